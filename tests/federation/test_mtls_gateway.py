"""The gateway's federation API and bundle endpoint, end to end over loopback: mutual
TLS with SPIFFE identities, authorisation by SPIFFE ID, the bundle endpoint profile,
and the CLI that shows identity and bundle."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from federation.client import FederationClient
from federation.errors import PeerUnreachable
from fedgw.errors import PermissionDenied
from spire_integration import SpiffeId, TrustBundle, validate_svid
from spire_integration.bundle import BundleSet
from spire_integration.source import SourceState
from spire_integration.svid import X509Svid
from tests.conftest import FEDGW, InProcessGateway, free_port, gateway_settings, start_gateway


async def federating_gateway(base: Path, domain: str) -> InProcessGateway:
    await asyncio.to_thread(base.mkdir)
    settings = gateway_settings(
        base,
        domain,
        listen=("127.0.0.1", free_port()),
        bundle_listen=("127.0.0.1", free_port()),
    )
    return await start_gateway(settings)


@pytest.fixture
async def pair(short_tmp: Path) -> AsyncIterator[tuple[InProcessGateway, InProcessGateway]]:
    """cluster1 and cluster2, trusting each other's bundles (static federation)."""
    gw1 = await federating_gateway(short_tmp / "c1", "cluster1")
    gw2 = await federating_gateway(short_tmp / "c2", "cluster2")
    try:
        gw1.gateway.identity.set_bundle(gw2.gateway.identity.own_bundle())
        gw2.gateway.identity.set_bundle(gw1.gateway.identity.own_bundle())
        yield gw1, gw2
    finally:
        for gw in (gw1, gw2):
            await gw.client.close()
            await gw.stop()


def url(gw: InProcessGateway) -> str:
    assert gw.settings.listen is not None
    host, port = gw.settings.listen
    return f"https://{host}:{port}"


def bundle_url(gw: InProcessGateway) -> str:
    assert gw.settings.bundle_listen is not None
    host, port = gw.settings.bundle_listen
    return f"https://{host}:{port}"


async def test_peer_gateways_call_each_other(
    pair: tuple[InProcessGateway, InProcessGateway],
) -> None:
    gw1, gw2 = pair
    pong = await gw2.gateway.federation.client.request(
        "cluster1", url(gw1), "GET", "/federation/v1/ping"
    )
    assert pong["domain"] == "cluster1"
    assert pong["caller"] == "spiffe://cluster2/fedgw/gateway"
    pong = await gw1.gateway.federation.client.request(
        "cluster2", url(gw2), "GET", "/federation/v1/ping"
    )
    assert pong["caller"] == "spiffe://cluster1/fedgw/gateway"


async def test_an_untrusted_domain_fails_the_handshake(short_tmp: Path) -> None:
    """A gateway with a valid SVID from its own CA, of a domain not federated: refused."""
    gw1 = await federating_gateway(short_tmp / "c1", "cluster1")
    gw3 = await federating_gateway(short_tmp / "c3", "cluster3")
    try:
        gw3.gateway.identity.set_bundle(gw1.gateway.identity.own_bundle())  # one-sided
        with pytest.raises(PeerUnreachable, match=r"cluster1 at https://127\.0\.0\.1"):
            await gw3.gateway.federation.client.request(
                "cluster1", url(gw1), "GET", "/federation/v1/ping"
            )
    finally:
        for gw in (gw1, gw3):
            await gw.client.close()
            await gw.stop()


async def test_client_refuses_a_server_of_another_domain(
    pair: tuple[InProcessGateway, InProcessGateway],
) -> None:
    gw1, _ = pair
    # gw1's own address, but cluster2 is expected there: gw1's SVID does not chain to
    # cluster2's bundle, so the client ends the handshake.
    with pytest.raises(PeerUnreachable, match="TLS"):
        await gw1.gateway.federation.client.request(
            "cluster2", url(gw1), "GET", "/federation/v1/ping"
        )


class StaticSource:
    """An identity source holding a fixed SVID and bundles (for a hand-made client)."""

    kind = "static"
    description = "test"

    def __init__(self, svid: X509Svid, bundles: BundleSet) -> None:
        self._svid, self._bundles, self._state = svid, bundles, SourceState()
        self.trust_domain = svid.spiffe_id.trust_domain

    @property
    def version(self) -> int:
        return 0

    def svid(self) -> X509Svid:
        return self._svid

    def bundles(self) -> BundleSet:
        return self._bundles.copy()

    def subscribe(self, callback: object) -> object:
        return lambda: None

    async def wait_for_update(self, version: int) -> int:
        await asyncio.Event().wait()
        return version

    def status(self) -> object:
        raise NotImplementedError

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def test_a_workload_svid_is_not_a_peer_gateway(
    pair: tuple[InProcessGateway, InProcessGateway], short_tmp: Path
) -> None:
    """A valid SVID of a federated domain, but not its gateway: 403 with a clear body."""
    gw1, gw2 = pair
    inner = gw2.gateway.identity.inner
    ca = inner._ca  # type: ignore[attr-defined]
    workload = ca.issue_svid(SpiffeId.parse("spiffe://cluster2/workload/intruder"))
    source = StaticSource(workload, gw2.gateway.identity.bundles())
    client = FederationClient(source)  # type: ignore[arg-type]
    try:
        with pytest.raises(PermissionDenied, match="is not a fedgw gateway") as info:
            await client.request("cluster1", url(gw1), "GET", "/federation/v1/ping")
        assert info.value.code == "permission_denied"
    finally:
        await client.close()


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-s", "-k", "-m", "5", *args], capture_output=True, text=True)


async def test_no_client_certificate_is_refused(
    pair: tuple[InProcessGateway, InProcessGateway],
) -> None:
    gw1, _ = pair
    result = await asyncio.to_thread(curl, f"{url(gw1)}/federation/v1/ping")
    assert result.returncode != 0
    assert "cluster1" not in result.stdout
    # openssl s_client too: the server ends the handshake without a certificate
    host, port = gw1.settings.listen or ("", 0)
    s_client = await asyncio.to_thread(
        subprocess.run,
        ["openssl", "s_client", "-connect", f"{host}:{port}", "-tls1_2"],
        input="GET /federation/v1/ping HTTP/1.0\r\n\r\n",
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert "cluster1" not in s_client.stdout
    assert "alert" in s_client.stderr.lower() or s_client.returncode != 0


def ca_true_certificate(base: Path, gw: InProcessGateway) -> tuple[Path, Path]:
    """A certificate signed by the domain's own CA, with the right SPIFFE ID, but CA=true."""
    ca = gw.gateway.identity.inner._ca  # type: ignore[attr-defined]
    authority = ca._active()  # the CA key and certificate now signing
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "evil")]))
        .issuer_name(authority.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("spiffe://cluster1/fedgw/gateway")]
            ),
            critical=False,
        )
        .sign(authority.key, hashes.SHA256())
    )
    cert_path, key_path = base / "evil.pem", base / "evil.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_a_ca_certificate_of_the_own_ca_is_refused(
    pair: tuple[InProcessGateway, InProcessGateway], short_tmp: Path
) -> None:
    gw1, _ = pair
    cert, key = ca_true_certificate(short_tmp, gw1)
    result = await asyncio.to_thread(
        curl, "--cert", str(cert), "--key", str(key), f"{url(gw1)}/federation/v1/ping"
    )
    assert result.returncode != 0
    assert "cluster1" not in result.stdout


async def test_bundle_endpoint_needs_no_client_certificate_and_verifies_the_svid(
    pair: tuple[InProcessGateway, InProcessGateway],
) -> None:
    gw1, _ = pair
    result = await asyncio.to_thread(curl, bundle_url(gw1) + "/")
    assert result.returncode == 0, result.stderr
    bundle = TrustBundle.parse("cluster1", result.stdout)
    # The certificate the endpoint presents is the gateway's SVID, and the bundle's
    # x5c authorities verify it.
    host, port = gw1.settings.bundle_listen or ("", 0)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    _, writer = await asyncio.open_connection(host, port, ssl=context)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    await writer.wait_closed()
    leaf = x509.load_der_x509_certificate(der)
    spiffe_id = validate_svid([leaf], BundleSet([bundle]), datetime.now(UTC))
    assert str(spiffe_id) == "spiffe://cluster1/fedgw/gateway"


async def test_cli_identity_and_bundle_show(
    pair: tuple[InProcessGateway, InProcessGateway],
) -> None:
    gw1, _ = pair
    env = {**os.environ, "FEDGW_GATEWAY": str(gw1.settings.socket)}

    def fedgw(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([FEDGW, *args], env=env, capture_output=True, text=True, timeout=30)

    shown = json.loads((await asyncio.to_thread(fedgw, "identity", "show", "--json")).stdout)
    assert shown["spiffe_id"] == "spiffe://cluster1/fedgw/gateway"
    assert shown["source"] == "builtin"
    assert {b["trust_domain"] for b in shown["bundles"]} == {"cluster1", "cluster2"}
    table = (await asyncio.to_thread(fedgw, "identity", "show")).stdout
    assert "spiffe://cluster1/fedgw/gateway" in table
    printed = (await asyncio.to_thread(fedgw, "bundle", "show")).stdout
    bundle = TrustBundle.parse("cluster1", printed)
    assert bundle == gw1.gateway.identity.own_bundle()
    assert all(k["use"] == "x509-svid" and k["x5c"] for k in json.loads(printed)["keys"])


async def test_static_federation_from_the_command_line(short_tmp: Path) -> None:
    """--federated-bundle DOMAIN=FILE makes the gateway trust that domain from the start."""
    gw2 = await federating_gateway(short_tmp / "c2", "cluster2")
    try:
        bundle_file = short_tmp / "cluster2.json"
        bundle_file.write_text(gw2.gateway.identity.own_bundle().to_json())
        gw1_settings = gateway_settings(
            short_tmp / "c1",
            "cluster1",
            listen=("127.0.0.1", free_port()),
            federated_bundles={"cluster2": bundle_file},
        )
        (short_tmp / "c1").mkdir()
        gw1 = await start_gateway(gw1_settings)
        try:
            assert "cluster2" in gw1.gateway.identity.bundles().domains()
        finally:
            await gw1.client.close()
            await gw1.stop()
    finally:
        await gw2.client.close()
        await gw2.stop()
