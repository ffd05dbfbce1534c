"""The in-memory driver's own promises to higher layers: it records what a real driver would
send, fails on demand, fakes handshakes (its semantics: see test_driver_contract)."""

from __future__ import annotations

import errno
from datetime import UTC, datetime

import pytest

from wireguard.drivers import (
    Endpoint,
    InterfaceRef,
    InterfaceSpec,
    MemoryDriver,
    PeerSpec,
    PeerState,
    PeerUpdate,
    prefixes,
)
from wireguard.drivers.base import plan_peer
from wireguard.errors import InvalidSpec, NetlinkFailed
from wireguard.keys import PresharedKey, PrivateKey, PublicKey


def key() -> PublicKey:
    return PrivateKey.generate().public_key()


def spec(name: str = "wg0", netns: str | None = "gw") -> InterfaceSpec:
    return InterfaceSpec(name, netns, PrivateKey.generate(), listen_port=51820)


async def test_records_only_what_changes() -> None:
    driver = MemoryDriver()
    s = spec()
    await driver.ensure_interface(s)
    await driver.ensure_interface(s)
    peer = key()
    await driver.set_peer(s.ref, PeerSpec(peer, allowed_ips=prefixes("10.0.0.0/24")))
    await driver.set_peer(s.ref, PeerSpec(peer, allowed_ips=prefixes("10.0.0.0/24")))
    await driver.add_allowed_ips(s.ref, peer, prefixes("10.1.0.0/24"))
    await driver.remove_allowed_ips(s.ref, peer, prefixes("10.0.0.0/24"))
    await driver.remove_peer(s.ref, peer)
    await driver.remove_interface(s.ref)
    ops = [(op.op, op.detail) for op in driver.operations]
    assert [o for o, _ in ops] == [
        "create_interface",
        "write_peer",
        "write_peer",
        "write_peer",
        "remove_peer",
        "remove_interface",
    ]
    added, removed = ops[2][1], ops[3][1]
    # Adding sends only the new prefix and never replaces; removing replaces this peer's.
    assert added == PeerUpdate(peer, create=False, allowed_ips=prefixes("10.1.0.0/24"))
    assert removed == PeerUpdate(
        peer, create=False, replace_allowed_ips=True, allowed_ips=prefixes("10.1.0.0/24")
    )


async def test_same_name_in_two_namespaces_like_kernel_links() -> None:
    driver = MemoryDriver()
    one, two = spec(netns="a"), spec(netns="b")
    await driver.ensure_interface(one)
    await driver.ensure_interface(two)
    assert await driver.interfaces("a") == [InterfaceRef("wg0", "a")]
    assert await driver.interfaces(None) == []
    assert (await driver.state(one.ref)).public_key != (await driver.state(two.ref)).public_key


async def test_fail_next_injects_one_failure() -> None:
    driver = MemoryDriver()
    s = spec()
    await driver.ensure_interface(s)
    driver.fail_next("write_peer", NetlinkFailed("boom", errno=errno.EBUSY))
    with pytest.raises(NetlinkFailed) as exc:
        await driver.set_peer(s.ref, PeerSpec(key()))
    assert exc.value.retryable
    assert (await driver.state(s.ref)).peers == ()
    await driver.set_peer(s.ref, PeerSpec(key()))  # only the next one failed
    assert len((await driver.state(s.ref)).peers) == 1


async def test_handshakes_are_faked_on_request() -> None:
    driver = MemoryDriver()
    s = spec()
    await driver.ensure_interface(s)
    peer = key()
    await driver.set_peer(s.ref, PeerSpec(peer))
    at = datetime(2030, 1, 1, tzinfo=UTC)
    driver.handshake(s.ref, peer, at=at, rx=100, tx=50)
    state = (await driver.state(s.ref)).peer(peer)
    assert state is not None
    assert (state.last_handshake, state.rx_bytes, state.tx_bytes) == (
        at,
        100,
        50,
    )


async def test_a_new_private_key_drops_the_peer_that_had_its_public_key() -> None:
    driver = MemoryDriver()
    s = spec()
    await driver.ensure_interface(s)
    new_key = PrivateKey.generate()
    await driver.set_peer(s.ref, PeerSpec(new_key.public_key()))
    await driver.ensure_interface(InterfaceSpec("wg0", "gw", new_key))
    assert (await driver.state(s.ref)).peers == ()
    assert driver.spec(s.ref).private_key == new_key


def test_plan_peer_sends_the_smallest_change() -> None:
    k, psk = key(), PresharedKey.generate()
    desired = PeerSpec(k, Endpoint.parse("192.0.2.1:1"), prefixes("10.0.0.0/24"), 25, psk)
    created = plan_peer(None, desired)
    assert created is not None
    assert created.create
    assert created.set_preshared_key
    current = PeerState(k, desired.endpoint, desired.allowed_ips, 25, None, 0, 0, psk)
    assert plan_peer(current, desired) is None
    grown = PeerSpec(k, desired.endpoint, prefixes("10.0.0.0/24", "10.1.0.0/24"), 25, psk)
    assert plan_peer(current, grown) == PeerUpdate(
        k, create=False, preshared_key=psk, allowed_ips=prefixes("10.1.0.0/24")
    )
    roamed = PeerState(k, Endpoint.parse("203.0.113.9:4"), desired.allowed_ips, 25, None, 0, 0, psk)
    no_endpoint = PeerSpec(k, None, desired.allowed_ips, 25, psk)
    assert plan_peer(roamed, no_endpoint) is None  # a learnt endpoint is left alone


def test_specs_are_validated() -> None:
    with pytest.raises(InvalidSpec, match="1 to 15"):
        InterfaceSpec("a-name-much-too-long", None, PrivateKey.generate())
    with pytest.raises(InvalidSpec, match="MTU"):
        InterfaceSpec("wg0", None, PrivateKey.generate(), mtu=500)
    with pytest.raises(InvalidSpec, match="keepalive"):
        PeerSpec(key(), persistent_keepalive=70000)
    with pytest.raises(InvalidSpec, match="brackets"):
        Endpoint.parse("2001:db8::1:51820")
    with pytest.raises(InvalidSpec, match="resolve names first"):
        Endpoint.parse("gateway.example:51820")
    with pytest.raises(InvalidSpec, match=r"1\.\.65535"):
        Endpoint.parse("192.0.2.1:0")
    assert str(Endpoint.parse("[2001:db8::1]:51820")) == "[2001:db8::1]:51820"
    assert prefixes("10.0.0.1/24", "10.0.0.0/24") == prefixes("10.0.0.0/24")
