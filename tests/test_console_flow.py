"""The web console (/console) in a real headless Chromium against a live server on the tiny model,
with real PEFT adapter files: sign in, upload, list, the playground side by side (the same texts
and token counts the API gives), the operator's status page, delete; a wrong token; another
account's finetunes never shown. Each page is screenshotted (see browser.SCREENSHOTS).

One browser and one server for the module (tests run in file order and share the signed-in tab).
Run: .venv/bin/python -m pytest -q tests/test_console_flow.py
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys

import httpx
import pytest

from api_server import LiveServer, server_options
from browser import by_css, open_page, screenshot, script_errors, sign_in, text_at, text_of, wait_for
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
def second_adapter_dir(files, tmp_path_factory):
    """Another PEFT adapter for the same model: rank 8 on q_proj and v_proj, other weights."""
    import transformers

    from tiny_models import make_peft_adapter

    folder = tmp_path_factory.mktemp("second-adapter")
    make_peft_adapter(transformers.AutoModelForCausalLM.from_pretrained(files[0]), folder, seed=2, r=8,
                      lora_alpha=16, target_modules=["q_proj", "v_proj"])
    return folder


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    live = LiveServer.start(server_options(files[0], tmp_path_factory.mktemp("console"), admin_token=ADMIN_TOKEN))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def alice(server):
    tenant = Tenant.open(server, "alice", MODEL)
    tenant.token = tenant.client.headers["Authorization"].split()[1]
    yield tenant
    tenant.close()


@pytest.fixture(autouse=True)
def no_script_errors(driver):
    """After each test: the pages logged no script error and no failed load of their own files
    (refused API calls are expected answers, shown in words, and are not counted)."""
    yield
    problems = script_errors(driver)
    assert not problems, problems


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
    from loraplex.api.console import CONSOLE_DIR

    scripts = sorted(p.name for p in CONSOLE_DIR.iterdir() if p.suffix in (".js", ".css"))
    assert {"app.js", "logs.js", "datasets.js", "jobs.js", "losschart.js", "style.css"} <= set(scripts)
    for name in scripts:
        asset = httpx.get(f"{server.url}/console/{name}", timeout=30)
        assert asset.status_code == 200 and len(asset.text) > 200, name
        # SVG's namespace name is an identifier, never fetched; any other URL would be a load from elsewhere
        text = asset.text.replace('"http://www.w3.org/2000/svg"', "")
        assert not re.search(r"https?://", text), f"{name} names an external URL"
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


def drop_files(driver, files: dict[str, bytes]) -> None:
    """Drop files (name → bytes) on the upload form's drop zone, as a drag from the desktop does."""
    driver.execute_script("""
        const transfer = new DataTransfer();
        for (const [name, b64] of Object.entries(arguments[0])) {
          const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
          transfer.items.add(new File([bytes], name));
        }
        const zone = document.getElementById("drop-zone");
        for (const type of ["dragover", "drop"]) {
          zone.dispatchEvent(new DragEvent(type, {dataTransfer: transfer, bubbles: true, cancelable: true}));
        }""", {name: base64.b64encode(data).decode() for name, data in files.items()})


def test_upload_refusals_show_the_servers_message_inline(driver, server, alice, adapter_dir, tmp_path):
    bad = tmp_path / WEIGHTS
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    by_css(driver, "#ft-name").send_keys("broken")
    drop_files(driver, {CONFIG: (adapter_dir / CONFIG).read_bytes(), WEIGHTS: bad.read_bytes()})
    chosen = by_css(driver, "#chosen-files").text
    assert f"{CONFIG}: {CONFIG} (1.2 KiB)" in chosen and f"{WEIGHTS}: {WEIGHTS} (16 B)" in chosen
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


def set_value(driver, selector: str, value) -> None:
    element = by_css(driver, selector)
    element.clear()
    element.send_keys(str(value))


def ask(driver, prompt: str) -> dict[str, tuple[str, int, int]]:
    """Send `prompt` from the playground; per side (text, prompt tokens, completion tokens) of the new answers."""
    before = {side: len(driver.find_elements("css selector", f"#{side}-output .answer")) for side in ("left", "right")}
    set_value(driver, "#prompt", prompt)
    by_css(driver, "#send").click()
    out = {}
    for side in ("left", "right"):
        answer = wait_for(lambda: (a := driver.find_elements("css selector", f"#{side}-output .answer"))[before[side]:]
                          and a[-1].get_attribute("data-done") == "true" and a[-1], f"the {side} answer")
        assert not answer.find_elements("css selector", ".error"), text_of(driver, answer)
        out[side] = (text_of(driver, answer), int(answer.get_attribute("data-prompt-tokens")),
                     int(answer.get_attribute("data-completion-tokens")))
    return out


def api_answer(tenant, body: dict, lora: str | None) -> tuple[str, int, int]:
    reply = tenant.client.post(f"/run/{MODEL}", json=body | ({"lora": lora} if lora else {}))
    assert reply.status_code == 200, reply.text
    result = reply.json()["result"]
    return result["response"], result["usage"]["prompt_tokens"], result["usage"]["completion_tokens"]


def run_snippet(driver, button: str, token: str) -> str:
    """Click a "Copy as" button, run the snippet shown (Python or shell) with the token in the
    environment, close the dialog; the snippet's standard output."""
    by_css(driver, button).click()
    code = text_of(driver, wait_for(lambda: by_css(driver, "#snippet-dialog").is_displayed() and by_css(driver, "#snippet-code"),
                                    "the snippet"))
    assert token not in code  # the snippet reads the token from the environment
    by_css(driver, "#snippet-close").click()
    command = ["bash", "-c", code] if code.startswith("curl") else [sys.executable, "-c", code]
    env = os.environ | {"CLOUDFLARE_API_TOKEN": token, "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run(command, capture_output=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done.stdout.decode("utf-8")


def test_playground_side_by_side_gives_the_apis_answers(driver, server, alice):
    open_page(driver, server, "playground")
    wait_for(lambda: "polite" in [o.get_attribute("value") for o in driver.find_elements("css selector", "#right-model option")],
             "the finetune in the playground's picker")
    from selenium.webdriver.support.select import Select
    assert Select(by_css(driver, "#left-model")).first_selected_option.get_attribute("value") == ""  # the base model
    Select(by_css(driver, "#right-model")).select_by_value("polite")
    assert "broken" not in [o.get_attribute("value") for o in driver.find_elements("css selector", "#right-model option")]
    set_value(driver, "#temperature", 0)
    set_value(driver, "#seed", 7)
    set_value(driver, "#max-tokens", 12)
    layout = driver.execute_script("return ['#left-stats', '#right-stats', '#left-output'].map("
                                   "s => JSON.stringify(document.querySelector(s).getBoundingClientRect()))")
    sampling = {"temperature": 0, "seed": 7, "max_tokens": 12}
    chat = ask(driver, PROMPT)
    first_turn = [{"role": "user", "content": PROMPT}]
    assert chat["left"] == api_answer(alice, sampling | {"messages": first_turn}, None)
    assert chat["right"] == api_answer(alice, sampling | {"messages": first_turn}, "polite")
    assert chat["left"][0] != chat["right"][0]  # the adapter changes the answer
    assert layout == driver.execute_script("return ['#left-stats', '#right-stats', '#left-output'].map("
                                           "s => JSON.stringify(document.querySelector(s).getBoundingClientRect()))")
    stats = by_css(driver, "#right-stats").text
    assert f"{chat['right'][1]} prompt + {chat['right'][2]} completion tokens" in stats and "first token" in stats
    # the request each side sent, run by the SDKs and curl: the same text
    assert run_snippet(driver, "#right-copy-openaiPython", alice.token) == chat["right"][0] + "\n"
    assert run_snippet(driver, "#right-copy-cloudflarePython", alice.token) == chat["right"][0] + "\n"
    assert json.loads(run_snippet(driver, "#left-copy-curl", alice.token))["result"]["response"] == chat["left"][0]
    # the second turn carries each side's own history
    second = ask(driver, "And then?")
    for side, lora in (("left", None), ("right", "polite")):
        history = first_turn + [{"role": "assistant", "content": chat[side][0]}, {"role": "user", "content": "And then?"}]
        assert second[side] == api_answer(alice, sampling | {"messages": history}, lora)
    screenshot(driver, "playground")
    # raw mode: the prompt as is, no history
    by_css(driver, "#raw").click()
    raw = ask(driver, "Once upon a time")
    for side, lora in (("left", None), ("right", "polite")):
        assert raw[side] == api_answer(alice, sampling | {"prompt": "Once upon a time", "raw": True}, lora)
    assert run_snippet(driver, "#right-copy-openaiPython", alice.token) == raw["right"][0] + "\n"


def test_playground_finetune_against_finetune(driver, server, alice, second_adapter_dir):
    alice.send_folder(alice.create_id("terse"), second_adapter_dir)
    open_page(driver, server, "playground")
    from selenium.webdriver.support.select import Select
    wait_for(lambda: "terse" in [o.get_attribute("value") for o in driver.find_elements("css selector", "#left-model option")],
             "the second finetune in the picker")
    Select(by_css(driver, "#left-model")).select_by_value("terse")
    Select(by_css(driver, "#right-model")).select_by_value("polite")
    set_value(driver, "#temperature", 0)
    set_value(driver, "#max-tokens", 10)
    answers = ask(driver, PROMPT)
    body = {"messages": [{"role": "user", "content": PROMPT}], "temperature": 0, "max_tokens": 10}
    assert answers["left"] == api_answer(alice, body, "terse") and answers["right"] == api_answer(alice, body, "polite")
    assert answers["left"][0] != answers["right"][0]


def test_status_page_shows_slots_caches_and_traffic(driver, server, alice):
    open_page(driver, server, "status")
    wait_for(lambda: "admin token" in text_at(driver, "#admin-error"), "the ask for the admin token")
    tokens = wait_for(lambda: int(re.search(r"(\d+) tokens generated", text_at(driver, "#tile-throughput")).group(1)),
                      "the token counter")
    assert tokens == server.ctx.metrics.generation_tokens._value.get()
    set_value(driver, "#admin-token", "not-the-admin-token")
    by_css(driver, "#operator-apply").click()
    wait_for(lambda: "forbidden: not the admin token" in text_at(driver, "#admin-error"), "the admin refusal")
    set_value(driver, "#admin-token", ADMIN_TOKEN)
    by_css(driver, "#operator-apply").click()
    polite = alice.get("polite")["id"]
    slots = wait_for(lambda: polite in (t := text_at(driver, "#slot-rows")) and t, "the adapter in a slot")
    assert f"polite ({polite})resident0" in slots  # slot, adapter, state, holders
    assert driver.execute_script("return document.querySelectorAll('#slot-rows tr').length") == \
        server.ctx.engine.stats().lora_slots_total
    assert f"polite ({polite})" in text_at(driver, "#tiers")
    rate = wait_for(lambda: re.fullmatch(r"\d+\.\d", text_at(driver, "#tile-throughput .value")),
                    "a tokens/s figure (two scrapes)")
    assert float(rate.group()) >= 0 and "mean of" in text_at(driver, "#tile-ttft")
    screenshot(driver, "status")


def test_delete_asks_for_confirmation(driver, server, alice):
    open_page(driver, server, "finetunes")
    wait_for(lambda: rows(driver).get("polite"), "the list")
    by_css(driver, "#finetune-rows tr[data-name='polite'] button").click()
    dialog = wait_for(lambda: by_css(driver, "#confirm-dialog").is_displayed() and by_css(driver, "#confirm-dialog"), "the dialog")
    assert "polite" in dialog.text
    by_css(driver, "#confirm-cancel").click()
    assert "polite" in rows(driver) and alice.client.get("/finetunes/polite").status_code == 200
    by_css(driver, "#finetune-rows tr[data-name='polite'] button").click()
    wait_for(lambda: by_css(driver, "#confirm-dialog").is_displayed(), "the dialog again")
    by_css(driver, "#confirm-ok").click()
    wait_for(lambda: "polite" not in rows(driver), "the row to go")
    assert alice.client.get("/finetunes/polite").status_code == 404


def test_another_accounts_finetunes_never_appear(driver, server, alice, adapter_dir):
    bob = Tenant.open(server, "bob", MODEL)
    try:
        for name, public in (("bobs-private", False), ("bobs-public", True)):
            bob.send_folder(bob.create_id(name, public=public), adapter_dir)
        mine = alice.create_id("alices-own")
        alice.send_folder(mine, adapter_dir)
        open_page(driver, server, "finetunes")
        listed = wait_for(lambda: (r := rows(driver)) and "alices-own" in r and r, "alice's list")
        assert not any(name.startswith("bobs-") for name in listed)
        assert set(listed) == {f["name"] for f in alice.client.get("/finetunes").json()["result"]}
        open_page(driver, server, "playground")
        options = wait_for(lambda: (o := [e.get_attribute("value") for e in driver.find_elements("css selector", "#right-model option")])
                           and "alices-own" in o and o, "the picker")
        assert not any(o.startswith("bobs-") for o in options) and "bob" not in driver.page_source
    finally:
        bob.close()


def test_keyboard_only(driver, server, alice):
    """Sign in, open the playground, send with Ctrl+Enter, dismiss a dialog with Escape: no mouse."""
    from selenium.webdriver.common.keys import Keys

    driver.get(server.url + "/console/")
    driver.execute_script("sessionStorage.clear()")
    driver.refresh()
    field = wait_for(lambda: (a := driver.switch_to.active_element).get_attribute("id") == "account-id" and a, "the focus")
    field.send_keys(alice.account_id, Keys.TAB, alice.token, Keys.ENTER)
    wait_for(lambda: by_css(driver, "#upload-form"), "the finetunes page")
    by_css(driver, "#nav a[data-page='playground']").send_keys(Keys.ENTER)
    wait_for(lambda: driver.switch_to.active_element.get_attribute("id") == "main", "the focus on the new page")
    prompt = by_css(driver, "#prompt")
    prompt.send_keys("Hi", Keys.CONTROL, Keys.ENTER)
    wait_for(lambda: len(driver.find_elements("css selector", ".answer[data-done='true']")) == 2, "both answers")
    by_css(driver, "#left-copy-curl").send_keys(Keys.ENTER)
    wait_for(lambda: by_css(driver, "#snippet-dialog").is_displayed(), "the snippet dialog")
    driver.switch_to.active_element.send_keys(Keys.ESCAPE)
    wait_for(lambda: not by_css(driver, "#snippet-dialog").is_displayed(), "the dialog to close")


def test_sign_in_page(driver, server):
    driver.execute_script("sessionStorage.clear()")
    driver.get(server.url + "/console/")
    driver.refresh()
    wait_for(lambda: by_css(driver, "#account-id") == driver.switch_to.active_element, "the focused account field")
    screenshot(driver, "sign-in")
