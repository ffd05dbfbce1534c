"""Fixtures of the identity tests: a hand-driven clock, a small PKI of three trust domains
made with ``cryptography``, and a folder of known-bad SVIDs generated at test time."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc  # type: ignore[import-untyped]
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from spiffe._proto import workload_pb2, workload_pb2_grpc

from spire_integration.bundle import BundleSet, TrustBundle
from spire_integration.ca import BuiltinCA
from spire_integration.errors import IdentityError, SvidExpired, SvidInvalid, SvidUntrusted
from spire_integration.svid import X509Svid


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@dataclass
class Authority:
    domain: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def make_ca(domain: str, *, name: str | None = None) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name or f"test CA {domain}")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{domain}")]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(domain, cert, key)


def _key_usage(
    *, digital_signature: bool = True, cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not digital_signature,
        key_cert_sign=cert_sign,
        crl_sign=crl_sign or cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def make_leaf(
    issuer: Authority,
    uris: list[str],
    *,
    ca: bool = False,
    key_usage: x509.KeyUsage | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    dns: list[str] | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns or []]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test")]))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - timedelta(minutes=5))
        .not_valid_after(not_after or now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(key_usage or _key_usage(), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer.key, hashes.SHA256()), key


@dataclass
class Pki:
    """cluster1 is "us", cluster2 a federated peer, cluster3 a domain we hold no bundle of."""

    cluster1: Authority
    cluster2: Authority
    cluster3: Authority

    def bundles(self) -> BundleSet:
        return BundleSet(
            [
                TrustBundle("cluster1", (self.cluster1.cert,), sequence=1),
                TrustBundle("cluster2", (self.cluster2.cert,), sequence=1),
            ]
        )


@pytest.fixture(scope="session")
def pki() -> Pki:
    return Pki(make_ca("cluster1"), make_ca("cluster2"), make_ca("cluster3"))


@dataclass(frozen=True)
class BadCase:
    """A known-bad SVID: what must refuse it, and the words the refusal must contain."""

    name: str
    error: type[IdentityError]
    message: str
    # Whether OpenSSL's own chain verification lets it through (a CA of the pool signed
    # it, and it is within its validity): then only the SPIFFE check in the handshake
    # stops it. OpenSSL does not apply the X509-SVID rules (cA, keyUsage, URI SANs).
    passes_openssl: bool = False


BAD_CASES = [
    BadCase("wrong-leaf-ca-true", SvidInvalid, "is a CA certificate", True),
    BadCase("wrong-two-uri-sans", SvidInvalid, "has 2 URI SANs", True),
    BadCase("wrong-no-uri-san", SvidInvalid, "has 0 URI SANs", True),
    BadCase("wrong-scheme-https", SvidInvalid, "scheme 'https'", True),
    BadCase("wrong-empty-path", SvidInvalid, "empty path", True),
    BadCase("wrong-key-cert-sign", SvidInvalid, "keyCertSign", True),
    BadCase("wrong-crl-sign", SvidInvalid, "cRLSign", True),
    BadCase("wrong-no-digital-signature", SvidInvalid, "lacks digitalSignature", True),
    BadCase("wrong-expired", SvidExpired, "expired at"),
    BadCase("wrong-not-yet-valid", SvidExpired, "not valid before"),
    BadCase(
        "wrong-claims-cluster2-signed-by-cluster1",
        SvidUntrusted,
        "not signed by an authority of trust domain 'cluster2'",
        True,
    ),
    BadCase(
        "wrong-claims-cluster1-signed-by-cluster2",
        SvidUntrusted,
        "not signed by an authority of trust domain 'cluster1'",
        True,
    ),
    BadCase("wrong-unknown-domain", SvidUntrusted, "no trust bundle is held"),
    BadCase(
        "wrong-unknown-domain-signed-by-cluster1", SvidUntrusted, "no trust bundle is held", True
    ),
]


def _bad_cert(pki: Pki, name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The bad SVID called ``name``: a cluster2 client gone wrong in one way each."""
    good = ["spiffe://cluster2/fedgw/gateway"]
    now = datetime.now(UTC)
    c1, c2, c3 = pki.cluster1, pki.cluster2, pki.cluster3
    match name:
        case "wrong-leaf-ca-true":
            return make_leaf(c2, good, ca=True)
        case "wrong-two-uri-sans":
            return make_leaf(c2, [*good, "spiffe://cluster2/other"])
        case "wrong-no-uri-san":
            return make_leaf(c2, [], dns=["gateway.cluster2"])
        case "wrong-scheme-https":
            return make_leaf(c2, ["https://cluster2/fedgw/gateway"])
        case "wrong-empty-path":
            return make_leaf(c2, ["spiffe://cluster2"])
        case "wrong-key-cert-sign":
            return make_leaf(c2, good, key_usage=_key_usage(cert_sign=True))
        case "wrong-crl-sign":
            return make_leaf(c2, good, key_usage=_key_usage(crl_sign=True))
        case "wrong-no-digital-signature":
            return make_leaf(c2, good, key_usage=_key_usage(digital_signature=False))
        case "wrong-expired":
            return make_leaf(
                c2, good, not_before=now - timedelta(hours=2), not_after=now - timedelta(hours=1)
            )
        case "wrong-not-yet-valid":
            return make_leaf(
                c2, good, not_before=now + timedelta(hours=1), not_after=now + timedelta(hours=2)
            )
        case "wrong-claims-cluster2-signed-by-cluster1":
            return make_leaf(c1, good)
        case "wrong-claims-cluster1-signed-by-cluster2":
            return make_leaf(c2, ["spiffe://cluster1/fedgw/gateway"])
        case "wrong-unknown-domain":
            return make_leaf(c3, ["spiffe://cluster3/fedgw/gateway"])
        case "wrong-unknown-domain-signed-by-cluster1":
            return make_leaf(c1, ["spiffe://cluster3/fedgw/gateway"])
    raise AssertionError(f"no bad case {name}")


@pytest.fixture(scope="session")
def bad_cert_dir(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<case>.pem`` (certificate) and ``<case>.key`` for every case of BAD_CASES."""
    folder = tmp_path_factory.mktemp("bad-svids")
    for case in BAD_CASES:
        cert, key = _bad_cert(pki, case.name)
        (folder / f"{case.name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / f"{case.name}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return folder


def load_bad(folder: Path, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((folder / f"{name}.pem").read_bytes())


# --- a SPIRE agent's Workload API, served by the test -------------------------------

DER = serialization.Encoding.DER


def svid_response(svid: X509Svid, ca: BuiltinCA, federated: dict[str, bytes]) -> Any:
    return workload_pb2.X509SVIDResponse(
        svids=[
            workload_pb2.X509SVID(
                spiffe_id=str(svid.spiffe_id),
                x509_svid=b"".join(c.public_bytes(DER) for c in svid.chain),
                x509_svid_key=svid.private_key.private_bytes(
                    DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                ),
                bundle=b"".join(c.public_bytes(DER) for c in ca.bundle().x509_authorities),
            )
        ],
        federated_bundles=federated,
    )


class FakeWorkloadApi(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    """Streams the latest X509SVIDResponse to every client, and each new one as it comes."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._latest: Any = None
        self._generation = 0
        self.streams = 0
        self.refused = 0

    def push(self, response: Any) -> None:
        with self._cond:
            self._latest = response
            self._generation += 1
            self._cond.notify_all()

    def FetchX509SVID(self, request: Any, context: Any) -> Iterator[Any]:
        # SPIRE refuses calls without the security header; so do we.
        if ("workload.spiffe.io", "true") not in tuple(context.invocation_metadata()):
            self.refused += 1
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing")
        self.streams += 1
        seen = 0
        while context.is_active():
            with self._cond:
                if self._generation == seen:
                    self._cond.wait(0.05)
                    continue
                seen, response = self._generation, self._latest
            yield response


def start_agent(socket: Path) -> tuple[FakeWorkloadApi, Any]:
    servicer = FakeWorkloadApi()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"unix:{socket}")
    server.start()
    return servicer, server


@pytest.fixture
def workload_api(short_tmp: Path) -> Iterator[tuple[FakeWorkloadApi, Path]]:
    socket = short_tmp / "agent.sock"
    servicer, server = start_agent(socket)
    try:
        yield servicer, socket
    finally:
        server.stop(grace=None).wait(5)
