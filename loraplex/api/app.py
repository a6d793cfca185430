"""The FastAPI application: routers under /client/v4, error handlers, body limits, metrics.

`create_app(ctx)` serves an ApiContext (see server.py for building one from options); the
engine thread starts and stops with the app's lifespan.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.routing import compile_path

from loraplex.api import admin, finetunes, openai, workers_ai
from loraplex.api.context import ApiContext
from loraplex.api.errors import install_error_handlers
from loraplex.api.limits import BodyLimitMiddleware
from loraplex.api.request_scope import RequestIdMiddleware

API_PREFIX = "/client/v4"


class RequestCounter:
    """ASGI middleware: count(route template, status) once per HTTP request. (A plain ASGI
    wrapper, not BaseHTTPMiddleware, whose task group would re-raise errors from `receive` —
    such as a body over the limit — after the handler already answered them.)"""

    def __init__(self, app, count):
        self.app = app
        self.count = count

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_and_note_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            self.count(getattr(scope.get("route"), "path", "unmatched"), str(status))


def create_app(ctx: ApiContext) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        ctx.engine.start()
        try:
            yield
        finally:
            ctx.engine.shutdown()

    app = FastAPI(title="loraplex", version="0.1.0", lifespan=lifespan,
                  description="Multi-tenant LoRA inference: Workers AI and OpenAI dialects.")
    app.state.ctx = ctx
    install_error_handlers(app)
    for router in (workers_ai.router, finetunes.router, openai.router):
        app.include_router(router, prefix=API_PREFIX)
    if ctx is not None and ctx.admin_token:  # (ctx None: an app built only for its OpenAPI schema)
        app.include_router(admin.router)
    (upload,) = [r for r in finetunes.router.routes if getattr(r, "endpoint", None) is finetunes.upload_asset]
    upload_path, upload_methods = compile_path(API_PREFIX + upload.path)[0], upload.methods

    def body_limit(scope) -> int:
        """The upload limit for a request the asset-upload route will serve (its method and path
        template, matched as Starlette's router matches it), else the JSON limit: never chosen
        by what the raw path ends with."""
        if scope.get("method") in upload_methods and upload_path.fullmatch(scope["path"]):
            return ctx.limits.max_upload_body_bytes
        return ctx.limits.max_json_body_bytes

    app.add_middleware(BodyLimitMiddleware, limit_for=body_limit)
    app.add_middleware(RequestCounter, count=lambda route, status: ctx.metrics.requests.labels(route, status).inc())
    app.add_middleware(RequestIdMiddleware)  # outermost: every answer, refusals included, has an id

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "model": ctx.model_name}

    @app.get("/metrics")
    async def metrics():
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
