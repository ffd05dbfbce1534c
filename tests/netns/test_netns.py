"""wireguard.netns: namespaces, veths, addresses, routes and sysctls, each in namespaces
the test creates; nothing in the host's own namespace changes."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import secrets
from collections.abc import AsyncIterator

import pytest

from tests.hostcheck import host_snapshot, needs_root
from wireguard.errors import CommandFailed, LinkNotFound, NamespaceNotFound, NetlinkFailed
from wireguard.netns import (
    LINKS_AT_ONCE,
    Rtnl,
    create_netns,
    delete_netns,
    get_sysctl,
    list_netns,
    netns_exists,
    netns_pids,
    run,
    set_sysctl,
)
from wireguard.routing import Policy

pytestmark = needs_root


@pytest.fixture
async def pair() -> AsyncIterator[tuple[str, str]]:
    tag = secrets.token_hex(3)
    a, b = f"fgwn-{tag}-a", f"fgwn-{tag}-b"
    before = host_snapshot()
    try:
        assert await create_netns(a)
        assert await create_netns(b)
        yield a, b
    finally:
        await delete_netns(a)
        await delete_netns(b)
        assert host_snapshot() == before


async def test_create_and_delete_are_idempotent(pair: tuple[str, str]) -> None:
    a, _ = pair
    assert not await create_netns(a)
    assert netns_exists(a)
    assert a in list_netns("fgwn-")
    async with Rtnl(a) as rtnl:
        lo = next(link for link in await rtnl.links() if link.name == "lo")
        assert lo.up


async def test_links_deleted_together_take_their_peers_and_nothing_else(
    pair: tuple[str, str],
) -> None:
    a, b = pair
    async with Rtnl(a) as rtnl:
        for n in range(3):
            await rtnl.add_veth(f"gone{n}", f"peer{n}", b)
        await rtnl.add_veth("kept", "kept-peer", b)
        done = await rtnl.delete_links(["gone0", "gone1", "never", "gone2"], 0xFED6)
        assert done == [True, True, False, True]  # "never" was not there
        assert {link.name for link in await rtnl.links()} == {"lo", "kept"}
        assert await rtnl.delete_links(["never"], 0xFED6) == [False]  # an empty group
    async with Rtnl(b) as rtnl:
        assert {link.name for link in await rtnl.links()} == {"lo", "kept-peer"}


async def test_more_links_than_fit_one_datagram_are_deleted_too(pair: tuple[str, str]) -> None:
    """Every request in a datagram is answered into the socket's receive buffer before
    any is read: a few hundred at once overflowed it."""
    a, b = pair
    count = 2 * LINKS_AT_ONCE + 10
    async with Rtnl(a) as rtnl:
        for n in range(0, count, 2):
            await rtnl.add_veth(f"many{n}", f"peer{n}", b)
        done = await rtnl.delete_links([f"many{n}" for n in range(count)], 0xFED6)
        assert done == [n % 2 == 0 for n in range(count)]
        assert {link.name for link in await rtnl.links()} == {"lo"}


async def test_veth_across_namespaces_carries_ping(pair: tuple[str, str]) -> None:
    a, b = pair
    async with Rtnl(a) as rtnl:
        assert await rtnl.add_veth("va", "vb", b)
        assert not await rtnl.add_veth("va", "vb", b)  # already there
        await rtnl.set_link("va", up=True, mtu=1400)
        assert await rtnl.add_address("va", "10.99.0.1/24")
        assert not await rtnl.add_address("va", "10.99.0.1/24")
        va = next(link for link in await rtnl.links() if link.name == "va")
        assert (va.kind, va.mtu, va.up) == ("veth", 1400, True)
    async with Rtnl(b) as rtnl:
        await rtnl.set_link("vb", up=True)
        await rtnl.add_address("vb", "10.99.0.2/24")
        await rtnl.add_route("10.98.0.0/16", via="10.99.0.1")
        await rtnl.add_route("10.98.0.0/16", via="10.99.0.1")  # replace: harmless
        assert ("vb", ipaddress.ip_interface("10.99.0.2/24")) in await rtnl.addresses("vb")
    out = await run("ip", "netns", "exec", a, "ping", "-c", "1", "-W", "2", "10.99.0.2")
    assert "1 received" in out
    routes = await run("ip", "-n", b, "route")
    assert "10.98.0.0/16 via 10.99.0.1 dev vb" in routes


async def test_two_deletes_at_once_both_succeed(pair: tuple[str, str]) -> None:
    """Both see the namespace, one deletes it: the other finds it gone, not an error
    (two `fedgw lab down` at once)."""
    a, _ = pair
    assert sorted(await asyncio.gather(delete_netns(a), delete_netns(a))) == [False, True]
    assert not netns_exists(a)


async def test_sysctl_is_per_namespace(pair: tuple[str, str]) -> None:
    a, b = pair
    await set_sysctl(a, "net.ipv4.ip_forward", "1")
    assert await get_sysctl(a, "net.ipv4.ip_forward") == "1"
    assert await get_sysctl(b, "net.ipv4.ip_forward") == "0"
    # (the pair fixture checks that the host's own ip_forward did not change)


async def test_errors_name_what_failed(pair: tuple[str, str]) -> None:
    a, _ = pair
    with pytest.raises(NamespaceNotFound, match="'fgwn-missing' does not exist"):
        async with Rtnl("fgwn-missing"):
            pass
    assert not netns_exists("fgwn-missing")  # opening a session did not create it
    async with Rtnl(a) as rtnl:
        with pytest.raises(LinkNotFound, match=f"interface nope0 does not exist in netns {a}"):
            await rtnl.set_link("nope0", up=True)
        with pytest.raises(NetlinkFailed, match="Network is unreachable") as info:
            await rtnl.add_route("10.0.0.0/8", via="192.0.2.1")
        assert info.value.errno == 101
        with pytest.raises(ValueError, match="1 to 15 characters"):
            await rtnl.add_veth("much-too-long-name", "x")
    with pytest.raises(NamespaceNotFound):
        await set_sysctl("fgwn-missing", "net.ipv4.ip_forward", "1")
    with pytest.raises(CommandFailed, match=r"fgwn-missing"):
        await run("ip", "netns", "exec", "fgwn-missing", "true")


async def test_processes_found_by_namespace(pair: tuple[str, str]) -> None:
    a, b = pair
    proc = await asyncio.create_subprocess_exec("ip", "netns", "exec", a, "sleep", "30")
    try:
        for _ in range(100):
            if proc.pid in netns_pids([a]):
                break
            await asyncio.sleep(0.02)
        assert netns_pids([a, b]) == {proc.pid: a}
    finally:
        proc.kill()
        await proc.wait()
    assert netns_pids([a]) == {}


async def test_a_session_leaves_the_thread_in_its_own_namespace(pair: tuple[str, str]) -> None:
    """The socket of a session in another namespace is made on the calling thread, on
    a visit there: the thread (here, the event loop's) must be back home afterwards,
    also when the namespace is missing, and the socket must work where it was made."""
    a, _ = pair
    home = os.stat("/proc/thread-self/ns/net").st_ino
    async with Rtnl(a) as rtnl:
        assert os.stat("/proc/thread-self/ns/net").st_ino == home
        await rtnl.add_veth("fgwn-v0", "fgwn-v1")
        assert {link.name for link in await rtnl.links()} == {"lo", "fgwn-v0", "fgwn-v1"}
    with pytest.raises(NamespaceNotFound):
        async with Rtnl("fgwn-missing"):
            pass
    assert os.stat("/proc/thread-self/ns/net").st_ino == home
    async with Rtnl() as here:
        assert "fgwn-v0" not in {link.name for link in await here.links()}


async def test_marked_lookups_find_their_table_through_its_bucket(pair: tuple[str, str]) -> None:
    """fedgw's rule layout (wireguard.routing) as the kernel walks it: a mark leads
    through its bucket's ``goto`` to its table, in the first bucket and in a later one;
    a mark whose table is gone meets a blackhole, not the main table; unmarked lookups
    pass by."""
    ns, _ = pair
    policy = Policy(priority=20000, protocol=147, tables=range(100, 200), mark_mask=0xFF00)
    dst = "10.9.0.1"
    async with Rtnl(ns) as rtnl:
        await rtnl.add_veth("fgwn0", "fgwn1")
        await rtnl.set_link("fgwn0", up=True)
        await rtnl.add_address("fgwn0", "10.1.0.1/24")
        # The main table routes dst through fgwn0; table 100 and 163 through fgwn1.
        await rtnl.add_route(ipaddress.ip_network("10.9.0.0/24"), dev="fgwn0")
        await rtnl.set_link("fgwn1", up=True)
        rules = {*policy.frame_rules(), *policy.table_rules(100), *policy.table_rules(163)}
        await rtnl.add_rules(sorted(rules, key=lambda r: r.priority))
        for table in (100, 163):
            await rtnl.add_route(ipaddress.ip_network("10.9.0.0/24"), dev="fgwn1", table=table)

    async def via(mark: int) -> str:
        out = await run("ip", "-n", ns, "route", "get", dst, "mark", str(mark))
        return out.split(" dev ")[1].split()[0]

    assert await via(0) == "fgwn0"  # unmarked: the main table
    assert await via(policy.mark(100)) == "fgwn1"  # first bucket
    assert await via(policy.mark(163)) == "fgwn1"  # second bucket
    for missing in (policy.mark(164), policy.mark(101), 0xFF00):
        # Its bucket is there but not its table, or neither: dropped, never the main table.
        with pytest.raises(CommandFailed, match="Invalid argument"):
            await via(missing)
