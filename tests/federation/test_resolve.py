"""Domain resolution against a real DNS server (dnsmasq) that the test runs on loopback."""

from __future__ import annotations

import asyncio
import shutil
import socket
from collections.abc import AsyncIterator

import pytest

from federation.errors import PeerUnreachable, UnknownDomain
from federation.resolve import DomainResolver, _pick
from tests.conftest import free_port, udp_listening

pytestmark = pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="dnsmasq is not installed")


@pytest.fixture
async def dnsmasq() -> AsyncIterator[tuple[str, int]]:
    port = free_port(socket.SOCK_DGRAM)
    proc = await asyncio.create_subprocess_exec(
        "dnsmasq", "--keep-in-foreground", "--no-daemon", "--no-resolv", "--no-hosts",
        "--bind-interfaces", "--listen-address=127.0.0.1", f"--port={port}",
        "--user=root", "--pid-file", "--log-facility=-",
        "--srv-host=_fedgw._tcp.cluster2,gw.cluster2,8443,0,10",
        "--srv-host=_fedgw._tcp.cluster5,gw-a.cluster5,9443,10,1",
        "--srv-host=_fedgw._tcp.cluster5,gw-b.cluster5,9444,20,1",
        "--host-record=gw.cluster2,198.18.0.12",
        "--host-record=gw-a.cluster5,198.18.0.15",
        "--host-record=gw-b.cluster5,198.18.0.16",
        "--srv-host=_fedgw._tcp.cluster6,nowhere.cluster6,8443",
        "--local=/cluster3/cluster6/",  # answer NXDOMAIN there rather than REFUSED
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await udp_listening(port, proc)
        yield "127.0.0.1", port
    finally:
        proc.terminate()
        await proc.wait()


def resolver(ns: tuple[str, int], peers: dict[str, str], federated: set[str]) -> DomainResolver:
    return DomainResolver(peers.get, federated.__contains__, nameserver=ns, timeout=2)


async def test_peer_table_first(dnsmasq: tuple[str, int]) -> None:
    r = resolver(dnsmasq, {"cluster2": "https://10.0.0.2:8443"}, {"cluster2"})
    got = await r.resolve("cluster2")
    assert (got.url, got.source) == ("https://10.0.0.2:8443", "peer table")


async def test_srv_for_a_federated_domain(dnsmasq: tuple[str, int]) -> None:
    r = resolver(dnsmasq, {}, {"cluster2", "cluster5"})
    got = await r.resolve("cluster2")
    assert (got.url, got.source) == ("https://198.18.0.12:8443", "dns srv")
    # the lowest priority wins
    assert (await r.resolve("cluster5")).url == "https://198.18.0.15:9443"


async def test_srv_is_not_trusted_for_an_unknown_domain(dnsmasq: tuple[str, int]) -> None:
    r = resolver(dnsmasq, {}, set())
    with pytest.raises(UnknownDomain, match="'cluster2' is not federated"):
        await r.resolve("cluster2")


async def test_missing_records(dnsmasq: tuple[str, int]) -> None:
    r = resolver(dnsmasq, {}, {"cluster3", "cluster6"})
    with pytest.raises(UnknownDomain, match=r"no DNS SRV record _fedgw\._tcp\.cluster3"):
        await r.resolve("cluster3")
    with pytest.raises(UnknownDomain, match=r"nowhere\.cluster6 of a fedgw gateway has no address"):
        await r.resolve("cluster6")


async def test_dns_server_down() -> None:
    r = resolver(("127.0.0.1", free_port(socket.SOCK_DGRAM)), {}, {"cluster2"})
    with pytest.raises(PeerUnreachable, match=r"DNS lookup of _fedgw\._tcp\.cluster2 failed"):
        await r.resolve("cluster2")


def test_weighted_pick_follows_weights() -> None:
    records = [(1, 90, "a", 1), (1, 10, "b", 2), (0, 0, "c", 3)]
    assert _pick(records) == ("c", 3)
    picks = [_pick(records[:2])[0] for _ in range(2000)]
    assert 0.85 < picks.count("a") / len(picks) < 0.95
