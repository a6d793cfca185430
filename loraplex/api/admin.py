"""Operator routes, outside the tenant API: `GET /admin/adapters` (which adapter is resident in
which tier: AdapterResidency.snapshot, adapters/residency.py).

They exist only when the server has an admin token (`LORAPLEX_ADMIN_TOKEN`, read by `loraplex
serve`); otherwise every /admin/ path is 404 like any unknown route. Callers send
`Authorization: Bearer <admin token>`: none → 401, another token (a tenant's included) → 403.
"""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request

from loraplex.api.context import ApiContext
from loraplex.api.errors import ApiError

router = APIRouter(prefix="/admin")


def _authorize_operator(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.ctx
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(10000, "authentication error: missing admin token (Authorization: Bearer …)", 401)
    if not hmac.compare_digest(token.strip().encode(), ctx.admin_token.encode()):
        raise ApiError(10000, "forbidden: not the admin token", 403)
    return ctx


@router.get("/adapters")
async def adapters(request: Request):
    """One snapshot, taken on the engine thread, of slots, host and disk tiers and loads in flight."""
    ctx = _authorize_operator(request)
    return await ctx.engine.call(lambda engine: engine.adapters.snapshot())
