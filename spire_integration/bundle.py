"""Trust bundles: the X.509 authorities of one trust domain in the SPIFFE bundle format
(a JWKS), kept per trust domain in a :class:`BundleSet` and never merged into one pool."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from spire_integration.errors import BundleMalformed, InvalidSpiffeId
from spire_integration.spiffe_id import check_trust_domain

log = logging.getLogger(__name__)

DOCUMENT_MAX = 1024 * 1024
PIN_PREFIX = "sha256:"

_EC_CURVES = {"secp256r1": ("P-256", 32), "secp384r1": ("P-384", 48), "secp521r1": ("P-521", 66)}


def spki_pin(cert: x509.Certificate) -> str:
    """``sha256:<hex>`` of the certificate's DER SubjectPublicKeyInfo (what a token pins)."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return PIN_PREFIX + hashlib.sha256(spki).hexdigest()


def check_pin(pin: str) -> str:
    """Return ``pin`` in canonical form (lowercase) if it is ``sha256:`` + 64 hex digits."""
    if not pin.lower().startswith(PIN_PREFIX):
        raise BundleMalformed(f"pin {pin!r} must start with {PIN_PREFIX!r}")
    digest = pin[len(PIN_PREFIX) :].lower()
    if len(digest) != 64 or any(ch not in "0123456789abcdef" for ch in digest):
        raise BundleMalformed(
            f"pin {pin!r} must be {PIN_PREFIX!r} followed by 64 hexadecimal digits "
            f"(a SHA-256), not {len(digest)} characters"
        )
    return PIN_PREFIX + digest


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _public_jwk(cert: x509.Certificate) -> dict[str, Any]:
    """The JWK members for the certificate's public key (RFC 7518 / RFC 8037)."""
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in _EC_CURVES:
            raise BundleMalformed(f"authority key curve {key.curve.name} has no JWK name")
        crv, size = _EC_CURVES[key.curve.name]
        numbers = key.public_numbers()
        return {
            "kty": "EC",
            "crv": crv,
            "x": _b64url(numbers.x.to_bytes(size, "big")),
            "y": _b64url(numbers.y.to_bytes(size, "big")),
        }
    if isinstance(key, rsa.RSAPublicKey):
        rsa_numbers = key.public_numbers()
        return {
            "kty": "RSA",
            "n": _b64url(rsa_numbers.n.to_bytes((rsa_numbers.n.bit_length() + 7) // 8, "big")),
            "e": _b64url(rsa_numbers.e.to_bytes((rsa_numbers.e.bit_length() + 7) // 8, "big")),
        }
    if isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "x": _b64url(raw)}
    raise BundleMalformed(f"authority key type {type(key).__name__} cannot be written as a JWK")


@dataclass(frozen=True, slots=True)
class TrustBundle:
    """The authorities of ONE trust domain.

    ``sequence`` only grows for a given trust domain (see :meth:`BundleSet.update`);
    ``refresh_hint`` is how often, in seconds, the publisher asks to be polled.
    """

    trust_domain: str
    x509_authorities: tuple[x509.Certificate, ...]
    sequence: int = 0
    refresh_hint: int | None = None
    jwt_authorities: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        try:
            check_trust_domain(self.trust_domain)
        except InvalidSpiffeId as exc:
            raise BundleMalformed(f"bundle trust domain: {exc}") from None
        if not self.x509_authorities:
            raise BundleMalformed(
                f"bundle of trust domain {self.trust_domain!r} has no X.509 authority"
            )
        if self.sequence < 0:
            raise BundleMalformed(f"bundle sequence {self.sequence} must not be negative")
        if self.refresh_hint is not None and self.refresh_hint < 0:
            raise BundleMalformed(f"bundle refresh hint {self.refresh_hint} must not be negative")
        # Duplicates would only bloat the OpenSSL pool; keep the first of each.
        unique = tuple(dict.fromkeys(self.x509_authorities))
        if len(unique) != len(self.x509_authorities):
            object.__setattr__(self, "x509_authorities", unique)

    # --- the SPIFFE bundle format ---------------------------------------------------

    @classmethod
    def parse(cls, trust_domain: str, document: bytes | str) -> TrustBundle:
        """Parse a SPIFFE bundle (JWKS) of ``trust_domain``; skipped entries are logged."""
        bundle, skipped = parse_bundle(trust_domain, document)
        for reason in skipped:
            log.warning("bundle of %s: %s", trust_domain, reason)
        return bundle

    def to_jwks(self) -> dict[str, Any]:
        keys: list[dict[str, Any]] = []
        for cert in self.x509_authorities:
            der = cert.public_bytes(serialization.Encoding.DER)
            jwk = _public_jwk(cert)
            jwk["use"] = "x509-svid"
            jwk["x5c"] = [base64.b64encode(der).decode("ascii")]
            keys.append(jwk)
        keys.extend(json.loads(jwt) for jwt in self.jwt_authorities)
        document: dict[str, Any] = {"keys": keys, "spiffe_sequence": self.sequence}
        if self.refresh_hint is not None:
            document["spiffe_refresh_hint"] = self.refresh_hint
        return document

    def to_json(self) -> str:
        return json.dumps(self.to_jwks(), indent=2)

    @classmethod
    def from_pem(
        cls, trust_domain: str, pem: bytes, *, sequence: int = 0, refresh_hint: int | None = None
    ) -> TrustBundle:
        """A bundle from concatenated PEM certificates (e.g. a SPIRE ``bundle show`` output)."""
        try:
            certs = x509.load_pem_x509_certificates(pem)
        except ValueError as exc:
            raise BundleMalformed(f"bundle of {trust_domain!r} is not PEM: {exc}") from exc
        return cls(trust_domain, tuple(certs), sequence, refresh_hint)

    def to_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.x509_authorities)

    # --- pins and fingerprints -------------------------------------------------------

    def pins(self) -> frozenset[str]:
        """The SPKI pins of all X.509 authorities."""
        return frozenset(spki_pin(c) for c in self.x509_authorities)

    def matches_pin(self, pin: str) -> bool:
        """Whether one of the authorities has this SPKI pin (a rotating bundle keeps its
        pinned root until the root retires, so a short-lived token's pin still matches)."""
        return check_pin(pin) in self.pins()

    def fingerprint(self) -> str:
        """``sha256:<hex>`` over the sorted DER authorities: equal bundles, equal fingerprints.
        Show the first 16 hex digits to people."""
        ders = sorted(c.public_bytes(serialization.Encoding.DER) for c in self.x509_authorities)
        return PIN_PREFIX + hashlib.sha256(b"".join(ders)).hexdigest()

    def with_sequence(self, sequence: int) -> TrustBundle:
        return replace(self, sequence=sequence)


def parse_bundle(trust_domain: str, document: bytes | str) -> tuple[TrustBundle, list[str]]:
    """Parse a SPIFFE bundle; return it with the reasons why entries were skipped.

    Lenient per key and strict per document, as the SPIFFE Trust Domain and Bundle spec
    asks: an entry with an unknown ``use`` or a malformed ``x5c`` is skipped, but a
    document without a single usable X.509 authority is rejected. ``jwt-svid`` keys are
    carried verbatim (opaque JWK JSON) so that a bundle relayed through fedgw keeps them;
    fedgw itself never validates JWT-SVIDs with them.
    """
    raw = document.encode() if isinstance(document, str) else document
    if len(raw) > DOCUMENT_MAX:
        raise BundleMalformed(
            f"bundle of {trust_domain!r} is {len(raw)} bytes; at most {DOCUMENT_MAX} are accepted"
        )
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleMalformed(f"bundle of {trust_domain!r} is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BundleMalformed(
            f"bundle of {trust_domain!r} is a JSON {type(data).__name__}, not a JWKS object"
        )
    keys = data.get("keys")
    if not isinstance(keys, list):
        raise BundleMalformed(f"bundle of {trust_domain!r} has no 'keys' list")
    sequence = _optional_uint(data, "spiffe_sequence", trust_domain)
    refresh_hint = _optional_uint(data, "spiffe_refresh_hint", trust_domain)

    authorities: list[x509.Certificate] = []
    jwt_keys: list[str] = []
    skipped: list[str] = []
    for index, key in enumerate(keys):
        where = f"key {index}"
        if not isinstance(key, dict):
            skipped.append(f"{where} is a {type(key).__name__}, not an object: skipped")
            continue
        use = key.get("use")
        if use == "x509-svid":
            cert_or_reason = _x509_authority(key)
            if isinstance(cert_or_reason, str):
                skipped.append(f"{where} (x509-svid) {cert_or_reason}: skipped")
            else:
                authorities.append(cert_or_reason)
        elif use == "jwt-svid":
            if not isinstance(key.get("kid"), str) or not key["kid"]:
                skipped.append(f"{where} (jwt-svid) has no 'kid': skipped")
            elif not isinstance(key.get("kty"), str):
                skipped.append(f"{where} (jwt-svid) has no 'kty': skipped")
            else:
                jwt_keys.append(json.dumps(key, sort_keys=True))
        else:
            skipped.append(f"{where} has unknown use {use!r}: skipped")
    if not authorities:
        detail = f" ({'; '.join(skipped)})" if skipped else ""
        raise BundleMalformed(
            f"bundle of {trust_domain!r} has no usable X.509 authority among its "
            f"{len(keys)} keys{detail}"
        )
    bundle = TrustBundle(
        trust_domain,
        tuple(authorities),
        sequence=sequence or 0,
        refresh_hint=refresh_hint,
        jwt_authorities=tuple(jwt_keys),
    )
    return bundle, skipped


def _optional_uint(data: dict[str, Any], name: str, trust_domain: str) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    # bool is an int in Python but never a sequence number in JSON.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BundleMalformed(
            f"bundle of {trust_domain!r} has {name} {value!r}: expected a non-negative integer"
        )
    return value


def _x509_authority(key: dict[str, Any]) -> x509.Certificate | str:
    """The certificate of an ``x509-svid`` JWK, or why it cannot be used."""
    x5c = key.get("x5c")
    if not isinstance(x5c, list) or len(x5c) != 1:
        count = len(x5c) if isinstance(x5c, list) else 0
        return f"has {count} x5c certificates; exactly one is required"
    if not isinstance(x5c[0], str):
        return "has an x5c entry that is not a string"
    try:
        der = base64.b64decode(x5c[0], validate=True)
    except (binascii.Error, ValueError):
        return "has an x5c entry that is not base64"
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        return f"has an x5c entry that is not a DER certificate ({exc})"


class BundleSet:
    """Bundles keyed by trust domain. An SVID is only ever checked against the bundle of
    its own trust domain; :meth:`authorities` (all of them) is for OpenSSL's handshake
    pool only, which the per-domain check then narrows."""

    def __init__(self, bundles: Iterable[TrustBundle] = ()) -> None:
        self._bundles: dict[str, TrustBundle] = {}
        for bundle in bundles:
            self._bundles[bundle.trust_domain] = bundle

    def update(self, bundle: TrustBundle) -> bool:
        """Store ``bundle`` unless the stored one has a higher sequence; return whether the
        set changed. An equal sequence with other content is accepted: SPIRE's Workload API
        and many bundle endpoints send no sequence at all (it reads as 0)."""
        current = self._bundles.get(bundle.trust_domain)
        if current is not None:
            if bundle.sequence < current.sequence:
                log.warning(
                    "bundle of %s with sequence %d refused: sequence %d is already held",
                    bundle.trust_domain,
                    bundle.sequence,
                    current.sequence,
                )
                return False
            if bundle == current:
                return False
        self._bundles[bundle.trust_domain] = bundle
        return True

    def replace(self, bundle: TrustBundle) -> None:
        """Store ``bundle`` whatever its sequence (for the source that owns the domain)."""
        self._bundles[bundle.trust_domain] = bundle

    def remove(self, trust_domain: str) -> bool:
        return self._bundles.pop(trust_domain, None) is not None

    def get(self, trust_domain: str) -> TrustBundle | None:
        return self._bundles.get(trust_domain)

    def domains(self) -> list[str]:
        return sorted(self._bundles)

    def authorities(self) -> list[x509.Certificate]:
        """Every authority of every domain, without duplicates (the handshake pool)."""
        seen: dict[x509.Certificate, None] = {}
        for domain in self.domains():
            for cert in self._bundles[domain].x509_authorities:
                seen.setdefault(cert, None)
        return list(seen)

    def copy(self) -> BundleSet:
        return BundleSet(self._bundles.values())

    def __contains__(self, trust_domain: object) -> bool:
        return trust_domain in self._bundles

    def __iter__(self) -> Iterator[TrustBundle]:
        return iter([self._bundles[d] for d in self.domains()])

    def __len__(self) -> int:
        return len(self._bundles)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BundleSet):
            return NotImplemented
        return self._bundles == other._bundles

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        parts = ", ".join(f"{b.trust_domain}#{b.sequence}" for b in self)
        return f"BundleSet({parts})"
