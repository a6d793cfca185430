"""JobStore, on both databases: states, fairness across accounts, cancel rules; across servers
(several stores on one database, as several processes would have): each job claimed by exactly
one trainer, and the lease rule — a job is failed as abandoned only once its trainer stopped
renewing, never while it renews (an injected clock, no sleeping)."""

import threading

import pytest

from loraplex.errors import InvalidInput, NotFound
from loraplex.training.jobs import ABANDONED, JobStore

T = "trainer-1"


def _queued(store, account):
    job = store.create(account, "m", "file-x", {"n_epochs": 1})
    assert job.status == "validating_files" and store.mark_queued(job.id)
    return job


def test_claims_alternate_between_accounts(open_training):
    store = JobStore(open_training())
    a = [_queued(store, "a") for _ in range(3)]
    b = [_queued(store, "b") for _ in range(2)]
    order = []
    while (job := store.claim_next(T)) is not None:
        order.append(job.id)
        store.finish(job.id, "succeeded", fine_tuned_model="m:x")
    assert order == [a[0].id, b[0].id, a[1].id, b[1].id, a[2].id]


def test_cancel_rules_and_isolation(open_training):
    store = JobStore(open_training())
    job = _queued(store, "a")
    with pytest.raises(NotFound):
        store.cancel("b", job.id)
    assert store.list("b") == []
    assert store.cancel("a", job.id).status == "cancelled"
    with pytest.raises(InvalidInput, match="already cancelled"):
        store.cancel("a", job.id)
    assert store.claim_next(T) is None
    done = _queued(store, "a")
    store.finish(store.claim_next(T).id, "succeeded")
    with pytest.raises(InvalidInput, match="already succeeded"):
        store.cancel("a", done.id)


def test_each_job_is_claimed_by_exactly_one_of_many_trainers(open_training):
    """Four trainers, each with its own store (own connections, as another process), claim at
    once until the queue is empty: every job is claimed once, by one of them."""
    jobs = JobStore(open_training())
    queued = {_queued(jobs, f"acct-{i % 3}").id for i in range(12)}
    stores = [JobStore(open_training()) for _ in range(4)]
    claimed: list[list[str]] = [[] for _ in stores]
    start = threading.Barrier(len(stores))

    def trainer(i):
        start.wait()
        while (job := stores[i].claim_next(f"trainer-{i}")) is not None:
            claimed[i].append(job.id)

    threads = [threading.Thread(target=trainer, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    every = [job_id for ids in claimed for job_id in ids]
    assert sorted(every) == sorted(queued)  # each once: no job claimed twice, none left
    assert {j.status for acct in ("acct-0", "acct-1", "acct-2") for j in jobs.list(acct)} == {"running"}


def test_a_running_job_is_failed_only_once_its_lease_lapsed(open_training):
    """Server A's trainer runs a job; server B starting (or idle) does not fail it while A renews;
    once A stops renewing for longer than the lease, B fails it as abandoned, and A's next renew
    says the job is no longer its own."""
    now = [1_000_000.0]
    a = JobStore(open_training(), lease_s=30, clock=lambda: now[0])
    b = JobStore(open_training(), lease_s=30, clock=lambda: now[0])
    running = _queued(a, "alice")
    waiting = _queued(a, "bob")
    assert a.claim_next("trainer-a").id == running.id
    a.add_event(running.id, "step 1", {"step": 1, "loss": 2.5})
    for _ in range(5):  # a renews every 20 s: its job is never abandoned, however long it runs
        now[0] += 20
        assert b.fail_abandoned() == 0
        assert a.renew(running.id, "trainer-a")
    assert not a.renew(running.id, "trainer-b")  # a lease is renewed by its own trainer only
    now[0] += 30  # exactly at the lease's end: not yet
    assert b.fail_abandoned() == 0
    now[0] += 1
    assert b.fail_abandoned() == 1 and b.fail_abandoned() == 0
    failed = b.get("alice", running.id)
    assert (failed.status, failed.error) == ("failed", ABANDONED)
    assert not a.renew(running.id, "trainer-a")  # a learns it lost the job, and lets go
    assert not a.finish(running.id, "succeeded", fine_tuned_model="m:x")
    assert b.get("bob", waiting.id).status == "queued"
    assert [e["data"] for e in b.events("alice", running.id) if e["data"]] == [{"step": 1, "loss": 2.5}]
    assert b.events("alice", running.id)[-1]["message"] == f"the job failed: {ABANDONED}"
    with pytest.raises(NotFound):
        b.events("bob", running.id)


def test_cancel_through_another_server_reaches_the_trainer(open_training):
    a, b = JobStore(open_training()), JobStore(open_training())
    job = _queued(a, "alice")
    assert a.claim_next("trainer-a").id == job.id and a.renew(job.id, "trainer-a")
    assert b.cancel("alice", job.id).status == "cancelled"
    assert not a.renew(job.id, "trainer-a") and a.get("alice", job.id).status == "cancelled"


def test_checkpoint_and_trained_tokens_of_a_succeeded_job_only(open_training):
    store = JobStore(open_training())
    job = _queued(store, "a")
    store.claim_next(T)
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
