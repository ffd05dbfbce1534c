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
from typing import Any, TypeVar

from federation.client import FederationClient
from federation.service import Federation, FederationSettings
from fedgw import __version__
from fedgw.clock import Clock, SystemClock, to_datetime
from fedgw.store import Store
from gateway.api.schemas import DataplaneInfo, GatewayStatus, TunnelInfo
from gateway.connections import ConnectionManager, load_or_create_key
from gateway.events import EventBus
from gateway.identity import make_identity, start_identity
from gateway.registry import Registry
from gateway.settings import GatewaySettings
from gateway.state_dir import StateDir
from gateway.store.sqlite import SqliteStore
from gateway.workloads import WorkloadProbe
from spire_integration import FederatedIdentity
from wireguard.dataplane import Dataplane, DataplaneSettings
from wireguard.drivers import DriverSelection, select_driver
from wireguard.drivers.userspace import UserspaceSettings

log = logging.getLogger(__name__)


T = TypeVar("T")


def _started(part: T | None) -> T:
    if part is None:
        raise RuntimeError("gateway is not started")
    return part


_DRIVERS: dict[str, DriverSelection] = {
    "auto": "auto",
    "kernel": "kernel",
    "userspace": "userspace",
}


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
        self._connections: ConnectionManager | None = None
        self._started_at = 0.0
        self._started_monotonic = 0.0

    @property
    def registry(self) -> Registry:
        return _started(self._registry)

    @property
    def identity(self) -> FederatedIdentity:
        return _started(self._identity)

    @property
    def federation(self) -> Federation:
        """Tokens, peers, and mTLS calls to peer gateways."""
        return _started(self._federation)

    @property
    def connections(self) -> ConnectionManager:
        return _started(self._connections)

    async def _make_connections(self, probe: WorkloadProbe) -> ConnectionManager:
        s = self.settings
        assert self._store is not None and self._registry is not None
        assert self._federation is not None and self._state_dir is not None
        key = None
        make_dataplane = None
        if s.dataplane != "off":
            kind = _DRIVERS[s.dataplane]
            key = await load_or_create_key(self._state_dir.path / "wireguard.key")
            log_dir = self._state_dir.path / "wireguard"

            async def make_dataplane() -> Dataplane:
                await asyncio.to_thread(log_dir.mkdir, mode=0o700, exist_ok=True)
                driver = await select_driver(
                    kind,
                    userspace=UserspaceSettings(log_dir=log_dir),
                    on_exit=lambda event: manager.daemon_exited(event),
                )
                log.info("data plane: %s (%s)", driver.kind, driver.name)
                settings = DataplaneSettings(
                    prefix=s.interface_prefix,
                    mss_clamping=s.mss_clamping,
                    ipv6_as_needed=s.ipv6_as_needed,
                    mark_mask=s.mark_mask,
                    link_group=s.link_group,
                )
                return Dataplane(settings, driver)

        advertise = s.advertise
        if advertise is None and s.listen is not None and s.listen[0] not in {"0.0.0.0", "::"}:
            advertise = s.listen[0]
        manager = ConnectionManager(
            domain=s.domain,
            store=self._store,
            registry=self._registry,
            federation=self._federation,
            bus=self.bus,
            clock=self.clock,
            probe=probe,
            dataplane=make_dataplane,
            private_key=key,
            advertise=advertise,
            wireguard_port=s.wireguard_port,
            behind_nat=s.behind_nat,
            keepalive=s.keepalive,
            lease=s.connection_lease,
            handshake_timeout=s.handshake_timeout,
            exclude=s.exclude_prefixes,
        )
        await manager.load()
        return manager

    @property
    def store(self) -> Store:
        return _started(self._store)

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
            self._connections = await self._make_connections(probe)
            self._federation.peer_removed.append(self._connections.drop_peer)
        except BaseException:
            await self.stop()
            raise
        self._started_at = self.clock.now()
        self._started_monotonic = time.monotonic()
        self._spawn(self._registry.run(), "fedgw-registry")
        self._spawn(self.federation.run(), "fedgw-bundle-refresh")
        self._spawn(self.connections.supervise(), "fedgw-connections")
        log.info("gateway for domain %s started (state dir %s)", s.domain, s.state_dir)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)

        def died(t: asyncio.Task[None]) -> None:
            if not t.cancelled() and t.exception() is not None:
                log.error("background task %s died", name, exc_info=t.exception())

        task.add_done_callback(died)
        self._tasks.append(task)

    async def stop_background(self) -> None:
        """Cancel the background tasks (lease expiry, supervision, bundle refresh)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def stop(self) -> None:
        """Stop background tasks, end event streams, flush and close the store."""
        await self.stop_background()
        self.bus.close()
        if self._connections is not None:
            await self._connections.shutdown()
            self._connections = None
        if self._federation is not None:
            await self._federation.offers.close()
            await self._federation.closes.close()
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

    async def status(self) -> GatewayStatus:
        total, bound = self.registry.count_endpoints()
        dataplane = await self.connections.dataplane_status()
        info = None
        if dataplane is not None:
            info = DataplaneInfo(
                driver=f"{dataplane.driver} ({dataplane.driver_name})",
                tunnels=[
                    TunnelInfo(
                        domain=p.domain,
                        interface=p.interface,
                        public_key=p.public_key,
                        endpoint=p.endpoint,
                        last_handshake=p.last_handshake,
                        rx_bytes=p.rx_bytes,
                        tx_bytes=p.tx_bytes,
                        allowed_ips=p.allowed_ips,
                        error=p.error,
                    )
                    for p in dataplane.peers
                ],
                wires=len(dataplane.wires),
            )
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
            peers=len(self.federation.peers.all()),
            connections=self.connections.counts().model_dump(),
            dataplane=info,
            dataplane_mode=self.settings.dataplane,
        )
