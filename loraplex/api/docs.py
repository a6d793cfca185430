"""API documentation served by the server itself, and the OpenAPI document's auth scheme.

- `/docs` (Swagger UI) and `/redoc` load their scripts and styles from `/docs-assets/`, the
  static files shipped by the `fastapi-offline` package (swagger-ui and redoc bundles): nothing
  from a CDN, so they render offline. Their pages reference no external URL.
- `/openapi.json` declares bearer authentication (`bearerAuth`) for every route but the public
  ones (`PUBLIC_ROUTES`; `/metrics` too unless the server has a metrics token).
- `/` is a small page pointing at the docs (or, with the docs off, at the API's prefix).

The docs are public by default (they describe the API, hold no tenant data); `--no-docs` turns
all three routes off.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs-assets"
PUBLIC_ROUTES = ("/", "/healthz")


def _assets_dir() -> Path:
    import fastapi_offline

    return Path(fastapi_offline.__file__).parent / "static"


def install_docs(app: FastAPI, enabled: bool, metrics_public: bool) -> None:
    """Add `/`, and with `enabled` the docs pages, their assets and the OpenAPI document (which
    the app must have been created with `docs_url=redoc_url=None`)."""
    title = app.title

    @app.get("/", include_in_schema=False)
    async def root() -> HTMLResponse:
        where = ('<a href="/docs">/docs</a> (Swagger UI), <a href="/redoc">/redoc</a>, '
                 '<a href="/openapi.json">/openapi.json</a>') if enabled else "this server's operator"
        return HTMLResponse(f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head>"
                            f"<body><h1>{title}</h1><p>{app.description}</p><p>API under <code>/client/v4</code> "
                            f"(Workers AI and OpenAI dialects), <code>Authorization: Bearer TOKEN</code>. "
                            f"Reference: {where}. Liveness: <a href='/healthz'>/healthz</a>.</p></body></html>")

    if not enabled:
        return
    app.mount(ASSETS_URL, StaticFiles(directory=_assets_dir()), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{title} - Swagger UI",
                                   swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
                                   swagger_favicon_url=f"{ASSETS_URL}/favicon.png",
                                   swagger_ui_parameters={"validatorUrl": None, "persistAuthorization": True})

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=app.openapi_url, title=f"{title} - ReDoc",
                              redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js",
                              redoc_favicon_url=f"{ASSETS_URL}/favicon.png", with_google_fonts=False)

    public = set(PUBLIC_ROUTES) | ({"/metrics"} if metrics_public else set())

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearerAuth": {"type": "http", "scheme": "bearer",
                               "description": "an account's API token (`loraplex accounts create`)"}}
            schema["security"] = [{"bearerAuth": []}]
            for path, operations in schema.get("paths", {}).items():
                if path in public:
                    for operation in operations.values():
                        operation["security"] = []
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
