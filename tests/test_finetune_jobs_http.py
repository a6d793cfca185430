"""Fine-tuning jobs over HTTP with the real OpenAI SDK: create (queued), list, get, events,
cancel; refusals (model not served, another account's file, hyperparameters out of range,
cancelling a finished job) are clear 4xx and store nothing."""

import io
import time

import openai
import pytest

from loraplex.training.runner import STOPPED
from tests.api_server import LiveServer, server_options
from tests.finetune_helpers import ONE_EXAMPLE_DATA

MODEL = "@cf/test/tiny-llama"
DATA = ONE_EXAMPLE_DATA


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    live = LiveServer.start(server_options(model_dir, tmp_path_factory.mktemp("data")))
    yield live
    live.stop()



def _file(client) -> str:
    return client.files.create(file=("t.jsonl", io.BytesIO(DATA)), purpose="fine-tune").id


def wait_for_event(client, job_id: str, prefix: str) -> str:
    deadline = time.monotonic() + 300  # a deadlock guard only
    while True:
        found = [e.message for e in client.fine_tuning.jobs.list_events(job_id) if e.message.startswith(prefix)]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no event {prefix!r}"
        time.sleep(0.1)


def test_create_list_get_cancel(server):
    """The cancel lands whenever it lands (queued, training, publishing, or too late): each
    outcome is asserted exactly, so the test does not depend on how fast the trainer is."""
    client = server.openai_client("jobs-alice")
    account = client.base_url.path.split("/")[4]
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=_file(client), seed=7,
                                         hyperparameters={"n_epochs": 50, "batch_size": 1})
    assert job.status in ("queued", "running") and (job.seed, job.hyperparameters.n_epochs) == (7, 50)
    assert [j.id for j in client.fine_tuning.jobs.list()] == [job.id]
    assert client.fine_tuning.jobs.retrieve(job.id).training_file == job.training_file
    try:
        cancelled = client.fine_tuning.jobs.cancel(job.id)
    except openai.BadRequestError as e:  # the trainer won: 50 steps and the publish were done first
        assert "already succeeded" in str(e)
        done = client.fine_tuning.jobs.retrieve(job.id)
        assert done.status == "succeeded" and done.trained_tokens > 0
        assert [f.name for f in server.ctx.registry.list_finetunes(account)] == [done.fine_tuned_model.split(":")[-1]]
        return
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
    if server.ctx.jobs.get(account, job.id).started_at is not None:  # the trainer had it: wait until it lets go
        assert wait_for_event(client, job.id, STOPPED)
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert (done.status, done.fine_tuned_model, done.trained_tokens) == ("cancelled", None, None)
    assert server.ctx.registry.list_finetunes(account) == []
    assert list(client.fine_tuning.jobs.checkpoints.list(job.id)) == []
    with pytest.raises(openai.BadRequestError, match="already cancelled"):
        client.fine_tuning.jobs.cancel(job.id)


def test_refusals_store_nothing(server):
    alice, bob = server.openai_client("jobs-a2"), server.openai_client("jobs-b2")
    alice_file, bob_file = _file(alice), _file(bob)
    cases = [
        (dict(model="no-such-model", training_file=alice_file), openai.BadRequestError, "is not served"),
        (dict(model=MODEL, training_file=bob_file), openai.NotFoundError, "no file"),
        (dict(model=MODEL, training_file=alice_file, hyperparameters={"n_epochs": 0}), openai.BadRequestError,
         "n_epochs must be an integer"),
        (dict(model=MODEL, training_file=alice_file,
              method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 10**6}}}),
         openai.BadRequestError, "batch_size"),
        # the suffix begins the finetune's name: one the registry would refuse is refused before training
        (dict(model=MODEL, training_file=alice_file, suffix="has space"), openai.BadRequestError, "suffix"),
        (dict(model=MODEL, training_file=alice_file, suffix="x" * 52), openai.BadRequestError, "suffix"),
    ]
    for kwargs, kind, needle in cases:
        with pytest.raises(kind, match=needle):
            alice.fine_tuning.jobs.create(**kwargs)
    assert list(alice.fine_tuning.jobs.list()) == []
    job = bob.fine_tuning.jobs.create(model=MODEL, training_file=bob_file)
    with pytest.raises(openai.NotFoundError):
        alice.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.NotFoundError):
        alice.fine_tuning.jobs.cancel(job.id)
    assert bob.fine_tuning.jobs.retrieve(job.id).id == job.id
