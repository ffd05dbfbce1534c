"""Join, peers, leave, export policy and the federated registry, with real gateway
processes talking over loopback and the CLI driven as a user would. No mocks in the
join path; the man in the middle is a real TLS proxy with its own CA."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from federation.tokens import FederationToken
from spire_integration import BuiltinCA
from tests.conftest import GatewayProcess, free_port, udp_listening


class Gw(GatewayProcess):
    """A gateway process with a federation API and a bundle endpoint on loopback."""

    def __init__(self, base: Path, domain: str, *extra: str) -> None:
        super().__init__(base / domain, domain)
        self.base.mkdir(parents=True)
        self.port, self.bundle_port = free_port(), free_port()
        self.extra = [
            "--listen", f"127.0.0.1:{self.port}",
            "--bundle-listen", f"127.0.0.1:{self.bundle_port}",
            "--log-level", "debug",
            *extra,
        ]  # fmt: skip

    def start(self, *more: str) -> None:
        super().start(*self.extra, *more)

    def ok(self, *args: str) -> str:
        return self.cli(*args, check=True).stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def fails(self, *args: str) -> str:
        r = self.cli(*args)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr
        return r.stderr

    def token(self, *args: str) -> str:
        return self.ok("token", "create", *args).strip()

    @property
    def bundle_file(self) -> Path:
        path = self.base / "bundle.json"
        path.write_text(self.ok("bundle", "show"))
        return path


@pytest.fixture
def gateways(short_tmp: Path) -> Iterator[Callable[..., Gw]]:
    started: list[Gw] = []

    def make(domain: str, *extra: str, start: bool = True) -> Gw:
        gw = Gw(short_tmp, domain, *extra)
        started.append(gw)
        if start:
            gw.start()
        return gw

    try:
        yield make
    finally:
        for gw in started:
            if gw.proc is not None:
                assert gw.stop() == 0, gw.log.read_text()


def tampered(token: str, **changes: Any) -> str:
    """The token with fields changed and a check that matches (a forger's token)."""
    parsed = FederationToken.parse(token)
    fields = {**parsed.__dict__, **changes}
    return FederationToken(**fields).encode()


def test_join_makes_both_sides_peers_and_exports_are_enforced(gateways: Callable[..., Gw]) -> None:
    c1, c2 = gateways("cluster1"), gateways("cluster2")
    c2.ok("ns", "register", "vpn-gateway", "--export", "cluster1")
    c2.ok("ns", "register", "internal-only")
    c2.ok("ns", "register", "for-everyone", "--export", "*")
    c2.ok("nse", "register", "vpn-gw-1", "--service", "vpn-gateway", "--service", "internal-only",
          "--label", "zone=a", "--route", "10.60.0.0/16", "--pool", "172.16.1.0/24")  # fmt: skip
    c1.ok("ns", "register", "dns", "--export", "cluster2")
    c1.ok("ns", "register", "hidden")

    out = c1.ok("join", c2.token())
    assert "joined cluster2" in out
    peers1, peers2 = c1.json("peers"), c2.json("peers")
    assert [p["domain"] for p in peers1] == ["cluster2"]
    assert [p["domain"] for p in peers2] == ["cluster1"]
    assert peers1[0]["url"] == f"https://127.0.0.1:{c2.port}"
    assert peers2[0]["url"] == f"https://127.0.0.1:{c1.port}"
    assert peers1[0]["state"] == "active"

    # exactly what is exported to the caller, both ways
    assert {s["name"] for s in c1.json("ns", "list", "--domain", "cluster2")} == {
        "vpn-gateway",
        "for-everyone",
    }
    assert {s["name"] for s in c2.json("ns", "list", "--domain", "cluster1")} == {"dns"}
    (endpoint,) = c1.json("nse", "list", "--domain", "cluster2")
    assert endpoint["services"] == ["vpn-gateway"]  # internal-only is not shown
    assert endpoint["routes"] == ["10.60.0.0/16"]
    assert "pool" not in endpoint
    assert "workload" not in endpoint
    assert c1.json("nse", "list", "--domain", "cluster2", "--service", "internal-only") == []

    # joining again is a clear answer, not a duplicate
    err = c1.fails("join", c2.token())
    assert "already federated with cluster2" in err
    assert [p["domain"] for p in c1.json("peers")] == ["cluster2"]


def test_token_rules(gateways: Callable[..., Gw]) -> None:
    c2 = gateways("cluster2")
    c1, c3, c4 = gateways("cluster1"), gateways("cluster3"), gateways("cluster4")
    token = c2.token()
    c1.ok("join", token)
    assert "used already" in c3.fails("join", token)

    short = c2.token("--ttl", "1s")
    time.sleep(1.2)
    assert "expired" in c3.fails("join", short)

    revoked = c2.token("--description", "to revoke")
    c2.ok("token", "revoke", FederationToken.parse(revoked).id)
    assert "revoked" in c3.fails("join", revoked)

    fresh = c2.token()
    forged = tampered(fresh, secret=FederationToken.parse(fresh).secret[:-2] + "xy")
    assert "not valid for this gateway" in c3.fails("join", forged)
    assert "damaged" in c3.fails("join", fresh[:-3] + "abc")
    assert "not a fedgw federation token" in c3.fails("join", "hello")
    # neither the forgery nor the damaged copy used the token up
    c4.ok("join", fresh)

    listed = {t["id"]: t for t in c2.json("token", "list")}
    assert listed[FederationToken.parse(token).id]["used_by"] == ["cluster1"]
    assert listed[FederationToken.parse(revoked).id]["state"] == "revoked"
    assert all("secret" not in json.dumps(t) for t in listed.values())
    assert "never expires" not in c2.fails("token", "create", "--ttl", "0")
    assert "too long" in c2.fails("token", "create", "--ttl", "2d")


def test_racing_joins_on_a_one_use_token(gateways: Callable[..., Gw]) -> None:
    c2 = gateways("cluster2")
    joiners = [gateways(f"cluster{i}") for i in (3, 4, 5, 6)]
    token = c2.token()
    with ThreadPoolExecutor(len(joiners)) as pool:
        results = list(pool.map(lambda gw: gw.cli("join", token), joiners))
    assert sorted(r.returncode for r in results) == [0, 1, 1, 1]
    assert len(c2.json("peers")) == 1


def test_tampered_pin_aborts_and_stores_nothing(gateways: Callable[..., Gw]) -> None:
    c1, c2 = gateways("cluster1"), gateways("cluster2")
    token = c2.token()
    forged = tampered(token, pins=("sha256:" + "00" * 32,))
    err = c1.fails("join", forged)
    assert "does not match the token's pin" in err
    assert "Nothing was stored" in err
    assert c1.json("peers") == []
    assert c2.json("peers") == []
    c1.ok("join", token)  # the real token was not used up


class TlsProxy:
    """A man in the middle: terminates TLS with its own CA's certificate for the
    issuer's SPIFFE ID and relays bytes to the real endpoint."""

    def __init__(self, upstream_port: int, cert: Path, key: Path) -> None:
        self.upstream_port = upstream_port
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.port = 0
        self.connections = 0

    async def __aenter__(self) -> TlsProxy:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0, ssl=self.context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        upstream_tls = ssl.create_default_context()
        upstream_tls.check_hostname = False
        upstream_tls.verify_mode = ssl.CERT_NONE
        up_r, up_w = await asyncio.open_connection(
            "127.0.0.1", self.upstream_port, ssl=upstream_tls
        )

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))


@pytest.fixture
async def attacker_svid(short_tmp: Path) -> tuple[Path, Path]:
    ca = await asyncio.to_thread(BuiltinCA, "cluster2", short_tmp / "evil-ca")
    svid = await asyncio.to_thread(ca.issue_svid)  # spiffe://cluster2/fedgw/gateway, wrong CA
    cert, key = short_tmp / "evil.pem", short_tmp / "evil.key"
    cert.write_bytes(svid.chain_pem())
    key.write_bytes(svid.key_pem())
    return cert, key


async def test_a_man_in_the_middle_makes_the_join_abort(
    gateways: Callable[..., Gw], attacker_svid: tuple[Path, Path]
) -> None:
    c1, c2 = gateways("cluster1"), gateways("cluster2")
    token = await asyncio.to_thread(c2.token)
    async with TlsProxy(c2.bundle_port, *attacker_svid) as proxy:
        through_proxy = tampered(token, bundle_urls=(f"https://127.0.0.1:{proxy.port}",))
        err = await asyncio.to_thread(c1.fails, "join", through_proxy)
        assert proxy.connections >= 1  # the joiner did go through the proxy
    assert "is not cluster2's gateway" in err
    assert "Nothing was stored" in err
    assert await asyncio.to_thread(c1.json, "peers") == []
    assert await asyncio.to_thread(c2.json, "peers") == []


def test_a_gateway_of_a_non_federated_domain_is_refused(gateways: Callable[..., Gw]) -> None:
    c2 = gateways("cluster2")
    # cluster5 trusts cluster2 (it has its bundle) and has a valid SVID of its own CA,
    # but cluster2 never federated with cluster5.
    c5 = gateways("cluster5", "--federated-bundle", f"cluster2={c2.bundle_file}", start=False)
    c5.start()
    c2.ok("ns", "register", "x", "--export", "*")
    err = c5.fails("ns", "list", "--domain", "cluster2")
    assert "TLS" in err or "unreachable" in err.lower() or "cluster2" in err


def test_leave_makes_both_sides_forget_and_refuse(gateways: Callable[..., Gw]) -> None:
    c1, c2 = gateways("cluster1"), gateways("cluster2")
    c2.ok("ns", "register", "x", "--export", "cluster1")
    c1.ok("join", c2.token())
    bundle2 = c2.bundle_file
    assert "it forgot this domain too" in c1.ok("leave", "cluster2")
    assert c1.json("peers") == []
    assert c2.json("peers") == []
    assert "not federated" in c1.fails("ns", "list", "--domain", "cluster2")
    # Even a cluster1 that still trusts cluster2 is refused by cluster2 now.
    c1.stop()
    c1.start("--federated-bundle", f"cluster2={bundle2}")
    err = c1.fails("ns", "list", "--domain", "cluster2")
    assert "cluster2" in err
    assert "not federated with this gateway" not in err  # refused by cluster2, not locally


@pytest.fixture
async def dnsmasq_srv() -> AsyncIterator[Callable[[str, int], Awaitable[int]]]:
    """Starts dnsmasq on loopback with an SRV record; gives its port."""
    if shutil.which("dnsmasq") is None:
        pytest.skip("dnsmasq is not installed")
    procs: list[asyncio.subprocess.Process] = []

    async def start(domain: str, port: int) -> int:
        dns_port = free_port(socket.SOCK_DGRAM)
        proc = await asyncio.create_subprocess_exec(
            "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces",
            "--listen-address=127.0.0.1", f"--port={dns_port}", "--user=root", "--pid-file",
            f"--srv-host=_fedgw._tcp.{domain},gw.{domain},{port}",
            f"--host-record=gw.{domain},127.0.0.1",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(proc)
        await udp_listening(dns_port, proc)
        return dns_port

    try:
        yield start
    finally:
        for proc in procs:
            proc.terminate()
            await proc.wait()


async def test_dns_srv_finds_a_federated_domain_without_a_peer_entry(
    gateways: Callable[..., Gw], dnsmasq_srv: Callable[[str, int], Awaitable[int]]
) -> None:
    """Static federation (bundles only, no peer entry): the gateway's address comes from
    _fedgw._tcp.<domain>, served by a real DNS server on loopback."""
    c2 = await asyncio.to_thread(gateways, "cluster2", start=False)
    c1 = await asyncio.to_thread(gateways, "cluster1", start=False)
    # Each needs the other's bundle before it starts: start once to create the CAs.
    for gw in (c1, c2):
        await asyncio.to_thread(gw.start)
    b1, b2 = (
        await asyncio.to_thread(lambda: c1.bundle_file),
        await asyncio.to_thread(lambda: c2.bundle_file),
    )
    dns_port = await dnsmasq_srv("cluster2", c2.port)
    await asyncio.to_thread(c2.stop)
    await asyncio.to_thread(c2.start, "--federated-bundle", f"cluster1={b1}")
    await asyncio.to_thread(c1.stop)
    await asyncio.to_thread(
        c1.start, "--federated-bundle", f"cluster2={b2}", "--dns-server", f"127.0.0.1:{dns_port}"
    )
    await asyncio.to_thread(c2.ok, "ns", "register", "vpn", "--export", "cluster1")
    listed = await asyncio.to_thread(c1.json, "ns", "list", "--domain", "cluster2")
    assert [s["name"] for s in listed] == ["vpn"]


def test_logs_of_a_whole_join_never_hold_the_secret(gateways: Callable[..., Gw]) -> None:
    c1, c2, c3 = gateways("cluster1"), gateways("cluster2"), gateways("cluster3")
    token = c2.token()
    secret = FederationToken.parse(token).secret
    c1.ok("join", token)
    c3.fails("join", token)  # refused: used
    c3.fails("join", tampered(token, secret=secret[:-1] + "Z"))
    for gw in (c1, c2, c3):
        gw.stop()
        text = gw.log.read_text()
        assert "join" in text.lower() or gw is c3  # the logs did cover the join
        assert secret not in text
        assert token not in text


def test_peers_bundles_refresh_at_their_hint_and_survive_outages(
    gateways: Callable[..., Gw],
) -> None:
    # A CA that rotates every 12 s, its successor published 3 s before it signs; the
    # bundle's refresh hint is 1 s.
    c2 = gateways("cluster2", "--ca-ttl", "12s", "--svid-ttl", "2s")
    c1 = gateways("cluster1")
    c1.ok("join", c2.token())
    first = c1.json("peers")[0]
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        now = c1.json("peers")[0]
        if now["bundle_sequence"] >= first["bundle_sequence"] + 2:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"bundle of cluster2 not refreshed: {c1.json('peers')}")
    assert now["bundle_fingerprint"] != first["bundle_fingerprint"]
    # Through those rotations, calls between the two kept working.
    c2.ok("ns", "register", "vpn", "--export", "cluster1")
    assert [s["name"] for s in c1.json("ns", "list", "--domain", "cluster2")] == ["vpn"]
    # cluster2 goes away: cluster1 keeps the last good bundle and says what failed.
    c2.stop()
    time.sleep(3)
    kept = c1.json("peers")[0]
    assert kept["bundle_sequence"] >= now["bundle_sequence"]
    assert "bundle refresh" in (kept["last_error"] or "")
