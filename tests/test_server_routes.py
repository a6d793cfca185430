"""The routes without an account token, decided one by one: `/`, `/healthz`, the docs (`/docs`,
`/redoc`, `/openapi.json`: public by default, off with `--no-docs`) served with their own assets
(nothing from a CDN), bearer auth declared in the OpenAPI document, and `/metrics` (open by
default, behind `--metrics-token` when given). Against live servers."""

from __future__ import annotations

import re
import shutil
import subprocess

import httpx
import pytest

from api_server import LiveServer, server_options

METRICS_TOKEN = "metrics-secret-for-the-test"


@pytest.fixture(scope="module")
def open_server(model_dir, tmp_path_factory):
    """Defaults: docs on, /metrics open."""
    live = LiveServer.start(server_options(model_dir, tmp_path_factory.mktemp("open")))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def closed_server(model_dir, tmp_path_factory):
    """--no-docs --metrics-token."""
    live = LiveServer.start(server_options(model_dir, tmp_path_factory.mktemp("closed"), docs=False,
                                           metrics_token=METRICS_TOKEN))
    yield live
    live.stop()


def get(server: LiveServer, path: str, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(server.url + path, headers=headers, timeout=60)


def referenced_urls(html: str) -> list[str]:
    return re.findall(r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)["']""", html) + re.findall(
        r"""url:\s*['"]([^'"]+)['"]""", html)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_use_only_the_servers_own_assets(open_server, page):
    reply = get(open_server, page)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/html")
    html = reply.text
    assert not re.search(r"https?://|//cdn|fonts\.googleapis", html), "an external URL in the page"
    urls = referenced_urls(html)
    assert "/openapi.json" in urls and any(u.endswith(".js") for u in urls)
    for url in urls:
        assert url.startswith("/"), url
        asset = get(open_server, url)
        assert asset.status_code == 200 and len(asset.content) > 100, url


def test_openapi_declares_bearer_auth_except_on_public_routes(open_server, closed_server):
    schema = get(open_server, "/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": "an account's API token (`loraplex accounts create`)"}
    assert schema["security"] == [{"bearerAuth": []}]
    assert schema["paths"]["/healthz"]["get"]["security"] == []
    assert schema["paths"]["/metrics"]["get"]["security"] == []  # open on this server
    run = schema["paths"]["/client/v4/accounts/{account_id}/ai/run/{model_name}"]["post"]
    assert "security" not in run  # the document's default: bearer


def test_root_is_a_page_not_a_404(open_server, closed_server):
    page = get(open_server, "/")
    assert page.status_code == 200 and 'href="/docs"' in page.text and "/client/v4" in page.text
    bare = get(closed_server, "/")
    assert bare.status_code == 200 and "/docs" not in bare.text


def test_docs_can_be_turned_off(closed_server):
    for path in ("/docs", "/redoc", "/openapi.json", "/docs-assets/swagger-ui-bundle.js"):
        reply = get(closed_server, path)
        assert reply.status_code == 404 and reply.json()["errors"][0]["code"] == 7000, path


def test_metrics_open_by_default(open_server):
    reply = get(open_server, "/metrics")
    assert reply.status_code == 200 and "loraplex_requests_in_flight" in reply.text


def test_metrics_behind_the_metrics_token(closed_server):
    account_id, tenant_token = closed_server.account("tenant")
    for token in (None, "wrong", tenant_token):
        reply = get(closed_server, "/metrics", token)
        assert reply.status_code == 401, token
        assert reply.json()["errors"][0]["code"] == 10000 and "loraplex_" not in reply.text
    reply = get(closed_server, "/metrics", METRICS_TOKEN)
    assert reply.status_code == 200 and "loraplex_requests_in_flight" in reply.text
    assert get(closed_server, "/healthz").status_code == 200  # liveness stays open


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("chromium-headless-shell")


@pytest.mark.browser
@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium (apt-get install chromium)")
@pytest.mark.parametrize("page, rendered", [("/docs", "opblock-summary-path"), ("/redoc", "http-verb")])
def test_docs_render_in_a_headless_browser_offline(open_server, page, rendered, tmp_path):
    """Chromium loads the page from the server (nothing else is reachable from the test machine
    either) and runs its scripts: the rendered DOM lists the API's operations (elements the
    scripts create, absent from the page as served)."""
    assert rendered not in get(open_server, page).text
    dom = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--user-data-dir={tmp_path}", "--virtual-time-budget=20000", "--dump-dom", open_server.url + page],
        capture_output=True, text=True, timeout=300).stdout
    assert dom.count(rendered) >= 10, dom[:2000]
    assert "ai/run" in dom
