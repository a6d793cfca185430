"""Bearer-token authentication against the registry, and the account-in-path check."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request
from starlette.concurrency import run_in_threadpool as to_thread

from loraplex.api.errors import ApiError
from loraplex.api.request_scope import ACCOUNT_ID

if TYPE_CHECKING:
    from loraplex.api.context import ApiContext


async def authorize(request: Request, account_id: str) -> str:
    """The caller's account id. 401 / 10000 for a missing or invalid token (the registry compares
    hashes in constant time); 403 / 10000 when the path names another account. Sets
    request_scope.ACCOUNT_ID to the token's account."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(10000, "authentication error: missing API token (Authorization: Bearer …)", 401)
    owner = await to_thread(request.app.state.ctx.registry.authenticate, token.strip())
    ACCOUNT_ID.set(owner)  # for the log lines of this request
    if owner != account_id:
        raise ApiError(10000, "forbidden: this token does not belong to the account in the path", 403)
    return owner


async def authorized_context(request: Request, account_id: str) -> ApiContext:
    """The server's ApiContext, once `authorize` has accepted the caller for `account_id`."""
    await authorize(request, account_id)
    return request.app.state.ctx
