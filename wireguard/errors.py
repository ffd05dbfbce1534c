"""Errors of the data plane, leaves of :class:`fedgw.errors.FedgwError`.

Netlink and OS errors are translated where they leave this package, keeping the errno:
``raise NetlinkFailed(..., errno=exc.code) from exc``.
"""

from __future__ import annotations

import errno as errnos

from fedgw.errors import Conflict, Exhausted, FedgwError, InvalidInput, NotFound, Unavailable

# Errors a retry may cure: the kernel was busy, or memory was short for a moment.
_TRANSIENT = {errnos.EBUSY, errnos.EAGAIN, errnos.ENOBUFS, errnos.ENOMEM, errnos.EINTR}


class DataplaneError(FedgwError):
    """A data-plane operation failed."""

    code = "dataplane_error"


class NetlinkFailed(DataplaneError):
    """The kernel refused a netlink request; ``errno`` says why."""

    code = "netlink_failed"

    def __init__(self, message: str, *, errno: int) -> None:
        super().__init__(message, retryable=errno in _TRANSIENT)
        self.errno = errno


class NamespaceNotFound(DataplaneError, NotFound):
    """A network namespace the operation needs does not exist."""

    code = "netns_not_found"


class LinkNotFound(DataplaneError, NotFound):
    """An interface the operation needs does not exist."""

    code = "link_not_found"


class CommandFailed(DataplaneError):
    """A helper program (ip, nft, wg, wireguard-go) failed or is missing."""

    code = "command_failed"


class DriverUnavailable(DataplaneError, Unavailable):
    """The WireGuard driver asked for cannot run here (no kernel module, no binary)."""

    code = "driver_unavailable"


class PoolExhausted(DataplaneError, Exhausted):
    """An address pool has no free address pair left."""

    code = "pool_exhausted"


class InvalidKey(DataplaneError, InvalidInput):
    """A WireGuard key is malformed (wrong base64, wrong length). Messages about private
    keys never quote the input."""

    code = "invalid_key"


class InsecureKeyFile(DataplaneError, InvalidInput):
    """A private key file is readable or writable by group or others; fix its mode."""

    code = "insecure_key_file"


class InvalidSpec(DataplaneError, InvalidInput):
    """An interface, peer or pool specification is malformed or contradictory."""

    code = "invalid_dataplane_spec"


class PeerNotFound(DataplaneError, NotFound):
    """The interface has no peer with that public key."""

    code = "peer_not_found"


class InterfaceConflict(DataplaneError, Conflict):
    """The interface name is taken by something else (another kind of link, or a
    userspace interface of that name in another namespace)."""

    code = "interface_conflict"


class UapiFailed(DataplaneError):
    """A userspace WireGuard daemon refused a UAPI request or could not be reached;
    ``errno`` says why (positive, as in :mod:`errno`)."""

    code = "uapi_failed"

    def __init__(self, message: str, *, errno: int) -> None:
        super().__init__(message, retryable=errno in _TRANSIENT_UAPI)
        self.errno = errno


class InterfaceDied(DataplaneError, Unavailable):
    """The process behind a userspace interface exited; ``ensure_interface`` starts a
    new one (whose peers must then be configured again)."""

    code = "interface_died"


# A daemon that is restarting refuses connections for a moment; a timeout may pass too.
_TRANSIENT_UAPI = _TRANSIENT | {errnos.ECONNREFUSED, errnos.ETIMEDOUT}


# --- appended for wires, policy routing and the reconciler ----------------------------


class WireConflict(DataplaneError, Conflict):
    """A wire or peer contradicts one already in place: the same address, prefix or
    interface name with a different destination (e.g. two connections of one peer
    given the same address pair), or a workload interface name that is taken."""

    code = "wire_conflict"


class UnknownPeer(DataplaneError, NotFound):
    """The data plane has no tunnel to that peer domain (``ensure_peer`` comes first)."""

    code = "unknown_peer"


class WireNotFound(DataplaneError, NotFound):
    """The data plane has no wire for that connection."""

    code = "wire_not_found"
