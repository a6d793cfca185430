"""Request-body size limits, enforced while the body streams in (never buffering past the limit).

A declared Content-Length over the limit is answered 413 / 3006 at once; a body that grows past
it (chunked, or lying about its length) raises ApiError(3006) from `receive`, inside whichever
handler is reading it, which the error handlers turn into the same answer.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from loraplex.api.errors import ApiError, envelope, log_refusal


def too_large(limit: int) -> ApiError:
    return ApiError(3006, f"request too large: the limit for this route is {limit} bytes", 413)


class BodyLimitMiddleware:
    """ASGI middleware; `limit_for(scope)` gives the byte limit of the request's route."""

    def __init__(self, app, limit_for: Callable[[dict], int]):
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await _refuse(send, too_large(limit) if declared.isdigit()
                                 else ApiError(5004, "invalid Content-Length header"), scope["path"])
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large(limit)
            return message

        await self.app(scope, limited_receive, send)


async def _refuse(send, error: ApiError, path: str) -> None:
    log_refusal(error, path)
    body = json.dumps(envelope(None, [{"code": error.code, "message": error.message}])).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
