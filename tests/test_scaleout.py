"""`loraplex serve --replicas 2`: two engine replicas of a tiny model on a local Ray Serve behind
one endpoint, against a single-process server on the same model and adapters (the reference),
through the real Cloudflare and OpenAI SDKs and plain httpx.

Fine-tuning jobs created through the replicated endpoint train as Ray tasks (one CPU each; the
replicas take the other): trained, cancelled, and killed.

One local Ray and one deployment for the whole module (2 CPUs, half a CPU and one torch thread per
replica). The SIGKILL test runs last: it leaves a restarted replica behind."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import httpx
import pytest
from cloudflare import Cloudflare
from openai import OpenAI

import ray
from ray import serve

from api_server import LiveServer, free_port, server_options
from loraplex.core import SamplingParams
from loraplex.serve.remote_engine import pinned_replica
from loraplex.serve.replica_header import INGRESS
from loraplex.serve.training_task import TASK_PREFIX
from loraplex.training.runner import STOPPED
from finetune_helpers import MEMORISE, MEMORISE_DATA, MEMORISE_PROMPTS, wait_for_job
from scaleout_server import ScaleoutServer, scaleout_config, start_local_ray, stop_local_ray
from tiny_models import make_peft_adapter

MODEL = "@cf/test/tiny-llama"
ADMIN_TOKEN = "operator-secret"
NAMES = ("a0", "a1", "a2", "a3")
PROMPTS = ("The capital of France is", "Once upon a time")
HEADER = "x-loraplex-replica"
SPILL = 4  # the replicas' spill bound (ScaleoutConfig.spill_in_flight), small to see it act
MAX_TOKENS = 96  # long enough that the victim replica is busy when it is killed


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory):
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    root = tmp_path_factory.mktemp("adapters")
    for seed, name in enumerate(NAMES):
        make_peft_adapter(base, root / name, seed=seed, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    return {name: root / name for name in NAMES}


@pytest.fixture(scope="module")
def single(model_dir, tmp_path_factory):
    live = LiveServer.start(server_options(model_dir, tmp_path_factory.mktemp("single")))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def cluster(model_dir, tmp_path_factory):
    start_local_ray()
    options = server_options(model_dir, tmp_path_factory.mktemp("cluster"), admin_token=ADMIN_TOKEN)
    server = ScaleoutServer.start(options, scaleout_config(app_name="loraplex-tests", spill_in_flight=SPILL))
    yield server
    server.stop()
    stop_local_ray()


def upload(url: str, account, name: str, folder) -> str:
    """Create a finetune and send both files with the Cloudflare SDK; its id."""
    account_id, token = account
    cf = Cloudflare(api_token=token, base_url=f"{url}/client/v4", max_retries=0)
    finetune = cf.ai.finetunes.create(account_id=account_id, model=MODEL, name=name)
    for file_name in ("adapter_config.json", "adapter_model.safetensors"):
        with open(folder / file_name, "rb") as f:
            assert cf.ai.finetunes.assets.create(finetune.id, account_id=account_id, file=f, file_name=file_name).success
    return finetune.id


@pytest.fixture(scope="module")
def accounts(single, cluster, adapters):
    """(single account, cluster account), each with a0 and a1 uploaded."""
    pair = single.account("alice"), cluster.live.account("alice")
    for (url, account) in ((single.url, pair[0]), (cluster.url, pair[1])):
        for name in ("a0", "a1"):
            upload(url, account, name, adapters[name])
    return pair


def run(url: str, account, body: dict) -> httpx.Response:
    account_id, token = account
    return httpx.post(f"{url}/client/v4/accounts/{account_id}/ai/run/{MODEL}", json=body,
                      headers={"Authorization": f"Bearer {token}"}, timeout=120)


def reply(url: str, account, prompt: str, lora: str | None, max_tokens: int = 8) -> tuple[str, str]:
    """(the response text, the replica header or None) of a greedy Workers AI run."""
    r = run(url, account, {"prompt": prompt, "lora": lora, "max_tokens": max_tokens, "temperature": 0, "raw": True})
    assert r.status_code == 200, r.text
    return r.json()["result"]["response"], r.headers.get(HEADER)


def test_outputs_equal_the_single_process_server_through_both_sdks(single, cluster, accounts):
    ids = cluster.replica_ids()
    for lora in (None, "a0", "a1"):
        for prompt in PROMPTS:
            text, replica = reply(cluster.url, accounts[1], prompt, lora)
            assert text == reply(single.url, accounts[0], prompt, lora)[0]
            assert replica in ids

    (sid, stoken), (cid, ctoken) = accounts
    kwargs = dict(prompt=PROMPTS[0], lora="a1", max_tokens=8, temperature=0, raw=True)
    cf_single = Cloudflare(api_token=stoken, base_url=f"{single.url}/client/v4", max_retries=0)
    cf_cluster = Cloudflare(api_token=ctoken, base_url=f"{cluster.url}/client/v4", max_retries=0)
    assert cf_cluster.ai.run(MODEL, account_id=cid, **kwargs) == cf_single.ai.run(MODEL, account_id=sid, **kwargs)

    messages = [{"role": "user", "content": PROMPTS[1]}]
    answers = []
    for url, (account_id, token) in ((single.url, accounts[0]), (cluster.url, accounts[1])):
        client = OpenAI(api_key=token, base_url=f"{url}/client/v4/accounts/{account_id}/ai/v1", max_retries=0)
        whole = client.chat.completions.create(model=f"{MODEL}:a0", messages=messages, max_tokens=8, temperature=0)
        pieces = client.chat.completions.create(model=f"{MODEL}:a0", messages=messages, max_tokens=8, temperature=0,
                                                stream=True)
        answers.append((whole.choices[0].message.content,
                        "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)))
    assert answers[0] == answers[1] and answers[1][0] == answers[1][1]


def test_every_response_names_its_replica(cluster, accounts):
    account_id, token = accounts[1]
    ids = cluster.replica_ids()
    for lora in (None, "a0"):
        with httpx.stream("POST", f"{cluster.url}/client/v4/accounts/{account_id}/ai/run/{MODEL}",
                          json={"prompt": PROMPTS[0], "lora": lora, "max_tokens": 4, "stream": True},
                          headers={"Authorization": f"Bearer {token}"}, timeout=120) as r:
            assert r.status_code == 200 and r.headers[HEADER] in ids
            assert r.read().endswith(b"data: [DONE]\n\n")
    assert httpx.get(f"{cluster.url}/healthz").headers[HEADER] == INGRESS
    refused = run(cluster.url, (account_id, "not-a-token"), {"prompt": "x"})
    assert refused.status_code == 401 and refused.headers[HEADER] == INGRESS


def test_sequential_requests_of_each_adapter_stay_on_one_replica(cluster, accounts, adapters):
    account = accounts[1]
    for name in ("a2", "a3"):
        upload(cluster.url, account, name, adapters[name])
    served = {name: Counter() for name in NAMES}
    for _ in range(5):
        for name in NAMES:
            served[name][reply(cluster.url, account, PROMPTS[0], name, max_tokens=2)[1]] += 1
    for name, counts in served.items():
        assert counts.most_common(1)[0][1] >= 0.9 * sum(counts.values()), (name, counts)
    assert {counts.most_common(1)[0][0] for counts in served.values()} == set(cluster.replica_ids())


def test_an_uploaded_adapter_is_served_at_once_by_every_replica(single, cluster, accounts, adapters):
    finetune = upload(cluster.url, accounts[1], "fresh", adapters["a2"])
    upload(single.url, accounts[0], "fresh", adapters["a2"])
    expected = reply(single.url, accounts[0], PROMPTS[1], "fresh")[0]
    ctx = cluster.ctx
    tokenizer = ctx.tokenizer

    async def generate_on(replica: str) -> str:
        with pinned_replica(replica):
            adapter = await ctx.adapter_for(accounts[1][0], "fresh")
            outputs = [o async for o in ctx.engine.generate(tokenizer.encode(PROMPTS[1]),
                                                            SamplingParams(max_tokens=8, temperature=0), adapter)]
        return outputs[-1].text

    for replica in cluster.replica_ids():
        assert asyncio.run(generate_on(replica)) == expected
    registered = asyncio.run(ctx.engine.call(lambda engine: finetune in engine.adapters.names))
    assert registered == {"replicas": {rid: True for rid in cluster.replica_ids()}}

    account_id, token = accounts[1]  # deleted through the endpoint: forgotten by every replica
    deleted = httpx.delete(f"{cluster.url}/client/v4/accounts/{account_id}/ai/finetunes/{finetune}",
                           headers={"Authorization": f"Bearer {token}"})
    assert deleted.status_code == 200, deleted.text
    registered = asyncio.run(ctx.engine.call(lambda engine: finetune in engine.adapters.names))
    assert registered == {"replicas": {rid: False for rid in cluster.replica_ids()}}
    gone = run(cluster.url, accounts[1], {"prompt": PROMPTS[1], "lora": "fresh"})
    assert gone.status_code == 404 and gone.json()["errors"][0]["code"] == 3037, gone.text


def test_a_burst_for_one_adapter_past_the_spill_bound_spreads_over_both_replicas(cluster, accounts):
    """More requests for one adapter at once than `spill_in_flight`: the others go elsewhere."""
    served: list = []

    def send() -> None:
        served.append(reply(cluster.url, accounts[1], PROMPTS[0], "a1", max_tokens=24)[1])

    threads = [threading.Thread(target=send) for _ in range(3 * SPILL)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(served) == 3 * SPILL and set(served) == set(cluster.replica_ids())


def test_the_ingress_admits_max_pending_per_replica_then_refuses(cluster, accounts):
    """RemoteEngine's own bound (max_pending × replicas), before any replica is asked: over HTTP,
    on the ingress's own RemoteEngine, its bound lowered to that of max_pending 1 on 2 replicas."""
    engine = cluster.ctx.engine
    bound, engine.max_pending = engine.max_pending, 2
    account_id, token = accounts[1]
    url = f"{cluster.url}/client/v4/accounts/{account_id}/ai/run/{MODEL}"
    headers = {"Authorization": f"Bearer {token}"}
    body = {"prompt": PROMPTS[0], "max_tokens": 400, "temperature": 0, "raw": True, "stream": True}
    try:
        with httpx.Client(timeout=120) as client, contextlib.ExitStack() as streams:
            for _ in range(2):  # each answered (so queued on a replica) and left unread
                response = streams.enter_context(client.stream("POST", url, json=body, headers=headers))
                assert response.status_code == 200
            assert engine.num_in_flight == 2
            third = client.post(url, json={**body, "stream": False}, headers=headers)
            assert third.status_code == 429 and "too many requests in flight" in third.text
        deadline = time.monotonic() + 60  # a guard against a hang only: the streams closed, they are aborted
        while engine.num_in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.num_in_flight == 0
    finally:
        engine.max_pending = bound


def test_metrics_and_admin_view_cover_every_replica(cluster, accounts):
    reply(cluster.url, accounts[1], PROMPTS[0], "a0")
    ids = cluster.replica_ids()
    admin = httpx.get(f"{cluster.url}/admin/adapters", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()
    assert sorted(admin["replicas"]) == ids
    in_slots = [(rid, r["adapter"]) for rid, snap in admin["replicas"].items() for r in snap["slots"]["residents"]]
    assert in_slots  # the adapters just used are in some replica's slots
    expected = [f'loraplex_replica_adapter_resident{{adapter="{adapter}",replica="{rid}",tier="slot"}} 1.0'
                for rid, adapter in in_slots]
    for _ in range(200):  # residency reaches /metrics with the replicas' next routing stats
        text = httpx.get(f"{cluster.url}/metrics").text
        if all(line in text for line in expected):
            break
        threading.Event().wait(0.05)
    assert all(line in text for line in expected), text
    for rid in ids:
        assert f'loraplex_replica_requests_in_flight{{replica="{rid}"}}' in text


def test_the_cli_serves_replicas_on_a_cluster_it_joins_and_removes_them_on_exit(cluster, model_dir, tmp_path):
    """`loraplex serve --replicas 1 --ray-address <this module's Ray>` (beside the module's own app)."""
    port = free_port()
    command = [sys.executable, "-m", "loraplex.cli", "serve", "--model", str(model_dir), "--model-name", MODEL,
               "--dtype", "float32", "--device", "cpu", "--kv-cache-memory", str(32 << 20), "--data-dir", str(tmp_path),
               "--port", str(port), "--dev-account", "--replicas", "1", "--replica-cpus", "0.5",
               "--ray-address", ray.get_runtime_context().gcs_address]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        for line in process.stdout:
            seen.append(line)
            if "serving" in line and "engine replicas on Ray Serve" in line:
                break
        else:
            raise AssertionError("".join(seen[-30:]))
        printed = "".join(seen)
        account = (re.search(r"LORAPLEX_ACCOUNT_ID=(\S+)", printed)[1], re.search(r"LORAPLEX_API_TOKEN=(\S+)", printed)[1])
        text, replica = reply(f"http://127.0.0.1:{port}", account, PROMPTS[0], None)
        assert text and replica not in (None, INGRESS)
        assert "loraplex" in serve.status().applications
    finally:
        process.send_signal(signal.SIGTERM)  # (SIGINT ends it the same way)
        process.communicate(timeout=60)
    assert process.returncode == 0
    assert "loraplex" not in serve.status().applications
    assert "loraplex-tests" in serve.status().applications


def _pids(cluster) -> dict[str, int]:
    return asyncio.run(cluster.ctx.engine.call(lambda engine: os.getpid()))["replicas"]


def _ray_training(client, job_id: str, guard_s: float = 300) -> tuple[str, int]:
    """(the job's "training as Ray task …" event, the task's pid) once the task has reported a step.
    `guard_s` only guards against a hang."""
    deadline = time.monotonic() + guard_s
    while True:
        events = list(client.fine_tuning.jobs.list_events(job_id))
        notes = [e.message for e in events if e.message.startswith("training as Ray task")]
        if notes and any(e.type == "metrics" for e in events):
            return notes[0], int(re.search(r"pid (\d+)", notes[0])[1])
        assert time.monotonic() < deadline and not any(e.message.startswith(STOPPED) for e in events), events
        time.sleep(0.1)


def _process_ended(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")  # exited, not yet reaped
    except FileNotFoundError:
        return True


def _until_ended(pid: int, guard_s: float = 60) -> None:
    deadline = time.monotonic() + guard_s
    while not _process_ended(pid):
        assert time.monotonic() < deadline, f"the training task (pid {pid}) still runs"
        time.sleep(0.1)


def _long_job(client, suffix: str):
    """A job of many steps (a few hundred examples, 50 epochs), running long after its first step."""
    data = "".join(json.dumps({"messages": [{"role": "user", "content": f"count {i}"},
                                            {"role": "assistant", "content": "ARR"}]}) + "\n" for i in range(400))
    f = client.files.create(file=("long.jsonl", io.BytesIO(data.encode())), purpose="fine-tune")
    return client.fine_tuning.jobs.create(model=MODEL, training_file=f.id, suffix=suffix,
                                          hyperparameters={"n_epochs": 50, "batch_size": 1})


def _account_id(client) -> str:
    return client.base_url.path.split("/")[4]


def test_a_fine_tuning_job_trains_as_a_ray_task_and_its_finetune_is_served_by_the_replicas(cluster):
    client = cluster.live.openai_client("trainee")
    f = client.files.create(file=("t.jsonl", io.BytesIO(MEMORISE_DATA)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=f.id, seed=1, suffix="pirate",
                                         hyperparameters=MEMORISE)
    job = wait_for_job(client, job.id)
    assert job.status == "succeeded", job.error
    events = list(reversed(list(client.fine_tuning.jobs.list_events(job.id))))
    (note,) = [e.message for e in events if e.message.startswith("training as Ray task")]
    assert f"Ray task {TASK_PREFIX}{job.id} on node {ray.get_runtime_context().get_node_id()}" in note
    assert int(re.search(r"pid (\d+)", note)[1]) not in (os.getpid(), *_pids(cluster).values())
    steps = [e.data for e in events if e.type == "metrics"]
    assert [d["step"] for d in steps] == list(range(1, 12 * 2 + 1))
    assert job.trained_tokens == steps[-1]["trained_tokens"]
    replies = [client.chat.completions.create(model=job.fine_tuned_model, max_tokens=3, temperature=0,
                                              messages=[{"role": "user", "content": p}]).choices[0].message.content
               for p in MEMORISE_PROMPTS]
    assert sum(r == "ARR" for r in replies) >= 3, replies


def test_cancelling_a_job_kills_its_ray_task_and_publishes_nothing(cluster):
    client = cluster.live.openai_client("canceller")
    job = _long_job(client, "cancelled")
    _, pid = _ray_training(client, job.id)
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    deadline = time.monotonic() + 60  # until the runner lets go (it stopped the task first)
    while not any(e.message.startswith(STOPPED) for e in client.fine_tuning.jobs.list_events(job.id)):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    _until_ended(pid)
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert (done.status, done.fine_tuned_model) == ("cancelled", None)
    assert cluster.ctx.registry.list_finetunes(_account_id(client)) == []


def test_a_training_task_that_dies_fails_its_job_with_a_clear_error(cluster):
    """SIGKILL of the task's worker process, as when its node is lost."""
    client = cluster.live.openai_client("crasher")
    job = _long_job(client, "killed")
    _, pid = _ray_training(client, job.id)
    os.kill(pid, signal.SIGKILL)
    done = wait_for_job(client, job.id)
    assert done.status == "failed" and done.fine_tuned_model is None
    assert "the training task was lost" in done.error.message, done.error
    assert cluster.ctx.registry.list_finetunes(_account_id(client)) == []


def test_a_stream_on_a_killed_replica_ends_with_an_error_event_and_the_replica_comes_back(single, cluster, accounts):
    """A sampled request without a seed cannot be replayed elsewhere: its stream ends with the
    SSE error event (3040). top_k=1 makes it as long as the greedy reply, which runs to
    max_tokens (checked on the single-process server), so it is still streaming at the kill."""
    body = {"prompt": PROMPTS[0], "max_tokens": 450, "raw": True}
    whole = run(single.url, accounts[0], body | {"temperature": 0})
    assert whole.json()["result"]["usage"]["completion_tokens"] == 450  # no end-of-sequence before
    pids = _pids(cluster)
    account_id, token = accounts[1]
    with httpx.stream("POST", f"{cluster.url}/client/v4/accounts/{account_id}/ai/run/{MODEL}",
                      json=body | {"temperature": 1.0, "top_k": 1, "stream": True},
                      headers={"Authorization": f"Bearer {token}"}, timeout=120) as r:
        victim = r.headers[HEADER]
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert "response" in json.loads(first[6:])
        os.kill(pids[victim], signal.SIGKILL)
        events = [line[6:] for line in lines if line.startswith("data: ")]
    assert events[-1] != "[DONE]"
    assert json.loads(events[-1])["error"]["code"] == 3040, events[-3:]
    assert victim not in cluster.wait_for_replicas(2, without=victim)


def test_sigkill_mid_load_loses_no_unstreamed_request(single, cluster, accounts):
    """Greedy requests are replayed on the other replica, whether or not their first tokens came."""
    jobs = [(PROMPTS[i % 2], (None, "a0", "a1")[i % 3]) for i in range(24)]
    expected = {job: reply(single.url, accounts[0], *job, max_tokens=MAX_TOKENS)[0] for job in set(jobs)}
    victim, pid = sorted(_pids(cluster).items())[1]
    results: list = [None] * len(jobs)

    def send(i: int) -> None:
        prompt, lora = jobs[i]
        results[i] = run(cluster.url, accounts[1], {"prompt": prompt, "lora": lora, "max_tokens": MAX_TOKENS,
                                                    "temperature": 0, "raw": True})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    while cluster.ctx.engine.replicas().get(victim, {}).get("in_flight", 0) == 0:  # it reports work in flight
        assert any(t.is_alive() for t in threads), "every request ended before the victim reported one"
        threading.Event().wait(0.01)
    os.kill(pid, signal.SIGKILL)
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [200] * len(jobs), [r.text for r in results if r.status_code != 200]
    assert [r.json()["result"]["response"] for r in results] == [expected[job] for job in jobs]
    assert victim not in cluster.wait_for_replicas(2, without=victim)
