"""SlotTable bookkeeping and the scheduler's skip-don't-block rule for adapters without a slot."""

from __future__ import annotations

from loraplex.config import SchedulerConfig
from loraplex.core import SamplingParams
from loraplex.engine.scheduler import Scheduler
from loraplex.engine.sequence import Sequence
from loraplex.adapters.slot_table import SlotTable
from loraplex.kvcache.block_manager import BlockManager


class InHostAdapters:
    """The scheduler's view of adapter residency (engine.scheduler.SlotResidency) with every
    adapter already in host memory, as AdapterResidency behaves then: `want` reserves a slot and
    starts a copy (recorded in `copies`); `land` finishes the copies started so far."""

    def __init__(self, num_slots: int):
        self.slots = SlotTable(num_slots)
        self.copies: list[tuple[int, str]] = []

    def acquire(self, name):
        return self.slots.acquire(name)

    def release(self, name):
        self.slots.release(name)

    def set_draining(self, wanted):
        self.slots.set_draining(wanted)

    def want(self, name):
        if self.slots.slot_of(name) is not None:
            return name == self.slots.draining
        slot = self.slots.reserve(name)
        if slot is None:
            return True
        self.copies.append((slot, name))
        return False

    def land(self) -> list[tuple[int, str]]:
        landed, self.copies = self.copies, []
        for _, name in landed:
            self.slots.loaded(name)
        return landed


def test_held_slots_are_never_evicted_and_idle_ones_go_lru_first():
    table = SlotTable(2)
    assert table.acquire("a") is None  # not in a slot yet
    assert table.reserve("a") == 0 and table.residents()[0]["loading"]
    assert table.acquire("a") is None  # still copying
    assert table.reserve("b") == 1
    assert table.reserve("c") is None  # both loading: not evictable
    table.loaded("a"), table.loaded("b")
    assert table.acquire("a") == 0 and table.acquire("a") == 0
    assert table.reserve("c") == 1  # b was idle: its slot is reused
    assert table.slot_of("b") is None
    table.loaded("c")
    table.release("a"), table.release("a")
    table.acquire("c"), table.release("c")  # c used more recently than a
    assert table.reserve("d") == 0  # a is the least recently used
    assert table.remove("c") and table.slot_of("c") is None
    assert not table.remove("d")  # loading
    table.abandon("d")  # a failed copy frees the slot
    assert table.slot_of("d") is None and table.reserve("e") is not None


def seq(name: str, lora: str | None, arrival: int) -> Sequence:
    return Sequence(name, [1, 2, 3], SamplingParams(max_tokens=4), arrival, lora=lora)


def test_request_without_a_slot_is_skipped_not_blocking():
    adapters = InHostAdapters(1)
    scheduler = Scheduler(SchedulerConfig(), BlockManager(64, 4), adapters)
    first, blocked, base, same = seq("1", "a", 0), seq("2", "b", 1), seq("3", None, 2), seq("4", "a", 3)
    for s in (first, blocked, base, same):
        scheduler.add(s)
    plan = scheduler.schedule()
    assert [e.seq for e in plan.scheduled] == [base]  # "a" is being copied into the one slot
    assert adapters.land() == [(0, "a")]  # the copy is done by the next step
    plan = scheduler.schedule()
    assert [e.seq for e in plan.scheduled if e.seq.lora] == [first, same] and adapters.copies == []
    assert list(scheduler.waiting) == [blocked]
    scheduler.finish(first)
    scheduler.schedule()
    assert adapters.copies == []  # "a" still held by request 4
    scheduler.finish(same)
    scheduler.schedule()
    assert adapters.land() == [(0, "b")]
    assert blocked in [e.seq for e in scheduler.schedule().scheduled]


def test_a_hot_adapter_cannot_starve_a_cold_one():
    """One slot; requests for "a" arrive every step and each runs 3 steps, so "a" is never idle.
    A single request for "b" must still get the slot, ahead of newer requests for "a"."""
    adapters = InHostAdapters(1)
    scheduler = Scheduler(SchedulerConfig(), BlockManager(256, 4), adapters)
    cold = seq("cold", "b", 1)
    scheduler.add(seq("hot-0", "a", 0))
    scheduler.add(cold)
    admitted_at = {}
    for step in range(50):
        scheduler.add(seq(f"hot-{step + 1}", "a", step + 2))
        plan = scheduler.schedule()
        adapters.land()  # copies finish by the next step
        if cold in [e.seq for e in plan.scheduled]:
            break
        admitted_at.update({e.seq.request_id: step for e in plan.scheduled if e.seq.request_id not in admitted_at})
        for running in list(scheduler.running):
            if step - admitted_at[running.request_id] >= 2:
                scheduler.finish(running)
    else:
        raise AssertionError("the request for 'b' never got a slot")
    assert adapters.slots.slot_of("b") == 0
    assert step <= 6
