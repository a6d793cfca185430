"""Fine-tuning state shared by two servers (two processes) on one PostgreSQL registry and one
object store, through the real OpenAI SDK and the logs routes: a file uploaded through one server
is listed, read and trained on through the other, and deleted through it with its object; a job
created through one is listed through the other and trained by exactly one trainer, its finetune
served by both; a job is cancelled through the server that did not create it; logging turned on
through one server is applied by the other once its settings cache expires (on that server's
clock, no sleeping), and the entries are listed through both."""

from __future__ import annotations

import io
import json
import time

import httpx
import openai
import pytest

from finetune_helpers import MEMORISE, wait_for_job
from loraplex.training.files import KEY_SCOPE
from loraplex.training.runner import STARTED, STOPPED
from shared_servers import two_servers

MODEL = "@cf/test/tiny-llama"
PROMPTS = ["say one", "say two"]
DATA = "".join(json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "ARR"}]})
               + "\n" for p in PROMPTS).encode()


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory, postgres_module_url):
    """(live: a LiveServer, proc: a `loraplex serve` subprocess), both with a trainer."""
    with two_servers(model_dir, tmp_path_factory.mktemp("shared-training"), postgres_module_url) as pair:
        yield pair


class Tenant:
    """One account as seen through each server: an OpenAI client and the logs routes."""

    def __init__(self, servers, name: str):
        self.live, self.proc = servers
        self.id, self.token = self.live.account(name)  # in the shared registry: both servers know it

    def base(self, server) -> str:
        return f"{server.url}/client/v4/accounts/{self.id}/ai"

    def oai(self, server) -> openai.OpenAI:
        return openai.OpenAI(api_key=self.token, base_url=f"{self.base(server)}/v1", max_retries=0)

    def logs(self, server, method: str = "GET", path: str = "", **kwargs):
        response = httpx.request(method, f"{self.base(server)}/logs{path}", timeout=30,
                                 headers={"Authorization": f"Bearer {self.token}"}, **kwargs)
        assert response.status_code == 200, response.text
        return response.json()["result"]

    def chat(self, server, content: str, model: str = MODEL) -> str:
        reply = self.oai(server).chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                                        max_tokens=3, temperature=0)
        return reply.choices[0].message.content


def events(client: openai.OpenAI, job_id: str) -> list[str]:
    return [e.message for e in reversed(list(client.fine_tuning.jobs.list_events(job_id)))]


def wait_for_event(client: openai.OpenAI, job_id: str, prefix: str) -> None:
    deadline = time.monotonic() + 300  # a deadlock guard only
    while not any(m.startswith(prefix) for m in events(client, job_id)):
        assert time.monotonic() < deadline, f"no event {prefix!r}"
        time.sleep(0.1)


def test_a_file_and_a_job_made_through_one_server_are_shared_with_the_other(servers):
    live, proc = servers
    alice = Tenant(servers, "alice")
    via_proc, via_live = alice.oai(proc), alice.oai(live)

    uploaded = via_proc.files.create(file=("train.jsonl", io.BytesIO(DATA)), purpose="fine-tune")
    assert [f.id for f in via_live.files.list()] == [uploaded.id]
    assert via_live.files.retrieve(uploaded.id).bytes == len(DATA)
    assert via_live.files.content(uploaded.id).read() == DATA

    job = via_live.fine_tuning.jobs.create(model=MODEL, training_file=uploaded.id, seed=3, suffix="shared",
                                           hyperparameters=MEMORISE)
    assert [j.id for j in via_proc.fine_tuning.jobs.list()] == [job.id]
    done = wait_for_job(via_proc, job.id)
    assert done.status == "succeeded", done.error
    started = [m for m in events(via_live, job.id) if m.startswith(STARTED)]
    assert len(started) == 1, started  # one claim: exactly one trainer trained it
    replies = {server.url: [alice.chat(server, p, done.fine_tuned_model) for p in PROMPTS] for server in servers}
    assert replies[live.url] == replies[proc.url]  # the finetune is served by both
    assert sum(r == "ARR" for r in replies[live.url]) >= 1, replies

    via_live.files.delete(uploaded.id)  # the row and the object go, for both servers
    assert list(via_proc.files.list()) == []
    assert not [p for p in (live.ctx.store.root / KEY_SCOPE).rglob("*") if p.is_file()]
    with pytest.raises(openai.NotFoundError):
        via_proc.files.content(uploaded.id)


def test_a_job_is_cancelled_through_the_server_that_did_not_create_it(servers):
    """Whichever trainer has the job, or none yet, the cancel through the other server reaches it;
    each outcome of the race with a fast trainer is asserted exactly."""
    live, proc = servers
    bob = Tenant(servers, "bob")
    via_proc, via_live = bob.oai(proc), bob.oai(live)
    uploaded = via_live.files.create(file=("t.jsonl", io.BytesIO(DATA)), purpose="fine-tune")
    job = via_proc.fine_tuning.jobs.create(model=MODEL, training_file=uploaded.id,
                                           hyperparameters={"n_epochs": 50, "batch_size": 1})
    try:
        cancelled = via_live.fine_tuning.jobs.cancel(job.id)
    except openai.BadRequestError as e:  # a trainer won: 100 steps and the publish were done first
        assert "already succeeded" in str(e)
        return
    assert cancelled.status == "cancelled"
    if live.ctx.jobs.get(bob.id, job.id).started_at is not None:  # a trainer had it: it lets go
        wait_for_event(via_proc, job.id, STOPPED)
    done = via_proc.fine_tuning.jobs.retrieve(job.id)
    assert (done.status, done.fine_tuned_model) == ("cancelled", None)
    assert live.ctx.registry.list_finetunes(bob.id) == []


def test_logging_turned_on_through_one_server_applies_on_the_other(servers):
    live, proc = servers
    carol = Tenant(servers, "carol")
    clock = [1000.0]
    live.ctx.request_logs.clock = lambda: clock[0]  # the live server's settings cache, on a test clock
    ttl = live.ctx.request_logs.ttl_s
    carol.chat(live, "before")  # logging is off; the live server caches that
    carol.logs(proc, "PUT", "/settings", json={"enabled": True})
    clock[0] += ttl / 2
    carol.chat(live, "cached")  # within the TTL the live server still has logging off
    clock[0] += ttl / 2
    carol.chat(live, "logged")  # the TTL is over: the live server reads the shared setting
    carol.chat(proc, "through proc")
    live.ctx.request_logs.writer.drain()
    deadline = time.monotonic() + 60  # a guard only: the subprocess's writer stores off the request path
    while len(carol.logs(proc)) < 2:
        assert time.monotonic() < deadline, carol.logs(proc)
        time.sleep(0.1)
    for server in servers:
        assert {e["messages"][0]["content"] for e in carol.logs(server)} == {"logged", "through proc"}


def test_a_dead_servers_job_is_failed_by_the_other_once_its_lease_lapsed(servers):
    """The subprocess trains a job (the live server's trainer is stopped, so it cannot take it);
    the live server checking for abandoned jobs, as a starting server does, leaves it alone; the
    subprocess is SIGKILLed; once the job's lease has passed (the live server's store on a clock
    moved past it: no waiting), the live server fails it as abandoned. (Last in this module: the
    subprocess is gone afterwards.)"""
    import psutil

    from loraplex.training.jobs import ABANDONED

    live, proc = servers
    dave = Tenant(servers, "dave")
    live.app.state.runner.stop()
    uploaded = dave.oai(live).files.create(file=("t.jsonl", io.BytesIO(DATA)), purpose="fine-tune")
    job = dave.oai(live).fine_tuning.jobs.create(model=MODEL, training_file=uploaded.id,
                                                 hyperparameters={"n_epochs": 50, "batch_size": 1})
    wait_for_event(dave.oai(live), job.id, STARTED)  # the subprocess's trainer has it
    assert live.ctx.jobs.fail_abandoned() == 0  # its trainer renews the lease: not abandoned
    assert live.ctx.jobs.get(dave.id, job.id).status == "running"

    trainers = psutil.Process(proc.proc.pid).children(recursive=True)
    proc.kill()
    for child in trainers:  # the dead server's training process, orphaned: gone too
        child.kill()
    assert live.ctx.jobs.fail_abandoned() == 0  # dead, but its lease has not passed yet
    real_clock = live.ctx.jobs.clock
    live.ctx.jobs.clock = lambda: real_clock() + live.ctx.jobs.lease_s + 1
    try:
        assert live.ctx.jobs.fail_abandoned() == 1
    finally:
        live.ctx.jobs.clock = real_clock
    failed = dave.oai(live).fine_tuning.jobs.retrieve(job.id)
    assert (failed.status, failed.error.message, failed.fine_tuned_model) == ("failed", ABANDONED, None)
