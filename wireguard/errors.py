"""Errors of the data plane, leaves of :class:`fedgw.errors.FedgwError`.

Netlink and OS errors are translated where they leave this package, keeping the errno:
``raise NetlinkFailed(..., errno=exc.code) from exc``.
"""

from __future__ import annotations

import errno as errnos

from fedgw.errors import Exhausted, FedgwError, NotFound, Unavailable

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
