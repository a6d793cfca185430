"""The console's Server status page on a locked-down server (a metrics token, no operator routes),
in a real headless Chromium: each missing piece is said in words, and the metrics token entered
on the page opens the metrics. Run: .venv/bin/python -m pytest -q tests/test_console_operator.py"""

from __future__ import annotations

import pytest

from api_server import LiveServer, server_options
from browser import text_at, wait_for

pytestmark = pytest.mark.browser
METRICS_TOKEN = "metrics-token-for-the-console-test"


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    live = LiveServer.start(server_options(model_dir, tmp_path_factory.mktemp("locked"), metrics_token=METRICS_TOKEN))
    yield live
    live.stop()


def test_status_page_names_what_is_missing(driver, server):
    account_id, token = server.account("operator")
    driver.get(server.url + "/console/")
    driver.execute_script("sessionStorage.setItem('loraplex.console.session', JSON.stringify("
                          "{accountId: arguments[0], token: arguments[1], model: arguments[2]}))",
                          account_id, token, server.ctx.model_name)
    driver.get(server.url + "/console/#/status")
    driver.refresh()
    refusal = wait_for(lambda: (t := text_at(driver, "#metrics-error")) and t, "the metrics refusal")
    assert "/metrics wants the server's metrics token" in refusal and "enter the server's metrics token" in refusal
    assert text_at(driver, "#tiles") == ""  # no figures made up
    driver.find_element("css selector", "#admin-token").send_keys("any-admin-token")
    driver.find_element("css selector", "#metrics-token").send_keys(METRICS_TOKEN)
    driver.find_element("css selector", "#operator-apply").click()
    wait_for(lambda: "0 / 2" in text_at(driver, "#tile-slots"), "the metrics, with the token")
    assert not driver.find_element("css selector", "#metrics-error").is_displayed()
    admin = wait_for(lambda: "no operator routes" in (t := text_at(driver, "#admin-error")) and t, "the admin hint")
    assert "HTTP 404" in admin and "LORAPLEX_ADMIN_TOKEN" in admin
    errors = [e["message"] for e in driver.get_log("browser") if e["source"] in ("javascript", "security")]
    assert not errors, errors
