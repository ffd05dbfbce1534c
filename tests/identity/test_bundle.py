"""The SPIFFE bundle format, per-domain bundle sets with sequence rules, pins."""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from spire_integration.bundle import BundleSet, TrustBundle, check_pin, parse_bundle, spki_pin
from spire_integration.errors import BundleMalformed
from tests.identity.conftest import Pki, make_ca


def _b64(cert_der: bytes) -> str:
    return base64.b64encode(cert_der).decode()


def _der(pki_ca: Any) -> bytes:
    der: bytes = pki_ca.cert.public_bytes(serialization.Encoding.DER)
    return der


def _unb64url(text: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), "big")


def test_round_trip_keeps_authorities_sequence_hint_and_jwt_keys(pki: Pki) -> None:
    jwt_key = {"use": "jwt-svid", "kty": "EC", "kid": "k1", "crv": "P-256", "x": "AA", "y": "AA"}
    document = {
        "keys": [
            {"use": "x509-svid", "kty": "EC", "x5c": [_b64(_der(pki.cluster1))]},
            jwt_key,
            {"use": "x509-svid", "x5c": [_b64(_der(pki.cluster3))]},
        ],
        "spiffe_sequence": 42,
        "spiffe_refresh_hint": 300,
    }
    bundle = TrustBundle.parse("cluster1", json.dumps(document))
    assert bundle.x509_authorities == (pki.cluster1.cert, pki.cluster3.cert)
    assert (bundle.sequence, bundle.refresh_hint) == (42, 300)
    assert [json.loads(k) for k in bundle.jwt_authorities] == [jwt_key]
    again = TrustBundle.parse("cluster1", bundle.to_json())
    assert again == bundle
    assert again.fingerprint() == bundle.fingerprint()


def test_written_keys_carry_the_public_key_as_jwk(pki: Pki) -> None:
    bundle = TrustBundle("cluster1", (pki.cluster1.cert,), sequence=3)
    doc = bundle.to_jwks()
    assert doc["spiffe_sequence"] == 3
    assert "spiffe_refresh_hint" not in doc
    (key,) = doc["keys"]
    assert key["use"] == "x509-svid"
    assert key["kty"] == "EC"
    assert key["crv"] == "P-256"
    assert base64.b64decode(key["x5c"][0]) == _der(pki.cluster1)
    public = pki.cluster1.cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    numbers = public.public_numbers()
    assert (_unb64url(key["x"]), _unb64url(key["y"])) == (numbers.x, numbers.y)


def test_malformed_entries_are_skipped_not_fatal(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    good = _b64(_der(pki.cluster1))
    document = {
        "keys": [
            "not an object",
            {"use": "x509-svid", "x5c": [good, good]},
            {"use": "x509-svid", "x5c": []},
            {"use": "x509-svid", "x5c": ["%%% not base64"]},
            {"use": "x509-svid", "x5c": [base64.b64encode(b"not DER").decode()]},
            {"use": "x509-svid", "x5c": [7]},
            {"use": "jwt-svid", "kty": "EC"},
            {"use": "sig", "kty": "EC"},
            {"kty": "EC"},
            {"use": "x509-svid", "x5c": [good]},
        ]
    }
    bundle, skipped = parse_bundle("cluster1", json.dumps(document))
    assert bundle.x509_authorities == (pki.cluster1.cert,)
    assert bundle.jwt_authorities == ()
    assert bundle.sequence == 0
    assert bundle.refresh_hint is None
    assert len(skipped) == 9
    assert "key 1 (x509-svid) has 2 x5c certificates; exactly one is required" in skipped[1]
    assert "not base64" in skipped[3]
    assert "not a DER certificate" in skipped[4]
    assert "has no 'kid'" in skipped[6]
    assert "unknown use 'sig'" in skipped[7]
    with caplog.at_level(logging.WARNING):
        TrustBundle.parse("cluster1", json.dumps(document))
    assert sum("skipped" in r.message for r in caplog.records) == 9


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (b"\xff\xfe", "is not JSON"),
        ("{", "is not JSON"),
        ("[]", "is a JSON list, not a JWKS object"),
        ("{}", "has no 'keys' list"),
        ('{"keys": {}}', "has no 'keys' list"),
        ('{"keys": []}', "no usable X.509 authority among its 0 keys"),
        ('{"keys": [{"use": "sig"}]}', "no usable X.509 authority among its 1 keys (key 0 has"),
        ('{"keys": [], "spiffe_sequence": -1}', "spiffe_sequence -1"),
        ('{"keys": [], "spiffe_sequence": "1"}', "spiffe_sequence '1'"),
        ('{"keys": [], "spiffe_refresh_hint": true}', "spiffe_refresh_hint True"),
        (" " * (1024 * 1024 + 1), "at most 1048576"),
    ],
)
def test_unusable_documents_are_rejected(document: str | bytes, message: str) -> None:
    with pytest.raises(BundleMalformed) as info:
        TrustBundle.parse("cluster1", document)
    assert message in str(info.value)
    assert info.value.code == "bundle_malformed"


def test_bundle_needs_an_authority_and_a_valid_domain(pki: Pki) -> None:
    with pytest.raises(BundleMalformed, match=r"no X\.509 authority"):
        TrustBundle("cluster1", ())
    with pytest.raises(BundleMalformed, match="trust domain"):
        TrustBundle("Cluster1", (pki.cluster1.cert,))


def test_duplicate_authorities_are_kept_once(pki: Pki) -> None:
    bundle = TrustBundle("cluster1", (pki.cluster1.cert, pki.cluster1.cert))
    assert bundle.x509_authorities == (pki.cluster1.cert,)


def test_pem_round_trip(pki: Pki) -> None:
    bundle = TrustBundle("cluster1", (pki.cluster1.cert, pki.cluster2.cert))
    assert TrustBundle.from_pem("cluster1", bundle.to_pem()) == bundle
    with pytest.raises(BundleMalformed, match="is not PEM"):
        TrustBundle.from_pem("cluster1", b"junk")


def test_bundle_set_sequence_rules(pki: Pki) -> None:
    bundles = BundleSet()
    v5 = TrustBundle("cluster2", (pki.cluster2.cert,), sequence=5)
    assert bundles.update(v5) is True
    # A replayed older bundle (lower sequence) must not roll back a rotation.
    older = TrustBundle("cluster2", (pki.cluster3.cert,), sequence=4)
    assert bundles.update(older) is False
    assert bundles.get("cluster2") == v5
    assert bundles.update(v5) is False  # same content: no change
    same_seq_new_content = TrustBundle("cluster2", (pki.cluster3.cert,), sequence=5)
    assert bundles.update(same_seq_new_content) is True
    v6 = TrustBundle("cluster2", (pki.cluster2.cert, pki.cluster3.cert), sequence=6)
    assert bundles.update(v6) is True
    assert bundles.get("cluster2") == v6
    # Domains are independent: a low sequence elsewhere is fine.
    assert bundles.update(TrustBundle("cluster1", (pki.cluster1.cert,), sequence=1)) is True
    assert bundles.domains() == ["cluster1", "cluster2"]
    assert bundles.get("cluster3") is None
    bundles.replace(older)  # the owner of a domain may set anything
    assert bundles.get("cluster2") == older


def test_bundle_set_keeps_domains_apart(pki: Pki) -> None:
    shared = make_ca("shared")
    bundles = BundleSet(
        [
            TrustBundle("cluster1", (pki.cluster1.cert, shared.cert)),
            TrustBundle("cluster2", (pki.cluster2.cert, shared.cert)),
        ]
    )
    assert len(bundles) == 2
    assert "cluster1" in bundles
    assert "cluster3" not in bundles
    assert bundles.get("cluster1") == TrustBundle("cluster1", (pki.cluster1.cert, shared.cert))
    # The handshake pool has every authority once.
    assert sorted(c.serial_number for c in bundles.authorities()) == sorted(
        [
            pki.cluster1.cert.serial_number,
            pki.cluster2.cert.serial_number,
            shared.cert.serial_number,
        ]
    )
    copy = bundles.copy()
    assert copy == bundles
    assert copy.remove("cluster1")
    assert not copy.remove("cluster1")
    assert copy != bundles
    assert "cluster1" in bundles


def test_spki_pin_and_matching(pki: Pki) -> None:
    pin = spki_pin(pki.cluster1.cert)
    assert pin.startswith("sha256:")
    assert len(pin) == len("sha256:") + 64
    bundle = TrustBundle("cluster1", (pki.cluster1.cert, pki.cluster3.cert))
    assert bundle.matches_pin(pin)
    assert bundle.matches_pin(pin.upper().replace("SHA256:", "sha256:"))
    assert not bundle.matches_pin(spki_pin(pki.cluster2.cert))
    assert bundle.pins() == {pin, spki_pin(pki.cluster3.cert)}


@pytest.mark.parametrize(
    ("pin", "message"),
    [
        ("md5:abcd", "must start with 'sha256:'"),
        ("sha256:abc", "not 3 characters"),
        ("sha256:" + "g" * 64, "64 hexadecimal digits"),
    ],
)
def test_bad_pins(pin: str, message: str) -> None:
    with pytest.raises(BundleMalformed, match=message):
        check_pin(pin)


def test_fingerprint_depends_on_authorities_only(pki: Pki) -> None:
    a = TrustBundle("cluster1", (pki.cluster1.cert, pki.cluster2.cert), sequence=1)
    b = TrustBundle("cluster1", (pki.cluster2.cert, pki.cluster1.cert), sequence=9)
    c = TrustBundle("cluster1", (pki.cluster1.cert,), sequence=1)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
