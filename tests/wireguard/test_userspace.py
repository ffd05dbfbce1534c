"""wireguard-go for real, in two namespaces joined by a veth: pings through the tunnel, `wg show`
as a witness, sessions that survive changes to other peers, stops, crashes, adoption."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.wireguard.conftest import Lab, needs_wireguard_go
from wireguard.drivers import (
    Endpoint,
    InterfaceRef,
    InterfaceSpec,
    PeerSpec,
    ProcessExit,
    UserspaceDriver,
    UserspaceSettings,
    prefixes,
    select_driver,
)
from wireguard.drivers.uapi import SOCKET_DIR
from wireguard.drivers.userspace import _Daemon
from wireguard.errors import (
    CommandFailed,
    DriverUnavailable,
    InterfaceConflict,
    InterfaceDied,
    LinkNotFound,
)
from wireguard.keys import PrivateKey, PublicKey
from wireguard.netns import Rtnl, run

pytestmark = [needs_wireguard_go, pytest.mark.root]

UNDERLAY_A, UNDERLAY_B = "198.18.0.1", "198.18.0.2"
TUNNEL_A, TUNNEL_B = "100.64.0.0", "100.64.0.1"  # one /31 pair


@dataclass
class Side:
    netns: str
    spec: InterfaceSpec

    @property
    def ref(self) -> InterfaceRef:
        return self.spec.ref

    @property
    def public_key(self) -> PublicKey:
        return self.spec.private_key.public_key()


@dataclass
class Tunnel:
    driver: UserspaceDriver
    a: Side
    b: Side
    exits: list[ProcessExit] = field(default_factory=list)

    def peer_of_a(self) -> PeerSpec:
        """A's view of B."""
        return PeerSpec(
            self.b.public_key, Endpoint.parse(f"{UNDERLAY_B}:51820"), prefixes(f"{TUNNEL_B}/32")
        )

    async def ping(self, count: int = 3, interval: float = 0.2) -> tuple[int, int]:
        out = await run(
            *("ip", "netns", "exec", self.a.netns, "ping", "-n", "-q"),
            *("-c", str(count), "-i", str(interval), "-W", "1", TUNNEL_B),
            check=False,
        )
        found = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        assert found, out
        return int(found[1]), int(found[2])


@pytest.fixture
def settings(tmp_path: Path) -> UserspaceSettings:
    return UserspaceSettings(log_dir=tmp_path / "logs", stop_timeout=2.0)


@pytest.fixture
async def tunnel(lab: Lab, settings: UserspaceSettings) -> AsyncIterator[Tunnel]:
    exits: list[ProcessExit] = []
    driver = UserspaceDriver(settings, on_exit=exits.append)
    sides: list[Side] = []
    try:
        ns_a, ns_b = await lab.netns("a"), await lab.netns("b")
        async with Rtnl(ns_a) as rtnl:
            await rtnl.add_veth("under", "under", ns_b)
            await rtnl.add_address("under", f"{UNDERLAY_A}/24")
            await rtnl.set_link("under", up=True)
        async with Rtnl(ns_b) as rtnl:
            await rtnl.add_address("under", f"{UNDERLAY_B}/24")
            await rtnl.set_link("under", up=True)
        for ns, address in ((ns_a, TUNNEL_A), (ns_b, TUNNEL_B)):
            spec = InterfaceSpec(lab.ifname(), ns, PrivateKey.generate(), listen_port=51820)
            sides.append(Side(ns, spec))
            await driver.ensure_interface(spec)
            async with Rtnl(ns) as rtnl:
                await rtnl.add_address(spec.name, f"{address}/31")
        t = Tunnel(driver, sides[0], sides[1], exits)
        await driver.set_peer(t.a.ref, t.peer_of_a())
        await driver.set_peer(
            t.b.ref,
            PeerSpec(
                t.a.public_key, Endpoint.parse(f"{UNDERLAY_A}:51820"), prefixes(f"{TUNNEL_A}/32")
            ),
        )
        yield t
    finally:
        for side in sides:
            await driver.remove_interface(side.ref)
        await driver.close()


async def wg_dump(netns: str, name: str) -> list[list[str]]:
    """`wg show NAME dump` from Debian's wireguard-tools, run inside the namespace."""
    out = await run("ip", "netns", "exec", netns, "wg", "show", name, "dump")
    return [line.split("\t") for line in out.strip().splitlines()]


async def test_ping_goes_through_and_wg_show_agrees_with_state(tunnel: Tunnel) -> None:
    assert await tunnel.ping() == (3, 3)
    before = await tunnel.driver.state(tunnel.a.ref)
    dump = await wg_dump(tunnel.a.netns, tunnel.a.spec.name)
    after = await tunnel.driver.state(tunnel.a.ref)

    assert dump[0] == [
        tunnel.a.spec.private_key.secret_base64(),
        str(before.public_key),
        "51820",
        "off",  # fwmark
    ]
    assert len(dump) == 2
    assert len(before.peers) == 1
    peer = before.peers[0]
    pub, psk, endpoint, allowed, handshake, rx, tx, keepalive = dump[1]
    assert pub == str(peer.public_key) == str(tunnel.b.public_key)
    assert psk == "(none)"
    assert peer.preshared_key is None
    assert endpoint == str(peer.endpoint) == f"{UNDERLAY_B}:51820"
    assert allowed == ",".join(str(n) for n in peer.allowed_ips) == f"{TUNNEL_B}/32"
    assert keepalive == "off"
    assert peer.persistent_keepalive == 0
    assert peer.last_handshake is not None
    assert int(handshake) == int(peer.last_handshake.timestamp())
    after_peer = after.peers[0]
    assert peer.rx_bytes <= int(rx) <= after_peer.rx_bytes
    assert peer.rx_bytes > 0
    assert peer.tx_bytes <= int(tx) <= after_peer.tx_bytes
    assert peer.tx_bytes > 0
    # MTU and state of the TUN device come from the spec.
    async with Rtnl(tunnel.a.netns) as rtnl:
        link = await rtnl.link(tunnel.a.spec.name)
    assert link is not None
    assert link.up
    assert link.mtu == 1420
    assert link.kind == "tun"


async def test_changing_other_peers_and_prefixes_keeps_the_session(tunnel: Tunnel) -> None:
    driver, a, b = tunnel.driver, tunnel.a, tunnel.b
    assert await tunnel.ping(count=1) == (1, 1)
    state_a, state_b = await driver.state(a.ref), await driver.state(b.ref)
    handshake_a = state_a.peers[0].last_handshake
    handshake_b = state_b.peers[0].last_handshake
    assert handshake_a is not None
    assert handshake_b is not None

    pinging = asyncio.create_task(tunnel.ping(count=40, interval=0.05))
    other = PrivateKey.generate().public_key()
    steps = [
        driver.set_peer(
            a.ref,
            PeerSpec(other, Endpoint.parse("198.18.0.3:51820"), prefixes("10.77.0.0/24")),
        ),
        driver.add_allowed_ips(a.ref, b.public_key, prefixes("10.88.0.0/24", "fd88::/64")),
        driver.add_allowed_ips(a.ref, other, prefixes("10.78.0.0/24")),
        # Removal replaces B's list on A: the path that could reset a session.
        driver.remove_allowed_ips(a.ref, b.public_key, prefixes("10.88.0.0/24")),
        driver.remove_allowed_ips(a.ref, b.public_key, prefixes("fd88::/64")),
        driver.set_peer(a.ref, tunnel.peer_of_a()),  # unchanged: a no-op
        driver.remove_peer(a.ref, other),
    ]
    for step in steps:
        await step
        await asyncio.sleep(0.15)
    assert await pinging == (40, 40)  # not one packet lost

    state_a = await driver.state(a.ref)
    assert [p.public_key for p in state_a.peers] == [b.public_key]
    peer = state_a.peers[0]
    assert peer.allowed_ips == prefixes(f"{TUNNEL_B}/32")
    assert peer.last_handshake == handshake_a  # same session: no new handshake
    assert (await driver.state(b.ref)).peers[0].last_handshake == handshake_b


async def test_remove_interface_stops_the_daemon_and_removes_its_socket(tunnel: Tunnel) -> None:
    ref = tunnel.a.ref
    pid = tunnel.driver.pid(ref)
    assert pid is not None
    assert os.path.exists(f"/proc/{pid}")  # noqa: ASYNC240 - /proc does not block
    socket = SOCKET_DIR / f"{ref.name}.sock"
    assert socket.exists()
    assert await tunnel.driver.remove_interface(ref) is True
    assert not os.path.exists(f"/proc/{pid}")  # noqa: ASYNC240 - stopped and reaped
    assert not socket.exists()
    async with Rtnl(ref.netns) as rtnl:
        assert await rtnl.find(ref.name) is None
    with pytest.raises(LinkNotFound):
        await tunnel.driver.state(ref)
    assert tunnel.exits == []  # a requested stop is not a crash


async def test_a_crash_is_detected_and_ensure_starts_a_new_daemon(tunnel: Tunnel) -> None:
    driver, ref = tunnel.driver, tunnel.a.ref
    pid = driver.pid(ref)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        if tunnel.exits:
            break
        await asyncio.sleep(0.02)
    assert [(e.iface, e.pid, e.returncode) for e in tunnel.exits] == [(ref, pid, -9)]
    assert "SIGKILL" in tunnel.exits[0].describe()
    assert driver.exited(ref) == tunnel.exits[0]
    assert not (SOCKET_DIR / f"{ref.name}.sock").exists()  # the stale socket is gone
    with pytest.raises(InterfaceDied, match="SIGKILL") as exc:
        await driver.state(ref)
    assert exc.value.retryable

    state = await driver.ensure_interface(tunnel.a.spec)
    new_pid = driver.pid(ref)
    assert new_pid not in (None, pid)
    assert state.public_key == tunnel.a.public_key
    assert state.peers == ()
    await driver.set_peer(ref, tunnel.peer_of_a())  # ...the reconciler sets them again
    async with Rtnl(ref.netns) as rtnl:
        await rtnl.add_address(ref.name, f"{TUNNEL_A}/31")
    assert await tunnel.ping(count=2) == (2, 2)


async def test_a_restarted_gateway_adopts_the_running_daemon(
    tunnel: Tunnel, settings: UserspaceSettings
) -> None:
    assert await tunnel.ping(count=1) == (1, 1)
    ref = tunnel.a.ref
    pid = tunnel.driver.pid(ref)
    before = await tunnel.driver.state(ref)
    await tunnel.driver.close()  # the gateway goes away; its daemons stay

    exits: list[ProcessExit] = []
    fresh = UserspaceDriver(settings, on_exit=exits.append)
    try:
        assert ref in await fresh.interfaces(ref.netns)
        assert await fresh.state(ref) == before  # readable before ensure, too
        state = await fresh.ensure_interface(tunnel.a.spec)
        assert fresh.pid(ref) == pid  # adopted, not restarted
        assert state.peers[0].last_handshake == before.peers[0].last_handshake
        assert await tunnel.ping(count=1) == (1, 1)
        # Supervised through a pidfd now: its death is seen without being its parent.
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            if exits:
                break
            await asyncio.sleep(0.02)
        assert [(e.pid, e.returncode) for e in exits] == [(pid, None)]
        with pytest.raises(InterfaceDied):
            await fresh.state(ref)
    finally:
        await fresh.remove_interface(ref)
        await fresh.close()


async def test_a_name_runs_in_one_namespace_only(tunnel: Tunnel) -> None:
    clash = InterfaceSpec(tunnel.a.spec.name, tunnel.b.netns, PrivateKey.generate())
    with pytest.raises(InterfaceConflict, match="unique on the host"):
        await tunnel.driver.ensure_interface(clash)
    # Another driver instance (no memory of it) sees the clash through the socket.
    other = UserspaceDriver(tunnel.driver.settings)
    with pytest.raises(InterfaceConflict, match="another namespace"):
        await other.ensure_interface(clash)
    with pytest.raises(LinkNotFound):
        await other.state(clash.ref)


async def test_a_daemon_that_cannot_start_is_reported(lab: Lab, tmp_path: Path) -> None:
    ns = await lab.netns("x")
    broken = UserspaceDriver(UserspaceSettings(binary="false", log_dir=tmp_path))
    spec = InterfaceSpec(lab.ifname(), ns, PrivateKey.generate())
    with pytest.raises(CommandFailed, match="exited with status 1 while starting"):
        await broken.ensure_interface(spec)
    with pytest.raises(DriverUnavailable, match="not installed") as exc:
        await UserspaceDriver(UserspaceSettings(binary="no-such-wireguard-go")).check()
    assert not exc.value.retryable


async def test_a_daemon_ignoring_sigterm_is_killed(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        "sh",
        "-c",
        "trap '' TERM; echo ready; while :; do sleep 0.05; done",
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert await proc.stdout.readline() == b"ready\n"  # the trap is in place
    driver = UserspaceDriver(UserspaceSettings(socket_dir=tmp_path, stop_timeout=0.3))
    daemon = _Daemon(InterfaceRef("fgwtstop"), proc.pid, proc=proc)
    started = time.monotonic()
    await driver._stop(daemon)
    assert proc.returncode == -signal.SIGKILL
    assert 0.3 <= time.monotonic() - started < 3


async def test_select_driver_reports_what_runs() -> None:
    driver = await select_driver("userspace")
    assert driver.kind == "userspace"
    assert driver.name.startswith("wireguard-go v")
    auto = await select_driver("auto")
    assert auto.kind in ("kernel", "userspace")
    assert (await select_driver("memory")).kind == "memory"
