"""The error tree on the wire: which HTTP status each kind of error is, the JSON body
of an error response, and the error a client raises for one. Servers (the gateway's
APIs) and clients (the CLI, peer gateways) share this one table."""

from __future__ import annotations

import json
from typing import Any

from fedgw.errors import (
    Conflict,
    Exhausted,
    FedgwError,
    InvalidInput,
    NotFound,
    PermissionDenied,
    TooLarge,
    Unavailable,
)

# Most specific first.
STATUS_OF: list[tuple[type[FedgwError], int]] = [
    (InvalidInput, 400),
    (PermissionDenied, 403),
    (NotFound, 404),
    (Conflict, 409),
    (Exhausted, 409),
    (TooLarge, 413),
    (Unavailable, 503),
]

_ERROR_OF_STATUS: dict[int, type[FedgwError]] = {
    400: InvalidInput,
    401: PermissionDenied,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    413: TooLarge,
    422: InvalidInput,
    502: Unavailable,
    503: Unavailable,
    504: Unavailable,
}


def status_of(exc: FedgwError) -> int:
    for cls, status in STATUS_OF:
        if isinstance(exc, cls):
            return status
    return 500


def error_body(code: str, detail: str, *, retryable: bool = False, **extra: Any) -> dict[str, Any]:
    return {"error": code, "detail": detail, "retryable": retryable, **extra}


def error_from_response(status: int, text: str, *, source: str = "") -> FedgwError:
    """The error an error response stands for, keeping its code, message and retryable
    flag; ``source`` (e.g. "cluster2") prefixes the message."""
    code: str | None = None
    retryable = status >= 500
    try:
        body = json.loads(text)
        detail = str(body["detail"])
        code = str(body.get("error") or "") or None
        retryable = bool(body.get("retryable", retryable))
    except (ValueError, KeyError, TypeError):
        detail = " ".join(text.split())[:200] or f"HTTP {status}"
    return error_of(status, code, detail, retryable=retryable, source=source)


def error_of(
    status: int, code: str | None, detail: str, *, retryable: bool, source: str = ""
) -> FedgwError:
    """The error that ``status`` and an error body's fields stand for."""
    cls = _ERROR_OF_STATUS.get(status, FedgwError)
    error = cls(f"{source}: {detail}" if source else detail, retryable=retryable)
    if code:
        error.code = code
    return error
