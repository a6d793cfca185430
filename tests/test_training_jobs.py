"""JobStore: states, fairness across accounts, cancel rules, restart never leaves `running`."""

import pytest

from loraplex.errors import InvalidInput, NotFound
from loraplex.training.jobs import JobStore


def _queued(store, account):
    job = store.create(account, "m", "file-x", {"n_epochs": 1})
    assert job.status == "validating_files" and store.mark_queued(job.id)
    return job


def test_claims_alternate_between_accounts(tmp_path):
    store = JobStore(tmp_path)
    a = [_queued(store, "a") for _ in range(3)]
    b = [_queued(store, "b") for _ in range(2)]
    order = []
    while (job := store.claim_next()) is not None:
        order.append(job.id)
        store.finish(job.id, "succeeded", fine_tuned_model="m:x")
    assert order == [a[0].id, b[0].id, a[1].id, b[1].id, a[2].id]


def test_cancel_rules_and_isolation(tmp_path):
    store = JobStore(tmp_path)
    job = _queued(store, "a")
    with pytest.raises(NotFound):
        store.cancel("b", job.id)
    assert store.list("b") == []
    assert store.cancel("a", job.id).status == "cancelled"
    with pytest.raises(InvalidInput, match="already cancelled"):
        store.cancel("a", job.id)
    assert store.claim_next() is None
    done = _queued(store, "a")
    store.finish(store.claim_next().id, "succeeded")
    with pytest.raises(InvalidInput, match="already succeeded"):
        store.cancel("a", done.id)


def test_restart_marks_running_jobs_failed(tmp_path):
    store = JobStore(tmp_path)
    running = _queued(store, "a")
    waiting = _queued(store, "b")
    assert store.claim_next().id == running.id
    store.add_event(running.id, "step 1", {"step": 1, "loss": 2.5})
    reopened = JobStore(tmp_path)
    assert reopened.fail_interrupted() == 1
    assert reopened.get("a", running.id).status == "failed"
    assert "restarted" in reopened.get("a", running.id).error
    assert reopened.get("b", waiting.id).status == "queued"
    assert [e["data"] for e in reopened.events("a", running.id) if e["data"]] == [{"step": 1, "loss": 2.5}]
    assert reopened.events("a", running.id)[-1]["message"] == "the job failed: the server restarted while the job ran"
    with pytest.raises(NotFound):
        reopened.events("b", running.id)


def test_checkpoint_and_trained_tokens_of_a_succeeded_job_only(tmp_path):
    store = JobStore(tmp_path)
    job = _queued(store, "a")
    store.claim_next()
    for step in (1, 2):
        store.add_event(job.id, f"step {step}", {"step": step, "train_loss": 3.0 - step})
    assert store.checkpoints("a", job.id) == [] and store.get("a", job.id).trained_tokens is None
    assert store.finish(job.id, "succeeded", fine_tuned_model="m:x", trained_tokens=120)
    done = store.get("a", job.id)
    assert done.trained_tokens == 120
    assert store.checkpoints("a", job.id) == [{"fine_tuned_model": "m:x", "step": 2, "created_at": done.finished_at,
                                               "metrics": {"step": 2, "train_loss": 1.0}}]
    cancelled = _queued(store, "a")
    store.cancel("a", cancelled.id)
    assert store.checkpoints("a", cancelled.id) == []
    assert not store.finish(cancelled.id, "succeeded", fine_tuned_model="m:y")  # the cancel wins
    with pytest.raises(NotFound):
        store.checkpoints("b", job.id)


def test_a_store_from_before_trained_tokens_gets_the_column(tmp_path):
    import sqlite3

    from loraplex.training import jobs as jobs_module

    old_schema = jobs_module._SCHEMA[0].replace(", trained_tokens INTEGER", "")
    with sqlite3.connect(tmp_path / "training.sqlite") as conn:
        conn.execute(old_schema)
        conn.execute("INSERT INTO jobs VALUES ('ftjob-old','a','m','file-x',NULL,NULL,0,'{}','succeeded',1,1.0,2,"
                     "'m:x',NULL)")
    store = JobStore(tmp_path)
    assert store.get("a", "ftjob-old").trained_tokens is None
    assert _queued(store, "a").trained_tokens is None
