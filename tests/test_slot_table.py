"""SlotTable bookkeeping and the scheduler's skip-don't-block rule for adapters without a slot."""

from __future__ import annotations

from loraplex.config import SchedulerConfig
from loraplex.core import SamplingParams
from loraplex.engine.scheduler import Scheduler
from loraplex.engine.sequence import Sequence
from loraplex.kvcache.block_manager import BlockManager
from loraplex.lora.slot_table import SlotTable


def test_held_slots_are_never_evicted_and_idle_ones_go_lru_first():
    table = SlotTable(2)
    assert table.acquire("a") == (0, True)
    assert table.acquire("b") == (1, True)
    assert table.acquire("a") == (0, False)  # already loaded: no copy
    assert table.acquire("c") is None  # both held
    table.release("b")
    assert table.acquire("c") == (1, True)  # b was idle: its slot is reused
    assert table.slot_of("b") is None
    table.release("a"), table.release("a"), table.release("c")
    table.acquire("c"), table.release("c")  # c used more recently than a
    assert table.acquire("d") == (0, True)  # a is the least recently used
    assert table.evict("c") and table.slot_of("c") is None
    assert not table.evict("d")  # held


def seq(name: str, lora: str | None, arrival: int) -> Sequence:
    return Sequence(name, [1, 2, 3], SamplingParams(max_tokens=4), arrival, lora=lora)


def test_request_without_a_slot_is_skipped_not_blocking():
    scheduler = Scheduler(SchedulerConfig(), BlockManager(64, 4), SlotTable(1))
    first, blocked, base, same = seq("1", "a", 0), seq("2", "b", 1), seq("3", None, 2), seq("4", "a", 3)
    for s in (first, blocked, base, same):
        scheduler.add(s)
    plan = scheduler.schedule()
    assert [e.seq for e in plan.scheduled] == [first, base, same]
    assert plan.lora_loads == [(0, "a")]
    assert list(scheduler.waiting) == [blocked]
    scheduler.finish(first)
    assert scheduler.schedule().lora_loads == []  # "a" still held by request 4
    scheduler.finish(same)
    plan = scheduler.schedule()
    assert blocked in [e.seq for e in plan.scheduled] and plan.lora_loads == [(0, "b")]


def test_a_hot_adapter_cannot_starve_a_cold_one():
    """One slot; requests for "a" arrive every step and each runs 3 steps, so "a" is never idle.
    A single request for "b" must still get the slot, ahead of newer requests for "a"."""
    scheduler = Scheduler(SchedulerConfig(), BlockManager(256, 4), SlotTable(1))
    cold = seq("cold", "b", 1)
    scheduler.add(seq("hot-0", "a", 0))
    scheduler.add(cold)
    admitted_at = {}
    for step in range(50):
        scheduler.add(seq(f"hot-{step + 1}", "a", step + 2))
        plan = scheduler.schedule()
        if cold in [e.seq for e in plan.scheduled]:
            break
        admitted_at.update({e.seq.request_id: step for e in plan.scheduled if e.seq.request_id not in admitted_at})
        for running in list(scheduler.running):
            if step - admitted_at[running.request_id] >= 2:
                scheduler.finish(running)
    else:
        raise AssertionError("the request for 'b' never got a slot")
    assert plan.lora_loads == [(0, "b")]
    assert step <= 4
