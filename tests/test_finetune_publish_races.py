"""Publishing a trained adapter, where it can go wrong (issue 22): a cancel that lands after the
finetune is published but before the job is marked `succeeded` wins — the job stays cancelled and
the finetune, its objects and the engine's copy are gone; an account at its finetune limit when
the adapter is published gets a failed job that says so, and nothing is left behind."""

from __future__ import annotations

import io
import json
import time

import httpx
import pytest
from openai import OpenAI

from loraplex.api import jobs as jobs_api
from loraplex.training.runner import STOPPED, JobRunner
from tests.api_server import LiveServer, server_options
from tests.browser import wait_for
from tests.upload_client import assert_error

MODEL = "@cf/test/tiny-llama"
DATA = (json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ARR"}]})
        + "\n").encode()
LIMIT = 1


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    live = LiveServer.start(server_options(model_dir, tmp_path_factory.mktemp("data"), max_finetunes_per_account=LIMIT))
    yield live
    live.stop()


def tenant(server, name: str) -> tuple[str, str, OpenAI]:
    account_id, token = server.account(name)
    return account_id, token, OpenAI(api_key=token, base_url=f"{server.url}/client/v4/accounts/{account_id}/ai/v1",
                                     max_retries=0)


def create_job(client: OpenAI):
    training_file = client.files.create(file=("t.jsonl", io.BytesIO(DATA)), purpose="fine-tune").id
    return client.fine_tuning.jobs.create(model=MODEL, training_file=training_file,
                                          hyperparameters={"n_epochs": 1, "batch_size": 1})


def wait_until_done(client: OpenAI, job_id: str):
    deadline = time.monotonic() + 300  # a deadlock guard only
    while (job := client.fine_tuning.jobs.retrieve(job_id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return job


def stored_objects(server) -> set[str]:
    root = server.ctx.store.root / "sha256"
    return {p.name for p in root.glob("*/*")} if root.exists() else set()


def run(server, account_id: str, token: str, lora: str) -> httpx.Response:
    return httpx.post(f"{server.url}/client/v4/accounts/{account_id}/ai/run/{MODEL}", timeout=60,
                      headers={"Authorization": f"Bearer {token}"},
                      json={"prompt": "hi", "lora": lora, "max_tokens": 1})


@pytest.fixture
def runner_that_cancels_after_publishing(server):
    """The server's trainer slot, swapped for one whose publish step is followed by a cancel of
    the job (the request a user sends in that window), after the published finetune was used once."""
    ctx, seen = server.ctx, {}

    def publish_then_cancel(job, folder):
        name = jobs_api.publish(ctx, job, folder)
        finetune = ctx.registry.get_finetune(job.account, name.rpartition(":")[2])
        seen.update(finetune=finetune, objects=stored_objects(server),
                    served=run(server, job.account, seen["token"], finetune.name).status_code)
        ctx.jobs.cancel(job.account, job.id)
        return name

    server.app.state.runner.stop()
    server.app.state.runner = JobRunner(ctx.jobs, ctx.files, ctx.model_dir, publish_then_cancel,
                                        lambda job, name: jobs_api.unpublish(ctx, job, name))
    server.app.state.runner.start()
    yield seen
    server.app.state.runner.stop()
    server.app.state.runner = jobs_api.start_runner(ctx)


def test_a_cancel_while_publishing_wins_and_leaves_no_finetune(server, runner_that_cancels_after_publishing):
    seen = runner_that_cancels_after_publishing
    account_id, seen["token"], client = tenant(server, "cancel-while-publishing")
    before = stored_objects(server)
    job = create_job(client)
    done = wait_until_done(client, job.id)
    assert (done.status, done.fine_tuned_model, done.trained_tokens) == ("cancelled", None, None)
    # the status turns `cancelled` inside the publish window; the runner's last event says it let go
    last_event = lambda: next(iter(client.fine_tuning.jobs.list_events(job.id))).message  # noqa: E731
    wait_for(lambda: last_event().startswith(STOPPED), "the trainer to let go of the job")
    assert last_event() == f"{STOPPED}cancelled while publishing, {MODEL}:{seen['finetune'].name} was deleted again"
    # it was published (stored, served) in the window, and is gone now: registry, objects, engine
    assert seen["served"] == 200 and seen["objects"] > before
    assert server.ctx.registry.list_finetunes(account_id) == [] and stored_objects(server) == before
    assert_error(run(server, account_id, seen["token"], seen["finetune"].name), 404, 3037)
    # the engine forgets it once the request that used it has left the engine
    wait_for(lambda: seen["finetune"].id not in server.ctx.engine.engine.adapters.names, "the engine to forget it")
    assert list(client.fine_tuning.jobs.checkpoints.list(job.id)) == []


def test_an_account_at_its_finetune_limit_gets_a_failed_job_and_nothing_left(server):
    account_id, _, client = tenant(server, "at-the-limit")
    kept = server.ctx.registry.create_finetune(account_id, "kept", MODEL)  # pending: counted all the same
    before = stored_objects(server)
    job = create_job(client)
    done = wait_until_done(client, job.id)
    assert (done.status, done.fine_tuned_model) == ("failed", None)
    assert done.error.message.startswith("the trained adapter could not be published: account limited: "
                                         f"at most {LIMIT} finetunes per account")
    assert done.error.message.endswith("delete one first, then create the job again")
    assert [f.id for f in server.ctx.registry.list_finetunes(account_id)] == [kept.id]
    assert stored_objects(server) == before
