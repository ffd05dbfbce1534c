"""The built-in CA of one trust domain: an ECDSA P-256 root that signs short-lived
X509-SVIDs and rotates without breaking anyone, persisted in a directory (keys 0600)."""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedgw.clock import Clock, SystemClock, to_datetime
from spire_integration.bundle import TrustBundle
from spire_integration.errors import CaStateInvalid, IdentityConfigInvalid, InvalidSpiffeId
from spire_integration.spiffe_id import SpiffeId, check_trust_domain
from spire_integration.svid import X509Svid

log = logging.getLogger(__name__)

DEFAULT_CA_TTL = 24 * 3600.0
DEFAULT_SVID_TTL = 3600.0
STATE_FILE = "ca-state.json"
BUNDLE_FILE = "bundle.json"
_FORMAT = 1
_PREPARE_AT = 0.5
_ACTIVATE_AT = 0.75


@dataclass
class _Authority:
    id: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    activated_at: float | None = None
    last_issued_not_after: float | None = None

    @property
    def start(self) -> float:
        return self.cert.not_valid_before_utc.timestamp()

    @property
    def end(self) -> float:
        return self.cert.not_valid_after_utc.timestamp()


class BuiltinCA:
    """A rotating per-domain root CA kept in ``directory``. Thread-safe; the methods do
    file and crypto work, so async callers run them in a thread.

    Rotation, for a CA valid from ``start`` to ``end`` (life ``L``) and an SVID TTL ``S``:

    * at ``start + L/2`` the NEXT CA is created and published in the bundle (sequence
      + 1); it signs nothing yet, so peers have time to fetch the bundle that holds it;
    * at ``min(start + 3L/4, end - S)`` the next CA becomes active and signs every new
      SVID (so an SVID never outlives the CA that signed it);
    * the previous CA stays in the bundle until the last SVID it signed has expired,
      then it is dropped (sequence + 1).

    So at most three authorities are published (retiring, active, next). Every change
    is written to the directory (state, keys 0600, ``bundle.json``) before it is used,
    and a restart continues where it stopped.
    """

    def __init__(
        self,
        trust_domain: str,
        directory: Path,
        *,
        clock: Clock | None = None,
        ca_ttl: float = DEFAULT_CA_TTL,
        svid_ttl: float = DEFAULT_SVID_TTL,
        refresh_hint: int | None = None,
    ) -> None:
        self.trust_domain = check_trust_domain(trust_domain)
        if svid_ttl < 1:
            raise IdentityConfigInvalid(f"SVID TTL {svid_ttl} s is too short: at least 1 s")
        if ca_ttl < 3 * svid_ttl:
            raise IdentityConfigInvalid(
                f"CA TTL {ca_ttl:g} s must be at least three times the SVID TTL "
                f"{svid_ttl:g} s, so that the next CA is published before it signs"
            )
        self.directory = directory
        self.clock: Clock = clock or SystemClock()
        self.ca_ttl = ca_ttl
        self.svid_ttl = svid_ttl
        # Peers should poll several times between publication and activation of a CA.
        self.refresh_hint = refresh_hint or max(1, min(300, round(ca_ttl / 24)))
        self._lock = threading.RLock()
        self._authorities: list[_Authority] = []
        self._sequence = 0
        self._load()
        self.maintain()

    # --- public API ------------------------------------------------------------------

    def bundle(self) -> TrustBundle:
        with self._lock:
            return TrustBundle(
                self.trust_domain,
                tuple(a.cert for a in self._authorities),
                sequence=self._sequence,
                refresh_hint=self.refresh_hint,
            )

    @property
    def active_authority(self) -> x509.Certificate:
        with self._lock:
            return self._active().cert

    def maintain(self) -> bool:
        """Advance the rotation to the clock's now; return whether the bundle changed."""
        with self._lock:
            now = self.clock.now()
            changed = self._drop_expired(now)
            active = self._active_or_none()
            if active is None or now >= self._activate_at(active):
                prepared = self._prepared()
                if prepared is None:
                    if active is not None:
                        log.warning(
                            "CA of %s: no next CA was prepared in time (was the gateway "
                            "down?); activating a new one peers have not seen yet",
                            self.trust_domain,
                        )
                    prepared = self._create(now)
                prepared.activated_at = now
                active = prepared
                log.info("CA of %s: authority %s is now active", self.trust_domain, active.id)
                changed = True
            changed |= self._drop_retired(now, active)
            if self._prepared() is None and now >= self._prepare_at(active):
                created = self._create(now)
                log.info("CA of %s: next authority %s published", self.trust_domain, created.id)
                changed = True
            if changed:
                self._sequence += 1
                self._save()
            return changed

    def next_event_at(self) -> float:
        """When :meth:`maintain` next has something to do (epoch seconds)."""
        with self._lock:
            active = self._active()
            times = [self._activate_at(active)]
            if self._prepared() is None:
                times.append(self._prepare_at(active))
            for a in self._authorities:
                times.append(a.end)
                if a is not active and a.activated_at is not None:
                    # A CA that never signed anything retires at once.
                    times.append(a.last_issued_not_after or a.start)
            return min(times)

    def issue_svid(self, spiffe_id: SpiffeId | None = None, ttl: float | None = None) -> X509Svid:
        """Issue an X509-SVID with a fresh P-256 key; default: the gateway's ID, the SVID TTL."""
        spiffe_id = spiffe_id or SpiffeId.for_gateway(self.trust_domain)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self.sign(spiffe_id, key.public_key(), ttl)
        return X509Svid(spiffe_id, cert, (), key)

    def sign(
        self,
        spiffe_id: SpiffeId,
        public_key: ec.EllipticCurvePublicKey,
        ttl: float | None = None,
    ) -> x509.Certificate:
        """Sign a leaf X509-SVID for ``public_key`` with the active authority."""
        if not spiffe_id.member_of(self.trust_domain):
            raise InvalidSpiffeId(
                f"cannot issue {spiffe_id}: the CA of {self.trust_domain!r} signs only "
                "its own trust domain"
            )
        if not spiffe_id.path:
            raise InvalidSpiffeId(f"cannot issue {spiffe_id}: an SVID needs a path")
        ttl = self.svid_ttl if ttl is None else ttl
        if ttl <= 0:
            raise IdentityConfigInvalid(f"SVID TTL {ttl} s must be positive")
        with self._lock:
            self.maintain()
            active = self._active()
            now = self.clock.now()
            # Peers whose clock runs a little behind would see a brand-new SVID as not
            # yet valid; backdate by a small share of its life.
            not_before = now - min(10.0, ttl / 20)
            not_after = min(now + ttl, active.end)
            cert = _leaf_certificate(spiffe_id, public_key, active, not_before, not_after)
            issued_until = cert.not_valid_after_utc.timestamp()
            if active.last_issued_not_after is None or issued_until > active.last_issued_not_after:
                active.last_issued_not_after = issued_until
                self._save()
            return cert

    # --- rotation helpers ------------------------------------------------------------

    def _active_or_none(self) -> _Authority | None:
        activated = [a for a in self._authorities if a.activated_at is not None]
        return max(activated, key=lambda a: a.activated_at or 0.0) if activated else None

    def _active(self) -> _Authority:
        active = self._active_or_none()
        if active is None:  # maintain() always leaves one
            raise CaStateInvalid(f"CA of {self.trust_domain!r} has no active authority")
        return active

    def _prepared(self) -> _Authority | None:
        prepared = [a for a in self._authorities if a.activated_at is None]
        return max(prepared, key=lambda a: a.start) if prepared else None

    def _prepare_at(self, a: _Authority) -> float:
        return a.start + _PREPARE_AT * (a.end - a.start)

    def _activate_at(self, a: _Authority) -> float:
        return min(a.start + _ACTIVATE_AT * (a.end - a.start), a.end - self.svid_ttl)

    def _drop_expired(self, now: float) -> bool:
        keep = [a for a in self._authorities if now < a.end]
        dropped = len(keep) != len(self._authorities)
        self._authorities = keep
        return dropped

    def _drop_retired(self, now: float, active: _Authority) -> bool:
        def retired(a: _Authority) -> bool:
            if a is active or a.activated_at is None:
                return False
            return a.last_issued_not_after is None or now >= a.last_issued_not_after

        gone = [a for a in self._authorities if retired(a)]
        for a in gone:
            log.info("CA of %s: authority %s retired", self.trust_domain, a.id)
        self._authorities = [a for a in self._authorities if a not in gone]
        return bool(gone)

    def _create(self, now: float) -> _Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        serial = x509.random_serial_number()
        authority_id = f"{serial:x}"[:16]
        cert = _ca_certificate(self.trust_domain, key, serial, authority_id, now, self.ca_ttl)
        authority = _Authority(authority_id, cert, key)
        self._write_authority(authority)
        self._authorities.append(authority)
        return authority

    # --- persistence -----------------------------------------------------------------

    def _key_path(self, authority_id: str) -> Path:
        return self.directory / f"ca-{authority_id}.key"

    def _cert_path(self, authority_id: str) -> Path:
        return self.directory / f"ca-{authority_id}.pem"

    def _write_authority(self, a: _Authority) -> None:
        key_pem = a.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write_atomic(self._key_path(a.id), key_pem, 0o600)
        _write_atomic(self._cert_path(a.id), a.cert.public_bytes(serialization.Encoding.PEM), 0o644)

    def _save(self) -> None:
        state = {
            "format": _FORMAT,
            "trust_domain": self.trust_domain,
            "sequence": self._sequence,
            "authorities": [
                {
                    "id": a.id,
                    "activated_at": a.activated_at,
                    "last_issued_not_after": a.last_issued_not_after,
                }
                for a in self._authorities
            ],
        }
        _write_atomic(self.directory / STATE_FILE, json.dumps(state, indent=2).encode(), 0o600)
        # The published bundle, for operators and for a bundle endpoint that serves files.
        _write_atomic(self.directory / BUNDLE_FILE, self.bundle().to_json().encode(), 0o644)
        self._remove_orphans()

    def _remove_orphans(self) -> None:
        """Delete files of authorities no longer in the state (retired, or left by a crash
        between writing a new key and the state that names it)."""
        known = {a.id for a in self._authorities}
        for path in self.directory.glob("ca-*.*"):
            if path.name == STATE_FILE or path.suffix not in (".key", ".pem"):
                continue
            if path.stem.removeprefix("ca-") not in known:
                path.unlink(missing_ok=True)

    def _load(self) -> None:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise CaStateInvalid(f"cannot create CA directory {self.directory}: {exc}") from exc
        state_path = self.directory / STATE_FILE
        try:
            raw = state_path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise CaStateInvalid(f"cannot read {state_path}: {exc}") from exc
        try:
            state = json.loads(raw)
            if state.get("format") != _FORMAT:
                raise CaStateInvalid(
                    f"{state_path} has format {state.get('format')!r}; this fedgw reads {_FORMAT}"
                )
            if state["trust_domain"] != self.trust_domain:
                raise CaStateInvalid(
                    f"{state_path} belongs to trust domain {state['trust_domain']!r}, not "
                    f"{self.trust_domain!r}: use another directory for another domain"
                )
            self._sequence = int(state["sequence"])
            entries: list[dict[str, Any]] = state["authorities"]
            self._authorities = [self._load_authority(e) for e in entries]
        except CaStateInvalid:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CaStateInvalid(f"{state_path} is not a valid CA state: {exc!r}") from exc

    def _load_authority(self, entry: dict[str, Any]) -> _Authority:
        authority_id = str(entry["id"])
        key_path, cert_path = self._key_path(authority_id), self._cert_path(authority_id)
        try:
            mode = key_path.stat().st_mode & 0o777
            if mode & 0o077:
                raise CaStateInvalid(
                    f"CA key {key_path} has mode {mode:04o}; it must be readable by its owner "
                    f"only (chmod 600 {key_path})"
                )
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except OSError as exc:
            raise CaStateInvalid(f"CA authority {authority_id} cannot be read: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CaStateInvalid(f"CA key {key_path} is not an ECDSA key")
        if key.public_key() != cert.public_key():
            raise CaStateInvalid(f"CA key {key_path} does not match certificate {cert_path}")
        activated = entry.get("activated_at")
        issued = entry.get("last_issued_not_after")
        return _Authority(
            authority_id,
            cert,
            key,
            activated_at=None if activated is None else float(activated),
            last_issued_not_after=None if issued is None else float(issued),
        )


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write via a temporary file and rename, so a crash leaves the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)  # O_CREAT's mode does not apply to an existing file
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise CaStateInvalid(f"cannot write {path}: {exc}") from exc


def _ca_certificate(
    trust_domain: str,
    key: ec.EllipticCurvePrivateKey,
    serial: int,
    authority_id: str,
    now: float,
    ttl: float,
) -> x509.Certificate:
    # A distinct subject per authority lets OpenSSL and our path walk tell the CAs of a
    # rotation apart by name, not only by key identifier.
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedgw"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"fedgw CA {authority_id}"),
        ]
    )
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(serial)
        .not_valid_before(to_datetime(now - min(60.0, ttl / 100)))
        .not_valid_after(to_datetime(now + ttl))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(str(SpiffeId.of_trust_domain(trust_domain)))]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _leaf_certificate(
    spiffe_id: SpiffeId,
    public_key: ec.EllipticCurvePublicKey,
    issuer: _Authority,
    not_before: float,
    not_after: float,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedgw")]))
        .issuer_name(issuer.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(to_datetime(not_before))
        .not_valid_after(to_datetime(not_after))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
        .sign(issuer.key, hashes.SHA256())
    )
