"""What the console needs outside the browser: its files ship as package data (every file of
loraplex/api/console/ is matched by pyproject's package-data patterns), and the API route it reads
rank and targets from, `GET …/finetunes/{id}/finetune-assets/adapter_config.json`, against a live
server: the stored bytes to whoever may read the finetune, refusals otherwise."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

import httpx
import pytest

from api_server import LiveServer, server_options
from upload_client import CONFIG, MODEL, WEIGHTS, Tenant, assert_error, make_model_and_adapter

ROOT = Path(__file__).parent.parent


def test_every_console_file_is_package_data():
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["loraplex.api"]
    console = ROOT / "loraplex" / "api" / "console"
    files = [p.relative_to(console.parent).as_posix() for p in console.rglob("*") if p.is_file()]
    assert "console/index.html" in files
    unshipped = [f for f in files if not any(fnmatch.fnmatch(f, pattern) for pattern in patterns)]
    assert not unshipped, f"add them to [tool.setuptools.package-data]: {unshipped}"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_model_and_adapter(tmp_path_factory)


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    live = LiveServer.start(server_options(files[0], tmp_path_factory.mktemp("config-route")))
    yield live
    live.stop()


def test_adapter_config_route(server, files):
    adapter = files[1]
    owner, other = Tenant.open(server, "owner", MODEL), Tenant.open(server, "other", MODEL)
    try:
        private, public = owner.create_id("private-one"), owner.create_id("public-one", public=True)
        path = f"/finetunes/{private}/finetune-assets/{CONFIG}"
        assert_error(owner.client.get(path), 400, 3039, "private-one", "has no adapter_config.json yet")
        for finetune in (private, public):
            owner.send_folder(finetune, adapter)
        reply = owner.client.get(path)
        assert reply.status_code == 200 and reply.headers["content-type"] == "application/json"
        assert reply.content == (adapter / CONFIG).read_bytes()
        assert owner.client.get(f"/finetunes/private-one/finetune-assets/{CONFIG}").content == reply.content  # by name
        # another account: never a private finetune's config; a public one's by its id, as GET …/finetunes/{id}
        assert_error(other.client.get(path), 404, 3037)
        assert other.client.get(f"/finetunes/{public}/finetune-assets/{CONFIG}").content == reply.content
        assert_error(httpx.get(str(owner.client.base_url).rstrip("/") + path, timeout=30), 401, 10000, "missing API token")
        stranger = f"{server.url}/client/v4/accounts/{other.account_id}/ai{path}"
        assert_error(owner.client.get(stranger), 403, 10000, "does not belong")
        assert owner.client.get(f"/finetunes/{private}/finetune-assets/{WEIGHTS}").status_code in (404, 405)  # config only
        assert httpx.get(server.url + "/healthz", timeout=30).status_code == 200
    finally:
        owner.close()
        other.close()


def test_browser_tests_fail_without_chromium(monkeypatch):
    """Without Debian's chromium and chromium-driver the console's browser tests fail, naming the
    packages to install; they are never skipped."""
    import browser

    monkeypatch.setattr(browser.shutil, "which", lambda name: None)
    monkeypatch.setattr(browser.os.path, "exists", lambda path: False)
    with pytest.raises(pytest.fail.Exception) as failed:
        browser.open_browser(Path("/nonexistent"))
    assert "apt-get install -y chromium chromium-driver" in str(failed.value)
    assert "never skipped" in str(failed.value)
