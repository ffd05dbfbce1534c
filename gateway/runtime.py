"""The running gateway: state dir, store, registry and their background tasks, started
and stopped as one unit. The HTTP apps are thin layers over it."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any

from federation.client import FederationClient
from federation.service import Federation, FederationSettings
from fedgw import __version__
from fedgw.clock import Clock, SystemClock, to_datetime
from fedgw.store import Store
from gateway.api.schemas import GatewayStatus
from gateway.events import EventBus
from gateway.identity import make_identity, start_identity
from gateway.registry import Registry
from gateway.settings import GatewaySettings
from gateway.state_dir import StateDir
from gateway.store.sqlite import SqliteStore
from gateway.workloads import WorkloadProbe
from spire_integration import FederatedIdentity

log = logging.getLogger(__name__)


class Gateway:
    """One gateway: ``async with Gateway(settings) as gw: ...``."""

    def __init__(
        self, settings: GatewaySettings, *, clock: Clock | None = None, store: Store | None = None
    ) -> None:
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        self.bus = EventBus(settings.event_queue_size)
        self._given_store = store
        self._store: Store | None = None
        self._state_dir: StateDir | None = None
        self._registry: Registry | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._identity: FederatedIdentity | None = None
        self._federation: Federation | None = None
        self._started_at = 0.0
        self._started_monotonic = 0.0

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            raise RuntimeError("gateway is not started")
        return self._registry

    @property
    def identity(self) -> FederatedIdentity:
        if self._identity is None:
            raise RuntimeError("gateway is not started")
        return self._identity

    @property
    def federation(self) -> Federation:
        """Tokens, peers, and mTLS calls to peer gateways."""
        if self._federation is None:
            raise RuntimeError("gateway is not started")
        return self._federation

    @property
    def store(self) -> Store:
        if self._store is None:
            raise RuntimeError("gateway is not started")
        return self._store

    async def start(self) -> None:
        s = self.settings
        try:
            self._state_dir = await asyncio.to_thread(StateDir.open, s.state_dir)
            self._store = self._given_store or await SqliteStore.open(
                self._state_dir.store_path, synchronous=s.store_synchronous
            )
            probe = WorkloadProbe(s.netns_dir, s.proc_dir)
            self._registry = Registry(
                self._store, s.registry, bus=self.bus, clock=self.clock, probe=probe
            )
            await self._registry.load()
            self._identity = make_identity(s)
            await start_identity(self._identity, s)
            self._federation = Federation(
                FederationSettings(
                    domain=s.domain,
                    url=s.public_url(s.listen),
                    bundle_url=s.public_url(s.bundle_listen),
                    bundle_refresh=s.bundle_refresh,
                    dns_server=s.dns_server,
                ),
                self._store,
                self._identity,
                FederationClient(self._identity),
                self.clock,
            )
            await self._federation.load()
        except BaseException:
            await self.stop()
            raise
        self._started_at = self.clock.now()
        self._started_monotonic = time.monotonic()
        self._spawn(self._registry.run(), "fedgw-registry")
        self._spawn(self.federation.run(), "fedgw-bundle-refresh")
        log.info("gateway for domain %s started (state dir %s)", s.domain, s.state_dir)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)

        def died(t: asyncio.Task[None]) -> None:
            if not t.cancelled() and t.exception() is not None:
                log.error("background task %s died", name, exc_info=t.exception())

        task.add_done_callback(died)
        self._tasks.append(task)

    async def stop(self) -> None:
        """Stop background tasks, end event streams, flush and close the store."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self.bus.close()
        if self._federation is not None:
            await self._federation.client.close()
            self._federation = None
        if self._identity is not None:
            await self._identity.stop()
            self._identity = None
        if self._store is not None and self._store is not self._given_store:
            await self._store.close()
        self._store = None
        if self._state_dir is not None:
            self._state_dir.close()
            self._state_dir = None
        self._registry = None

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def status(self) -> GatewayStatus:
        total, bound = self.registry.count_endpoints()
        return GatewayStatus(
            domain=self.settings.domain,
            version=__version__,
            pid=os.getpid(),
            started_at=to_datetime(self._started_at).isoformat(),
            uptime_seconds=round(time.monotonic() - self._started_monotonic, 3),
            socket=str(self.settings.socket),
            state_dir=str(Path(self.settings.state_dir)),
            store=self.store.description,
            services=len(self.registry.services()),
            endpoints=total,
            workload_bound_endpoints=bound,
            watchers=self.bus.watchers,
        )
