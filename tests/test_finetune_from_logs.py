"""Fine-tuning from request logs, end to end over HTTP on a tiny model: logging on, chats made
(OpenAI SDK), feedback and corrections set, export, a fine-tuning job on the exported file (OpenAI
SDK), the served finetune answers as corrected, and its own requests are logged under it.
Another account sees none of those logs, files or jobs."""

import json

import openai
import pytest

from tests.api_server import LiveServer, server_options
from tests.finetune_helpers import MEMORISE, wait_for_job
from tests.request_log_client import MODEL, Tenant, refused

PROMPTS = [f"say {w}" for w in ("one", "two", "three", "four")]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    live = LiveServer.start(server_options(model_dir, tmp_path_factory.mktemp("data")))
    yield live
    live.stop()


def test_logs_to_dataset_to_job_to_served_finetune(server):
    alice, bob = Tenant(server, "flow-alice"), Tenant(server, "flow-bob")
    alice.ok("PUT", "/settings", json={"enabled": True})
    for prompt in [*PROMPTS, "a bad answer"]:
        alice.chat(prompt)
    bad, *entries = alice.logs()
    for entry in entries:  # the tenant corrects every answer to the style it wants
        alice.ok("PATCH", f"/{entry['id']}", json={"feedback": 1, "corrected_response": "ARR"})
    alice.ok("PATCH", f"/{bad['id']}", json={"feedback": -1})  # left out of the dataset

    exported = alice.ok("POST", "/export", json={"filename": "from-logs.jsonl"})
    lines = [json.loads(x) for x in alice.oai.files.content(exported["id"]).read().splitlines()]
    assert lines == [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "ARR"}]}
                     for p in PROMPTS]
    job = alice.oai.fine_tuning.jobs.create(model=MODEL, training_file=exported["id"], seed=1, suffix="logs",
                                            hyperparameters=MEMORISE)
    job = wait_for_job(alice.oai, job.id)
    assert job.status == "succeeded", job.error

    replies = [alice.chat(p, model=job.fine_tuned_model, max_tokens=3).choices[0].message.content for p in PROMPTS]
    assert sum(r == "ARR" for r in replies) >= 3, replies
    name = job.fine_tuned_model.rpartition(":")[2]
    finetune_id = server.ctx.registry.get_finetune(alice.id, name).id
    served = alice.logs(finetune=name)
    assert [e["response"] for e in served] == replies[::-1] and {e["finetune"] for e in served} == {finetune_id}
    assert len(alice.logs()) == len(PROMPTS) + 1 + len(served)

    assert bob.logs() == [] and list(bob.oai.files.list()) == [] and list(bob.oai.fine_tuning.jobs.list()) == []
    refused(bob.call("GET", f"/{bad['id']}"), 404, "no log entry")
    for call, ident in ((bob.oai.files.retrieve, exported["id"]), (bob.oai.fine_tuning.jobs.retrieve, job.id)):
        with pytest.raises(openai.NotFoundError):
            call(ident)
    with pytest.raises(openai.NotFoundError):
        bob.chat("hello", model=job.fine_tuned_model)
