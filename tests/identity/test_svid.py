"""X509-SVID validation as the spec requires, against the folder of known-bad SVIDs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from spire_integration.bundle import BundleSet, TrustBundle
from spire_integration.errors import SvidExpired, SvidInvalid, SvidUntrusted
from spire_integration.spiffe_id import SpiffeId
from spire_integration.svid import X509Svid, validate_svid
from tests.identity.conftest import BAD_CASES, Authority, BadCase, Pki, load_bad, make_leaf

NOW = datetime.now(UTC)
C2_GATEWAY = "spiffe://cluster2/fedgw/gateway"


def test_good_svid_is_accepted_with_its_id(pki: Pki) -> None:
    cert, _ = make_leaf(pki.cluster2, [C2_GATEWAY])
    assert validate_svid([cert], pki.bundles(), NOW) == SpiffeId.for_gateway("cluster2")


@pytest.mark.parametrize("case", BAD_CASES, ids=lambda c: c.name)
def test_known_bad_svids_are_rejected(case: BadCase, pki: Pki, bad_cert_dir: Path) -> None:
    cert = load_bad(bad_cert_dir, case.name)
    with pytest.raises(case.error) as info:
        validate_svid([cert], pki.bundles(), NOW)
    assert case.message in str(info.value)


def test_error_messages_are_exact(pki: Pki, bad_cert_dir: Path) -> None:
    cert = load_bad(bad_cert_dir, "wrong-two-uri-sans")
    with pytest.raises(SvidInvalid) as info:
        validate_svid([cert], pki.bundles(), NOW)
    assert str(info.value) == "SVID has 2 URI SANs; the X509-SVID spec requires exactly one"
    assert info.value.code == "svid_invalid"


def test_a_bundle_of_another_domain_never_vouches(pki: Pki) -> None:
    """The bundle set holds cluster2's CA, but only under cluster2."""
    forged, _ = make_leaf(pki.cluster2, ["spiffe://cluster1/fedgw/gateway"])
    with pytest.raises(
        SvidUntrusted, match="not signed by an authority of trust domain 'cluster1'"
    ):
        validate_svid([forged], pki.bundles(), NOW)
    # Had cluster2's CA been (wrongly) in cluster1's bundle, it would pass: the test above
    # fails for the right reason.
    merged = BundleSet([TrustBundle("cluster1", (pki.cluster1.cert, pki.cluster2.cert))])
    assert validate_svid([forged], merged, NOW) == SpiffeId.for_gateway("cluster1")


def test_validity_is_checked_against_the_given_time(pki: Pki) -> None:
    cert, _ = make_leaf(pki.cluster2, [C2_GATEWAY])
    with pytest.raises(SvidExpired, match="expired at"):
        validate_svid([cert], pki.bundles(), NOW + timedelta(hours=2))
    with pytest.raises(SvidExpired, match="not valid before"):
        validate_svid([cert], pki.bundles(), NOW - timedelta(hours=2))


def test_empty_chain(pki: Pki) -> None:
    with pytest.raises(SvidInvalid, match="no certificate"):
        validate_svid([], pki.bundles(), NOW)


def _intermediate(
    root: Authority,
    name: str,
    *,
    ca: bool = True,
    cert_sign: bool = True,
    path_length: int | None = None,
) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(hours=1))
        .not_valid_after(NOW + timedelta(hours=3))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=cert_sign,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(root.key, hashes.SHA256())
    )
    return Authority(root.domain, cert, key)


def test_chain_through_intermediates_in_any_order(pki: Pki) -> None:
    mid1 = _intermediate(pki.cluster2, "mid1")
    mid2 = _intermediate(mid1, "mid2")
    leaf, _ = make_leaf(mid2, [C2_GATEWAY])
    bundles = pki.bundles()
    assert validate_svid([leaf, mid2.cert, mid1.cert], bundles, NOW).trust_domain == "cluster2"
    assert validate_svid([leaf, mid1.cert, mid2.cert], bundles, NOW).trust_domain == "cluster2"
    with pytest.raises(SvidUntrusted):
        validate_svid([leaf, mid2.cert], bundles, NOW)  # mid1 missing
    with pytest.raises(SvidUntrusted):
        validate_svid([leaf], bundles, NOW)


def test_intermediates_must_be_signing_cas(pki: Pki) -> None:
    not_ca = _intermediate(pki.cluster2, "not-ca", ca=False)
    leaf, _ = make_leaf(not_ca, [C2_GATEWAY])
    with pytest.raises(SvidInvalid, match="is not a CA"):
        validate_svid([leaf, not_ca.cert], pki.bundles(), NOW)
    no_sign = _intermediate(pki.cluster2, "no-sign", cert_sign=False)
    leaf, _ = make_leaf(no_sign, [C2_GATEWAY])
    with pytest.raises(SvidInvalid, match="lacks keyUsage keyCertSign"):
        validate_svid([leaf, no_sign.cert], pki.bundles(), NOW)


def test_path_length_constraint(pki: Pki) -> None:
    mid1 = _intermediate(pki.cluster2, "mid1", path_length=0)
    mid2 = _intermediate(mid1, "mid2")
    leaf, _ = make_leaf(mid2, [C2_GATEWAY])
    with pytest.raises(SvidInvalid, match="allows no path this long"):
        validate_svid([leaf, mid2.cert, mid1.cert], pki.bundles(), NOW)


def test_x509svid_from_chain_checks_leaf_and_key(pki: Pki) -> None:
    cert, key = make_leaf(pki.cluster2, [C2_GATEWAY])
    svid = X509Svid.from_chain([cert], key)
    assert svid.spiffe_id == SpiffeId.for_gateway("cluster2")
    assert svid.chain == [cert]
    assert svid.not_after == cert.not_valid_after_utc
    assert b"BEGIN CERTIFICATE" in svid.chain_pem()
    assert b"PRIVATE KEY" in svid.key_pem()
    assert "PRIVATE" not in repr(svid)
    _, other_key = make_leaf(pki.cluster2, [C2_GATEWAY])
    with pytest.raises(SvidInvalid, match="does not match its leaf"):
        X509Svid.from_chain([cert], other_key)
    ca_leaf, ca_key = make_leaf(pki.cluster2, [C2_GATEWAY], ca=True)
    with pytest.raises(SvidInvalid, match="CA certificate"):
        X509Svid.from_chain([ca_leaf], ca_key)
    with pytest.raises(SvidInvalid, match="empty"):
        X509Svid.from_chain([], key)
