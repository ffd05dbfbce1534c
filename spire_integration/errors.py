"""Errors of the identity layer, leaves of :class:`fedgw.errors.FedgwError`.

    IdentityError                     identity_error
     ├── IdentityConfigInvalid  (InvalidInput)  contradictory TTLs, unusable socket address
     ├── InvalidSpiffeId        (InvalidInput)  breaks the SPIFFE ID grammar
     ├── BundleMalformed        (InvalidInput)  a bundle document that cannot be used
     ├── SvidInvalid            (PermissionDenied)  not an X509-SVID as the spec defines it
     │    └── SvidExpired                         ... or outside its validity period
     ├── SvidUntrusted          (PermissionDenied)  no chain to its own trust domain's bundle
     ├── PeerMismatch           (PermissionDenied)  valid SVID, but not the expected SPIFFE ID
     ├── CaStateInvalid         the built-in CA's files are unreadable or inconsistent
     ├── TlsSetupFailed         OpenSSL refused an SVID or a bundle for a TLS context
     └── IdentityUnavailable    (Unavailable)  no SVID yet: not started, SPIRE agent down

Errors of ``cryptography``, ``ssl``, ``json``, ``grpc`` and ``spiffe`` are translated where
they enter this package: ``raise BundleMalformed(...) from exc``.
"""

from __future__ import annotations

from fedgw.errors import FedgwError, InvalidInput, PermissionDenied, Unavailable


class IdentityError(FedgwError):
    """Base of every error of the identity layer."""

    code = "identity_error"


class IdentityConfigInvalid(IdentityError, InvalidInput):
    """The identity settings contradict each other or name something unusable."""

    code = "identity_config_invalid"


class InvalidSpiffeId(IdentityError, InvalidInput):
    """A SPIFFE ID or a trust domain name does not follow the SPIFFE ID grammar."""

    code = "invalid_spiffe_id"


class BundleMalformed(IdentityError, InvalidInput):
    """A trust bundle document is not JSON, not a JWKS, or holds no usable X.509 authority."""

    code = "bundle_malformed"


class SvidInvalid(IdentityError, PermissionDenied):
    """A certificate (chain) is not an X509-SVID as the SPIFFE X509-SVID spec defines it."""

    code = "svid_invalid"


class SvidExpired(SvidInvalid):
    """A certificate of the chain is expired or not yet valid."""

    code = "svid_expired"


class SvidUntrusted(IdentityError, PermissionDenied):
    """The chain does not lead to an authority of the bundle of the SVID's trust domain."""

    code = "svid_untrusted"


class PeerMismatch(IdentityError, PermissionDenied):
    """The peer holds a valid SVID, but for another SPIFFE ID than the expected one."""

    code = "peer_identity_mismatch"


class CaStateInvalid(IdentityError):
    """The built-in CA's directory holds files that cannot be read or do not fit together."""

    code = "ca_state_invalid"


class TlsSetupFailed(IdentityError):
    """OpenSSL refused the SVID or the trust bundles while building a TLS context."""

    code = "tls_setup_failed"


class IdentityUnavailable(IdentityError, Unavailable):
    """No identity can be had right now (source not started, SPIRE agent unreachable)."""

    code = "identity_unavailable"
