"""The data plane for real, with wireguard-go between gateway namespaces: pings and TCP through
wires, overlap, MTU, PIDs, the reconciler. Namespaces are ``fgwd-*``; none outlives a test."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import os
import re
import secrets
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from fedgw.models import Workload
from tests.hostcheck import host_snapshot
from tests.wireguard.conftest import needs_wireguard_go
from wireguard.dataplane import Dataplane, DataplaneSettings, DesiredState
from wireguard.drivers import (
    Endpoint,
    InterfaceRef,
    InterfaceSpec,
    UserspaceDriver,
    UserspaceSettings,
)
from wireguard.drivers.uapi import SOCKET_DIR
from wireguard.errors import (
    CommandFailed,
    NamespaceNotFound,
    NetlinkFailed,
    UnknownPeer,
    WireConflict,
)
from wireguard.keys import PrivateKey
from wireguard.netns import (
    Interface,
    Neighbour,
    Network,
    Route,
    Rtnl,
    Rule,
    create_netns,
    delete_netns,
    get_sysctl,
    in_netns,
    kill_netns_processes,
    netns_exists,
    netns_pids,
    run,
    set_sysctl,
)
from wireguard.nftables import Mark, Nft
from wireguard.wires import ClientWire, EndpointWire, PeerTunnel, process_start_ticks

pytestmark = [needs_wireguard_go, pytest.mark.root]

PORT = 51820
PAIR = ipaddress.ip_network("172.16.1.0/31")
ENDPOINT_ADDRESS = ipaddress.ip_interface("172.16.1.0/31")
CLIENT_ADDRESS = ipaddress.ip_interface("172.16.1.1/31")
OFFERED = ipaddress.ip_network("10.60.0.0/16")
SERVICE_ADDRESS = "10.60.0.1"  # on the endpoint's lo: reached through the offered route


def port(peer: str) -> int:
    """The port a gateway's tunnel to ``peer`` listens on."""
    return PORT + ord(peer[0])


def pair(n: int) -> tuple[Interface, Interface]:
    """The n-th /31 of 172.16.0.0/16: (endpoint address, client address)."""
    base = int(ipaddress.ip_address("172.16.0.0")) + 2 * n
    return (
        ipaddress.ip_interface(f"{ipaddress.ip_address(base)}/31"),
        ipaddress.ip_interface(f"{ipaddress.ip_address(base + 1)}/31"),
    )


@dataclass
class Gateway:
    domain: str
    netns: str
    key: PrivateKey
    dataplane: Dataplane
    addresses: dict[str, str] = field(default_factory=dict)
    """Underlay address of this gateway toward each peer domain."""

    def tunnel_to(self, other: Gateway, **extra: Any) -> PeerTunnel:
        # One interface per peer, so one UDP port per peer too.
        return PeerTunnel(
            domain=other.domain,
            private_key=self.key,
            public_key=other.key.public_key(),
            endpoint=Endpoint.parse(f"{other.addresses[self.domain]}:{port(self.domain)}"),
            listen_port=port(other.domain),
            **extra,
        )


@dataclass
class DataplaneLab:
    """Namespaces, gateways and processes of one test, and their removal."""

    tmp: Path
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    namespaces: list[str] = field(default_factory=list)
    gateways: dict[str, Gateway] = field(default_factory=dict)
    processes: list[asyncio.subprocess.Process] = field(default_factory=list)
    driver: UserspaceDriver | None = None
    drivers: list[UserspaceDriver] = field(default_factory=list)
    """Further drivers (a "restarted gateway" has its own)."""
    settings: dict[str, Any] = field(default_factory=dict)
    underlays: int = 0

    @property
    def prefix(self) -> str:
        """Interface prefix: unique per test, so wireguard-go names are unique on the host."""
        return f"d{self.tag[:4]}"

    def userspace(self) -> UserspaceDriver:
        if self.driver is None:
            self.driver = UserspaceDriver(
                UserspaceSettings(log_dir=self.tmp / "wg-logs", stop_timeout=2.0)
            )
        return self.driver

    async def netns(self, label: str) -> str:
        name = f"fgwd-{self.tag}-{label}"
        self.namespaces.append(name)
        await create_netns(name)
        return name

    async def gateway(self, domain: str, **settings: Any) -> Gateway:
        ns = await self.netns(f"gw{domain}")
        merged = {**self.settings, **settings}
        dp = Dataplane(DataplaneSettings(netns=ns, prefix=self.prefix, **merged), self.userspace())
        await dp.open()
        gw = Gateway(domain, ns, PrivateKey.generate(), dp)
        self.gateways[domain] = gw
        return gw

    async def underlay(self, a: Gateway, b: Gateway, *, mtu: int = 1500) -> None:
        """A veth between two gateway nodes, in a /24 of its own."""
        n = self.underlays
        self.underlays += 1
        ip_a, ip_b = f"198.18.{n}.1", f"198.18.{n}.2"
        name = f"u{b.domain}"
        async with Rtnl(a.netns) as rtnl:
            await rtnl.add_veth(name, f"u{a.domain}", b.netns)
            await rtnl.set_link(name, mtu=mtu, up=True)
            await rtnl.add_address(name, f"{ip_a}/24")
        async with Rtnl(b.netns) as rtnl:
            await rtnl.set_link(f"u{a.domain}", mtu=mtu, up=True)
            await rtnl.add_address(f"u{a.domain}", f"{ip_b}/24")
        a.addresses[b.domain] = ip_a
        b.addresses[a.domain] = ip_b

    async def peer(self, a: Gateway, b: Gateway, **extra: Any) -> None:
        await a.dataplane.ensure_peer(a.tunnel_to(b, **extra))
        await b.dataplane.ensure_peer(b.tunnel_to(a, **extra))

    async def workload(self, label: str, *, service: str | None = None) -> str:
        ns = await self.netns(label)
        if service is not None:
            async with Rtnl(ns) as rtnl:
                await rtnl.add_address("lo", f"{service}/32")
        return ns

    async def spawn(self, *argv: str) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
        self.processes.append(proc)
        return proc

    async def cleanup(self) -> None:
        problems: list[str] = []
        for gw in self.gateways.values():
            try:
                # Removing everything is the reconciler's job; teardown exercises it.
                report = await gw.dataplane.purge()
                problems += report.failures
            except Exception as exc:
                problems.append(f"reconcile to nothing in {gw.netns}: {exc!r}")
            with contextlib.suppress(Exception):
                if await _fedgw_tables(gw.netns):
                    problems.append(f"nftables table left in {gw.netns}")
            await gw.dataplane.close()
        for driver in [self.driver, *self.drivers]:
            if driver is not None:
                await driver.close()
        for proc in self.processes:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        # Whatever still runs in the test's namespaces (a daemon a failed test left).
        killed = await kill_netns_processes(self.namespaces)
        if killed:
            problems.append(f"processes left: {sorted(killed)}")
        sockets = sorted(p.name for p in _our_sockets(self.prefix))
        if sockets:
            problems.append(f"UAPI sockets left: {sockets}")
            for path in _our_sockets(self.prefix):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        for ns in self.namespaces:
            await delete_netns(ns)
        problems += [f"namespace left: {ns}" for ns in self.namespaces if netns_exists(ns)]
        problems += [f"pid left: {pid}" for pid in netns_pids(self.namespaces)]
        assert not problems, f"teardown: {problems}"


def _our_sockets(prefix: str) -> list[Path]:
    if not SOCKET_DIR.exists():
        return []
    return [p for p in SOCKET_DIR.iterdir() if p.name.startswith(prefix)]


async def _fedgw_tables(netns: str) -> list[str]:
    out = await run("ip", "netns", "exec", netns, "nft", "list", "tables")
    return [line for line in out.splitlines() if "fedgw_" in line]


def _root_namespace() -> dict[str, Any]:
    """What must never change: the host's own namespace (other tests may add
    namespaces and daemons meanwhile, so those are not compared)."""
    snap = host_snapshot()
    return {k: snap[k] for k in ("links", "addresses", "routes", "rules", "ip_forward")}


@pytest.fixture
async def dlab(tmp_path: Path) -> AsyncIterator[DataplaneLab]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    before = _root_namespace()
    lab = DataplaneLab(tmp_path)
    try:
        yield lab
    finally:
        await lab.cleanup()
        assert _root_namespace() == before


# --- traffic -------------------------------------------------------------------------------------


def _in(where: str) -> list[str]:
    """The argv prefix that runs a command in a namespace given by name or path."""
    if where.startswith("/proc/"):
        return ["nsenter", f"--net={where}"]
    return ["ip", "netns", "exec", where]


async def ping(
    where: str,
    dst: str,
    *,
    count: int = 3,
    interval: float = 0.2,
    size: int | None = None,
    df: bool = False,
    source: str | None = None,
) -> tuple[int, int]:
    argv = [*_in(where), "ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", "1"]
    if size is not None:
        argv += ["-s", str(size)]
    if source is not None:
        argv += ["-I", source]
    if df:
        argv += ["-M", "do"]
    out = await run(*argv, dst, check=False)
    found = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    if not found:
        return (0, 0)  # refused before sending (e.g. the message is too long)
    return int(found[1]), int(found[2])


def _sock(family: int = socket.AF_INET) -> Callable[[], socket.socket]:
    return lambda: socket.socket(family, socket.SOCK_STREAM)


async def tcp_transfer(server_ns: str, server: str, client_ns: str, size: int) -> str:
    """Send ``size`` random bytes from a client socket in ``client_ns`` to a server socket
    in ``server_ns``; the SHA-256 the server computed (it must equal the sender's)."""
    listener = await in_netns(server_ns, _sock())
    client = await in_netns(client_ns, _sock())
    loop = asyncio.get_running_loop()
    payload = os.urandom(size)
    try:
        listener.setblocking(False)
        listener.bind((server, 5201))
        listener.listen(1)
        client.setblocking(False)

        async def receive() -> str:
            conn, _ = await loop.sock_accept(listener)
            digest = hashlib.sha256()
            with conn:
                while chunk := await loop.sock_recv(conn, 65536):
                    digest.update(chunk)
            return digest.hexdigest()

        receiving = asyncio.create_task(receive())
        async with asyncio.timeout(30):
            await loop.sock_connect(client, (server, 5201))
            await loop.sock_sendall(client, payload)
            client.shutdown(socket.SHUT_WR)
            got = await receiving
    finally:
        listener.close()
        client.close()
    assert got == hashlib.sha256(payload).hexdigest()
    return got


async def whoami_server(
    ns: str, address: str, name: bytes
) -> tuple[socket.socket, asyncio.Task[None]]:
    """A TCP server on ``address``:7000 in ``ns`` that says ``name`` to whoever connects."""
    listener = await in_netns(ns, _sock())
    listener.setblocking(False)
    listener.bind((address, 7000))
    listener.listen(8)
    loop = asyncio.get_running_loop()

    async def serve() -> None:
        while True:
            conn, _ = await loop.sock_accept(listener)
            with conn:
                await loop.sock_sendall(conn, name)

    return listener, asyncio.create_task(serve())


async def whoami(ns: str, address: str) -> bytes:
    client = await in_netns(ns, _sock())
    loop = asyncio.get_running_loop()
    client.setblocking(False)
    try:
        async with asyncio.timeout(5):
            await loop.sock_connect(client, (address, 7000))
            return await loop.sock_recv(client, 100)
    finally:
        client.close()


async def wg_dump(netns: str, name: str) -> list[list[str]]:
    out = await run("ip", "netns", "exec", netns, "wg", "show", name, "dump")
    return [line.split("\t") for line in out.strip().splitlines()]


# --- a two-domain set-up ------------------------------------------------------------------------


@dataclass
class Pair:
    """Client C in domain a (gateway gwA), endpoint E in domain b (gateway gwB)."""

    a: Gateway
    b: Gateway
    client: str
    endpoint: str

    def wires(
        self,
        cid: str = "conn-1",
        n: int | None = None,
        *,
        client: str | None = None,
        endpoint: str | None = None,
        ifname: str = "nsm0",
        routes: tuple[Network, ...] = (OFFERED,),
        mtu: int | None = None,
    ) -> tuple[ClientWire, EndpointWire]:
        e_addr, c_addr = (ENDPOINT_ADDRESS, CLIENT_ADDRESS) if n is None else pair(n)
        cw = ClientWire(
            connection_id=cid,
            peer=self.b.domain,
            workload=Workload(netns=client or self.client),
            interface=ifname,
            address=c_addr,
            endpoint_address=e_addr,
            routes=routes,
            mtu=mtu,
        )
        ew = EndpointWire(
            connection_id=cid,
            peer=self.a.domain,
            workload=Workload(netns=endpoint or self.endpoint),
            interface=ifname,
            address=e_addr,
            client_address=c_addr,
            routes=routes,
            mtu=mtu,
        )
        return cw, ew

    async def attach(self, cw: ClientWire, ew: EndpointWire) -> None:
        await self.b.dataplane.attach_endpoint(ew)
        await self.a.dataplane.attach_client(cw)


async def two_domains(
    lab: DataplaneLab, *, underlay_mtu: int = 1500, peered: bool = True, **settings: Any
) -> Pair:
    a = await lab.gateway("a", **settings)
    b = await lab.gateway("b", **settings)
    await lab.underlay(a, b, mtu=underlay_mtu)
    if peered:
        await lab.peer(a, b)
    client = await lab.workload("c")
    endpoint = await lab.workload("e", service=SERVICE_ADDRESS)
    return Pair(a, b, client, endpoint)


# --- tests ----------------------------------------------------------------------------------------


async def test_a_wire_carries_ping_and_tcp_and_wg_show_agrees(dlab: DataplaneLab) -> None:
    p = await two_domains(dlab)
    cw, ew = p.wires()
    await p.attach(cw, ew)

    assert await ping(p.client, str(ENDPOINT_ADDRESS.ip)) == (3, 3)
    assert await ping(p.client, SERVICE_ADDRESS) == (3, 3)  # the offered prefix
    assert await ping(p.endpoint, str(CLIENT_ADDRESS.ip)) == (3, 3)
    await tcp_transfer(p.endpoint, SERVICE_ADDRESS, p.client, 4 << 20)

    status = await p.a.dataplane.state()
    assert status.driver == "userspace"
    [peer] = status.peers
    assert peer.domain == "b"
    assert peer.allowed_ips == ["10.60.0.0/16", "172.16.1.0/32"]
    assert peer.last_handshake is not None
    assert peer.rx_bytes > 4 << 20 or peer.tx_bytes > 4 << 20
    [row] = [r for r in await wg_dump(p.a.netns, peer.interface) if len(r) == 8]
    pub, _psk, endpoint, allowed, handshake, rx, tx, _keepalive = row
    assert pub == str(p.b.key.public_key())
    assert endpoint == f"{p.b.addresses['a']}:{port('a')}"
    assert allowed.split(",") == peer.allowed_ips
    assert int(handshake) == int(peer.last_handshake.timestamp())
    assert int(rx) >= peer.rx_bytes
    assert int(tx) >= peer.tx_bytes
    # B's tunnel lets A send from the client address only.
    [peer_b] = (await p.b.dataplane.state()).peers
    assert peer_b.allowed_ips == ["172.16.1.1/32"]

    [wire] = status.wires
    async with Rtnl(p.a.netns) as rtnl:
        # No address of any connection in the gateway namespace: overlap stays possible.
        # (The kernel's own IPv6 link-local address is scoped to the link: harmless.)
        addresses = await rtnl.addresses(wire.gateway_interface)
        assert [a for _, a in addresses if not a.ip.is_link_local] == []
        tunnel = await rtnl.link(peer.interface)
        assert tunnel is not None
        assert tunnel.mtu == 1420
    async with Rtnl(p.client) as rtnl:
        nsm0 = await rtnl.link("nsm0")
        assert nsm0 is not None
        assert nsm0.mtu == 1420
        assert [a for _, a in await rtnl.addresses("nsm0") if a.version == 4] == [CLIENT_ADDRESS]


async def test_unmarked_packets_jump_over_the_tables_rules(dlab: DataplaneLab) -> None:
    """Every lookup walks the rules as a list. A packet without fedgw's mark (the node's
    own, WireGuard's datagrams among them, or anything only passing through) goes from
    P+0 straight to the nop at the end of fedgw's priorities, past whatever lies between;
    a marked one that no table's rule takes is dropped at P+2. A rule planted at P+1,
    into a table where nothing is reachable, shows both."""
    p = await two_domains(dlab)
    await p.attach(*p.wires())
    settings = p.a.dataplane.settings
    base, unused_mark = settings.rule_priority, settings.mark_mask
    peer_b = p.b.addresses["a"]
    for family, dst in ((4, peer_b), (6, "fd00:99::1")):
        ns = ("ip", f"-{family}", "-n", p.a.netns)
        if family == 6:
            await run(*ns, "route", "add", "fd00:99::/64", "dev", "lo")
        await run(*ns, "route", "add", "unreachable", "default", "table", "99")
        await run(*ns, "rule", "add", "pref", str(base + 1), "lookup", "99")
        assert (await run(*ns, "route", "get", dst)).startswith(dst)
        with pytest.raises(CommandFailed, match="No route to host"):
            await run(*ns, "route", "get", dst, "mark", str(unused_mark))
        await run(*ns, "rule", "del", "pref", str(base + 1), "lookup", "99")
        with pytest.raises(CommandFailed, match="Invalid argument"):  # the blackhole
            await run(*ns, "route", "get", dst, "mark", str(unused_mark))
    assert await ping(p.client, SERVICE_ADDRESS) == (3, 3)


async def test_an_ipv4_connection_has_no_ipv6_rule_and_drops_ipv6(dlab: DataplaneLab) -> None:
    """An endpoint wire of an IPv4 connection: its table has an IPv4 rule only, and an
    IPv6 packet with the table's mark is dropped by the bucket's blackhole."""
    p = await two_domains(dlab)
    await p.attach(*p.wires())
    ns = p.b.netns
    v4 = await run("ip", "-4", "-n", ns, "rule")
    lookups = re.findall(r"fwmark (0x[0-9a-f]+)/0x[0-9a-f]+ lookup (\d+)", v4)
    assert len(lookups) == 2, lookups  # the tunnel's table, and the connection's
    v6 = await run("ip", "-6", "-n", ns, "rule")
    [(conn_mark, conn_table)] = [(m, t) for m, t in lookups if f"lookup {t}" not in v6]
    with pytest.raises(CommandFailed, match="table does not exist"):
        await run("ip", "-6", "-n", ns, "route", "show", "table", conn_table)
    with pytest.raises(CommandFailed, match="Invalid argument"):  # the blackhole
        await run("ip", "-6", "-n", ns, "route", "get", "fd00:99::1", "mark", conn_mark)
    route = await run("ip", "-4", "-n", ns, "route", "get", SERVICE_ADDRESS, "mark", conn_mark)
    assert f"table {conn_table}" in route
    assert await ping(p.client, SERVICE_ADDRESS) == (3, 3)


async def test_each_table_has_its_own_metric_and_reconciliation_drops_an_older_default(
    dlab: DataplaneLab,
) -> None:
    """The kernel walks one hash chain for IPv4 routes alike but for their table: every
    IPv4 route of a table, its unreachable default included, has the table's number as
    its metric, so that adding one costs the same at any number of tables. A default
    without it (an older layout's) sits beside it until reconciliation removes it."""
    p = await two_domains(dlab)
    cw, ew = p.wires()
    await p.attach(cw, ew)
    ns = p.b.netns
    v4 = await run("ip", "-4", "-n", ns, "rule")
    tables = re.findall(r"lookup (\d+)", v4)
    assert len(tables) == 2, tables  # the tunnel's table, and the connection's
    for table in tables:
        shown = _lines(await run("ip", "-4", "-n", ns, "route", "show", "table", table))
        assert f"unreachable default proto 147 metric {table}" in shown
        assert all(re.search(rf"\bmetric {table}\b", r) for r in shown), shown
    table = tables[-1]
    await run("ip", "-4", "-n", ns, "route", "add", "unreachable", "default", "table", table)
    _, want_b = desired(p, (cw, ew))
    report = await p.b.dataplane.reconcile(want_b)
    assert report.changes == [f"route unreachable 0.0.0.0/0 table {table} removed"]
    assert report.failures == []
    routes = await run("ip", "-4", "-n", ns, "route", "show", "table", table)
    assert [r for r in _lines(routes) if r.startswith("unreachable")] == [
        f"unreachable default proto 147 metric {table}"
    ]
    assert (await p.b.dataplane.reconcile(want_b)).changes == []
    assert await ping(p.client, SERVICE_ADDRESS) == (3, 3)


def _lines(out: str) -> list[str]:
    return [line.strip() for line in out.splitlines()]


async def _count_sources(netns: str, sources: list[str]) -> Callable[[], Awaitable[list[int]]]:
    """Count, in ``netns``, the packets that arrive from each of ``sources``."""
    rules = "".join(f"ip saddr {src} counter\n" for src in sources)
    script = (
        "table inet spy {\n chain c {\n type filter hook prerouting priority -300;\n"
        f"{rules} }}\n}}\n"
    )
    await run("ip", "netns", "exec", netns, "nft", "-f", "-", input=script.encode())

    async def counts() -> list[int]:
        out = await run("ip", "netns", "exec", netns, "nft", "list", "table", "inet", "spy")
        return [int(n) for n in re.findall(r"counter packets (\d+)", out)]

    return counts


async def test_a_workload_cannot_send_from_an_address_it_was_not_given(
    dlab: DataplaneLab,
) -> None:
    """The source guard: a client may send from its address only, an endpoint from its
    address and the prefixes it offers. The forged sources here belong to a second
    connection through the same tunnel, so the far side's WireGuard would let them in
    (its allowed IPs hold them): only the guard stops them. Counted where they would
    arrive."""
    p = await two_domains(dlab)
    c2, e2 = await dlab.workload("c2"), await dlab.workload("e2", service=SERVICE_ADDRESS)
    one, two = p.wires("conn-1", 1), p.wires("conn-2", 2, client=c2, endpoint=e2)
    await p.attach(*one)
    await p.attach(*two)
    client1, client2 = (str(cw.address.ip) for cw, _ in (one, two))
    endpoint2 = str(two[1].address.ip)

    # The client of conn-1 sends as the client of conn-2, whose endpoint would get it.
    at_e1 = await _count_sources(p.endpoint, [client1])
    at_e2 = await _count_sources(e2, [client2])
    await run("ip", "-n", p.client, "address", "add", f"{client2}/32", "dev", "nsm0")
    assert await ping(p.client, SERVICE_ADDRESS, count=2, interval=0.05, source=client1) == (2, 2)
    await ping(p.client, SERVICE_ADDRESS, count=2, interval=0.05, source=client2)
    assert (await at_e1(), await at_e2()) == ([2], [0])

    # The endpoint of conn-1: from an offered prefix, yes; as conn-2's endpoint, no.
    offered = str(OFFERED.network_address + 9)
    at_c1 = await _count_sources(p.client, [offered, endpoint2])
    for address in (offered, endpoint2):
        await run("ip", "-n", p.endpoint, "address", "add", f"{address}/32", "dev", "lo")
        await ping(p.endpoint, client1, count=2, interval=0.05, source=address)
    assert await at_c1() == [2, 0]


async def test_what_arrives_unmarked_on_a_wire_goes_nowhere(dlab: DataplaneLab) -> None:
    """A veth whose mark is missing (its wire is being made or removed) drops what it
    brings: the gateway node's main table would route it into the underlay."""
    p = await two_domains(dlab)
    cw, ew = p.wires()
    await p.attach(cw, ew)
    [wire] = (await p.a.dataplane.state()).wires
    underlay_b, client = p.b.addresses["a"], str(cw.address.ip)
    next_hop = str(cw.endpoint_address.ip)
    await run("ip", "-n", p.client, "route", "add", underlay_b, "via", next_hop, "dev", "nsm0")
    at_b = await _count_sources(p.b.netns, [client])
    await ping(p.client, underlay_b, count=2, interval=0.05)  # marked: its table ends it
    async with Nft(p.a.netns, dlab.prefix) as nft:
        [mark] = [m for m in await nft.marks() if m.iif == wire.gateway_interface]
        await nft.delete([mark])
    await ping(p.client, underlay_b, count=2, interval=0.05)
    assert await at_b() == [0]


async def test_another_connection_leaves_the_session_alone(dlab: DataplaneLab) -> None:
    p = await two_domains(dlab)
    await p.attach(*p.wires())
    assert await ping(p.client, str(ENDPOINT_ADDRESS.ip), count=1) == (1, 1)
    [before_a] = (await p.a.dataplane.state()).peers
    [before_b] = (await p.b.dataplane.state()).peers
    assert before_a.last_handshake is not None

    other_client = await dlab.workload("c2")
    other_endpoint = await dlab.workload("e2")
    pinging = asyncio.create_task(ping(p.client, SERVICE_ADDRESS, count=40, interval=0.05))
    await asyncio.sleep(0.2)
    cw, ew = p.wires(
        "conn-2",
        7,
        client=other_client,
        endpoint=other_endpoint,
        routes=(ipaddress.ip_network("10.70.0.0/16"), OFFERED),
    )
    await p.attach(cw, ew)
    assert await ping(other_client, str(ew.address.ip), count=2) == (2, 2)
    [during] = (await p.a.dataplane.state()).peers
    assert during.allowed_ips == ["10.60.0.0/16", "10.70.0.0/16", "172.16.0.14/32", "172.16.1.0/32"]
    assert await p.a.dataplane.detach("conn-2")
    assert await p.b.dataplane.detach("conn-2")
    assert not await p.a.dataplane.detach("conn-2")
    assert await pinging == (40, 40)  # not one packet lost

    [after_a] = (await p.a.dataplane.state()).peers
    [after_b] = (await p.b.dataplane.state()).peers
    assert after_a.last_handshake == before_a.last_handshake  # the same session
    assert after_b.last_handshake == before_b.last_handshake
    # The shared prefix stays for the first connection; the other one's went.
    assert after_a.allowed_ips == ["10.60.0.0/16", "172.16.1.0/32"]
    assert after_b.allowed_ips == ["172.16.1.1/32"]
    async with Rtnl(other_client) as rtnl:
        assert await rtnl.find("nsm0") is None


async def test_wires_closed_together_share_one_rewrite_of_the_allowed_ips(
    dlab: DataplaneLab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Six connections closed at once: their veth pairs go together after the lock,
    and the peer's list of allowed IPs (rewritten whole by WireGuard) is written once or
    twice, not six times, ending with exactly what the connection left open needs. An
    attach right after that reuses a closed connection's addresses works."""
    p = await two_domains(dlab)
    await p.attach(*p.wires())
    closing = [p.wires(f"conn-{n}", n, ifname=f"nsm{n}") for n in range(2, 8)]
    for cw, ew in closing:
        await p.attach(cw, ew)
    writes: list[int] = []
    replace_allowed_ips = p.a.dataplane.driver.replace_allowed_ips

    async def counted(*args: Any) -> None:
        writes.append(len(args[2]))
        await replace_allowed_ips(*args)

    monkeypatch.setattr(p.a.dataplane.driver, "replace_allowed_ips", counted)
    deletions: list[int] = []
    first_deletion = asyncio.Event()
    delete_links = Rtnl.delete_links

    async def counted_deletions(rtnl: Rtnl, ifnames: list[str], group: int) -> list[bool]:
        deletions.append(len(ifnames))
        if len(deletions) == 1:
            await first_deletion.wait()  # held until the others are waiting
        return await delete_links(rtnl, ifnames, group)

    monkeypatch.setattr(Rtnl, "delete_links", counted_deletions)
    detaching = asyncio.gather(*(p.a.dataplane.detach(cw.connection_id) for cw, _ in closing))
    for _ in range(1000):  # until all six are unwired, however slow the machine
        if len(p.a.dataplane._dying) == 6:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # their deletions are handed over
    first_deletion.set()
    await detaching
    assert 1 <= len(writes) <= 2, writes
    # What was closed while the first deletion ran went in one more: not six deletions,
    # each waiting for RCU grace periods.
    assert sum(deletions) == 6 and len(deletions) <= 2, deletions
    [peer] = (await p.a.dataplane.state()).peers
    assert peer.allowed_ips == ["10.60.0.0/16", "172.16.1.0/32"]
    async with Rtnl(p.client) as rtnl:
        assert [await rtnl.find(f"nsm{n}") for n in range(2, 8)] == [None] * 6
    for _, ew in closing:
        await p.b.dataplane.detach(ew.connection_id)
    again = p.wires("conn-9", 2, ifname="nsm2")
    await p.attach(*again)
    assert await ping(p.client, str(again[1].address.ip), count=1) == (1, 1)
    assert await ping(p.client, str(ENDPOINT_ADDRESS.ip), count=1) == (1, 1)


async def test_a_group_that_cannot_be_deleted_whole_is_deleted_one_by_one(
    dlab: DataplaneLab, caplog: pytest.LogCaptureFixture
) -> None:
    """Something that has no way to be deleted (here the loopback) in fedgw's link group
    fails the deletion of the whole group: the pairs are then deleted one by one, and
    the rest stays."""
    p = await two_domains(dlab)
    await p.attach(*p.wires())
    group = str(p.a.dataplane.settings.link_group)
    await run("ip", "-n", p.a.netns, "link", "set", "lo", "group", group)
    assert await p.a.dataplane.detach("conn-1")
    async with Rtnl(p.a.netns) as rtnl:
        assert await rtnl.find(p.a.dataplane.naming.veth("conn-1", "client")) is None
        [lo] = await rtnl.link_details("lo")
    assert lo.up
    assert "one by one" in caplog.text


async def test_wires_asked_for_together_are_attached_together(
    dlab: DataplaneLab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Wires asked for while the data plane is busy go in together: one WireGuard write
    for all their prefixes. In that group, a wire whose namespace does not exist and one
    whose interface name is taken fail on their own; the others carry traffic and the
    failed ones leave nothing."""
    p = await two_domains(dlab)
    await p.attach(*p.wires())  # nsm0 in the client
    # No offered routes: they would all lead to 10.60.0.0/16 in the one client.
    good = [p.wires(f"conn-{n}", n, ifname=f"nsm{n}", routes=()) for n in range(2, 6)]
    for _, ew in good:
        await p.b.dataplane.attach_endpoint(ew)
    no_netns, _ = p.wires("conn-8", 8, client=f"fgwd-{dlab.tag}-nothere", ifname="nsm8")
    name_taken, _ = p.wires("conn-9", 9)  # nsm0 again
    writes: list[int] = []
    add_allowed_ips = p.a.dataplane.driver.add_allowed_ips

    async def counted(*args: Any, **kwargs: Any) -> None:
        writes.append(len(args[2]))
        await add_allowed_ips(*args, **kwargs)

    monkeypatch.setattr(p.a.dataplane.driver, "add_allowed_ips", counted)
    dp = p.a.dataplane
    wires = [good[0][0], no_netns, good[1][0], name_taken, good[2][0], good[3][0]]
    async with dp._lock:  # busy: the requests queue up meanwhile
        attaching = [asyncio.create_task(dp.attach_client(w)) for w in wires]
        await asyncio.sleep(0.1)
    results = await asyncio.gather(*attaching, return_exceptions=True)

    assert isinstance(results[1], NamespaceNotFound), results[1]
    assert isinstance(results[3], WireConflict) and "exists" in str(results[3]), results[3]
    assert [r.connection_id for r in results if not isinstance(r, BaseException)] == [
        "conn-2",
        "conn-3",
        "conn-4",
        "conn-5",
    ]
    assert writes == [4]  # each good wire's endpoint address, in one write
    for _, ew in good:
        assert await ping(p.client, str(ew.address.ip), count=1) == (1, 1)
    assert await ping(p.client, SERVICE_ADDRESS, count=1) == (1, 1)
    state = await dp.state()
    assert sorted(w.connection_id for w in state.wires) == [f"conn-{n}" for n in range(1, 6)]
    async with Rtnl(p.a.netns) as rtnl:
        assert await rtnl.find(dp.naming.veth("conn-9", "client")) is None
        assert await rtnl.find(dp.naming.veth("conn-8", "client")) is None
    report = await dp.reconcile(
        DesiredState(peers=[p.a.tunnel_to(p.b)], wires=[p.wires()[0], *(cw for cw, _ in good)])
    )
    assert report.changes == []  # what the failures left equals what is wanted


async def test_one_wire_asked_for_twice_in_a_group(dlab: DataplaneLab) -> None:
    """The same wire asked for twice at once is made once, and both callers get it; a
    changed version of it asked for in the same group replaces it afterwards."""
    p = await two_domains(dlab)
    dp = p.a.dataplane
    cw, ew = p.wires()
    changed, _ = p.wires(routes=())
    await p.b.dataplane.attach_endpoint(ew)
    async with dp._lock:
        attaching = [asyncio.create_task(dp.attach_client(w)) for w in (cw, cw, changed)]
        await asyncio.sleep(0.1)
    first, again, last = await asyncio.gather(*attaching)
    assert first.gateway_interface == again.gateway_interface == last.gateway_interface
    assert first.routes == again.routes == ["10.60.0.0/16"]
    assert last.routes == []
    [wire] = (await dp.state()).wires
    assert wire.routes == []
    [peer] = (await dp.state()).peers
    assert peer.allowed_ips == ["172.16.1.0/32"]
    assert await ping(p.client, str(ENDPOINT_ADDRESS.ip), count=1) == (1, 1)


async def test_a_group_that_fails_together_is_tried_wire_by_wire(
    dlab: DataplaneLab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step the wires of a group take together fails (here nftables refuses one
    wire's marks): everything of the group is undone, then each wire is tried alone, so
    that only the one at fault fails and the others work."""
    p = await two_domains(dlab)
    dp = p.a.dataplane
    wires = [p.wires(f"conn-{n}", n, ifname=f"nsm{n}") for n in range(1, 4)]
    for _, ew in wires:
        await p.b.dataplane.attach_endpoint(ew)
    faulty = dp.naming.veth("conn-2", "client")
    add_marks = dp.nft.add
    tries: list[int] = []

    async def refusing(marks: Any) -> None:
        marks = list(marks)
        tries.append(len({m.iif for m in marks}))
        if any(m.iif == faulty for m in marks):
            raise NetlinkFailed("injected: nftables refuses", errno=22)
        await add_marks(marks)

    monkeypatch.setattr(dp.nft, "add", refusing)
    async with dp._lock:
        attaching = [asyncio.create_task(dp.attach_client(cw)) for cw, _ in wires]
        await asyncio.sleep(0.1)
    results = await asyncio.gather(*attaching, return_exceptions=True)

    assert tries == [3, 1, 1, 1]  # together, then each alone
    assert isinstance(results[1], NetlinkFailed), results[1]
    assert [r.connection_id for r in results if not isinstance(r, BaseException)] == [
        "conn-1",
        "conn-3",
    ]
    for n in (0, 2):
        assert await ping(p.client, str(wires[n][1].address.ip), count=1) == (1, 1)
    [peer] = (await dp.state()).peers
    assert peer.allowed_ips == ["10.60.0.0/16", "172.16.0.2/32", "172.16.0.6/32"]
    async with Rtnl(p.client) as rtnl:
        assert await rtnl.find("nsm2") is None
    async with Rtnl(p.a.netns) as rtnl:
        assert await rtnl.find(faulty) is None


async def test_an_attach_given_up_during_its_group_leaves_nothing(
    dlab: DataplaneLab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller cancelled while its wire is being made with others: the others are
    attached, and the given-up wire is taken off again before the cancellation reaches
    the caller, as an attach cancelled on its own always left nothing."""
    p = await two_domains(dlab)
    dp = p.a.dataplane
    (kept, kept_e), (given_up, given_up_e) = (
        p.wires(f"conn-{n}", n, ifname=f"nsm{n}") for n in (1, 2)
    )
    await p.b.dataplane.attach_endpoint(kept_e)
    await p.b.dataplane.attach_endpoint(given_up_e)
    reached, go_on = asyncio.Event(), asyncio.Event()
    create_veth = dp._create_veth

    async def held(plan: Any) -> None:
        await create_veth(plan)
        if plan.wire.connection_id == "conn-2":
            reached.set()
            await go_on.wait()

    monkeypatch.setattr(dp, "_create_veth", held)
    async with dp._lock:
        keeping = asyncio.create_task(dp.attach_client(kept))
        giving_up = asyncio.create_task(dp.attach_client(given_up))
        await asyncio.sleep(0.1)
    async with asyncio.timeout(10):
        await reached.wait()
    giving_up.cancel()
    await asyncio.sleep(0.1)
    go_on.set()
    assert (await keeping).connection_id == "conn-1"
    with pytest.raises(asyncio.CancelledError):
        await giving_up
    assert [w.connection_id for w in (await dp.state()).wires] == ["conn-1"]
    async with Rtnl(p.client) as rtnl:
        assert await rtnl.find("nsm2") is None
    [peer] = (await dp.state()).peers
    assert peer.allowed_ips == ["10.60.0.0/16", "172.16.0.2/32"]
    assert await ping(p.client, str(kept_e.address.ip), count=1) == (1, 1)


async def test_two_peers_handing_out_the_same_prefixes_both_work(dlab: DataplaneLab) -> None:
    a = await dlab.gateway("a")
    b = await dlab.gateway("b")
    d = await dlab.gateway("d")
    await dlab.underlay(a, b)
    await dlab.underlay(a, d)
    await dlab.peer(a, b)
    await dlab.peer(a, d)
    c1, c2 = await dlab.workload("c1"), await dlab.workload("c2")
    e_b = await dlab.workload("eb", service=SERVICE_ADDRESS)
    e_d = await dlab.workload("ed", service=SERVICE_ADDRESS)
    via_b = Pair(a, b, c1, e_b)
    via_d = Pair(a, d, c2, e_d)
    # Both peers give 172.16.1.0/31 and route 10.60.0.0/16, to two clients of gateway a.
    await via_b.attach(*via_b.wires("conn-b"))
    await via_d.attach(*via_d.wires("conn-d"))
    servers = [
        await whoami_server(e_b, SERVICE_ADDRESS, b"B"),
        await whoami_server(e_d, SERVICE_ADDRESS, b"D"),
    ]
    try:
        results = await asyncio.gather(
            ping(c1, str(ENDPOINT_ADDRESS.ip), count=5, interval=0.1),
            ping(c2, str(ENDPOINT_ADDRESS.ip), count=5, interval=0.1),
            ping(c1, SERVICE_ADDRESS, count=5, interval=0.1),
            ping(c2, SERVICE_ADDRESS, count=5, interval=0.1),
        )
        assert list(results) == [(5, 5)] * 4
        assert await whoami(c1, SERVICE_ADDRESS) == b"B"
        assert await whoami(c2, SERVICE_ADDRESS) == b"D"
    finally:
        for listener, task in servers:
            task.cancel()
            listener.close()
    status = await a.dataplane.state()
    assert {p.domain: p.allowed_ips for p in status.peers} == {
        "b": ["10.60.0.0/16", "172.16.1.0/32"],
        "d": ["10.60.0.0/16", "172.16.1.0/32"],
    }
    assert len({t for w in status.wires for t in w.tables}) == 2  # one table per peer


async def test_two_endpoints_offering_one_prefix_to_clients_of_one_peer(dlab: DataplaneLab) -> None:
    """Two replicas of a service in b offer the same prefix; a's two clients each reach
    the replica their connection chose (told apart by the client's source address)."""
    p = await two_domains(dlab)
    c2 = await dlab.workload("c2")
    e2 = await dlab.workload("e2", service=SERVICE_ADDRESS)
    await p.attach(*p.wires("conn-1", 1))
    await p.attach(*p.wires("conn-2", 2, client=c2, endpoint=e2))
    servers = [
        await whoami_server(p.endpoint, SERVICE_ADDRESS, b"E1"),
        await whoami_server(e2, SERVICE_ADDRESS, b"E2"),
    ]
    try:
        assert await whoami(p.client, SERVICE_ADDRESS) == b"E1"
        assert await whoami(c2, SERVICE_ADDRESS) == b"E2"
    finally:
        for listener, task in servers:
            task.cancel()
            listener.close()


async def test_a_df_ping_fills_the_mtu_exactly(dlab: DataplaneLab) -> None:
    # Underlay MTU 1450: the tunnel takes 1370 (found from the route to the peer).
    p = await two_domains(dlab, underlay_mtu=1450)
    await p.attach(*p.wires())
    [peer] = (await p.a.dataplane.state()).peers
    assert peer.mtu == 1370
    largest = 1370 - 28  # IPv4 header and ICMP header
    dst = str(ENDPOINT_ADDRESS.ip)
    assert await ping(p.client, dst, count=2, size=largest, df=True) == (2, 2)
    # One byte more does not fit the client's interface, and DF forbids fragments.
    out = await run(
        *_in(p.client),
        "ping",
        "-n",
        "-c",
        "1",
        "-W",
        "1",
        "-M",
        "do",
        "-s",
        str(largest + 1),
        dst,
        check=False,
    )
    assert "1 packets transmitted, 0 received, +1 errors" in out  # EMSGSIZE, not a loss
    assert await ping(p.endpoint, str(CLIENT_ADDRESS.ip), count=2, size=largest, df=True) == (2, 2)


async def test_a_workload_given_by_pid(dlab: DataplaneLab) -> None:
    p = await two_domains(dlab)
    # A namespace with no name, held by one process: how a pod looks to the gateway.
    proc = await dlab.spawn("unshare", "--net", "sh", "-c", "echo ready; exec sleep 300")
    assert proc.stdout is not None
    assert await proc.stdout.readline() == b"ready\n"
    cw, ew = p.wires()
    ticks = await asyncio.to_thread(process_start_ticks, proc.pid)
    cw = ClientWire(
        connection_id=cw.connection_id,
        peer=cw.peer,
        workload=Workload(pid=proc.pid, pid_start_ticks=ticks),
        interface="nsm0",
        address=cw.address,
        endpoint_address=cw.endpoint_address,
        routes=cw.routes,
    )
    await p.attach(cw, ew)
    where = f"/proc/{proc.pid}/ns/net"
    await run(*_in(where), "ip", "link", "set", "lo", "up")
    assert await ping(where, SERVICE_ADDRESS) == (3, 3)
    # The pod goes away: its namespace takes the veth, gateway end included.
    proc.kill()
    await proc.wait()
    [wire] = (await p.a.dataplane.state()).wires
    # The kernel takes namespaces apart on one work queue, shared with every other
    # namespace being deleted: seconds, at times.
    for _ in range(600):
        async with Rtnl(p.a.netns) as rtnl:
            if await rtnl.find(wire.gateway_interface) is None:
                break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the gateway end outlived the workload's namespace")
    assert await p.a.dataplane.detach(cw.connection_id)


async def test_a_local_connection_needs_no_tunnel(dlab: DataplaneLab) -> None:
    a = await dlab.gateway("a")
    client = await dlab.workload("c")
    endpoint = await dlab.workload("e", service=SERVICE_ADDRESS)
    common: dict[str, Any] = {
        "connection_id": "local-1",
        "peer": None,
        "interface": "nsm0",
        "routes": (OFFERED,),
    }
    await a.dataplane.attach_endpoint(
        EndpointWire(
            workload=Workload(netns=endpoint),
            address=ENDPOINT_ADDRESS,
            client_address=CLIENT_ADDRESS,
            **common,
        )
    )
    await a.dataplane.attach_client(
        ClientWire(
            workload=Workload(netns=client),
            address=CLIENT_ADDRESS,
            endpoint_address=ENDPOINT_ADDRESS,
            **common,
        )
    )
    assert await ping(client, SERVICE_ADDRESS) == (3, 3)
    assert await ping(endpoint, str(CLIENT_ADDRESS.ip)) == (3, 3)
    await tcp_transfer(endpoint, SERVICE_ADDRESS, client, 1 << 20)
    status = await a.dataplane.state()
    assert status.peers == []
    first, second = status.wires
    assert first.tables == second.tables  # one table for the connection
    assert await a.dataplane.detach("local-1")
    assert (await a.dataplane.state()).wires == []
    async with Rtnl(a.netns) as rtnl:
        assert [r for r in await rtnl.rules() if r.priority in range(20000, 20003)] == []
        assert await rtnl.routes(range(100_000, 200_000)) == []


async def test_what_contradicts_is_refused_and_rolled_back(dlab: DataplaneLab) -> None:
    p = await two_domains(dlab)
    cw, ew = p.wires()
    await p.attach(cw, ew)
    c2 = await dlab.workload("c2")
    # The same address pair from the same peer for a second client: ambiguous.
    clash, _ = p.wires("conn-2", client=c2)
    with pytest.raises(WireConflict, match="contradicts"):
        await p.a.dataplane.attach_client(clash)
    # A workload interface name that is taken.
    taken, _ = p.wires("conn-3", 3, client=p.client)
    with pytest.raises(WireConflict, match="exists"):
        await p.a.dataplane.attach_client(taken)
    unknown = ClientWire(
        connection_id="conn-4",
        peer="nowhere.example",
        workload=Workload(netns=c2),
        interface="nsm0",
        address=CLIENT_ADDRESS,
        endpoint_address=ENDPOINT_ADDRESS,
    )
    with pytest.raises(UnknownPeer):
        await p.a.dataplane.attach_client(unknown)
    # Nothing of the refused wires stayed; the first one still works.
    assert [w.connection_id for w in (await p.a.dataplane.state()).wires] == ["conn-1"]
    async with Rtnl(c2) as rtnl:
        assert await rtnl.find("nsm0") is None
    assert await ping(p.client, SERVICE_ADDRESS, count=1) == (1, 1)
    report = await p.a.dataplane.reconcile(DesiredState(peers=[p.a.tunnel_to(p.b)], wires=[cw]))
    assert report.changes == []  # what the refusals left equals what is wanted


async def test_removing_a_peer_removes_its_wires(dlab: DataplaneLab) -> None:
    p = await two_domains(dlab)
    await p.attach(*p.wires("conn-1", 1))
    await p.attach(*p.wires("conn-2", 2, ifname="nsm1"))
    [peer] = (await p.a.dataplane.state()).peers
    assert await p.a.dataplane.remove_peer("b") == ["conn-1", "conn-2"]
    status = await p.a.dataplane.state()
    assert (status.peers, status.wires) == ([], [])
    assert not (SOCKET_DIR / f"{peer.interface}.sock").exists()
    async with Rtnl(p.a.netns) as rtnl:
        assert [link.name for link in await rtnl.links() if link.name.startswith(dlab.prefix)] == []
    async with Rtnl(p.client) as rtnl:
        assert [link.name for link in await rtnl.links()] == ["lo"]


# --- the reconciler ----------------------------------------------------------------------------


async def owned(gw: Gateway) -> dict[str, list[str]]:
    """Everything fedgw owns in a gateway namespace, as text."""
    settings = gw.dataplane.settings
    async with Rtnl(gw.netns) as rtnl:
        links = sorted(
            link.name for link in await rtnl.links() if link.name.startswith(settings.prefix)
        )
        rules = sorted(str(r) for r in await rtnl.rules() if r.priority in settings.priorities)
        routes = sorted(str(r) for r in await rtnl.routes(settings.tables))
    sockets = sorted(p.name for p in _our_sockets(settings.prefix) if p.stem in links)
    pids = [str(pid) for pid in netns_pids([gw.netns])]
    return {"links": links, "rules": rules, "routes": routes, "sockets": sockets, "pids": pids}


def desired(p: Pair, *wires: tuple[ClientWire, EndpointWire]) -> tuple[DesiredState, DesiredState]:
    return (
        DesiredState(peers=[p.a.tunnel_to(p.b)], wires=[cw for cw, _ in wires]),
        DesiredState(peers=[p.b.tunnel_to(p.a)], wires=[ew for _, ew in wires]),
    )


async def test_the_reconciler_builds_repairs_and_removes(dlab: DataplaneLab) -> None:
    p = await two_domains(dlab, peered=False)
    c2 = await dlab.workload("c2")
    e2 = await dlab.workload("e2")
    one = p.wires("conn-1", 1)
    two = p.wires("conn-2", 2, client=c2, endpoint=e2, routes=())
    want_a, want_b = desired(p, one, two)
    for gw, want in ((p.a, want_a), (p.b, want_b)):
        report = await gw.dataplane.reconcile(want)
        assert report.failures == []
        assert report.changed
    assert await ping(p.client, SERVICE_ADDRESS, count=2) == (2, 2)
    assert await ping(c2, str(two[1].address.ip), count=2) == (2, 2)
    for gw, want in ((p.a, want_a), (p.b, want_b)):  # nothing differs: nothing is done
        assert (await gw.dataplane.reconcile(want)).changes == []
    [peer] = (await p.a.dataplane.state()).peers
    tunnel = peer.interface
    veth1, veth2 = (w.gateway_interface for w in (await p.a.dataplane.state()).wires)
    table = (await p.a.dataplane.state()).wires[0].tables[0]
    prefix = dlab.prefix

    # Break what fedgw made, and leave things it must remove.
    settings = p.a.dataplane.settings
    driver = dlab.userspace()
    stale_tunnel = f"{prefix}w{'z' * (14 - len(prefix))}"
    stranger = await dlab.workload("x")
    async with Nft(p.a.netns, prefix) as nft:
        [veth1_mark] = [m for m in await nft.marks() if m.iif == veth1]
        await nft.delete([veth1_mark])
        await nft.add([Mark(f"{prefix}cgone", None, 0x5)])
    async with Rtnl(p.a.netns) as rtnl:
        [route] = [r for r in await rtnl.routes(settings.tables) if r.dst == OFFERED]
        await rtnl.delete_route(route)
        await rtnl.delete_neighbour(Neighbour(veth2, two[0].address.ip, "00:00:00:00:00:00"))
        await rtnl.add_veth_pair(
            f"{prefix}c{'q' * (14 - len(prefix))}", "junk", peer_netns=stranger
        )
        await rtnl.add_rule(Rule(settings.rule_priority + 1, 4, table + 1, iif=f"{prefix}cgone"))
        await rtnl.replace_route(
            Route(ipaddress.ip_network("10.99.0.0/16"), table + 1, kind="unreachable")
        )
    async with Rtnl(p.client) as rtnl:
        await rtnl.delete_address("nsm0", one[0].address)
        await rtnl.set_link("nsm0", mtu=1300)

    await driver.ensure_interface(InterfaceSpec(stale_tunnel, p.a.netns, PrivateKey.generate()))
    await driver.remove_allowed_ips(
        InterfaceRef(tunnel, p.a.netns), p.b.key.public_key(), [OFFERED]
    )
    assert (await ping(p.client, SERVICE_ADDRESS, count=1))[1] == 0  # broken

    report = await p.a.dataplane.reconcile(want_a)
    assert report.failures == []
    text = "\n".join(report.changes)
    for expected in (
        f"mark {veth1_mark.mark:#x} on {veth1}",
        f"mark 0x5 on {prefix}cgone removed",
        f"route 10.60.0.0/16 dev {tunnel}",
        "neighbour 172.16.0.5 lladdr",
        "address 172.16.0.3/31 on nsm0",
        "link nsm0",
        f"stale wire {prefix}c",
        f"stale tunnel {stale_tunnel} removed",
        f"iif {prefix}cgone lookup {table + 1} (IPv4) removed",
        f"route unreachable 10.99.0.0/16 table {table + 1} removed",
        "peer b on",
    ):
        assert expected in text, f"{expected!r} not in {report.changes}"
    assert await ping(p.client, SERVICE_ADDRESS, count=2) == (2, 2)
    assert (await p.a.dataplane.reconcile(want_a)).changes == []
    assert not (SOCKET_DIR / f"{stale_tunnel}.sock").exists()
    async with Rtnl(stranger) as rtnl:
        assert await rtnl.find("junk") is None  # its veth went with the gateway end

    # A wire whose workload is gone fails alone; the rest is applied.
    gone = ClientWire(
        connection_id="conn-3",
        peer="b",
        workload=Workload(netns=f"fgwd-{dlab.tag}-nothere"),
        interface="nsm0",
        address=pair(3)[1],
        endpoint_address=pair(3)[0],
    )
    report = await p.a.dataplane.reconcile(DesiredState(peers=want_a.peers, wires=[one[0], gone]))
    assert len(report.failures) == 1
    assert "conn-3" in report.failures[0]
    assert any(f"stale wire {veth2} removed" in c for c in report.changes)
    [peer] = (await p.a.dataplane.state()).peers
    assert peer.allowed_ips == ["10.60.0.0/16", "172.16.0.2/32"]
    assert await ping(p.client, SERVICE_ADDRESS, count=2) == (2, 2)

    # Nothing wanted: nothing of fedgw's is left, daemon and socket included.
    await p.a.dataplane.purge()
    assert await owned(p.a) == {"links": [], "rules": [], "routes": [], "sockets": [], "pids": []}
    assert not (SOCKET_DIR / f"{tunnel}.sock").exists()


async def test_a_restarted_gateway_adopts_tunnels_and_wires(dlab: DataplaneLab) -> None:
    p = await two_domains(dlab, peered=False)
    second = p.wires("conn-2", 2, ifname="nsm1", routes=(ipaddress.ip_network("10.70.0.0/16"),))
    want_a, want_b = desired(p, p.wires("conn-1", 1), second)
    await p.a.dataplane.reconcile(want_a)
    await p.b.dataplane.reconcile(want_b)
    assert await ping(p.client, SERVICE_ADDRESS, count=1) == (1, 1)
    [before] = (await p.a.dataplane.state()).peers
    pids = netns_pids([p.a.netns])

    pinging = asyncio.create_task(ping(p.client, SERVICE_ADDRESS, count=30, interval=0.05))
    await asyncio.sleep(0.2)
    await p.a.dataplane.close()  # the gateway goes away; the kernel state stays
    fresh = UserspaceDriver(UserspaceSettings(log_dir=dlab.tmp / "wg-logs-2", stop_timeout=2.0))
    dlab.drivers.append(fresh)
    dp = Dataplane(p.a.dataplane.settings, fresh)
    p.a.dataplane = dp
    await dp.open()
    report = await dp.reconcile(want_a)
    assert (report.changes, report.failures) == ([], [])  # adopted as it was
    assert await pinging == (30, 30)
    [after] = (await dp.state()).peers
    assert after.last_handshake == before.last_handshake
    assert netns_pids([p.a.netns]) == pids  # the same wireguard-go
    # And it goes on working incrementally from the adopted state.
    assert await dp.detach("conn-2")
    assert [w.connection_id for w in (await dp.state()).wires] == ["conn-1"]


async def test_a_wire_a_stopped_gateway_was_deleting_is_made_anew(dlab: DataplaneLab) -> None:
    """A gateway that stops after it moved a pair into its link group to delete it, and
    before the kernel deleted the group: its successor does not adopt that pair (the next
    deletion of the group would take it along) but makes it anew."""
    p = await two_domains(dlab, peered=False)
    want_a, want_b = desired(p, p.wires("conn-1", 1))
    await p.a.dataplane.reconcile(want_a)
    await p.b.dataplane.reconcile(want_b)
    await p.a.dataplane.close()
    settings = p.a.dataplane.settings
    veth = p.a.dataplane.naming.veth("conn-1", "client")
    await run("ip", "-n", p.a.netns, "link", "set", veth, "group", str(settings.link_group))

    dp = Dataplane(settings, p.a.dataplane.driver)
    p.a.dataplane = dp
    await dp.open()
    report = await dp.reconcile(want_a)
    assert report.failures == []
    assert [c for c in report.changes if c.startswith(f"wire {veth} <-> nsm0")], report.changes
    async with Rtnl(p.a.netns) as rtnl:
        [link] = await rtnl.link_details(veth)
    assert link.group == 0
    assert await ping(p.client, SERVICE_ADDRESS, count=1) == (1, 1)


async def test_mss_clamping_lets_larger_workload_mtus_through(dlab: DataplaneLab) -> None:
    p = await two_domains(dlab, mss_clamping=True)
    # Workloads at 1500 behind a 1420 tunnel: without clamping, full-size segments
    # would be dropped at the tunnel and nobody would hear why.
    await p.attach(*p.wires(mtu=1500))
    ruleset = await run(
        "ip", "netns", "exec", p.a.netns, "nft", "list", "table", "inet", f"fedgw_{dlab.prefix}"
    )
    assert "maxseg size set rt mtu" in ruleset
    await tcp_transfer(p.endpoint, SERVICE_ADDRESS, p.client, 2 << 20)
    await tcp_transfer(p.client, str(CLIENT_ADDRESS.ip), p.endpoint, 2 << 20)


async def attach_ipv6_wire(p: Pair, interface: str) -> ClientWire:
    """Connection ``v6``: fd00:16::1 in the client to fd00:16:: in the endpoint, which
    offers fd60::/64 (and answers at fd60::1); the client's wire."""
    async with Rtnl(p.endpoint) as rtnl:
        await rtnl.add_address("lo", "fd60::1/128")
    e_addr = ipaddress.ip_interface("fd00:16::/127")
    c_addr = ipaddress.ip_interface("fd00:16::1/127")
    offered = ipaddress.ip_network("fd60::/64")
    client = ClientWire("v6", "b", Workload(netns=p.client), interface, c_addr, e_addr, (offered,))
    await p.b.dataplane.attach_endpoint(
        EndpointWire("v6", "a", Workload(netns=p.endpoint), interface, e_addr, c_addr, (offered,))
    )
    await p.a.dataplane.attach_client(client)
    return client


async def test_an_ipv6_wire_over_an_ipv4_underlay(dlab: DataplaneLab) -> None:
    p = await two_domains(dlab)
    await attach_ipv6_wire(p, "nsm0")
    assert await ping(p.client, "fd60::1") == (3, 3)
    assert await ping(p.endpoint, "fd00:16::1") == (3, 3)
    [peer] = (await p.a.dataplane.state()).peers
    assert peer.allowed_ips == ["fd00:16::/128", "fd60::/64"]
    # 1420 - 40 (IPv6 header) - 8 (ICMPv6 header) fits exactly.
    assert await ping(p.client, "fd60::1", count=1, size=1420 - 48, df=True) == (1, 1)


@pytest.mark.parametrize("by", ["ipv6_as_needed", "administrator"])
async def test_where_links_start_without_ipv6_only_those_that_carry_it_have_it(
    dlab: DataplaneLab, by: str
) -> None:
    """Links made in the gateway namespace start without IPv6, as the gateway asked
    (ipv6_as_needed) or its administrator did: an IPv4 wire's gateway end has none (no
    multicast route), while the tunnels and an IPv6 wire's end have it turned on, and
    reconciliation turns it on again where it went missing."""
    if by == "ipv6_as_needed":
        p = await two_domains(dlab, ipv6_as_needed=True)
    else:
        p = await two_domains(dlab, peered=False)
        await set_sysctl(p.a.netns, "net.ipv6.conf.default.disable_ipv6", "1")
        await p.a.dataplane.reconcile(DesiredState())  # as a gateway's start does
        await dlab.peer(p.a, p.b)
    cw, ew = p.wires()
    await p.attach(cw, ew)
    v6 = await attach_ipv6_wire(p, "nsm1")

    async def ipv6_off(ns: str, link: str) -> bool:
        return await get_sysctl(ns, f"net.ipv6.conf.{link}.disable_ipv6") == "1"

    naming = p.a.dataplane.naming
    v4_end, v6_end = naming.veth(cw.connection_id, "client"), naming.veth("v6", "client")
    [peer] = (await p.a.dataplane.state()).peers
    assert await get_sysctl(p.a.netns, "net.ipv6.conf.default.disable_ipv6") == "1"
    assert await ipv6_off(p.a.netns, v4_end)
    assert not await ipv6_off(p.a.netns, v6_end)
    assert not await ipv6_off(p.a.netns, peer.interface)
    local6 = await run("ip", "-6", "-n", p.a.netns, "route", "show", "table", "local")
    assert v6_end in local6 and v4_end not in local6
    assert await ping(p.client, SERVICE_ADDRESS) == (3, 3)
    assert await ping(p.client, "fd60::1") == (3, 3)
    assert await ping(p.endpoint, "fd00:16::1") == (3, 3)

    await set_sysctl(p.a.netns, f"net.ipv6.conf.{v6_end}.disable_ipv6", "1")
    assert await ping(p.client, "fd60::1", count=1) == (1, 0)
    report = await p.a.dataplane.reconcile(DesiredState(peers=[p.a.tunnel_to(p.b)], wires=[cw, v6]))
    # Turned off, IPv6 took the link's IPv6 neighbour and route along: both come back.
    assert report.changes[0] == f"link {v6_end}: IPv6 on"
    assert [c.split()[0] for c in report.changes[1:]] == ["neighbour", "route"]
    assert await ping(p.client, "fd60::1") == (3, 3)


async def test_a_peer_behind_nat_is_found_by_its_keepalives(dlab: DataplaneLab) -> None:
    a = await dlab.gateway("a")
    b = await dlab.gateway("b")
    await dlab.underlay(a, b)
    # b does not know where a is (a is behind NAT); a keeps the path open. (b first:
    # a's first keepalive would otherwise meet a closed port and be retried in 5 s.)
    behind = b.tunnel_to(a)
    await b.dataplane.ensure_peer(
        PeerTunnel(behind.domain, behind.private_key, behind.public_key, None, behind.listen_port)
    )
    await a.dataplane.ensure_peer(a.tunnel_to(b, persistent_keepalive=1))
    p = Pair(a, b, await dlab.workload("c"), await dlab.workload("e", service=SERVICE_ADDRESS))
    await p.attach(*p.wires())
    for _ in range(150):  # the first keepalive makes the handshake (retried in 5 s)
        [peer_b] = (await b.dataplane.state()).peers
        if peer_b.endpoint is not None:
            break
        await asyncio.sleep(0.1)
    assert peer_b.endpoint == f"{a.addresses['b']}:{port('b')}"
    assert await ping(p.endpoint, str(CLIENT_ADDRESS.ip)) == (3, 3)  # b -> a first
    [peer_a] = (await a.dataplane.state()).peers
    assert peer_a.persistent_keepalive == 1
    [row] = [r for r in await wg_dump(a.netns, peer_a.interface) if len(r) == 8]
    assert row[7] == "1"


async def test_a_tunnel_started_before_the_peers_key_is_known(dlab: DataplaneLab) -> None:
    p = await two_domains(dlab, peered=False)
    early = replace(p.a.tunnel_to(p.b), public_key=None, endpoint=None)
    status = await p.a.dataplane.ensure_peer(early)
    assert (status.public_key, status.error) == (None, None)
    assert status.listen_port == port("b")
    # The interface listens, with no peer: only its own line in the dump.
    [own] = await wg_dump(p.a.netns, status.interface)
    assert own[2] == str(port("b"))
    cw, ew = p.wires()
    with pytest.raises(UnknownPeer, match="no peer yet"):
        await p.a.dataplane.attach_client(cw)
    assert (await p.a.dataplane.state()).wires == []
    # A start of the gateway keeps it as it is.
    report = await p.a.dataplane.reconcile(DesiredState(peers=[early]))
    assert (report.changes, report.failures) == ([], [])
    # The first connection brings the key: same interface, now with the peer.
    await p.b.dataplane.ensure_peer(p.b.tunnel_to(p.a))
    status = await p.a.dataplane.ensure_peer(p.a.tunnel_to(p.b))
    assert status.public_key == str(p.b.key.public_key()) and status.error is None
    assert [r[0] for r in await wg_dump(p.a.netns, status.interface) if len(r) == 8] == [
        str(p.b.key.public_key())
    ]
    await p.attach(cw, ew)
    assert await ping(p.client, SERVICE_ADDRESS, count=2) == (2, 2)
    # The key is not taken back from under a wire.
    with pytest.raises(WireConflict, match="carries wires"):
        await p.a.dataplane.ensure_peer(early)
    assert await ping(p.client, SERVICE_ADDRESS, count=1) == (1, 1)


async def test_a_rotated_key_keeps_the_wires(dlab: DataplaneLab) -> None:
    p = await two_domains(dlab)
    await p.attach(*p.wires())
    assert await ping(p.client, SERVICE_ADDRESS, count=1) == (1, 1)
    p.b.key = PrivateKey.generate()  # b rotates its key and tells a
    await p.b.dataplane.ensure_peer(p.b.tunnel_to(p.a))
    status = await p.a.dataplane.ensure_peer(p.a.tunnel_to(p.b))
    assert status.public_key == str(p.b.key.public_key())
    assert status.allowed_ips == ["10.60.0.0/16", "172.16.1.0/32"]  # moved to the new key
    [row] = [r for r in await wg_dump(p.a.netns, status.interface) if len(r) == 8]
    assert row[0] == str(p.b.key.public_key())  # the old peer is gone
    # When both sides change within milliseconds, wireguard-go may drop the first
    # handshake and retry it after REKEY_TIMEOUT (5 s); traffic must flow by then.
    deadline = time.monotonic() + 20
    while await ping(p.client, SERVICE_ADDRESS, count=1) != (1, 1):
        assert time.monotonic() < deadline, "no traffic 20 s after the key rotation"
    assert await ping(p.client, SERVICE_ADDRESS, count=2) == (2, 2)
    # A second tunnel cannot take a port that one uses already.
    d = await dlab.gateway("d")
    taken = PeerTunnel("d", p.a.key, d.key.public_key(), listen_port=port("b"))
    with pytest.raises(WireConflict, match="port"):
        await p.a.dataplane.ensure_peer(taken)


async def _kill_daemon(lab: DataplaneLab, gw: Gateway) -> None:
    [peer] = (await gw.dataplane.state()).peers
    pid = lab.userspace().pid(InterfaceRef(peer.interface, gw.netns))
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):  # until the driver has seen it die
        if lab.userspace().exited(InterfaceRef(peer.interface, gw.netns)) is not None:
            return
        await asyncio.sleep(0.02)
    pytest.fail("the driver did not notice")


async def test_a_dead_daemon_is_replaced_with_its_peer_and_routes(dlab: DataplaneLab) -> None:
    p = await two_domains(dlab)
    await p.attach(*p.wires())
    assert await ping(p.client, SERVICE_ADDRESS, count=1) == (1, 1)
    await _kill_daemon(dlab, p.a)  # its TUN device goes, and the routes through it
    assert (await ping(p.client, SERVICE_ADDRESS, count=1))[1] == 0
    [peer] = (await p.a.dataplane.state()).peers
    assert peer.error is not None
    assert peer.allowed_ips == ["10.60.0.0/16", "172.16.1.0/32"]  # what it should have
    # What the gateway does when the driver reports the death: ensure the peer again.
    await p.a.dataplane.ensure_peer(p.a.tunnel_to(p.b))
    assert await ping(p.client, SERVICE_ADDRESS, count=2) == (2, 2)
    # Or reconcile, as at a start.
    await _kill_daemon(dlab, p.a)
    want = DesiredState(peers=[p.a.tunnel_to(p.b)], wires=[p.wires()[0]])
    report = await p.a.dataplane.reconcile(want)
    assert report.failures == []
    assert any("route 10.60.0.0/16" in c for c in report.changes)
    assert await ping(p.client, SERVICE_ADDRESS, count=2) == (2, 2)
