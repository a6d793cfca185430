"""The console's Datasets and Jobs pages in a real headless Chromium against a live server on the
tiny model: upload a JSONL dataset (a bad one is refused in the server's own words, naming the
line), preview it, delete one after a confirmation; start a fine-tuning job from the page (a
refused rank shown in words), watch its loss curve get the points the job's events report and
the job reach `succeeded` with the finetune it produced named; cancel a long job from the page;
another account sees none of those files or jobs. Screenshots: datasets, jobs (browser.SCREENSHOTS).

One browser and one server for the module (tests run in file order and share the signed-in tab).
Run: .venv/bin/python -m pytest -q tests/test_console_training.py
"""

from __future__ import annotations

import json
import re

import openai
import pytest

from loraplex.training.hyperparameters import DEFAULTS

from api_server import LiveServer, server_options
from browser import by_css, click, open_page, screenshot, script_errors, sign_in, text_at, wait_for

pytestmark = pytest.mark.browser
PROMPTS = [f"say {w}" for w in ("one", "two", "three", "four")]
DATASET = "".join(json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "ARR"}]}) + "\n"
                  for p in PROMPTS)
BAD_DATASET = DATASET.splitlines()[0] + "\n" + json.dumps({"messages": [{"role": "robot", "content": "beep"}]}) + "\n"


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    live = LiveServer.start(server_options(model_dir, tmp_path_factory.mktemp("console-training")))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def alice(server):
    """(account id, token, OpenAI SDK client) of the account the browser signs in as."""
    account_id, token = server.account("alice")
    client = openai.OpenAI(api_key=token, base_url=f"{server.url}/client/v4/accounts/{account_id}/ai/v1", max_retries=0)
    return account_id, token, client


@pytest.fixture(autouse=True)
def no_script_errors(driver):
    yield
    problems = script_errors(driver)
    assert not problems, problems


def dataset_rows(driver) -> dict[str, dict]:
    """The datasets table: file id → {filename, size}."""
    return driver.execute_script("""return Object.fromEntries([...document.querySelectorAll('#dataset-rows tr')].map(
        (tr) => [tr.dataset.id, {filename: tr.dataset.filename, size: tr.children[2].textContent}]))""")


def test_upload_a_dataset(driver, server, alice, tmp_path):
    account_id, token, client = alice
    sign_in(driver, server, account_id, token)
    wait_for(lambda: by_css(driver, "#upload-form"), "the finetunes page after sign-in")
    by_css(driver, "#nav a[data-page='datasets']").click()
    wait_for(lambda: "No dataset files yet" in text_at(driver, "#datasets-table caption"), "the empty list")
    # a bad file: the server's refusal (naming the line), inline; nothing stored
    bad = tmp_path / "bad.jsonl"
    bad.write_text(BAD_DATASET)
    by_css(driver, "#dataset-file").send_keys(str(bad))
    by_css(driver, "#dataset-upload").click()
    shown = wait_for(lambda: by_css(driver, "#dataset-error").is_displayed() and text_at(driver, "#dataset-error"), "the refusal")
    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=("bad.jsonl", BAD_DATASET.encode()), purpose="fine-tune")
    message = refused.value.body["message"]
    assert "line 2" in message and shown == f"Upload failed: {message} (HTTP 400)"
    assert list(client.files.list()) == []
    # a good one: listed with the API's id and size
    good = tmp_path / "pirate.jsonl"
    good.write_text(DATASET)
    by_css(driver, "#dataset-file").send_keys(str(good))
    assert text_at(driver, "#dataset-chosen") == f"pirate.jsonl ({len(DATASET.encode())} B)"
    by_css(driver, "#dataset-upload").click()
    done = wait_for(lambda: (t := text_at(driver, "#dataset-done")) and t, "the upload to finish")
    [stored] = list(client.files.list())
    assert done == f"Uploaded pirate.jsonl as {stored.id} ({stored.bytes} B)." and stored.bytes == len(DATASET.encode())
    assert not by_css(driver, "#dataset-error").is_displayed()
    assert float(by_css(driver, "#dataset-progress").get_attribute("value")) == 1.0
    listed = wait_for(lambda: dataset_rows(driver).get(stored.id), "the file in the list")
    assert listed == {"filename": "pirate.jsonl", "size": f"{stored.bytes} B"}
    # its first lines, as stored
    by_css(driver, f"#dataset-rows tr[data-id='{stored.id}'] button[aria-label='Preview pirate.jsonl']").click()
    wait_for(lambda: text_at(driver, "#preview-content") == DATASET.rstrip("\n"), "the preview")
    by_css(driver, "#preview-close").click()
    assert text_at(driver, "#dataset-progress-text") == f"{stored.bytes} B of {stored.bytes} B"
    screenshot(driver, "datasets")
    # a second file, deleted after a confirmation (cancelled once)
    by_css(driver, "#dataset-file").send_keys(str(good))
    by_css(driver, "#dataset-upload").click()
    wait_for(lambda: len(dataset_rows(driver)) == 2, "the second file listed")
    [extra] = [f.id for f in client.files.list() if f.id != stored.id]
    delete = f"#dataset-rows tr[data-id='{extra}'] button.danger"
    by_css(driver, delete).click()
    wait_for(lambda: by_css(driver, "#confirm-dialog").is_displayed(), "the confirmation")
    assert extra in text_at(driver, "#confirm-text")
    by_css(driver, "#confirm-cancel").click()
    assert client.files.retrieve(extra).id == extra
    by_css(driver, delete).click()
    wait_for(lambda: by_css(driver, "#confirm-dialog").is_displayed(), "the confirmation again")
    by_css(driver, "#confirm-ok").click()
    wait_for(lambda: list(dataset_rows(driver)) == [stored.id], "the row to go")
    assert [f.id for f in client.files.list()] == [stored.id]


def loss_points(driver) -> list[tuple[int, float]]:
    return driver.execute_script("return [...document.querySelectorAll('#loss-chart circle')].map("
                                 "(c) => [Number(c.dataset.step), Number(c.dataset.loss)])")


def test_start_a_job_and_watch_its_loss_curve(driver, server, alice):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.select import Select

    _, _, client = alice
    [dataset] = list(client.files.list())
    by_css(driver, f"#dataset-rows tr[data-id='{dataset.id}'] a").click()  # "Train on it"
    wait_for(lambda: by_css(driver, "#job-form"), "the jobs page")
    wait_for(lambda: Select(by_css(driver, "#job-file")).first_selected_option.get_attribute("value") == dataset.id,
             "the dataset chosen")
    assert "No jobs yet" in wait_for(lambda: (t := text_at(driver, "#jobs-table caption")) != "Loading…" and t, "the list")
    # a rank the server refuses: its message, in words; no job stored
    for selector, value in (("#job-epochs", 3), ("#job-rank", 64), ("#job-batch-size", 2), ("#job-lr", 50)):
        by_css(driver, selector).clear()
        by_css(driver, selector).send_keys(str(value))
    by_css(driver, "#job-suffix").send_keys("pirate")
    by_css(driver, "#job-start").click()
    shown = wait_for(lambda: by_css(driver, "#job-error").is_displayed() and text_at(driver, "#job-error"), "the refusal")
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(model=server.ctx.model_name, training_file=dataset.id, hyperparameters={"rank": 64})
    assert shown == f"The job was not started: {refused.value.body['message']} (HTTP 400)" and "rank" in shown
    assert list(client.fine_tuning.jobs.list()) == []
    # a rank it takes: the job starts and is watched on this same page
    driver.execute_script("document.getElementById('loss-chart').dataset.samePage = 'yes'")
    chart_size = "const r = document.getElementById('loss-chart').getBoundingClientRect(); return [r.width, r.height]"
    empty_size = driver.execute_script(chart_size)
    by_css(driver, "#job-rank").clear()
    by_css(driver, "#job-rank").send_keys("4")
    by_css(driver, "#job-start").click()
    started = wait_for(lambda: re.fullmatch(r"Started (ftjob-\w+): it is \w+\.", text_at(driver, "#job-started")), "the job")
    job_id = started.group(1)
    wait_for(lambda: text_at(driver, "#watch-state") == "succeeded", "the job to succeed on the page", timeout_s=600)
    job = client.fine_tuning.jobs.retrieve(job_id)
    assert job.status == "succeeded" and job.training_file == dataset.id and job.suffix == "pirate"
    hp = job.method.supervised.hyperparameters
    assert (hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier, hp.model_extra["rank"]) == (3, 2, 50, 4)
    # the curve: the loss of every step the job's events report, drawn in place (no reload)
    events = list(client.fine_tuning.jobs.list_events(job_id))
    reported = sorted((e.data["step"], e.data["train_loss"]) for e in events if e.data and "train_loss" in e.data)
    assert len(reported) == 6  # 4 examples, batch 2, 3 epochs
    assert [tuple(p) for p in loss_points(driver)] == reported  # drawn with the status that said `succeeded`
    assert driver.execute_script("return document.getElementById('loss-chart').dataset.samePage") == "yes"
    assert driver.execute_script(chart_size) == empty_size  # points arriving never resize the chart
    assert f"{len(reported)} points, step 6 of 6" in by_css(driver, "#loss-chart").get_attribute("aria-label")
    # the finetune it produced, named on the page and listed with the account's finetunes
    name = job.fine_tuned_model.rpartition(":")[2]
    assert name.startswith("pirate-") and text_at(driver, "#watch-finetune-name") == name
    assert job.fine_tuned_model in text_at(driver, "#watch-finetune")
    row = wait_for(lambda: by_css(driver, f"#job-rows tr[data-id='{job_id}']"), "the job's row")
    assert row.get_attribute("data-status") == "succeeded" and name in row.text
    assert "step 6/6: training loss=" in text_at(driver, "#job-events")
    screenshot(driver, "jobs")
    # a long job (2000 steps), cancelled from its row: nothing published
    long_file = client.files.create(file=("long.jsonl", (DATASET * 10).encode()), purpose="fine-tune").id
    wait_for(lambda: long_file in [o.get_attribute("value") for o in driver.find_elements("css selector", "#job-file option")],
             "the new file offered")
    Select(by_css(driver, "#job-file")).select_by_value(long_file)
    for selector, value in (("#job-epochs", 50), ("#job-batch-size", 1)):
        by_css(driver, selector).clear()
        by_css(driver, selector).send_keys(str(value))
    for selector in ("#job-rank", "#job-lr"):
        by_css(driver, selector).clear()  # empty: the server's default
    by_css(driver, "#job-suffix").clear()
    by_css(driver, "#job-suffix").send_keys("endless")
    by_css(driver, "#job-start").click()
    long_id = wait_for(lambda: (m := re.fullmatch(r"Started (ftjob-\w+): .*", text_at(driver, "#job-started"))) and m.group(1) != job_id
                       and m.group(1), "the long job")
    click(driver, f"#job-rows tr[data-id='{long_id}'] button[aria-label='Cancel {long_id}']", "its Cancel button")
    wait_for(lambda: text_at(driver, "#watch-state") == "cancelled", "the cancelled job")
    long_job = client.fine_tuning.jobs.retrieve(long_id)
    assert long_job.status == "cancelled" and long_job.fine_tuned_model is None
    long_hp = long_job.method.supervised.hyperparameters
    assert (long_hp.n_epochs, long_hp.batch_size, long_hp.learning_rate_multiplier, long_hp.model_extra["rank"]) == \
        (50, 1, DEFAULTS["learning_rate_multiplier"], DEFAULTS["rank"])
    assert text_at(driver, "#watch-finetune") == "The job was cancelled: nothing was published."
    assert not driver.find_elements("css selector", f"#job-rows tr[data-id='{long_id}'] button.danger")
    by_css(driver, f"#job-rows tr[data-id='{job_id}'] button[aria-label='Watch {job_id}']").send_keys(Keys.ENTER)
    wait_for(lambda: text_at(driver, "#watch-finetune-name") == name, "the first job watched again")
    assert driver.switch_to.active_element.get_attribute("id") == "watch-title"  # the keyboard follows
    by_css(driver, "#watch-finetune a[href='#/finetunes']").click()
    wait_for(lambda: driver.find_elements("css selector", f"#finetune-rows tr[data-name='{name}']"), "the finetune listed")
    assert "ready" in text_at(driver, f"#finetune-rows tr[data-name='{name}']")
    driver.back()
    wait_for(lambda: text_at(driver, "#watch-finetune-name") == name, "the jobs page again")
    by_css(driver, "#watch-finetune a[href^='#/playground']").click()
    wait_for(lambda: Select(by_css(driver, "#right-model")).first_selected_option.get_attribute("value") == name,
             "the finetune on the playground's right side")
    assert Select(by_css(driver, "#left-model")).first_selected_option.get_attribute("value") == ""  # the base model


def test_another_account_sees_none_of_them(driver, server, alice):
    _, _, client = alice
    datasets, jobs = list(client.files.list()), list(client.fine_tuning.jobs.list())
    job = next(j for j in jobs if j.status == "succeeded")
    bob_id, bob_token = server.account("bob")
    sign_in(driver, server, bob_id, bob_token)
    wait_for(lambda: by_css(driver, "#upload-form"), "bob's finetunes page")
    open_page(driver, server, "datasets")
    wait_for(lambda: "No dataset files yet" in text_at(driver, "#datasets-table caption"), "bob's empty list")
    open_page(driver, server, f"jobs?file={datasets[0].id}&job={job.id}")  # alice's ids, typed into bob's address bar
    wait_for(lambda: "No jobs yet" in text_at(driver, "#jobs-table caption"), "bob's empty job list")
    assert text_at(driver, "#watch-status") == f"No job {job.id} in this account."
    assert text_at(driver, "#job-file") == "No dataset files yet: upload one on the Datasets page"
    assert loss_points(driver) == [] and text_at(driver, "#job-events") == ""
    assert not any(d.id in driver.page_source for d in datasets)
    assert "pirate" not in driver.page_source and not any(j.id in driver.page_source for j in jobs if j is not job)
