"""Fine-tuning jobs in the Workers AI dialect over HTTP (…/ai/fine-tuning/jobs): the same jobs as
the OpenAI routes, in the Workers AI envelope — a job followed to `succeeded` (events oldest first
with their metrics, the final checkpoint, the finetune usable as `lora` in `run`); refusals as
Workers AI errors that store nothing; `…/ai/finetunes/jobs` still names a finetune."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.api_server import LiveServer, server_options
from tests.finetune_helpers import ONE_EXAMPLE_DATA
from tests.upload_client import assert_error

MODEL = "@cf/test/tiny-llama"
DATA = ONE_EXAMPLE_DATA


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    live = LiveServer.start(server_options(model_dir, tmp_path_factory.mktemp("data")))
    yield live
    live.stop()


def tenant(server, name: str) -> httpx.Client:
    account_id, token = server.account(name)
    return httpx.Client(base_url=f"{server.url}/client/v4/accounts/{account_id}/ai", timeout=60,
                        headers={"Authorization": f"Bearer {token}"})


def upload(client: httpx.Client) -> str:
    response = client.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("t.jsonl", DATA)})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def ok(response: httpx.Response):
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True and body["errors"] == [], body
    return body["result"]


def test_a_job_from_create_to_served_finetune(server):
    client = tenant(server, "wai-jobs")
    job = ok(client.post("/fine-tuning/jobs", json={"model": MODEL, "training_file": upload(client), "suffix": "wai",
                                                    "hyperparameters": {"n_epochs": 2, "batch_size": 1}}))
    assert job["status"] == "queued" and job["object"] == "fine_tuning.job"
    listing = client.get("/fine-tuning/jobs").json()
    assert [j["id"] for j in listing["result"]] == [job["id"]] and listing["result_info"]["total_count"] == 1
    assert [j["id"] for j in client.get("/v1/fine_tuning/jobs").json()["data"]] == [job["id"]]  # one store

    deadline = time.monotonic() + 300  # a deadlock guard only
    while (job := ok(client.get(f"/fine-tuning/jobs/{job['id']}")))["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert job["status"] == "succeeded", job["error"]
    events = ok(client.get(f"/fine-tuning/jobs/{job['id']}/events"))
    steps = [e["data"] for e in events if e["type"] == "metrics"]
    assert [(d["step"], d["total_steps"], d["epoch"]) for d in steps] == [(1, 2, 1), (2, 2, 2)]
    assert steps[-1]["eta_seconds"] == 0 and job["trained_tokens"] == steps[-1]["trained_tokens"] > 0
    assert events[-1]["message"] == f"the job has succeeded: {job['fine_tuned_model']}"  # oldest first
    (checkpoint,) = ok(client.get(f"/fine-tuning/jobs/{job['id']}/checkpoints"))
    assert (checkpoint["fine_tuned_model_checkpoint"], checkpoint["step_number"]) == (job["fine_tuned_model"], 2)

    name = job["fine_tuned_model"].rpartition(":")[2]
    assert ok(client.post(f"/run/{MODEL}", json={"prompt": "hi", "lora": name, "max_tokens": 2}))["response"] is not None
    assert_error(client.post(f"/fine-tuning/jobs/{job['id']}/cancel"), 400, 5004, "already succeeded")


def test_refusals_are_workers_ai_errors_and_store_nothing(server):
    alice, bob = tenant(server, "wai-alice"), tenant(server, "wai-bob")
    alice_file, bob_file = upload(alice), upload(bob)
    assert_error(alice.post("/fine-tuning/jobs", content=b"{"), 400, 5004, "not valid JSON")
    assert_error(alice.post("/fine-tuning/jobs", json={"model": "nope", "training_file": alice_file}), 400, 5004,
                 "is not served")
    assert_error(alice.post("/fine-tuning/jobs", json={"model": MODEL, "training_file": bob_file}), 404, 7000,
                 "no file")
    assert_error(alice.post("/fine-tuning/jobs", json={"model": MODEL, "training_file": alice_file,
                                                       "hyperparameters": {"rank": 999}}), 400, 5004, "rank must be")
    assert ok(alice.get("/fine-tuning/jobs")) == []
    job = ok(bob.post("/fine-tuning/jobs", json={"model": MODEL, "training_file": bob_file}))
    for path in ("", "/events", "/checkpoints"):
        assert_error(alice.get(f"/fine-tuning/jobs/{job['id']}{path}"), 404, 7000, "no fine-tuning job")
    assert_error(alice.post(f"/fine-tuning/jobs/{job['id']}/cancel"), 404, 7000, "no fine-tuning job")
    assert_error(bob.get("/fine-tuning/jobs", params={"per_page": 0}), 400, 5004, "per_page")


def test_finetunes_jobs_is_still_a_finetune_name(server):
    client = tenant(server, "wai-names")
    assert_error(client.get("/finetunes/jobs"), 404, 3037)
    finetune = ok(client.post("/finetunes", json={"model": MODEL, "name": "jobs"}))
    assert ok(client.get("/finetunes/jobs"))["id"] == finetune["id"]
