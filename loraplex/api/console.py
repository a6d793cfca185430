"""The web console at `/console`: static HTML/JS/CSS shipped in the package (loraplex/api/console/),
nothing from a CDN, no build step.

The pages hold no data and no secret: sign-in keeps the account id and API token in the browser's
sessionStorage, and every call the console makes goes to the public API with that token (the
operator view sends the admin token to `/admin/adapters` and, when the server has one, the metrics
token to `/metrics`), so the console can do nothing the API would not allow. Answers carry a
Content-Security-Policy that lets the pages load and call only this server.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

CONSOLE_URL = "/console"
CONSOLE_DIR = Path(__file__).parent / "console"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class _ConsoleFiles(StaticFiles):
    """StaticFiles (index.html for the folder) with the console's security headers."""

    async def get_response(self, path, scope):
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


def install_console(app: FastAPI) -> None:
    """Serve the console's files under `/console/` (`/console` redirects there)."""

    @app.get(CONSOLE_URL, include_in_schema=False)
    async def console_root() -> RedirectResponse:
        return RedirectResponse(CONSOLE_URL + "/", status_code=307)

    app.mount(CONSOLE_URL, _ConsoleFiles(directory=CONSOLE_DIR, html=True), name="console")
