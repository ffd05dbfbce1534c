"""The one place where errors become HTTP responses.

Every error body is ``{"error": <stable code>, "detail": <message>, "retryable": bool}``;
validation errors add ``"errors"``, one entry per offending field with its location.
Bad input never yields a 500: a 500 means a bug, and is logged with its traceback.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fedgw.errors import FedgwError
from fedgw.http import error_body, status_of
from fedgw.models import describe_validation_errors

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_input",
    503: "unavailable",
}


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc)


async def _fedgw_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FedgwError)
    status = status_of(exc)
    if status == 500:
        log.error("unmapped error: %s", exc, exc_info=exc)
    return JSONResponse(error_body(exc.code, str(exc), retryable=exc.retryable), status)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": _loc(e["loc"]), "msg": e["msg"].removeprefix("Value error, "), "type": e["type"]}
        for e in exc.errors()
    ]
    if any(e["type"] == "json_invalid" for e in errors):
        msg = next(e["msg"] for e in errors if e["type"] == "json_invalid")
        return JSONResponse(error_body("malformed_json", f"request body is not JSON: {msg}"), 400)
    detail = describe_validation_errors(exc.errors())
    return JSONResponse(error_body("invalid_input", detail, errors=errors), 422)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return JSONResponse(error_body(code, detail), exc.status_code, headers=exc.headers)


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.error("internal error", exc_info=exc)
    return JSONResponse(
        error_body("internal", "internal error in the gateway; its log has the details"), 500
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(FedgwError, _fedgw_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
