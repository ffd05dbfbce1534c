"""Real TLS handshakes on 127.0.0.1: known-bad SVIDs are refused by the server, a client
for domain D trusts only D, and the server follows the identity source without restart."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from spire_integration.builtin_source import BuiltinIdentitySource
from spire_integration.bundle import BundleSet, TrustBundle
from spire_integration.errors import PeerMismatch, SvidUntrusted
from spire_integration.spiffe_id import SpiffeId
from spire_integration.svid import X509Svid
from spire_integration.tls import (
    PeerClientContext,
    ServerTLS,
    SpiffeHandshakeError,
    client_context,
    peer_spiffe_id,
    server_context,
    verify_peer,
)
from tests.identity.conftest import BAD_CASES, BadCase, Pki, make_leaf

GW1 = SpiffeId.for_gateway("cluster1")
GW2 = SpiffeId.for_gateway("cluster2")


@dataclass
class Server:
    port: int
    seen: list[SpiffeId] = field(default_factory=list)


@asynccontextmanager
async def serve(ctx: ssl.SSLContext, bundles: BundleSet | None) -> AsyncIterator[Server]:
    """A TLS server that greets each client by the SPIFFE ID it verified."""
    server = Server(0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        try:
            spiffe_id = peer_spiffe_id(ssl_object)
            # The same check, run by hand after the handshake, agrees.
            if bundles is not None:
                assert verify_peer(ssl_object.getpeercert(binary_form=True), bundles) == spiffe_id
            server.seen.append(spiffe_id)
            writer.write(f"hello {spiffe_id}\n".encode())
        except SvidUntrusted:
            writer.write(b"hello anonymous\n")
        await writer.drain()
        writer.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()
        await listener.wait_closed()


async def exchange(port: int, ctx: ssl.SSLContext) -> bytes | Exception:
    """The server's greeting, or the error the client saw."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx), 5
        )
    except (OSError, TimeoutError) as exc:
        return exc
    try:
        return await asyncio.wait_for(reader.readline(), 5)
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        return exc
    finally:
        writer.close()


def _pem(*certs: object) -> str:
    return "".join(
        c.public_bytes(serialization.Encoding.PEM).decode()  # type: ignore[attr-defined]
        for c in certs
    )


def raw_client(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A plain client that trusts cluster1 and presents whatever it is given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=_pem(pki.cluster1.cert))
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


def _svid(pki_authority: object, uri: str) -> X509Svid:
    cert, key = make_leaf(pki_authority, [uri])  # type: ignore[arg-type]
    return X509Svid.from_chain([cert], key)


@pytest.fixture
def server_svid(pki: Pki) -> X509Svid:
    return _svid(pki.cluster1, str(GW1))


async def test_good_client_is_seen_with_its_spiffe_id(pki: Pki, server_svid: X509Svid) -> None:
    client_svid = _svid(pki.cluster2, str(GW2))
    async with serve(server_context(server_svid, pki.bundles()), pki.bundles()) as server:
        bundle1 = TrustBundle("cluster1", (pki.cluster1.cert,))
        ctx = client_context(client_svid, bundle1, GW1)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=ctx)
        assert await reader.readline() == b"hello spiffe://cluster2/fedgw/gateway\n"
        ssl_object = writer.get_extra_info("ssl_object")
        assert peer_spiffe_id(ssl_object) == GW1
        assert ssl_object.version() == "TLSv1.3"
        writer.close()
    assert server.seen == [GW2]


@pytest.mark.parametrize("case", BAD_CASES, ids=lambda c: c.name)
async def test_known_bad_client_svids_fail_in_a_real_handshake(
    case: BadCase,
    pki: Pki,
    server_svid: X509Svid,
    bad_cert_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ctx = raw_client(pki, bad_cert_dir / f"{case.name}.pem", bad_cert_dir / f"{case.name}.key")
    with caplog.at_level(logging.WARNING, logger="spire_integration.tls"):
        async with serve(server_context(server_svid, pki.bundles()), pki.bundles()) as server:
            result = await exchange(server.port, ctx)
    assert isinstance(result, Exception) or result == b"", result
    assert server.seen == []
    refusals = [r.getMessage() for r in caplog.records if "TLS peer refused" in r.getMessage()]
    if case.passes_openssl:
        assert len(refusals) == 1
        assert case.message in refusals[0]
    else:
        assert refusals == []  # OpenSSL refused it before the SPIFFE check ran


async def test_openssl_alone_accepts_a_forged_id_that_verify_peer_refuses(
    pki: Pki, server_svid: X509Svid, bad_cert_dir: Path, tmp_path: Path
) -> None:
    """Why the SPIFFE check must run: a pool of all bundles trusts cluster2's CA, which
    signed a certificate claiming cluster1."""
    plain = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    plain.load_cert_chain(*_files(server_svid, tmp_path))
    plain.load_verify_locations(cadata=_pem(*pki.bundles().authorities()))
    plain.verify_mode = ssl.CERT_REQUIRED
    name = "wrong-claims-cluster1-signed-by-cluster2"
    leaves: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        leaves.append(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
        writer.write(b"accepted\n")
        await writer.drain()
        writer.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=plain)
    port = listener.sockets[0].getsockname()[1]
    try:
        ctx = raw_client(pki, bad_cert_dir / f"{name}.pem", bad_cert_dir / f"{name}.key")
        assert await exchange(port, ctx) == b"accepted\n"
    finally:
        listener.close()
        await listener.wait_closed()
    with pytest.raises(
        SvidUntrusted, match="not signed by an authority of trust domain 'cluster1'"
    ):
        verify_peer(leaves[0], pki.bundles())


def _files(svid: X509Svid, folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "server.pem", folder / "server.key"
    cert.write_bytes(svid.chain_pem())
    key.write_bytes(svid.key_pem())
    key.chmod(0o600)
    return cert, key


async def test_client_without_certificate_fails_the_handshake(
    pki: Pki, server_svid: X509Svid
) -> None:
    async with serve(server_context(server_svid, pki.bundles()), pki.bundles()) as server:
        result = await exchange(server.port, raw_client(pki))
    assert isinstance(result, Exception) or result == b"", result
    assert server.seen == []


async def test_client_for_domain_d_refuses_a_server_of_another_ca(pki: Pki) -> None:
    client_svid = _svid(pki.cluster2, str(GW2))
    bundle1 = TrustBundle("cluster1", (pki.cluster1.cert,))
    # A server that claims to be cluster1's gateway with a certificate of cluster2's CA.
    forged = _svid(pki.cluster2, str(GW1))
    async with serve(server_context(forged, pki.bundles()), pki.bundles()) as server:
        result = await exchange(server.port, client_context(client_svid, bundle1, GW1))
    assert isinstance(result, ssl.SSLCertVerificationError)
    assert not isinstance(result, SpiffeHandshakeError)  # OpenSSL's pool of D alone refused
    assert server.seen == []


async def test_client_refuses_a_valid_server_with_another_spiffe_id(
    pki: Pki, server_svid: X509Svid
) -> None:
    client_svid = _svid(pki.cluster2, str(GW2))
    bundle1 = TrustBundle("cluster1", (pki.cluster1.cert,))
    other = SpiffeId.parse("spiffe://cluster1/some/workload")
    async with serve(server_context(server_svid, pki.bundles()), pki.bundles()) as server:
        result = await exchange(server.port, client_context(client_svid, bundle1, other))
        assert isinstance(result, SpiffeHandshakeError)
        assert isinstance(result.error, PeerMismatch)
        assert "server is spiffe://cluster1/fedgw/gateway, but spiffe://cluster1/some/workload" in (
            str(result)
        )
        # None accepts any SPIFFE ID of the domain.
        assert await exchange(server.port, client_context(client_svid, bundle1, None)) == (
            b"hello spiffe://cluster2/fedgw/gateway\n"
        )
    assert server.seen == [GW2]


async def test_accept_restricts_who_may_connect(pki: Pki, server_svid: X509Svid) -> None:
    bundle1 = TrustBundle("cluster1", (pki.cluster1.cert,))
    ctx = server_context(server_svid, pki.bundles(), accept=lambda i: i.path == "/fedgw/gateway")
    async with serve(ctx, pki.bundles()) as server:
        workload = _svid(pki.cluster2, "spiffe://cluster2/some/workload")
        refused = await exchange(server.port, client_context(workload, bundle1, GW1))
        gateway = _svid(pki.cluster2, str(GW2))
        allowed = await exchange(server.port, client_context(gateway, bundle1, GW1))
    assert isinstance(refused, Exception) or refused == b""
    assert allowed == b"hello spiffe://cluster2/fedgw/gateway\n"
    assert server.seen == [GW2]


# --- contexts that follow a source -----------------------------------------------------


@asynccontextmanager
async def two_domains(
    base: Path, **ttls: float
) -> AsyncIterator[tuple[BuiltinIdentitySource, ...]]:
    s1 = BuiltinIdentitySource("cluster1", base / "c1", **ttls)  # type: ignore[arg-type]
    s2 = BuiltinIdentitySource("cluster2", base / "c2", **ttls)  # type: ignore[arg-type]
    await s1.start()
    await s2.start()
    s1.set_federated_bundle(s2.own_bundle())
    s2.set_federated_bundle(s1.own_bundle())
    try:
        yield s1, s2
    finally:
        await s1.stop()
        await s2.stop()


async def test_server_tls_takes_new_bundles_without_restart(short_tmp: Path) -> None:
    async with two_domains(short_tmp) as (s1, s2):
        s3 = BuiltinIdentitySource("cluster3", short_tmp / "c3")
        await s3.start()
        s3.set_federated_bundle(s1.own_bundle())
        tls = ServerTLS(s1)
        try:
            async with serve(tls.context, None) as server:
                c2 = PeerClientContext(s2, "cluster1", GW1)
                c3 = PeerClientContext(s3, "cluster1", GW1)
                assert await exchange(server.port, c2) == b"hello spiffe://cluster2/fedgw/gateway\n"
                refused = await exchange(server.port, c3)
                assert isinstance(refused, Exception) or refused == b""
                # Federating with cluster3 reaches the running listener.
                s1.set_federated_bundle(s3.own_bundle())
                assert await exchange(server.port, c3) == b"hello spiffe://cluster3/fedgw/gateway\n"
                # And un-federating too.
                s1.remove_federated_bundle("cluster3")
                refused = await exchange(server.port, c3)
                assert isinstance(refused, Exception) or refused == b""
            assert server.seen == [GW2, SpiffeId.for_gateway("cluster3")]
        finally:
            tls.close()
            await s3.stop()


async def test_server_tls_presents_the_renewed_svid(short_tmp: Path) -> None:
    async with two_domains(short_tmp, svid_ttl=2, ca_ttl=6) as (s1, s2):
        tls = ServerTLS(s1)
        try:
            async with serve(tls.context, None) as server:
                ctx = PeerClientContext(s2, "cluster1", GW1)
                leaves = []
                for _ in range(2):
                    reader, writer = await asyncio.open_connection(
                        "127.0.0.1", server.port, ssl=ctx
                    )
                    await reader.readline()
                    leaves.append(writer.get_extra_info("ssl_object").getpeercert(True))
                    writer.close()
                    assert leaves[-1] == s1.svid().leaf.public_bytes(serialization.Encoding.DER)
                    await asyncio.wait_for(s1.wait_for_update(s1.version), 5)
                assert leaves[0] != leaves[1]
        finally:
            tls.close()


async def test_bundle_endpoint_profile_asks_for_no_client_certificate(short_tmp: Path) -> None:
    async with two_domains(short_tmp) as (s1, s2):
        tls = ServerTLS(s1, require_client_cert=False)
        try:
            async with serve(tls.context, None) as server:
                anonymous = client_context(None, s1.own_bundle(), GW1)
                assert await exchange(server.port, anonymous) == b"hello anonymous\n"
                # The client still checks who serves the bundle.
                wrong = client_context(None, s2.own_bundle(), GW2)
                assert isinstance(await exchange(server.port, wrong), ssl.SSLError)
        finally:
            tls.close()


async def test_peer_client_context_without_a_bundle_of_the_domain(short_tmp: Path) -> None:
    async with two_domains(short_tmp) as (_, s2):
        ctx = PeerClientContext(s2, "cluster9", SpiffeId.for_gateway("cluster9"))
        with pytest.raises(SvidUntrusted, match="no trust bundle for 'cluster9'"):
            ctx.current()
