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
