"""The registry of network services and endpoints of this domain, with leases.

Everything is held in memory with indexes (by service, by label) so that finding
endpoints does not scan; every change is written through to the store before it is
acknowledged and before watchers hear of it. Leases are wall-clock instants kept in a
heap: the expiry loop sleeps until the earliest one, so a lapsed endpoint disappears
within a second of its expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

from pydantic import BaseModel, Field

from fedgw.clock import Clock, to_datetime
from fedgw.durations import Duration, format_duration
from fedgw.errors import InvalidInput
from fedgw.models import Endpoint, EndpointRegistration, NetworkService, NetworkServiceRegistration
from fedgw.store import Collection, Store
from gateway.errors import EndpointNotFound, ServiceInUse, ServiceNotFound
from gateway.events import Event, EventBus, EventType, ResourceKind
from gateway.workloads import WorkloadProbe

log = logging.getLogger(__name__)

# (type, kind, object, reason) of the event a committed change announces
_EventSpec = tuple[EventType, ResourceKind, NetworkService | Endpoint, str | None]


class RegistrySettings(BaseModel):
    """Leases and liveness of registered endpoints."""

    default_ttl: Duration = Field(60.0, description="lease of an endpoint that gives no ttl")
    min_ttl: Duration = Field(1.0, description="shortest lease an endpoint may ask for")
    max_ttl: Duration = Field(86400.0, description="longest lease an endpoint may ask for")
    workload_check_interval: Duration = Field(
        2.0,
        gt=0,
        description="how often endpoints bound to a netns or pid are checked; while the "
        "workload exists the gateway renews their lease",
    )


class Registry:
    SERVICES = "services"
    ENDPOINTS = "endpoints"

    def __init__(
        self,
        store: Store,
        settings: RegistrySettings,
        *,
        bus: EventBus,
        clock: Clock,
        probe: WorkloadProbe,
    ) -> None:
        self.settings = settings
        self._services_store = Collection(store, self.SERVICES, NetworkService)
        self._endpoints_store = Collection(store, self.ENDPOINTS, Endpoint)
        self._bus = bus
        self._clock = clock
        self._probe = probe
        self._services: dict[str, NetworkService] = {}
        self._endpoints: dict[str, Endpoint] = {}
        self._expiry: dict[str, float] = {}
        self._by_service: defaultdict[str, set[str]] = defaultdict(set)
        self._by_label: defaultdict[tuple[str, str], set[str]] = defaultdict(set)
        self._heap: list[tuple[float, str]] = []
        self._wake = asyncio.Event()

    # --- loading -----------------------------------------------------------------------

    async def load(self) -> None:
        """Read the store; drop endpoints whose lease ran out while the gateway was down,
        unless their workload is still there (the gateway could not renew meanwhile)."""
        for service in await self._services_store.all():
            self._services[service.name] = service
        now = self._clock.now()
        stale: list[Endpoint] = []
        for ep in await self._endpoints_store.all():
            self._index_add(ep, ep.expires_at.timestamp())
            if ep.expires_at.timestamp() <= now:
                stale.append(ep)
        alive = await self._alive([ep for ep in stale if ep.workload is not None])
        for ep in stale:
            if alive.get(ep.name):
                await self._renew(ep.name, ep.ttl)
            else:
                await self._remove_endpoint(ep.name, "lease expired while the gateway was down")
        log.info(
            "registry loaded: %d services, %d endpoints", len(self._services), len(self._endpoints)
        )

    # --- network services ------------------------------------------------------------

    def services(self) -> list[NetworkService]:
        return [self._services[n] for n in sorted(self._services)]

    def service(self, name: str) -> NetworkService:
        try:
            return self._services[name]
        except KeyError:
            raise ServiceNotFound(f"network service {name!r} is not registered") from None

    async def register_service(
        self, reg: NetworkServiceRegistration
    ) -> tuple[NetworkService, bool]:
        """Register or update a network service; the bool says whether it is new."""
        old = self._services.get(reg.name)
        if old is not None and not _changed(old, reg):
            return old, False
        now = to_datetime(self._clock.now())
        service = NetworkService(
            **reg.model_dump(), created_at=old.created_at if old else now, updated_at=now
        )
        self._services[reg.name] = service
        await self._commit(
            self._services_store.put(reg.name, service),
            undo=lambda: self._restore(self._services, reg.name, service, old),
            event=(EventType.ADDED if old is None else EventType.UPDATED, "service", service, None),
        )
        return service, old is None

    async def delete_service(self, name: str) -> NetworkService:
        service = self.service(name)
        users = self._by_service.get(name)
        if users:
            shown = ", ".join(sorted(users)[:5]) + (", ..." if len(users) > 5 else "")
            raise ServiceInUse(
                f"network service {name!r} still has {len(users)} endpoint(s) ({shown}); "
                "delete them first"
            )
        del self._services[name]
        await self._commit(
            self._services_store.delete(name),
            undo=lambda: self._restore(self._services, name, None, service),
            event=(EventType.DELETED, "service", service, "deleted by request"),
        )
        return service

    # --- endpoints ---------------------------------------------------------------------

    def endpoint(self, name: str) -> Endpoint:
        try:
            return self._endpoints[name]
        except KeyError:
            raise EndpointNotFound(f"endpoint {name!r} is not registered") from None

    def has_endpoint(self, name: str) -> bool:
        return name in self._endpoints

    def endpoints(
        self, service: str | None = None, selector: dict[str, str] | None = None
    ) -> list[Endpoint]:
        """Endpoints offering ``service`` whose labels include all of ``selector``."""
        sets: list[set[str]] = []
        if service is not None:
            sets.append(self._by_service.get(service, set()))
        for key, value in (selector or {}).items():
            sets.append(self._by_label.get((key, value), set()))
        if not sets:
            names: Iterable[str] = self._endpoints
        else:
            sets.sort(key=len)
            names = sets[0].intersection(*sets[1:])
        return [self._endpoints[n] for n in sorted(names)]

    def count_endpoints(self) -> tuple[int, int]:
        """(all endpoints, those kept alive through their workload)."""
        bound = sum(1 for ep in self._endpoints.values() if ep.workload is not None)
        return len(self._endpoints), bound

    def _ttl(self, requested: float | None) -> float:
        s = self.settings
        ttl = s.default_ttl if requested is None else requested
        if not s.min_ttl <= ttl <= s.max_ttl:
            raise InvalidInput(
                f"ttl {format_duration(ttl)} is out of range: "
                f"from {format_duration(s.min_ttl)} to {format_duration(s.max_ttl)}"
            )
        return ttl

    async def register_endpoint(self, reg: EndpointRegistration) -> tuple[Endpoint, bool]:
        """Register or update an endpoint; the bool says whether it is new.

        A network service it names that is not registered yet is registered with the
        default policy (not exported), as an endpoint registering itself would expect.
        """
        ttl = self._ttl(reg.ttl)
        workload = reg.workload
        if workload is not None:
            workload = await asyncio.to_thread(self._probe.identify, workload)
        for service in reg.services:
            if service not in self._services:
                await self.register_service(NetworkServiceRegistration(name=service))
        old = self._endpoints.get(reg.name)
        now = self._clock.now()
        expiry = now + ttl
        # The registration is validated already; constructing skips a second pass.
        fields = {name: getattr(reg, name) for name in EndpointRegistration.model_fields}
        fields.update(
            workload=workload,
            ttl=ttl,
            registered_at=old.registered_at if old else to_datetime(now),
            expires_at=to_datetime(expiry),
        )
        endpoint = Endpoint.model_construct(**fields)
        event: _EventSpec | None = None
        if old is None:
            event = (EventType.ADDED, "endpoint", endpoint, None)
        elif _changed(old, endpoint, ignore={"expires_at", "registered_at"}):
            event = (EventType.UPDATED, "endpoint", endpoint, None)
        self._index_remove(old)
        self._index_add(endpoint, expiry)
        await self._commit(
            self._endpoints_store.put(reg.name, endpoint),
            undo=lambda: self._undo_endpoint(endpoint, old),
            event=event,
        )
        return endpoint, old is None

    async def refresh_endpoint(self, name: str, ttl: float | None = None) -> Endpoint:
        """Extend an endpoint's lease by ``ttl`` (its own lease length if not given)."""
        current = self.endpoint(name)
        return await self._renew(name, self._ttl(current.ttl if ttl is None else ttl))

    async def delete_endpoint(self, name: str, reason: str = "deleted by request") -> Endpoint:
        self.endpoint(name)
        return await self._remove_endpoint(name, reason)

    async def _renew(self, name: str, ttl: float) -> Endpoint:
        old = self._endpoints[name]
        expiry = self._clock.now() + ttl
        renewed = old.model_copy(update={"ttl": ttl, "expires_at": to_datetime(expiry)})
        self._index_remove(old)
        self._index_add(renewed, expiry)
        await self._commit(
            self._endpoints_store.put(name, renewed),
            undo=lambda: self._undo_endpoint(renewed, old),
            event=None,  # a renewed lease is not a change watchers need to hear of
        )
        return renewed

    async def _remove_endpoint(self, name: str, reason: str) -> Endpoint:
        endpoint = self._endpoints[name]
        self._index_remove(endpoint)
        await self._commit(
            self._endpoints_store.delete(name),
            undo=lambda: self._undo_endpoint(None, endpoint),
            event=(EventType.DELETED, "endpoint", endpoint, reason),
        )
        log.info("endpoint %s removed: %s", name, reason)
        return endpoint

    # --- leases --------------------------------------------------------------------------

    async def expire_due(self) -> list[Endpoint]:
        """Remove endpoints whose lease has run out; return them."""
        now = self._clock.now()
        due: list[str] = []
        while self._heap and self._heap[0][0] <= now:
            at, name = heapq.heappop(self._heap)
            if self._expiry.get(name) == at:  # else a stale heap entry (renewed or gone)
                due.append(name)
        if not due:
            return []
        # A workload-bound endpoint whose renewal the check loop has not reached yet is
        # renewed here instead of expiring while its workload is alive.
        bound = [self._endpoints[n] for n in due if self._endpoints[n].workload is not None]
        alive = await self._alive(bound)
        renewals: list[Coroutine[Any, Any, Endpoint]] = []
        removals: list[Coroutine[Any, Any, Endpoint]] = []
        for name in due:
            if name not in self._endpoints or self._expiry.get(name, now + 1) > now:
                continue  # changed while we were checking
            if alive.get(name):
                renewals.append(self._renew(name, self._endpoints[name].ttl))
            else:
                removals.append(self._remove_endpoint(name, "lease expired"))
        # Together, so the store commits them as one group.
        results = await asyncio.gather(*removals, *renewals)
        return list(results[: len(removals)])

    async def check_workloads(self) -> None:
        """Renew leases of endpoints whose workload lives; remove those whose is gone."""
        bound = [ep for ep in self._endpoints.values() if ep.workload is not None]
        alive = await self._alive(bound)
        now = self._clock.now()
        changes: list[Coroutine[Any, Any, Endpoint]] = []
        for ep in bound:
            if self._endpoints.get(ep.name) is not ep:
                continue  # re-registered or removed meanwhile
            if not alive[ep.name]:
                reason = f"workload gone: {ep.workload} no longer exists"
                changes.append(self._remove_endpoint(ep.name, reason))
            elif self._expiry[ep.name] - now < ep.ttl / 2:
                changes.append(self._renew(ep.name, ep.ttl))
        await asyncio.gather(*changes)

    async def _alive(self, endpoints: list[Endpoint]) -> dict[str, bool]:
        if not endpoints:
            return {}

        def probe() -> dict[str, bool]:
            return {ep.name: self._probe.alive(ep.workload) for ep in endpoints if ep.workload}

        return await asyncio.to_thread(probe)

    async def run(self) -> None:
        """Expire leases and watch workloads until cancelled."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._expiry_loop(), name="fedgw-lease-expiry")
            tasks.create_task(self._workload_loop(), name="fedgw-workload-check")

    async def _expiry_loop(self) -> None:
        while True:
            try:
                await self.expire_due()
            except Exception:
                log.exception("lease expiry failed; retrying")
            delay = self._heap[0][0] - self._clock.now() if self._heap else 1.0
            # Re-check at least every second: the wall clock may jump.
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(max(delay, 0.0), 1.0))

    async def _workload_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.workload_check_interval)
            try:
                await self.check_workloads()
            except Exception:
                log.exception("workload check failed; retrying")

    # --- internals -----------------------------------------------------------------------

    def _index_add(self, endpoint: Endpoint, expiry: float) -> None:
        name = endpoint.name
        self._endpoints[name] = endpoint
        self._expiry[name] = expiry
        for service in endpoint.services:
            self._by_service[service].add(name)
        for label in endpoint.labels.items():
            self._by_label[label].add(name)
        wakes = not self._heap or expiry < self._heap[0][0]
        heapq.heappush(self._heap, (expiry, name))
        if wakes:
            self._wake.set()

    def _index_remove(self, endpoint: Endpoint | None) -> None:
        if endpoint is None:
            return
        name = endpoint.name
        self._endpoints.pop(name, None)
        self._expiry.pop(name, None)
        for service in endpoint.services:
            _discard(self._by_service, service, name)
        for label in endpoint.labels.items():
            _discard(self._by_label, label, name)

    def _undo_endpoint(self, written: Endpoint | None, previous: Endpoint | None) -> None:
        name = (written or previous).name  # type: ignore[union-attr]
        if self._endpoints.get(name) is not written:
            return  # something newer happened meanwhile: leave it
        self._index_remove(written)
        if previous is not None:
            self._index_add(previous, previous.expires_at.timestamp())

    @staticmethod
    def _restore(
        table: dict[str, NetworkService],
        name: str,
        written: NetworkService | None,
        previous: NetworkService | None,
    ) -> None:
        if table.get(name) is not written:
            return
        if previous is None:
            table.pop(name, None)
        else:
            table[name] = previous

    async def _commit(
        self, write: Awaitable[object], undo: Callable[[], None], event: _EventSpec | None
    ) -> None:
        """Make durable a change that memory already shows, then tell watchers; take the
        change back from memory if the store refuses it.

        The outcome is handled in a done-callback so that a caller cancelled while it
        waits (a client that went away) neither undoes a write that will still commit
        nor leaves watchers without its event.
        """
        task = asyncio.ensure_future(write)

        def settle(done: asyncio.Future[object]) -> None:
            if done.cancelled() or done.exception() is not None:
                undo()
            elif event is not None:
                self._publish(*event)

        task.add_done_callback(settle)
        await asyncio.shield(task)

    def _publish(
        self,
        type_: EventType,
        kind: ResourceKind,
        obj: NetworkService | Endpoint,
        reason: str | None,
    ) -> None:
        self._bus.publish(
            Event(
                seq=self._bus.next_seq(),
                type=type_,
                kind=kind,
                name=obj.name,
                object=obj,
                reason=reason,
                time=to_datetime(self._clock.now()),
            )
        )

    def snapshot(self) -> list[Event]:
        """Events that describe the present state (``added`` for everything)."""
        now = to_datetime(self._clock.now())
        items: list[tuple[ResourceKind, NetworkService | Endpoint]] = [
            ("service", s) for s in self.services()
        ]
        items += [("endpoint", e) for e in self.endpoints()]
        return [
            Event(seq=0, type=EventType.ADDED, kind=kind, name=obj.name, object=obj, time=now)
            for kind, obj in items
        ]


def _discard(index: defaultdict[Any, set[str]], key: Any, name: str) -> None:
    names = index.get(key)
    if names is not None:
        names.discard(name)
        if not names:
            del index[key]


def _changed(old: BaseModel, new: BaseModel, ignore: set[str] | None = None) -> bool:
    fields = set(type(new).model_fields) - (ignore or set())
    return any(getattr(old, f, None) != getattr(new, f, None) for f in fields)
