"""SPIFFE identities: the built-in CA and the SPIRE Workload API, SVID validation,
trust bundles and TLS contexts (``spire_source`` and ``asgi`` are imported on demand)."""

from spire_integration.builtin_source import BuiltinIdentitySource
from spire_integration.bundle import BundleSet, TrustBundle, check_pin, parse_bundle, spki_pin
from spire_integration.ca import BuiltinCA
from spire_integration.overlay import FederatedIdentity
from spire_integration.source import BundleStatus, IdentitySource, IdentityStatus
from spire_integration.spiffe_id import SpiffeId, check_trust_domain
from spire_integration.svid import X509Svid, validate_svid
from spire_integration.tls import (
    PeerClientContext,
    ServerTLS,
    SpiffeHandshakeError,
    check_server_identity,
    client_context,
    peer_spiffe_id,
    server_context,
    verify_peer,
)

__all__ = [
    "BuiltinCA",
    "BuiltinIdentitySource",
    "BundleSet",
    "BundleStatus",
    "FederatedIdentity",
    "IdentitySource",
    "IdentityStatus",
    "PeerClientContext",
    "ServerTLS",
    "SpiffeHandshakeError",
    "SpiffeId",
    "TrustBundle",
    "X509Svid",
    "check_pin",
    "check_server_identity",
    "check_trust_domain",
    "client_context",
    "parse_bundle",
    "peer_spiffe_id",
    "server_context",
    "spki_pin",
    "validate_svid",
    "verify_peer",
]
