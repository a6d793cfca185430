"""The console's Logs page in a real headless Chromium against a live server on the tiny model:
logging turned on through the API, the entries that API calls made (Workers AI chat and raw, the
OpenAI SDK with a finetune; a request with `cf-aig-collect-log: false` is not there) listed as the
API lists them, filtered (finetune, time range, feedback) and a page at a time; feedback given by
mouse and by keyboard, a response corrected, an entry deleted, the entries exported to a dataset
file that the Datasets page then lists, with the content the API serves; the settings saved from
the page; another account sees none of it. Screenshots: logs, logs-entry (browser.SCREENSHOTS).

One browser and one server for the module (tests run in file order and share the signed-in tab).
Run: .venv/bin/python -m pytest -q tests/test_console_logs.py
"""

from __future__ import annotations

import json
import re

import openai
import pytest

from api_server import LiveServer, server_options
from browser import by_css, open_page, screenshot, script_errors, sign_in, text_at, wait_for
from upload_client import MODEL, Tenant, make_model_and_adapter

pytestmark = pytest.mark.browser
SAMPLING = {"max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_model_and_adapter(tmp_path_factory)


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    live = LiveServer.start(server_options(files[0], tmp_path_factory.mktemp("console-logs")))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def alice(server, files):
    """The account the browser signs in as, with the finetune `polite` and four generation
    requests made through the API after logging was turned on (the last one asks not to be logged)."""
    tenant = Tenant.open(server, "alice", MODEL)
    tenant.token = tenant.client.headers["Authorization"].split()[1]
    tenant.send_folder(tenant.create_id("polite"), files[1])
    assert tenant.client.put("/logs/settings", json={"enabled": True}).json()["result"]["enabled"] is True
    run = lambda body, headers=None: tenant.client.post(f"/run/{MODEL}", json=body | SAMPLING, headers=headers)  # noqa: E731
    assert run({"messages": [{"role": "user", "content": "Hello there"}]}).status_code == 200
    chat = openai.OpenAI(api_key=tenant.token, base_url=f"{tenant.client.base_url}v1", max_retries=0)
    chat.chat.completions.create(model=f"{MODEL}:polite", messages=[{"role": "user", "content": "Tell me a joke"}], **SAMPLING)
    assert run({"prompt": "Once upon a time", "raw": True}).status_code == 200
    assert run({"prompt": "Not this one"}, {"cf-aig-collect-log": "false"}).status_code == 200
    server.ctx.request_logs.writer.drain()
    tenant.oai = chat
    yield tenant
    tenant.close()


@pytest.fixture(autouse=True)
def no_script_errors(driver):
    yield
    problems = script_errors(driver)
    assert not problems, problems


def api_logs(tenant, **params) -> list[dict]:
    reply = tenant.client.get("/logs", params=params)
    assert reply.status_code == 200, reply.text
    return reply.json()["result"]


def shown(driver) -> list[dict]:
    """The logs table as shown: per row its id, feedback and the cells' text."""
    return driver.execute_script("""return [...document.querySelectorAll('#log-rows tr[data-id]')].map((tr) => ({
        id: tr.dataset.id, feedback: tr.dataset.feedback, cells: [...tr.children].map((td) => td.textContent)}))""")


def show_only(driver, finetune: str = "", feedback: str = "") -> None:
    from selenium.webdriver.support.select import Select

    Select(by_css(driver, "#filter-finetune")).select_by_value(finetune)
    Select(by_css(driver, "#filter-feedback")).select_by_value(feedback)
    by_css(driver, "#filter-apply").click()


def shown_ids(driver, expected: list[str], what: str) -> None:
    wait_for(lambda: [r["id"] for r in shown(driver)] == expected, what)


def test_logs_made_by_api_calls_are_listed_as_the_api_lists_them(driver, server, alice):
    sign_in(driver, server, alice.account_id, alice.token)
    wait_for(lambda: by_css(driver, "#upload-form"), "the finetunes page after sign-in")
    by_css(driver, "#nav a[data-page='logs']").click()
    entries = api_logs(alice)
    assert [e["prompt"] or e["messages"][-1]["content"] for e in entries] == ["Once upon a time", "Tell me a joke", "Hello there"]
    wait_for(lambda: len(shown(driver)) == 3, "the three entries")
    assert by_css(driver, "#logs-enabled").is_selected() and by_css(driver, "#logs-retention").get_attribute("value") == "30"
    polite = alice.get("polite")["id"]
    for row, entry in zip(shown(driver), entries, strict=True):
        when, who, prompt, response, tokens, took = row["cells"][:6]
        assert row["id"] == entry["id"] and row["feedback"] == "none"
        assert when == f"{entry['created_at'][:10]} {entry['created_at'][11:19]} UTC"
        assert who == ("polite" if entry["finetune"] == polite else "base model") + entry["dialect"]
        assert prompt == (entry["prompt"] or entry["messages"][-1]["content"]) and response == entry["response"]
        assert tokens == f"{entry['prompt_tokens']} + {entry['completion_tokens']}" and took == f"{entry['duration_ms']} ms"
    assert text_at(driver, "#logs-page") == "Page 1 of 1 · 3 entries"
    show_only(driver, finetune=polite)
    shown_ids(driver, [e["id"] for e in api_logs(alice, finetune="polite")], "the finetune's entries")
    assert len(shown(driver)) == 1 and shown(driver)[0]["cells"][2] == "Tell me a joke"
    show_only(driver)
    shown_ids(driver, [e["id"] for e in entries], "every entry again")
    # the time range (the browser's local time): nothing until 2000, everything since then
    set_time = "document.getElementById(arguments[0]).value = arguments[1]"
    driver.execute_script(set_time, "filter-until", "2000-01-01T00:00:00")
    by_css(driver, "#filter-apply").click()
    wait_for(lambda: text_at(driver, "#log-rows") == "No entries match these filters.", "no entry until 2000")
    assert text_at(driver, "#logs-page") == "Page 1 of 1 · 0 entries"
    driver.execute_script(set_time, "filter-until", "")
    driver.execute_script(set_time, "filter-since", "2000-01-01T00:00:00")
    by_css(driver, "#filter-apply").click()
    shown_ids(driver, [e["id"] for e in entries], "every entry since 2000")
    driver.execute_script(set_time, "filter-since", "")


def test_feedback_and_a_correction(driver, server, alice):
    from selenium.webdriver.common.keys import Keys

    raw, joke, hello = (e["id"] for e in api_logs(alice))
    by_css(driver, f"#log-rows tr[data-id='{hello}'] button[data-feedback='1']").click()  # by mouse
    wait_for(lambda: by_css(driver, f"#log-rows tr[data-id='{hello}']").get_attribute("data-feedback") == "1", "+1 shown")
    by_css(driver, f"#log-rows tr[data-id='{joke}'] button[data-feedback='-1']").send_keys(Keys.ENTER)  # by keyboard
    wait_for(lambda: by_css(driver, f"#log-rows tr[data-id='{joke}']").get_attribute("data-feedback") == "-1", "−1 shown")
    assert driver.switch_to.active_element.get_attribute("data-feedback") == "-1"  # the focus stays on the button
    assert {e["id"]: e["feedback"] for e in api_logs(alice)} == {raw: None, joke: -1, hello: 1}
    pressed = by_css(driver, f"#log-rows tr[data-id='{hello}'] button[data-feedback='1']")
    assert pressed.get_attribute("aria-pressed") == "true"
    show_only(driver, feedback="-1")
    shown_ids(driver, [joke], "the −1 entry")
    show_only(driver, feedback="none")
    shown_ids(driver, [raw], "the entry without feedback")
    show_only(driver)
    shown_ids(driver, [raw, joke, hello], "every entry")
    # a correction, in the entry's dialog; Escape closes it
    by_css(driver, f"#log-rows tr[data-id='{joke}'] td:last-child button").click()
    correction = wait_for(lambda: by_css(driver, "#log-dialog").is_displayed() and by_css(driver, "#log-correction"), "the dialog")
    assert "Tell me a joke" in text_at(driver, "#log-transcript")
    assert correction == driver.switch_to.active_element
    correction.clear()
    correction.send_keys("Why did the adapter cross the road?")
    by_css(driver, "#log-save").click()
    wait_for(lambda: text_at(driver, "#log-saved") == "Correction saved.", "the correction saved")
    entry = alice.client.get(f"/logs/{joke}").json()["result"]
    assert entry["corrected_response"] == "Why did the adapter cross the road?" and entry["feedback"] == -1
    screenshot(driver, "logs-entry", max_height=driver.execute_script("return innerHeight"))  # the dialog's backdrop: the viewport
    driver.switch_to.active_element.send_keys(Keys.ESCAPE)
    wait_for(lambda: not by_css(driver, "#log-dialog").is_displayed(), "the dialog to close")
    row = next(r for r in shown(driver) if r["id"] == joke)
    assert row["cells"][3] == "corrected Why did the adapter cross the road?" and row["feedback"] == "-1"


def test_export_to_a_dataset_file(driver, server, alice):
    by_css(driver, "#export-filename").send_keys("from-console.jsonl")
    by_css(driver, "#export").click()
    done = wait_for(lambda: (t := text_at(driver, "#export-done")) and t, "the export")
    [exported] = [f for f in alice.oai.files.list() if f.filename == "from-console.jsonl"]
    assert done == f"Exported from-console.jsonl as {exported.id} ({exported.bytes} bytes): see it in Datasets · train on it."
    # the API's content: oldest first, the correction replacing the response, the raw prompt left out
    hello, joke = reversed([e for e in api_logs(alice) if e["prompt"] is None])
    expected = [{"messages": hello["messages"] + [{"role": "assistant", "content": hello["response"]}]},
                {"messages": joke["messages"] + [{"role": "assistant", "content": "Why did the adapter cross the road?"}]}]
    content = alice.oai.files.content(exported.id).text
    assert [json.loads(line) for line in content.splitlines()] == expected
    screenshot(driver, "logs")
    by_css(driver, "#export-done a[href='#/datasets']").click()
    wait_for(lambda: driver.find_elements("css selector", f"#dataset-rows tr[data-id='{exported.id}']"), "the file in Datasets")
    assert by_css(driver, f"#dataset-rows tr[data-id='{exported.id}']").get_attribute("data-filename") == "from-console.jsonl"
    # nothing left to export: the server's refusal, in words
    open_page(driver, server, "logs")
    wait_for(lambda: len(shown(driver)) == 3, "the entries")
    show_only(driver, feedback="none")  # only the raw prompt, which no dataset can hold
    shown_ids(driver, [api_logs(alice)[0]["id"]], "the raw entry")
    by_css(driver, "#export").click()
    error = wait_for(lambda: by_css(driver, "#export-error").is_displayed() and text_at(driver, "#export-error"), "the refusal")
    assert re.fullmatch(r"Export failed: no log entries to export: .* \(HTTP 400, code 5004\)", error)


def test_settings_saved_from_the_page(driver, server, alice):
    by_css(driver, "#logs-enabled").click()
    retention = by_css(driver, "#logs-retention")
    retention.clear()
    retention.send_keys("7")
    by_css(driver, "#logs-settings-save").click()
    wait_for(lambda: text_at(driver, "#logs-settings-done") == "Saved: new requests are not logged.", "the settings saved")
    assert alice.client.get("/logs/settings").json()["result"] == {"enabled": False, "retention_days": 7}
    retention.clear()
    retention.send_keys("1000")  # the page leaves the upper bound to the server
    by_css(driver, "#logs-settings-save").click()
    error = wait_for(lambda: by_css(driver, "#logs-settings-error").is_displayed() and text_at(driver, "#logs-settings-error"),
                     "the refusal")
    refusal = alice.client.put("/logs/settings", json={"retention_days": 1000}).json()["errors"][0]
    assert error == f"Could not save the settings: {refusal['message']} (HTTP 400, code {refusal['code']})"


def test_another_account_sees_none_of_them(driver, server, alice):
    entries = api_logs(alice)
    bob_id, bob_token = server.account("bob")
    sign_in(driver, server, bob_id, bob_token)
    wait_for(lambda: by_css(driver, "#upload-form"), "bob's finetunes page")
    open_page(driver, server, "logs")
    wait_for(lambda: "No entries" in text_at(driver, "#log-rows"), "bob's empty log")
    assert shown(driver) == [] and not by_css(driver, "#logs-enabled").is_selected()
    assert [o.get_attribute("value") for o in driver.find_elements("css selector", "#filter-finetune option")] == [""]
    open_page(driver, server, "datasets")
    wait_for(lambda: "No dataset files yet" in text_at(driver, "#datasets-table caption"), "bob's empty datasets")
    source = driver.page_source
    assert not any(e["id"] in source for e in entries)
    assert "from-console" not in source


def test_entries_come_a_page_at_a_time(driver, server):
    carol = Tenant.open(server, "carol", MODEL)
    try:
        token = carol.client.headers["Authorization"].split()[1]
        carol.client.put("/logs/settings", json={"enabled": True})
        for i in range(21):  # one more than the page holds
            reply = carol.client.post(f"/run/{MODEL}", json={"messages": [{"role": "user", "content": f"question {i}"}],
                                                            "max_tokens": 1})
            assert reply.status_code == 200, reply.text
        server.ctx.request_logs.writer.drain()
        newest_first = [e["id"] for e in api_logs(carol, per_page=100)]
        sign_in(driver, server, carol.account_id, token)
        wait_for(lambda: by_css(driver, "#upload-form"), "carol's finetunes page")
        open_page(driver, server, "logs")
        shown_ids(driver, newest_first[:20], "the first page")
        assert text_at(driver, "#logs-page") == "Page 1 of 2 · 21 entries"
        assert not by_css(driver, "#logs-prev").is_enabled()
        by_css(driver, "#logs-next").click()
        shown_ids(driver, newest_first[20:], "the second page")
        assert shown(driver)[0]["cells"][2] == "question 0" and not by_css(driver, "#logs-next").is_enabled()
        by_css(driver, "#logs-prev").click()
        shown_ids(driver, newest_first[:20], "the first page again")
        # the one entry of the second page deleted, after a confirmation: back to the only page left
        by_css(driver, "#logs-next").click()
        shown_ids(driver, newest_first[20:], "the second page again")
        by_css(driver, f"#log-rows tr[data-id='{newest_first[20]}'] td:last-child button").click()
        wait_for(lambda: by_css(driver, "#log-dialog").is_displayed(), "the entry's dialog")
        by_css(driver, "#log-delete").click()
        wait_for(lambda: by_css(driver, "#confirm-dialog").is_displayed(), "the confirmation")
        by_css(driver, "#confirm-ok").click()
        shown_ids(driver, newest_first[:20], "the first page, the only one left")
        assert text_at(driver, "#logs-page") == "Page 1 of 1 · 20 entries" and not by_css(driver, "#log-dialog").is_displayed()
        assert carol.client.get(f"/logs/{newest_first[20]}").status_code == 404
    finally:
        carol.close()
