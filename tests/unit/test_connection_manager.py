"""The connection manager's use of its data plane: opened ahead of the first connection
once there may be one, and a tunnel made sure of once per change, not once per
connection of a burst. A recording stand-in takes the data plane's place."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from federation.models import WireGuardInfo
from fedgw.clock import ManualClock
from fedgw.errors import NotFound
from fedgw.models import ConnectionState, Workload
from gateway.connections import ConnectionManager
from gateway.events import EventBus
from gateway.store.memory import MemoryStore
from gateway.workloads import WorkloadProbe
from tests.unit.test_connection_table import record
from wireguard.dataplane import Dataplane, DesiredState, ReconcileReport
from wireguard.errors import DataplaneError
from wireguard.keys import PrivateKey
from wireguard.wires import PeerTunnel


class RecordingDataplane:
    def __init__(self, *, fail_open: bool = False, fail_detach: bool = False) -> None:
        self.opened = 0
        self.ensured: list[PeerTunnel] = []
        self.fail_open = fail_open
        self.fail_detach = fail_detach
        self.detached: list[str] = []
        self.reconciled: list[DesiredState] = []

    async def open(self) -> None:
        self.opened += 1
        if self.fail_open:
            raise DataplaneError("nft: command not found")

    async def ensure_peer(self, peer: PeerTunnel) -> None:
        await asyncio.sleep(0.01)  # long enough for the rest of a burst to arrive
        self.ensured.append(peer)

    async def peers(self, *, allowed_ips: bool = True) -> list[object]:
        return []  # the tick's look at the tunnels' counters: none

    async def detach(self, connection_id: str) -> bool:
        self.detached.append(connection_id)
        if self.fail_detach:
            raise DataplaneError("delete fgwcabc: Device or resource busy")
        return True

    async def reconcile(self, desired: DesiredState) -> ReconcileReport:
        self.reconciled.append(desired)
        return ReconcileReport()


class World:
    """A manager with no peers and no endpoints until a test gives it some."""

    def __init__(self, dataplane: RecordingDataplane) -> None:
        self.dataplane = dataplane
        self.made = 0
        self.peers: list[str] = []
        self.endpoints = (0, 0)

        async def make() -> Dataplane:
            self.made += 1
            return cast(Dataplane, dataplane)

        federation = SimpleNamespace(peers=SimpleNamespace(all=lambda: self.peers))
        registry = SimpleNamespace(count_endpoints=lambda: self.endpoints)
        self.manager = ConnectionManager(
            domain="cluster1",
            store=MemoryStore(),
            registry=cast(Any, registry),
            federation=cast(Any, federation),
            bus=EventBus(),
            clock=ManualClock(),
            probe=WorkloadProbe(Path("/nonexistent/netns"), Path("/nonexistent/proc")),
            dataplane=make,
            private_key=PrivateKey.generate(),
            advertise="198.18.0.1",
            wireguard_port=51820,
            behind_nat=False,
            keepalive=25,
            lease=60,
            handshake_timeout=180,
            exclude=[],
        )


def theirs(endpoint: str = "198.18.0.2:51820") -> WireGuardInfo:
    return WireGuardInfo(public_key=str(PrivateKey.generate().public_key()), endpoint=endpoint)


async def test_a_burst_of_connections_makes_sure_of_the_tunnel_once() -> None:
    world = World(RecordingDataplane())
    peer = theirs()
    await asyncio.gather(*(world.manager._connect_tunnel("cluster2", peer) for _ in range(16)))
    assert len(world.dataplane.ensured) == 1
    assert world.made == 1 and world.dataplane.opened == 1

    await world.manager._connect_tunnel("cluster2", peer)
    assert len(world.dataplane.ensured) == 1  # nothing changed

    moved = theirs("198.18.0.3:51820")
    await asyncio.gather(*(world.manager._connect_tunnel("cluster2", moved) for _ in range(4)))
    assert len(world.dataplane.ensured) == 2
    assert str(world.dataplane.ensured[-1].endpoint) == "198.18.0.3:51820"


async def test_the_data_plane_opens_ahead_once_a_connection_may_come() -> None:
    world = World(RecordingDataplane())
    await world.manager.tick()
    assert world.made == 0  # nothing to connect: the namespace is not touched

    world.peers = ["cluster2"]
    await world.manager.tick()
    assert world.dataplane.opened == 1
    await world.manager.tick()
    assert world.made == 1  # opened once

    local = World(RecordingDataplane())
    local.endpoints = (1, 0)  # an endpoint without a workload is never wired
    await local.manager.tick()
    assert local.made == 0
    local.endpoints = (1, 1)
    await local.manager.tick()
    assert local.dataplane.opened == 1


async def test_a_data_plane_that_cannot_open_is_left_to_the_requests(
    caplog: pytest.LogCaptureFixture,
) -> None:
    world = World(RecordingDataplane(fail_open=True))
    world.peers = ["cluster2"]
    await world.manager.tick()
    await world.manager.tick()
    assert world.dataplane.opened == 1  # tried once in the background, not every tick
    assert "cannot open the data plane yet" in caplog.text
    assert "nft: command not found" in caplog.text
    with pytest.raises(DataplaneError, match="nft: command not found"):
        await world.manager._connect_tunnel("cluster2", theirs())
    assert world.dataplane.opened == 2


async def test_a_close_the_kernel_partly_refuses_completes_and_the_next_tick_repairs() -> None:
    """The wires leave the data plane's model before any kernel step: a close whose
    kernel step fails is still a close (both ends, events, addresses), and what the
    kernel kept is for the repair, which the next tick makes without the connection."""
    dataplane = RecordingDataplane(fail_detach=True)
    world = World(dataplane)
    manager = world.manager
    await manager._ensure_dataplane()
    conn = record(
        "conn-1", "local", client=Workload(netns="c1"), interface="nsm0",
        server=Workload(netns="nse1"), endpoint="e1", endpoint_interface="nsm0",
    )  # fmt: skip
    manager._connections.put(conn)
    closed = await manager.close("conn-1")
    assert closed.connection.state is ConnectionState.CLOSED
    assert dataplane.detached == ["conn-1"]
    with pytest.raises(NotFound):
        manager.get("conn-1")
    assert dataplane.reconciled == []
    await manager.tick()
    [desired] = dataplane.reconciled
    assert desired.wires == []
    await manager.tick()
    assert len(dataplane.reconciled) == 1  # once
