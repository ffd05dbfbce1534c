"""The connection manager's use of its data plane: opened, and each peer's tunnel
started, ahead of the first connection once there may be one; a tunnel made sure of once
per change, not once per connection of a burst; closes that complete when the kernel
refuses part of them, and closes asked for in a batch; a connection stored only once it is
up, and the addresses of one that never got there given back at the next start. A
recording stand-in takes the data plane's place."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from federation.models import ConnectionGrant, ConnectionOffer, WireGuardInfo
from fedgw.clock import ManualClock
from fedgw.errors import NotFound
from fedgw.models import ConnectionState, Workload
from gateway.connections import ConnectionManager, ConnectionRequest
from gateway.events import EventBus
from gateway.store.memory import MemoryStore
from gateway.workloads import WorkloadProbe
from tests.unit.test_connection_table import NOW, record
from wireguard.dataplane import Dataplane, DesiredState, ReconcileReport
from wireguard.errors import DataplaneError
from wireguard.keys import PrivateKey
from wireguard.wires import PeerTunnel


class RecordingDataplane:
    def __init__(
        self, *, fail_open: bool = False, fail_detach: bool = False, fail_ensure: bool = False
    ) -> None:
        self.opened = 0
        self.ensured: list[PeerTunnel] = []
        self.fail_open = fail_open
        self.fail_detach = fail_detach
        self.fail_ensure = fail_ensure
        self.detached: list[str] = []
        self.reconciled: list[DesiredState] = []
        self.attached: list[str] = []

    async def open(self) -> None:
        self.opened += 1
        if self.fail_open:
            raise DataplaneError("nft: command not found")

    async def ensure_peer(self, peer: PeerTunnel) -> None:
        await asyncio.sleep(0.01)  # long enough for the rest of a burst to arrive
        self.ensured.append(peer)
        if self.fail_ensure:
            raise DataplaneError("wireguard-go: executable file not found")

    async def peers(self, *, allowed_ips: bool = True) -> list[object]:
        return []  # the tick's look at the tunnels' counters: none

    async def attach_client(self, wire: Any) -> None:
        self.attached.append(wire.connection_id)

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

    def __init__(
        self,
        dataplane: RecordingDataplane,
        *,
        store: MemoryStore | None = None,
        netns_dir: Path = Path("/nonexistent/netns"),
    ) -> None:
        self.dataplane = dataplane
        self.store = store or MemoryStore()
        self.made = 0
        self.peers: list[str] = []
        self.endpoints = (0, 0)

        async def make() -> Dataplane:
            self.made += 1
            return cast(Dataplane, dataplane)

        def peer(domain: str) -> SimpleNamespace | None:
            return SimpleNamespace(domain=domain) if domain in self.peers else None

        self.federation = SimpleNamespace(
            peers=SimpleNamespace(all=lambda: [peer(d) for d in self.peers], get=peer)
        )
        registry = SimpleNamespace(count_endpoints=lambda: self.endpoints)
        self.manager = ConnectionManager(
            domain="cluster1",
            store=self.store,
            registry=cast(Any, registry),
            federation=cast(Any, self.federation),
            bus=EventBus(),
            clock=ManualClock(),
            probe=WorkloadProbe(netns_dir, Path("/nonexistent/proc")),
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


async def test_the_tunnel_to_a_peer_starts_before_its_first_connection() -> None:
    world = World(RecordingDataplane())
    world.peers = ["cluster2"]
    await world.manager.tick()
    [early] = world.dataplane.ensured
    # No key yet (it comes with the first connection), but the port is set aside.
    assert early.domain == "cluster2" and early.public_key is None
    assert early.listen_port == 51820
    assert world.manager._desired().peers == [early]  # reconciliation keeps it
    await world.manager.tick()
    assert len(world.dataplane.ensured) == 1  # once

    peer = theirs()
    await asyncio.gather(*(world.manager._connect_tunnel("cluster2", peer) for _ in range(4)))
    assert len(world.dataplane.ensured) == 2  # the first connection brings the key
    assert str(world.dataplane.ensured[-1].public_key) == peer.public_key
    assert world.dataplane.ensured[-1].listen_port == 51820
    await world.manager.tick()
    assert len(world.dataplane.ensured) == 2  # a tick does not take the key back

    world.peers.append("cluster3")
    await world.manager.tick()
    assert [p.domain for p in world.dataplane.ensured] == ["cluster2"] * 2 + ["cluster3"]
    assert world.dataplane.ensured[-1].listen_port == 51821


async def test_a_tunnel_that_cannot_start_early_is_left_to_the_first_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    world = World(RecordingDataplane(fail_ensure=True))
    world.peers = ["cluster2"]
    await world.manager.tick()
    await world.manager.tick()
    assert len(world.dataplane.ensured) == 1  # tried once, not every tick
    assert "cannot start the tunnel to cluster2 yet" in caplog.text
    with pytest.raises(DataplaneError, match="executable file not found"):
        await world.manager._connect_tunnel("cluster2", theirs())
    assert len(world.dataplane.ensured) == 2


async def test_a_batch_of_closes_closes_the_callers_connections_and_names_the_rest() -> None:
    world = World(RecordingDataplane())
    manager = world.manager
    await manager._ensure_dataplane()
    for cid in ("s1", "s2", "s3"):  # served to domain "b"
        manager._connections.put(
            record(cid, "server", server=Workload(netns="nse1"), endpoint="e1",
                   endpoint_interface=f"nsm{cid[1]}")
        )  # fmt: skip
    answer = await manager.serve_closes("b", ["s1", "s2", "s1", "gone"])
    assert (sorted(answer.closed), answer.unknown) == (["s1", "s2"], ["gone"])
    assert sorted(world.dataplane.detached) == ["s1", "s2"]
    # Another domain cannot close b's connection.
    answer = await manager.serve_closes("c", ["s3"])
    assert (answer.closed, answer.unknown) == ([], ["s3"])
    assert [r.connection.id for r in manager.all()] == ["s3"]


async def test_a_connection_is_stored_once_it_is_up_not_while_it_is_being_made(
    tmp_path: Path,
) -> None:
    (tmp_path / "c1").touch()  # the client's namespace, as the probe sees it
    world = World(RecordingDataplane(), netns_dir=tmp_path)
    offered: asyncio.Queue[ConnectionOffer] = asyncio.Queue()
    answer = asyncio.Event()

    async def offer(peer: str, o: ConnectionOffer) -> ConnectionGrant:
        await offered.put(o)
        await answer.wait()
        return ConnectionGrant(
            id=o.id, endpoint="vpn-gw-1", endpoint_address="172.16.1.2/31",
            client_address="172.16.1.3/31", routes=[], wireguard=theirs(),
            expires_at=NOW + timedelta(minutes=1),
        )  # fmt: skip

    async def resolve(peer: str) -> None:
        return None

    world.federation.offer = offer
    world.federation.resolver = SimpleNamespace(resolve=resolve)
    manager = world.manager
    events = manager._bus.subscribe()
    asked = ConnectionRequest.model_validate(
        {"service": "vpn@cluster2", "workload": {"netns": "c1"}}
    )
    task = asyncio.create_task(manager.request(asked))
    o = await offered.get()
    # Being made: listed, announced, its interface name taken, but not in the store.
    assert manager.get(o.id).connection.state is ConnectionState.REQUESTED
    assert (await anext(events)).name == o.id
    assert await world.store.scan(ConnectionManager.CONNECTIONS) == []

    answer.set()
    made = await task
    assert made.connection.state is ConnectionState.UP
    assert world.dataplane.attached == [o.id]
    [stored] = await world.store.scan(ConnectionManager.CONNECTIONS)
    assert (stored.key, '"state":"up"' in stored.value) == (o.id, True)


async def test_addresses_of_a_connection_never_stored_are_given_back_at_start() -> None:
    store = MemoryStore()
    first = World(RecordingDataplane(), store=store)
    kept = record("kept", "server", server=Workload(netns="nse1"), endpoint="e1",
                  endpoint_interface="nsm0")  # fmt: skip
    await first.manager._save(kept)
    pool = "172.16.1.0/24"
    kept_pair = await first.manager.ipam.allocate(pool, "kept")
    await first.manager.ipam.allocate(pool, "unfinished")  # stopped before it was up
    await first.manager.ipam.allocate("172.16.2.0/24", "unfinished")

    again = World(RecordingDataplane(), store=store)
    await again.manager.load()
    ipam = again.manager.ipam
    assert await ipam.owners() == {"kept"}
    assert await ipam.lookup("unfinished") == []
    assert await ipam.lookup("kept") == [kept_pair]
    assert len(await store.scan("ipam")) == 1
