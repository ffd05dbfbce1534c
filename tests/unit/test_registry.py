"""The registry: find by service and labels, leases on a controllable clock, workloads
that keep endpoints alive, events, and reloading from the store."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fedgw.clock import ManualClock
from fedgw.errors import InvalidInput
from fedgw.models import EndpointRegistration, NetworkServiceRegistration, validated
from fedgw.store import Store
from gateway.errors import EndpointNotFound, ServiceInUse, ServiceNotFound, WorkloadNotFound
from gateway.events import Event, EventBus, EventType
from gateway.registry import Registry, RegistrySettings
from gateway.store.sqlite import SqliteStore
from gateway.workloads import WorkloadProbe


@dataclass
class World:
    registry: Registry
    clock: ManualClock
    bus: EventBus
    store: Store
    netns_dir: Path
    proc_dir: Path
    events: list[Event]

    def make_registry(self) -> Registry:
        """A fresh registry over the same store, as after a gateway restart."""
        return Registry(
            self.store,
            self.registry.settings,
            bus=self.bus,
            clock=self.clock,
            probe=WorkloadProbe(self.netns_dir, self.proc_dir),
        )

    def drain(self) -> list[tuple[str, str, str, str | None]]:
        out: list[tuple[str, str, str, str | None]] = [
            (e.type.value, e.kind, e.name, e.reason) for e in self.events
        ]
        self.events.clear()
        return out


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    netns_dir, proc_dir = tmp_path / "netns", tmp_path / "proc"
    netns_dir.mkdir()
    proc_dir.mkdir()
    clock = ManualClock()
    bus = EventBus()
    store = await SqliteStore.open(tmp_path / "state.db")
    registry = Registry(
        store,
        RegistrySettings(default_ttl=60, workload_check_interval=2),
        bus=bus,
        clock=clock,
        probe=WorkloadProbe(netns_dir, proc_dir),
    )
    events: list[Event] = []
    sub = bus.subscribe()

    async def collect() -> None:
        async for event in sub:
            events.append(event)

    collector = asyncio.create_task(collect())
    try:
        yield World(registry, clock, bus, store, netns_dir, proc_dir, events)
    finally:
        sub.close()
        await collector
        await store.close()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def ep(name: str, *services: str, **over: Any) -> EndpointRegistration:
    return validated(EndpointRegistration, {"name": name, "services": list(services), **over})


async def test_find_by_service_and_labels(world: World) -> None:
    r = world.registry
    await r.register_endpoint(ep("a1", "vpn", labels={"zone": "a", "tier": "gold"}))
    await r.register_endpoint(ep("a2", "vpn", labels={"zone": "a", "tier": "silver"}))
    await r.register_endpoint(ep("b1", "vpn", "dns", labels={"zone": "b", "tier": "gold"}))
    await r.register_endpoint(ep("c1", "dns", labels={"zone": "a"}))

    def names(service: str | None, **selector: str) -> list[str]:
        return [e.name for e in r.endpoints(service, selector)]

    assert names("vpn") == ["a1", "a2", "b1"]
    assert names("vpn", zone="a") == ["a1", "a2"]
    assert names("vpn", zone="a", tier="gold") == ["a1"]
    assert names("dns", zone="a") == ["c1"]
    assert names("vpn", zone="c") == []
    assert names("nope") == []
    assert names(None, tier="gold") == ["a1", "b1"]
    assert names(None) == ["a1", "a2", "b1", "c1"]

    # Re-registering with other labels moves it in the index.
    await r.register_endpoint(ep("a1", "dns", labels={"zone": "b"}))
    assert names("vpn", zone="a") == ["a2"]
    assert names("dns", zone="b") == ["a1", "b1"]


async def test_services_auto_created_and_guarded(world: World) -> None:
    r = world.registry
    await r.register_endpoint(ep("e1", "vpn"))
    assert [s.name for s in r.services()] == ["vpn"]
    assert r.service("vpn").export == []  # not exported unless said so
    with pytest.raises(ServiceInUse, match="still has 1 endpoint"):
        await r.delete_service("vpn")
    await r.delete_endpoint("e1")
    await r.delete_service("vpn")
    with pytest.raises(ServiceNotFound):
        r.service("vpn")
    with pytest.raises(EndpointNotFound):
        await r.delete_endpoint("e1")


async def test_service_update_events(world: World) -> None:
    r = world.registry
    _, created = await r.register_service(NetworkServiceRegistration(name="vpn"))
    assert created
    _, created = await r.register_service(NetworkServiceRegistration(name="vpn"))
    assert not created
    svc, _ = await r.register_service(NetworkServiceRegistration(name="vpn", export=["cluster2"]))
    assert svc.exported_to("cluster2")
    assert not svc.exported_to("cluster3")
    await settle()
    assert world.drain() == [
        ("added", "service", "vpn", None),
        ("updated", "service", "vpn", None),
    ]


async def test_lease_expiry_and_refresh(world: World) -> None:
    r = world.registry
    await r.register_endpoint(ep("short", "vpn", ttl=10))
    await r.register_endpoint(ep("long", "vpn", ttl=100))
    world.clock.advance(9)
    assert await r.expire_due() == []
    await r.refresh_endpoint("short")  # now expires at t=19
    world.clock.advance(9.5)
    assert await r.expire_due() == []
    world.clock.advance(0.5)
    assert [e.name for e in await r.expire_due()] == ["short"]
    with pytest.raises(EndpointNotFound):
        await r.refresh_endpoint("short")
    await settle()
    assert ("deleted", "endpoint", "short", "lease expired") in world.drain()
    assert [e.name for e in r.endpoints()] == ["long"]


async def test_ttl_bounds(world: World) -> None:
    with pytest.raises(InvalidInput, match="ttl 0s is out of range"):
        await world.registry.register_endpoint(ep("e", "vpn", ttl=0))
    with pytest.raises(InvalidInput, match="out of range"):
        await world.registry.register_endpoint(ep("e", "vpn", ttl="2d"))
    await world.registry.register_endpoint(ep("e", "vpn"))
    with pytest.raises(InvalidInput, match="ttl 100ms is out of range"):
        await world.registry.refresh_endpoint("e", 0.1)


async def test_expiry_loop_removes_within_a_second(tmp_path: Path) -> None:
    """With the real clock: the expiry loop deletes an endpoint < 1 s after expiry."""
    from fedgw.clock import SystemClock
    from gateway.store.memory import MemoryStore

    bus = EventBus()
    registry = Registry(
        MemoryStore(), RegistrySettings(), bus=bus, clock=SystemClock(), probe=WorkloadProbe()
    )
    runner = asyncio.create_task(registry.run())
    try:
        with bus.subscribe() as sub:
            endpoint, _ = await registry.register_endpoint(ep("e", "vpn", ttl=1))
            expiry = endpoint.expires_at.timestamp()
            async with asyncio.timeout(5):
                async for event in sub:
                    if event.type is EventType.DELETED:
                        break
            lateness = event.time.timestamp() - expiry
            assert 0 <= lateness < 1.0, lateness
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner


async def test_netns_keeps_lease_alive(world: World) -> None:
    r = world.registry
    (world.netns_dir / "nse-ns").touch()
    with pytest.raises(WorkloadNotFound, match="'missing' does not exist"):
        await r.register_endpoint(ep("e", "vpn", workload={"netns": "missing"}))
    await r.register_endpoint(ep("e", "vpn", ttl=10, workload={"netns": "nse-ns"}))
    for _ in range(10):  # 50 s: far past the ttl, renewed by the workload checks
        world.clock.advance(5)
        await r.check_workloads()
        assert await r.expire_due() == []
    assert r.endpoint("e").expires_at.timestamp() > world.clock.now()
    (world.netns_dir / "nse-ns").unlink()
    await r.check_workloads()
    await settle()
    assert world.drain()[-1] == (
        "deleted",
        "endpoint",
        "e",
        "workload gone: netns nse-ns no longer exists",
    )


async def test_expiry_checks_workload_before_removing(world: World) -> None:
    """Lease runs out between two workload checks: still alive, so renewed, not removed."""
    (world.netns_dir / "ns1").touch()
    await world.registry.register_endpoint(ep("e", "vpn", ttl=1, workload={"netns": "ns1"}))
    world.clock.advance(1.5)
    assert await world.registry.expire_due() == []
    assert world.registry.endpoint("e")


def fake_process(proc_dir: Path, pid: int, start: int) -> None:
    d = proc_dir / str(pid)
    d.mkdir(exist_ok=True)
    fields = ["S", "1"] + ["0"] * 17 + [str(start)] + ["0"] * 30
    (d / "stat").write_text(f"{pid} (my (odd) comm) " + " ".join(fields) + "\n")


async def test_pid_workload_and_pid_reuse(world: World) -> None:
    r = world.registry
    fake_process(world.proc_dir, 4242, start=1000)
    with pytest.raises(WorkloadNotFound, match="no process with pid 4243"):
        await r.register_endpoint(ep("e", "vpn", workload={"pid": 4243}))
    endpoint, _ = await r.register_endpoint(ep("e", "vpn", workload={"pid": 4242}))
    assert endpoint.workload is not None
    assert endpoint.workload.pid_start_ticks == 1000
    await r.check_workloads()
    assert r.endpoint("e")
    fake_process(world.proc_dir, 4242, start=2000)  # the pid now belongs to another process
    await r.check_workloads()
    with pytest.raises(EndpointNotFound):
        r.endpoint("e")


async def test_real_pid_of_this_process(world: World) -> None:
    registry = Registry(
        world.store, RegistrySettings(), bus=world.bus, clock=world.clock, probe=WorkloadProbe()
    )
    endpoint, _ = await registry.register_endpoint(ep("me", "vpn", workload={"pid": os.getpid()}))
    assert endpoint.workload is not None
    assert endpoint.workload.pid_start_ticks


async def test_restart_keeps_registered_drops_expired(world: World) -> None:
    r = world.registry
    await r.register_service(NetworkServiceRegistration(name="vpn", export=["cluster2"]))
    await r.register_endpoint(ep("keep", "vpn", ttl=600, labels={"zone": "a"}, pool="10.1.0.0/24"))
    await r.register_endpoint(ep("lapse", "vpn", ttl=5))
    (world.netns_dir / "ns").touch()
    await r.register_endpoint(ep("bound", "vpn", ttl=5, workload={"netns": "ns"}))

    world.clock.advance(30)  # the gateway was down for 30 s
    again = world.make_registry()
    await again.load()
    assert [e.name for e in again.endpoints("vpn", {"zone": "a"})] == ["keep"]
    assert {e.name for e in again.endpoints()} == {"keep", "bound"}
    assert again.endpoint("bound").expires_at.timestamp() > world.clock.now()
    assert again.service("vpn").export == ["cluster2"]
    assert str(again.endpoint("keep").pool) == "10.1.0.0/24"


async def test_failed_write_leaves_memory_unchanged(world: World) -> None:
    r = world.registry
    await r.register_endpoint(ep("e", "vpn", labels={"v": "1"}))
    await world.store.close()
    from fedgw.store import StoreUnavailable

    with pytest.raises(StoreUnavailable):
        await r.register_endpoint(ep("e", "vpn", labels={"v": "2"}))
    with pytest.raises(StoreUnavailable):
        await r.register_endpoint(ep("new", "vpn"))
    assert r.endpoint("e").labels == {"v": "1"}
    assert [e.name for e in r.endpoints("vpn", {"v": "1"})] == ["e"]
    assert [e.name for e in r.endpoints()] == ["e"]


async def test_cancelled_caller_still_commits_and_announces(world: World) -> None:
    r = world.registry
    await r.register_service(NetworkServiceRegistration(name="vpn"))
    world.drain()
    task = asyncio.create_task(r.register_endpoint(ep("e", "vpn")))
    await asyncio.sleep(0)  # queued in the store, not yet committed
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Announced once the store's thread has committed: no set time.
    announced: list[tuple[str, str, str, str | None]] = []
    async with asyncio.timeout(5):
        while ("added", "endpoint", "e", None) not in announced:
            await asyncio.sleep(0.01)
            announced += world.drain()
    assert r.endpoint("e")
    assert await world.store.get("endpoints", "e") is not None
