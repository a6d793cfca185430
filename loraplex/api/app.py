"""The FastAPI application: routers under /client/v4, error handlers, body limits, metrics,
docs.

`create_app(ctx)` serves an ApiContext (see server.py for building one from options); the
engine thread starts and stops with the app's lifespan.

Routes without an account token: `/healthz` (liveness), `/` and, unless `ctx.docs` is off,
`/docs`, `/redoc`, `/openapi.json` (docs.py), `/console` (the web console's static files,
console.py). `/metrics` wants `Authorization: Bearer
<ctx.metrics_token>` when the server has one (`--metrics-token`), and is open otherwise.
"""

from __future__ import annotations

import asyncio
import hmac
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.routing import compile_path

from loraplex.api import admin, files, finetunes, jobs, logs, openai, workers_ai
from loraplex.api.connections import quiet_accept_errors
from loraplex.api.console import install_console
from loraplex.api.context import MULTIPART_FRAMING_BYTES, ApiContext
from loraplex.api.docs import install_docs
from loraplex.api.errors import ApiError, install_error_handlers
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


def create_app(ctx: ApiContext | None) -> FastAPI:
    """The app serving `ctx` (None: an app to read the OpenAPI document from, serving nothing)."""
    docs = ctx is None or ctx.docs
    metrics_public = ctx is None or ctx.metrics_token is None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        quiet_accept_errors(asyncio.get_running_loop())
        ctx.engine.start()
        runner = jobs.start_runner(ctx)
        if ctx.request_logs is not None:
            ctx.request_logs.writer.start()
        try:
            yield
        finally:
            if runner is not None:
                runner.stop()
            ctx.engine.shutdown()
            if ctx.request_logs is not None:
                ctx.request_logs.writer.stop()

    app = FastAPI(title="loraplex", version="0.1.0", lifespan=lifespan,
                  description="Multi-tenant LoRA inference: Workers AI and OpenAI dialects.",
                  docs_url=None, redoc_url=None, openapi_url="/openapi.json" if docs else None)
    app.state.ctx = ctx
    install_error_handlers(app)
    for router in (workers_ai.router, finetunes.router, openai.router, files.router, jobs.router, logs.router):
        app.include_router(router, prefix=API_PREFIX)
    if ctx is not None and ctx.admin_token:  # (ctx None: an app built only for its OpenAPI schema)
        app.include_router(admin.router)
    def route_of(router, endpoint):
        (route,) = [r for r in router.routes if getattr(r, "endpoint", None) is endpoint]
        return compile_path(API_PREFIX + route.path)[0], route.methods

    uploads = [] if ctx is None else [  # (path regex, methods, body limit) of the routes taking files
        (*route_of(finetunes.router, finetunes.upload_asset), ctx.limits.max_upload_body_bytes),
        (*route_of(files.router, files.create_file), ctx.files.max_file_bytes + MULTIPART_FRAMING_BYTES),
    ]

    def body_limit(scope) -> int:
        """The upload limit for a request a file-upload route will serve (its method and path
        template, matched as Starlette's router matches it), else the JSON limit: never chosen
        by what the raw path ends with."""
        for path, methods, limit in uploads:
            if scope.get("method") in methods and path.fullmatch(scope["path"]):
                return limit
        return ctx.limits.max_json_body_bytes

    app.add_middleware(BodyLimitMiddleware, limit_for=body_limit)
    app.add_middleware(RequestCounter, count=lambda route, status: ctx.metrics.requests.labels(route, status).inc())
    app.add_middleware(RequestIdMiddleware)  # outermost: every answer, refusals included, has an id

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "model": ctx.model_name}

    @app.get("/metrics")
    async def metrics(request: Request):
        if ctx.metrics_token is not None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), ctx.metrics_token.encode()):
                raise ApiError(10000, "authentication error: /metrics wants the server's metrics token", 401)
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    install_docs(app, docs, metrics_public=metrics_public)
    install_console(app)  # /console: the web console's static files (console.py)

    return app
