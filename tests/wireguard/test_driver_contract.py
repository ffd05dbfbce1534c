"""One contract, every driver: the in-memory driver must behave as the real ones do, so
each test runs against memory, wireguard-go (root) and kernel WireGuard (where present)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from tests.wireguard.conftest import HAVE_WIREGUARD_GO, IS_ROOT, Lab
from wireguard.drivers import (
    Endpoint,
    InterfaceRef,
    InterfaceSpec,
    InterfaceState,
    KernelDriver,
    MemoryDriver,
    PeerSpec,
    UserspaceDriver,
    UserspaceSettings,
    WireGuardDriver,
    kernel_supports_wireguard,
    prefixes,
)
from wireguard.drivers.base import Network
from wireguard.errors import DriverUnavailable, InvalidSpec, LinkNotFound, PeerNotFound
from wireguard.keys import PresharedKey, PrivateKey, PublicKey
from wireguard.netns import Rtnl


@dataclass
class Env:
    driver: WireGuardDriver
    netns: str | None
    lab: Lab | None = None
    refs: list[InterfaceRef] = field(default_factory=list)

    def spec(self, **changes: object) -> InterfaceSpec:
        name = self.lab.ifname() if self.lab else f"fgwt{secrets.token_hex(2)}"
        spec = InterfaceSpec(
            name=name,
            netns=self.netns,
            private_key=PrivateKey.generate(),
            listen_port=20000 + secrets.randbelow(20000),
            mtu=1420,
        )
        spec = replace(spec, **changes)  # type: ignore[arg-type]
        self.refs.append(spec.ref)
        return spec

    async def up(self) -> InterfaceRef:
        return (await self.driver.ensure_interface(self.spec())).ref


@pytest.fixture(
    params=[
        "memory",
        pytest.param("userspace", marks=pytest.mark.root),
        pytest.param("kernel", marks=pytest.mark.root),
    ]
)
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    kind = request.param
    if kind == "memory":
        yield Env(MemoryDriver(), "fgwt-virtual")
        return
    if not IS_ROOT:
        pytest.skip("needs root (network namespaces)")
    if kind == "userspace" and not HAVE_WIREGUARD_GO:
        pytest.skip("wireguard-go is not installed")
    if kind == "kernel" and not await kernel_supports_wireguard():
        pytest.skip("this kernel has no WireGuard: the kernel driver cannot be exercised here")
    lab = Lab()
    driver: WireGuardDriver = (
        UserspaceDriver(UserspaceSettings(log_dir=tmp_path / "logs"))
        if kind == "userspace"
        else KernelDriver()
    )
    env = Env(driver, None, lab)
    try:
        env.netns = await lab.netns("c")
        yield env
    finally:
        try:
            for ref in env.refs:
                await driver.remove_interface(ref)
            await driver.close()
        finally:
            await lab.cleanup()


def key() -> PublicKey:
    return PrivateKey.generate().public_key()


def allowed(state: InterfaceState, public_key: PublicKey) -> tuple[Network, ...] | None:
    peer = state.peer(public_key)
    return None if peer is None else peer.allowed_ips


async def test_ensure_interface_creates_then_is_idempotent(env: Env) -> None:
    spec = env.spec()
    state = await env.driver.ensure_interface(spec)
    assert state.ref == spec.ref
    assert state.public_key == spec.private_key.public_key()
    assert state.listen_port == spec.listen_port
    assert state.peers == ()
    assert await env.driver.ensure_interface(spec) == state
    assert spec.ref in await env.driver.interfaces(spec.netns)
    # An existing interface is brought to a changed spec.
    changed = replace(spec, private_key=PrivateKey.generate(), listen_port=spec.listen_port + 1)
    state = await env.driver.ensure_interface(changed)
    assert state.public_key == changed.private_key.public_key()
    assert state.listen_port == changed.listen_port


async def test_set_peer_creates_and_updates_exactly_one_peer(env: Env) -> None:
    ref = await env.up()
    k1, k2, psk = key(), key(), PresharedKey.generate()
    await env.driver.set_peer(
        ref,
        PeerSpec(
            k1,
            Endpoint.parse("192.0.2.1:51820"),
            prefixes("10.1.0.0/24", "10.1.1.5/32", "fd00:1::/64"),
            persistent_keepalive=25,
            preshared_key=psk,
        ),
    )
    await env.driver.set_peer(ref, PeerSpec(k2, None, prefixes("10.2.0.0/24")))
    state = await env.driver.state(ref)
    assert [p.public_key for p in state.peers] == sorted([k1, k2])
    p1, p2 = state.peer(k1), state.peer(k2)
    assert p1 is not None
    assert p2 is not None
    assert p1.endpoint == Endpoint.parse("192.0.2.1:51820")
    assert p1.allowed_ips == prefixes("10.1.0.0/24", "10.1.1.5/32", "fd00:1::/64")
    assert p1.persistent_keepalive == 25
    assert p1.preshared_key == psk
    assert (p2.endpoint, p2.persistent_keepalive, p2.preshared_key) == (None, 0, None)
    assert p1.last_handshake is None
    assert p1.rx_bytes == 0

    await env.driver.set_peer(
        ref, PeerSpec(k1, Endpoint.parse("[2001:db8::1]:51821"), prefixes("10.1.0.0/24"))
    )
    after = await env.driver.state(ref)
    p1b = after.peer(k1)
    assert p1b is not None
    assert p1b.endpoint == Endpoint.parse("[2001:db8::1]:51821")
    assert p1b.allowed_ips == prefixes("10.1.0.0/24")
    assert (p1b.persistent_keepalive, p1b.preshared_key) == (0, None)
    assert after.peer(k2) == p2  # untouched
    # The same spec again changes nothing.
    await env.driver.set_peer(
        ref, PeerSpec(k1, Endpoint.parse("[2001:db8::1]:51821"), prefixes("10.1.0.0/24"))
    )
    assert await env.driver.state(ref) == after


async def test_allowed_ips_are_added_and_removed_one_by_one(env: Env) -> None:
    ref = await env.up()
    k1, k2 = key(), key()
    await env.driver.set_peer(ref, PeerSpec(k1, allowed_ips=prefixes("10.1.0.0/24")))
    await env.driver.set_peer(ref, PeerSpec(k2, allowed_ips=prefixes("10.2.0.0/24")))
    assert await env.driver.add_allowed_ips(ref, k1, prefixes("10.1.1.0/24", "10.1.0.0/24"))
    assert not await env.driver.add_allowed_ips(ref, k1, prefixes("10.1.1.0/24"))
    assert await env.driver.remove_allowed_ips(ref, k1, prefixes("10.1.0.0/24", "10.9.0.0/24"))
    assert not await env.driver.remove_allowed_ips(ref, k1, prefixes("10.9.0.0/24"))
    state = await env.driver.state(ref)
    assert allowed(state, k1) == prefixes("10.1.1.0/24")
    assert allowed(state, k2) == prefixes("10.2.0.0/24")
    # Down to none, and the peer stays.
    assert await env.driver.remove_allowed_ips(ref, k1, prefixes("10.1.1.0/24"))
    peer = (await env.driver.state(ref)).peer(k1)
    assert peer is not None
    assert peer.allowed_ips == ()
    with pytest.raises(PeerNotFound):
        await env.driver.add_allowed_ips(ref, key(), prefixes("10.3.0.0/24"))
    assert not await env.driver.remove_allowed_ips(ref, key(), prefixes("10.3.0.0/24"))


async def test_replacing_allowed_ips_touches_one_peer_and_creates_none(env: Env) -> None:
    ref = await env.up()
    k1, k2 = key(), key()
    await env.driver.set_peer(ref, PeerSpec(k1, allowed_ips=prefixes("10.1.0.0/24", "10.1.1.0/24")))
    await env.driver.set_peer(ref, PeerSpec(k2, allowed_ips=prefixes("10.2.0.0/24")))
    await env.driver.replace_allowed_ips(ref, k1, prefixes("10.1.1.0/24", "10.1.2.0/24"))
    state = await env.driver.state(ref)
    assert allowed(state, k1) == prefixes("10.1.1.0/24", "10.1.2.0/24")
    assert allowed(state, k2) == prefixes("10.2.0.0/24")
    await env.driver.replace_allowed_ips(ref, k1, ())
    peer = (await env.driver.state(ref)).peer(k1)
    assert peer is not None
    assert peer.allowed_ips == ()
    # Update-only: a peer that is not there stays away.
    await env.driver.replace_allowed_ips(ref, key(), prefixes("10.3.0.0/24"))
    assert [p.public_key for p in (await env.driver.state(ref)).peers] == sorted([k1, k2])


async def test_state_without_allowed_ips_has_the_counters_and_no_prefixes(env: Env) -> None:
    ref = await env.up()
    k1 = key()
    endpoint = Endpoint.parse("192.0.2.7:51820")
    await env.driver.set_peer(
        ref, PeerSpec(k1, endpoint=endpoint, allowed_ips=prefixes("10.1.0.0/24", "fd00::/64"))
    )
    full = await env.driver.state(ref)
    light = await env.driver.state(ref, allowed_ips=False)
    [peer] = light.peers
    assert peer.allowed_ips == ()
    assert replace(peer, allowed_ips=full.peers[0].allowed_ips) == full.peers[0]
    assert (light.public_key, light.listen_port) == (full.public_key, full.listen_port)


async def test_a_prefix_belongs_to_one_peer_at_a_time(env: Env) -> None:
    ref = await env.up()
    k1, k2 = key(), key()
    await env.driver.set_peer(ref, PeerSpec(k1, allowed_ips=prefixes("10.5.0.0/24", "10.6.0.0/24")))
    await env.driver.set_peer(ref, PeerSpec(k2))
    await env.driver.add_allowed_ips(ref, k2, prefixes("10.5.0.0/24"))
    state = await env.driver.state(ref)
    assert allowed(state, k2) == prefixes("10.5.0.0/24")
    assert allowed(state, k1) == prefixes("10.6.0.0/24")


async def test_remove_peer_leaves_the_others(env: Env) -> None:
    ref = await env.up()
    k1, k2 = key(), key()
    await env.driver.set_peer(ref, PeerSpec(k1, allowed_ips=prefixes("10.1.0.0/24")))
    await env.driver.set_peer(ref, PeerSpec(k2, allowed_ips=prefixes("10.2.0.0/24")))
    before = (await env.driver.state(ref)).peer(k2)
    assert await env.driver.remove_peer(ref, k1) is True
    assert await env.driver.remove_peer(ref, k1) is False
    state = await env.driver.state(ref)
    assert state.peers == (before,)


async def test_errors_are_the_same_everywhere(env: Env) -> None:
    spec = env.spec()
    missing = spec.ref
    with pytest.raises(LinkNotFound):
        await env.driver.state(missing)
    with pytest.raises(LinkNotFound):
        await env.driver.set_peer(missing, PeerSpec(key()))
    assert await env.driver.remove_interface(missing) is False
    await env.driver.ensure_interface(spec)
    with pytest.raises(InvalidSpec, match="own public key"):
        await env.driver.set_peer(spec.ref, PeerSpec(spec.private_key.public_key()))


async def test_remove_interface(env: Env) -> None:
    ref = await env.up()
    await env.driver.set_peer(ref, PeerSpec(key(), allowed_ips=prefixes("10.1.0.0/24")))
    assert await env.driver.remove_interface(ref) is True
    with pytest.raises(LinkNotFound):
        await env.driver.state(ref)
    assert ref not in await env.driver.interfaces(ref.netns)
    assert await env.driver.remove_interface(ref) is False


@pytest.mark.root
async def test_the_kernel_driver_says_when_the_kernel_has_no_wireguard() -> None:
    if not IS_ROOT:
        pytest.skip("needs root (network namespaces)")
    if await kernel_supports_wireguard():
        pytest.skip("this kernel has WireGuard")
    lab = Lab()
    try:
        ns = await lab.netns("k")
        driver = KernelDriver()
        with pytest.raises(DriverUnavailable, match="no WireGuard") as exc:
            await driver.check()
        assert not exc.value.retryable
        with pytest.raises(DriverUnavailable, match="no WireGuard"):
            await driver.ensure_interface(InterfaceSpec("wgk0", ns, PrivateKey.generate()))
        with pytest.raises(DriverUnavailable, match="netlink family"):
            await driver.state(InterfaceRef("wgk0", ns))
        assert await driver.interfaces(ns) == []
        async with Rtnl(ns) as rtnl:
            assert await rtnl.find("wgk0") is None  # nothing half-made
    finally:
        await lab.cleanup()
