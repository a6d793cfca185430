"""Who and which request the current code runs for, for the log lines: context variables set once
per HTTP request (the request id by `RequestIdMiddleware`, the account by `auth.authorize`).

Context variables are copied into the tasks a handler starts (a streaming body), so code anywhere
below a route reads the values of its own request. Every response carries the id as `x-request-id`,
so a caller can quote it and an operator find the matching log lines.
"""

from __future__ import annotations

import uuid
from contextvars import ContextVar

REQUEST_ID: ContextVar[str | None] = ContextVar("loraplex_request_id", default=None)
ACCOUNT_ID: ContextVar[str | None] = ContextVar("loraplex_account_id", default=None)
HEADER = b"x-request-id"


class RequestIdMiddleware:
    """ASGI middleware: a fresh id per HTTP request, in REQUEST_ID and the `x-request-id` header."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = uuid.uuid4().hex
        REQUEST_ID.set(request_id)
        ACCOUNT_ID.set(None)

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (HEADER, request_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)
