"""Errors in the Workers AI envelope (or OpenAI's shape under /ai/v1/), never a traceback.

    {"result": null, "success": false, "errors": [{"code": N, "message": "…"}], "messages": []}

Every exception that reaches a handler becomes such a response: ApiError carries its own code and
status; the domain errors of the layers below (loraplex/errors.py) are mapped by `WIRE`, the one
table of kind → code and status; object-store failures are 503 / 3040 with a generic message (the
details go to the log); FastAPI's validation errors are 400 / 5004;
unknown routes 404 / 7000, wrong methods 405 / 7001; anything unexpected 500 / 3043 with a
generic message (the details go to the log only).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from loraplex import errors
from loraplex.adapters.storage import StorageError
from loraplex.api.request_scope import ACCOUNT_ID, REQUEST_ID
from loraplex.logs import event

log = logging.getLogger(__name__)

_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error"}


# domain error kind → (Workers AI code, HTTP status): the one table. Most specific kinds first;
# the first row the error is an instance of answers.
WIRE: list[tuple[type[errors.LoraplexError], int, int]] = [
    (errors.TooLarge, 3006, 413),
    (errors.AdapterFilesMissing, 3039, 400),
    (errors.InvalidInput, 5004, 400),
    (errors.FinetuneNotFound, 3037, 404),
    (errors.ModelNotFound, 5007, 400),
    (errors.NotFound, 7000, 404),
    (errors.Unauthenticated, 10000, 401),
    (errors.Forbidden, 10000, 403),
    (errors.LimitReached, 3036, 429),
    (errors.CapacityExhausted, 3040, 429),
    (errors.Unavailable, 3040, 503),
]


def wire_of(error: errors.LoraplexError) -> tuple[int, int]:
    """(Workers AI code, HTTP status) of a domain error."""
    for kind, code, status in WIRE:
        if isinstance(error, kind):
            return code, status
    return 3043, 500


class ApiError(Exception):
    """A refused request: HTTP `status` (default: the code's in `WIRE`), Workers AI `code`, and a
    message safe to show the caller. For what only the API layer knows (auth, routes, body limits)."""

    def __init__(self, code: int, message: str, status: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status if status is not None else next((s for _, c, s in WIRE if c == code), 400)


def invalid(message: str) -> ApiError:
    return ApiError(5004, message)


def envelope(result=None, errors: list[dict] | None = None) -> dict:
    return {"result": result, "success": not errors, "errors": errors or [], "messages": []}


def log_refusal(error: ApiError, path: str) -> None:
    """One log line per 4xx answer, with its reason (the message the caller gets)."""
    if 400 <= error.status < 500:
        event(log, "refused", request_id=REQUEST_ID.get(), account=ACCOUNT_ID.get(), path=path,
              status=error.status, code=error.code, reason=error.message)


def error_response(request: Request, error: ApiError) -> JSONResponse:
    log_refusal(error, request.url.path)
    if "/ai/v1/" in request.url.path:  # the OpenAI dialect: its clients read error.message
        body = {"error": {"message": error.message, "type": _OPENAI_TYPES.get(error.status, "server_error"),
                          "code": error.code, "param": None}}
    else:
        body = envelope(None, [{"code": error.code, "message": error.message}])
    return JSONResponse(body, status_code=error.status)


def api_error_in(exc: BaseException) -> ApiError | None:
    """The ApiError `exc` is or holds (anyio task groups wrap what is raised inside them)."""
    if isinstance(exc, ApiError):
        return exc
    for inner in exc.exceptions if isinstance(exc, BaseExceptionGroup) else ():
        if found := api_error_in(inner):
            return found
    return None


def as_api_error(exc: Exception) -> ApiError:
    """The ApiError an exception from the layers below stands for."""
    if found := api_error_in(exc):
        return found
    if isinstance(exc, errors.LoraplexError):
        code, status = wire_of(exc)
        if status >= 500:
            log.warning("request failed: %r", exc)
        return ApiError(code, exc.message, status)
    if isinstance(exc, StorageError):
        log.warning("request failed: %r", exc)
        return ApiError(3040, "temporarily out of capacity: storage unavailable, retry later", 503)
    if isinstance(exc, ValueError):  # the engine's and SamplingParams' refusals name the bad input
        return invalid(str(exc)[:1000])
    log.exception("unexpected error", exc_info=exc)
    return ApiError(3043, "internal server error", 500)


def validation_message(errors: list[dict]) -> str:
    """Up to five pydantic errors as one line: "invalid input: field.path: what is wrong; …"."""
    parts = []
    for err in errors[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "invalid input: " + "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(request, invalid(validation_message(list(exc.errors()))))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        code = {404: 7000, 405: 7001}.get(exc.status_code, 5004)
        message = {404: "no route for that URI", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
        return error_response(request, ApiError(code, message, exc.status_code))

    async def _known(request: Request, exc: Exception):
        return error_response(request, as_api_error(exc))

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect):
        return Response(status_code=499)  # nobody reads it: the client left before its body was read

    # the expected kinds are registered one by one: Starlette sends a bare `Exception` handler to
    # its outermost middleware, which logs a traceback after answering
    for kind in (ApiError, errors.LoraplexError, StorageError, ValueError, Exception):
        app.add_exception_handler(kind, _known)
