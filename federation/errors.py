"""Errors of federation (tokens, join, peers, resolution), leaves of
:class:`fedgw.errors.FedgwError`."""

from __future__ import annotations

from fedgw.errors import Conflict, FedgwError, InvalidInput, NotFound, PermissionDenied, Unavailable


class FederationError(FedgwError):
    code = "federation_error"


class TokenMalformed(FederationError, InvalidInput):
    """The text is not a fedgw federation token, or it was damaged in transit."""

    code = "token_malformed"


class TokenRejected(FederationError, PermissionDenied):
    """The issuer refused the token: unknown, wrong secret, expired, used up, revoked.
    The message says which, except for an unknown id or a wrong secret (same answer)."""

    code = "token_rejected"


class PinMismatch(FederationError, PermissionDenied):
    """The bundle the issuer's endpoint served is not the one the token pins: someone
    may be in the middle. Nothing was stored."""

    code = "pin_mismatch"


class AlreadyFederated(FederationError, Conflict):
    code = "already_federated"


class UnknownDomain(FederationError, NotFound):
    """A domain that is neither a peer nor resolvable as a federated domain."""

    code = "unknown_domain"


class PeerUnreachable(FederationError, Unavailable):
    """A peer gateway did not answer (network, TLS, or its API failed)."""

    code = "peer_unreachable"


class NotExported(FederationError, PermissionDenied):
    """The peer does not export that network service to the caller."""

    code = "not_exported"


class BadPeerAnswer(FederationError, Unavailable):
    """A peer answered something this gateway cannot use (not JSON, not the expected
    shape, or not within what was asked for)."""

    code = "bad_peer_answer"
