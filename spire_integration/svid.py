"""X509-SVIDs: the chain and key a workload presents, and the validation of a peer's chain
as the X509-SVID spec requires, against the bundle of the SVID's own trust domain only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from spire_integration.bundle import BundleSet, TrustBundle
from spire_integration.errors import (
    InvalidSpiffeId,
    SvidExpired,
    SvidInvalid,
    SvidUntrusted,
)
from spire_integration.spiffe_id import SpiffeId

# Longer chains than this are not built by any SPIFFE issuer we know; a bound keeps a
# hostile chain from making path search expensive.
MAX_CHAIN = 8

# What cryptography raises for extensions it cannot parse (peer input: never trusted).
_UNREADABLE = (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType)

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True, slots=True)
class X509Svid:
    """Our own X509-SVID: leaf, intermediates (leaf first, root excluded) and private key."""

    spiffe_id: SpiffeId
    leaf: x509.Certificate
    intermediates: tuple[x509.Certificate, ...]
    # Compared by certificate: key objects have no value equality.
    private_key: PrivateKey = field(compare=False)

    @classmethod
    def from_chain(cls, chain: Sequence[x509.Certificate], private_key: PrivateKey) -> X509Svid:
        """Build from a leaf-first chain; checks the leaf is an SVID and the key fits it."""
        if not chain:
            raise SvidInvalid("SVID chain is empty")
        spiffe_id = leaf_spiffe_id(chain[0])
        check_leaf(chain[0])
        if _public_der(private_key.public_key()) != _public_der(chain[0].public_key()):
            raise SvidInvalid(f"the private key of SVID {spiffe_id} does not match its leaf")
        return cls(spiffe_id, chain[0], tuple(chain[1:]), private_key)

    @property
    def chain(self) -> list[x509.Certificate]:
        return [self.leaf, *self.intermediates]

    @property
    def not_before(self) -> datetime:
        return self.leaf.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.leaf.not_valid_after_utc

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    def key_pem(self) -> bytes:
        """PKCS#8, unencrypted: handle with care (only ever written to a 0600 file or memfd)."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def __repr__(self) -> str:
        # Never print the key.
        return f"X509Svid({self.spiffe_id}, not_after={self.not_after.isoformat()})"


def _public_der(key: object) -> bytes:
    public_bytes = getattr(key, "public_bytes", None)
    if public_bytes is None:
        raise SvidInvalid(f"unsupported key type {type(key).__name__}")
    der: bytes = public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def leaf_spiffe_id(cert: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID in the leaf's single URI SAN (with a non-empty path)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    except _UNREADABLE as exc:
        raise SvidInvalid(f"SVID has an unreadable subjectAltName: {exc}") from exc
    if len(uris) != 1:
        raise SvidInvalid(f"SVID has {len(uris)} URI SANs; the X509-SVID spec requires exactly one")
    try:
        spiffe_id = SpiffeId.parse(uris[0])
    except InvalidSpiffeId as exc:
        raise SvidInvalid(f"SVID URI SAN is not a SPIFFE ID: {exc}") from exc
    if not spiffe_id.path:
        raise SvidInvalid(
            f"SVID URI SAN {spiffe_id} has an empty path; a leaf SVID must name a workload, "
            "not only the trust domain"
        )
    return spiffe_id


def _extension(cert: x509.Certificate, ext_type: type[x509.ExtensionType]) -> object | None:
    try:
        return cert.extensions.get_extension_for_class(ext_type).value
    except x509.ExtensionNotFound:
        return None
    except _UNREADABLE as exc:
        raise SvidInvalid(f"certificate {_name(cert)} has malformed extensions: {exc}") from exc


def check_leaf(cert: x509.Certificate) -> None:
    """The X509-SVID spec's rules for leaf certificates (section 4)."""
    constraints = _extension(cert, x509.BasicConstraints)
    # go-spiffe's reference verifier treats a missing basicConstraints as cA=false too.
    if isinstance(constraints, x509.BasicConstraints) and constraints.ca:
        raise SvidInvalid("SVID leaf is a CA certificate (basicConstraints cA=true)")
    usage = _extension(cert, x509.KeyUsage)
    if not isinstance(usage, x509.KeyUsage):
        raise SvidInvalid("SVID leaf has no keyUsage; the spec requires digitalSignature")
    if usage.key_cert_sign:
        raise SvidInvalid("SVID leaf has keyUsage keyCertSign; a leaf SVID must not sign certs")
    if usage.crl_sign:
        raise SvidInvalid("SVID leaf has keyUsage cRLSign; a leaf SVID must not sign CRLs")
    if not usage.digital_signature:
        raise SvidInvalid("SVID leaf keyUsage lacks digitalSignature, which the spec requires")


def _check_signing_cert(cert: x509.Certificate) -> None:
    """Rules for intermediates the peer sent (X509-SVID spec section 4.1)."""
    constraints = _extension(cert, x509.BasicConstraints)
    if not isinstance(constraints, x509.BasicConstraints) or not constraints.ca:
        raise SvidInvalid(f"intermediate {_name(cert)} is not a CA (basicConstraints cA=false)")
    usage = _extension(cert, x509.KeyUsage)
    if not isinstance(usage, x509.KeyUsage) or not usage.key_cert_sign:
        raise SvidInvalid(f"intermediate {_name(cert)} lacks keyUsage keyCertSign")


def _check_time(cert: x509.Certificate, now: datetime, what: str) -> None:
    if now < cert.not_valid_before_utc:
        raise SvidExpired(
            f"{what} {_name(cert)} is not valid before {cert.not_valid_before_utc.isoformat()} "
            f"(now {now.isoformat()})"
        )
    if now > cert.not_valid_after_utc:
        raise SvidExpired(
            f"{what} {_name(cert)} expired at {cert.not_valid_after_utc.isoformat()} "
            f"(now {now.isoformat()})"
        )


def _name(cert: x509.Certificate) -> str:
    return repr(cert.subject.rfc4514_string() or f"serial {cert.serial_number:x}")


def _issued_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _path_length_ok(cert: x509.Certificate, below: int) -> bool:
    """Whether ``cert`` may have ``below`` intermediates between itself and the leaf."""
    constraints = _extension(cert, x509.BasicConstraints)
    if isinstance(constraints, x509.BasicConstraints) and constraints.path_length is not None:
        return below <= constraints.path_length
    return True


def validate_svid(chain: Sequence[x509.Certificate], bundles: BundleSet, now: datetime) -> SpiffeId:
    """Validate a peer's leaf-first chain as an X509-SVID; return its SPIFFE ID.

    The chain must lead to an authority of the bundle of the trust domain named in the
    leaf's SPIFFE ID; authorities of other trust domains are never considered, so a
    certificate claiming ``cluster1`` but signed by ``cluster2``'s CA is refused.
    """
    if not chain:
        raise SvidInvalid("peer sent no certificate")
    if len(chain) > MAX_CHAIN:
        raise SvidInvalid(f"peer chain has {len(chain)} certificates; at most {MAX_CHAIN}")
    leaf = chain[0]
    spiffe_id = leaf_spiffe_id(leaf)
    check_leaf(leaf)
    _check_time(leaf, now, "SVID")
    bundle = bundles.get(spiffe_id.trust_domain)
    if bundle is None:
        raise SvidUntrusted(
            f"SVID {spiffe_id} is from trust domain {spiffe_id.trust_domain!r}, "
            "for which no trust bundle is held"
        )
    _verify_path(leaf, list(chain[1:]), bundle, now, spiffe_id)
    return spiffe_id


def _verify_path(
    leaf: x509.Certificate,
    intermediates: list[x509.Certificate],
    bundle: TrustBundle,
    now: datetime,
    spiffe_id: SpiffeId,
) -> None:
    """Walk leaf -> intermediates -> an authority of ``bundle``, checking each signature."""
    current = leaf
    unused = list(intermediates)
    below = 0  # intermediates between ``current``'s issuer and the leaf
    problems: list[str] = []
    for _ in range(MAX_CHAIN):
        for root in bundle.x509_authorities:
            if _issued_by(current, root):
                if now < root.not_valid_before_utc or now > root.not_valid_after_utc:
                    problems.append(f"authority {_name(root)} is outside its validity period")
                    continue
                if not _path_length_ok(root, below):
                    problems.append(f"authority {_name(root)} allows no path this long")
                    continue
                return
        nxt = next((c for c in unused if c != current and _issued_by(current, c)), None)
        if nxt is None:
            break
        _check_signing_cert(nxt)
        _check_time(nxt, now, "intermediate")
        if not _path_length_ok(nxt, below):
            raise SvidInvalid(f"intermediate {_name(nxt)} allows no path this long")
        unused.remove(nxt)
        current = nxt
        below += 1
    detail = f" ({'; '.join(problems)})" if problems else ""
    raise SvidUntrusted(
        f"SVID {spiffe_id} is not signed by an authority of trust domain "
        f"{spiffe_id.trust_domain!r} (bundle sequence {bundle.sequence}, "
        f"{len(bundle.x509_authorities)} authorities){detail}"
    )
