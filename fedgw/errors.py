"""The root of fedgw's single error tree; every package derives its errors from here.

    FedgwError                     retryable: may the same call succeed later?
     ├── InvalidInput              malformed or contradictory input (never retry as is)
     ├── NotFound                  the named thing does not exist
     ├── Conflict                  the request contradicts the current state
     ├── TooLarge                  a body or a collection exceeds a limit
     ├── PermissionDenied          the caller is known but not allowed
     ├── Exhausted                 a pool or quota has nothing left
     └── Unavailable               something needed is down or busy (retryable)

Each package adds its own leaves in its ``errors.py`` (``gateway.errors``,
``wireguard.errors``, ...). Errors of lower libraries (sqlite3, httpx, netlink) are
translated where they cross into fedgw code: ``raise StoreUnavailable(...) from exc``.
The mapping to HTTP status codes lives in one place, ``gateway.api.errors``.
"""

from __future__ import annotations


class FedgwError(Exception):
    """Base of every error fedgw raises on purpose.

    ``code`` is a stable machine-readable name (it is the ``error`` field of API error
    bodies); the message is for humans and says what is wrong and where.
    """

    code: str = "error"
    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retryable is not None:
            self.retryable = retryable

    def __str__(self) -> str:
        return self.message


class InvalidInput(FedgwError):
    """The caller sent something malformed; sending it again will not help."""

    code = "invalid_input"


class NotFound(FedgwError):
    """The named object does not exist (or no longer exists)."""

    code = "not_found"


class Conflict(FedgwError):
    """The request contradicts the current state (in use, already exists, raced)."""

    code = "conflict"


class TooLarge(FedgwError):
    """A body or a collection exceeds a configured limit."""

    code = "too_large"


class PermissionDenied(FedgwError):
    """The caller was identified but is not allowed to do this."""

    code = "permission_denied"


class Exhausted(FedgwError):
    """A pool or a quota has nothing left to hand out."""

    code = "exhausted"


class Unavailable(FedgwError):
    """Something this call needs is down or busy; the same call may succeed later."""

    code = "unavailable"
    retryable = True
