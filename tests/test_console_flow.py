"""The web console (/console) in a real headless Chromium against a live server on the tiny model,
with real PEFT adapter files: sign in, upload, list, the playground side by side (the same texts
and token counts the API gives), the operator's status page, delete; a wrong token; another
account's finetunes never shown. Each page is screenshotted into docs/console/.

One browser and one server for the module (tests run in file order and share the signed-in tab).
Run: .venv/bin/python -m pytest -q tests/test_console_flow.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import httpx
import pytest

from api_server import LiveServer, server_options
from browser import open_browser, screenshot, text_of, wait_for
from upload_client import CONFIG, MODEL, WEIGHTS, Tenant, make_model_and_adapter

pytestmark = pytest.mark.browser
ADMIN_TOKEN = "admin-token-for-the-console-test"
PROMPT = "Hello there"


@pytest.fixture(scope="module")
def adapter_dir(files):
    return files[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_model_and_adapter(tmp_path_factory)


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    live = LiveServer.start(server_options(files[0], tmp_path_factory.mktemp("console"), admin_token=ADMIN_TOKEN))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    browser = open_browser(tmp_path_factory.mktemp("chromium-profile"))
    yield browser
    browser.quit()


@pytest.fixture(scope="module")
def alice(server):
    tenant = Tenant.open(server, "alice", MODEL)
    tenant.token = tenant.client.headers["Authorization"].split()[1]
    yield tenant
    tenant.close()


def by_css(driver, selector):
    return driver.find_element("css selector", selector)


def sign_in(driver, server, account_id: str, token: str) -> None:
    driver.get(server.url + "/console/")
    driver.execute_script("sessionStorage.clear()")
    driver.get(server.url + "/console/#/finetunes")
    account = wait_for(lambda: by_css(driver, "#account-id"), "the sign-in form")
    account.send_keys(account_id)
    by_css(driver, "#api-token").send_keys(token)
    by_css(driver, "#sign-in").click()


def rows(driver) -> dict[str, dict]:
    """The finetunes table: name → {column title: text}."""
    titles = [text_of(driver, th) for th in driver.find_elements("css selector", "#finetunes-table thead th")]
    out = {}
    for tr in driver.find_elements("css selector", "#finetune-rows tr"):
        cells = [text_of(driver, c) for c in tr.find_elements("css selector", "th, td")]
        out[tr.get_attribute("data-name")] = dict(zip(titles, cells))
    return out


def test_console_is_served_from_the_package_with_nothing_external(server):
    page = httpx.get(server.url + "/console", follow_redirects=True, timeout=30)
    assert page.status_code == 200 and str(page.url).endswith("/console/") and "<main" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    scripts = ["app.js", "api.js", "dom.js", "finetunes.js", "playground.js", "snippets.js", "status.js", "style.css"]
    for name in scripts:
        asset = httpx.get(f"{server.url}/console/{name}", timeout=30)
        assert asset.status_code == 200 and len(asset.text) > 200, name
        assert not re.search(r"https?://", asset.text), f"{name} names an external URL"
    missing = httpx.get(server.url + "/console/nothing.js", timeout=30)
    assert missing.status_code == 404


def test_a_wrong_token_shows_an_error_in_words(driver, server, alice):
    sign_in(driver, server, alice.account_id, "not-the-token")
    error = wait_for(lambda: by_css(driver, "#sign-in-error").is_displayed() and by_css(driver, "#sign-in-error"),
                     "the sign-in error")
    assert "Sign-in failed" in error.text and "authentication error" in error.text and "401" in error.text
    assert driver.execute_script("return sessionStorage.length") == 0  # nothing kept for a refused token
    screenshot(driver, "sign-in-error")
    other_id, _ = server.account("someone-else")
    sign_in(driver, server, other_id, alice.token)  # a real token, but of another account
    wait_for(lambda: "403" in by_css(driver, "#sign-in-error").text, "the wrong-account error")
    assert "does not belong to the account" in by_css(driver, "#sign-in-error").text


def test_sign_in_and_upload_an_adapter(driver, server, alice, adapter_dir):
    sign_in(driver, server, alice.account_id, alice.token)
    wait_for(lambda: by_css(driver, "#upload-form"), "the finetunes page")
    stored = json.loads(driver.execute_script("return sessionStorage.getItem('loraplex.console.session')"))
    assert stored["accountId"] == alice.account_id and stored["model"] == MODEL
    assert driver.execute_script("return localStorage.length") == 0  # the token is kept for the tab only
    by_css(driver, "#ft-name").send_keys("polite")
    by_css(driver, "#ft-description").send_keys("rank 4, every linear layer")
    by_css(driver, "#ft-files").send_keys(f"{adapter_dir / CONFIG}\n{adapter_dir / WEIGHTS}")
    by_css(driver, "#upload").click()
    wait_for(lambda: "Uploaded polite" in by_css(driver, "#upload-done").text, "the upload to finish")
    assert float(by_css(driver, "#upload-progress").get_attribute("value")) == 1.0
    row = wait_for(lambda: rows(driver).get("polite"), "the uploaded finetune in the list")
    api = alice.get("polite")
    config = json.loads((adapter_dir / CONFIG).read_text())
    assert row["Model"] == MODEL and row["State"].startswith("ready") and row["Public"] == "private"
    assert row["Rank"] == str(config["r"]) == "4"
    assert set(row["Targets"].split(", ")) == set(config["target_modules"])
    size = sum(a["size"] for a in api["assets"])
    assert size == (adapter_dir / CONFIG).stat().st_size + (adapter_dir / WEIGHTS).stat().st_size
    assert row["Size"] == (f"{size / 1024:.1f} KiB" if size < 2**20 else f"{size / 2**20:.1f} MiB")
    assert row["Created"].startswith(api["created_at"][:10])


def test_upload_refusals_show_the_servers_message_inline(driver, server, alice, adapter_dir, tmp_path):
    bad = tmp_path / WEIGHTS
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    by_css(driver, "#ft-name").send_keys("broken")
    by_css(driver, "#ft-files").send_keys(f"{adapter_dir / CONFIG}\n{bad}")
    by_css(driver, "#upload").click()
    error = wait_for(lambda: by_css(driver, "#upload-error").is_displayed() and by_css(driver, "#upload-error"),
                     "the refusal")
    # the same bytes through the API: the console shows the server's own message
    finetune = alice.create_id("broken-api")
    assert alice.send(finetune, CONFIG, (adapter_dir / CONFIG).read_bytes()).status_code == 200
    refusal = alice.send(finetune, WEIGHTS, bad.read_bytes())
    assert refusal.status_code == 400
    message = refusal.json()["errors"][0]["message"]
    assert f"Upload failed while uploading {WEIGHTS}: {message} (HTTP 400, code 5004)" == error.text
    row = wait_for(lambda: rows(driver).get("broken"), "the refused finetune in the list")
    assert row["State"].startswith("invalid") and message in row["State"]
    screenshot(driver, "finetunes")
    # a name the API refuses: its message, inline, before any file is sent
    by_css(driver, "#ft-name").clear()
    by_css(driver, "#ft-name").send_keys("broken")  # taken
    by_css(driver, "#ft-files").send_keys(f"{adapter_dir / CONFIG}\n{adapter_dir / WEIGHTS}")
    by_css(driver, "#upload").click()
    wait_for(lambda: "while creating the finetune" in by_css(driver, "#upload-error").text, "the name refusal")
    assert "broken" in by_css(driver, "#upload-error").text
