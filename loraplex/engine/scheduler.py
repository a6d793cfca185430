"""Continuous batching: which sequences run this step, and how many tokens each computes.

The scheduler never touches tensors. Each step it first serves the running sequences (a decode
token each, or the next chunk of a long prompt), preempting the newest running sequence by
recompute when blocks run out, then admits waiting sequences in arrival order while the token
budget, the sequence limit and free blocks allow; an admitted sequence starts after the longest
prefix of its tokens that the block manager has cached (prefix caching). A waiting sequence whose adapter is not ready
(still loading below the slots) or cannot get a device slot (all held by running sequences) is
skipped, never left blocking the queue; it is admitted at the first step after that changes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import NamedTuple

from loraplex.config import SchedulerConfig
from loraplex.engine.sequence import Sequence, SequenceStatus
from loraplex.kvcache.block_manager import BlockManager
from loraplex.lora.slot_table import SlotTable


class ScheduledSequence(NamedTuple):
    seq: Sequence
    num_tokens: int  # tokens computed this step, from seq.num_computed_tokens on

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the sequence, so a token is sampled."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


class SchedulerOutput(NamedTuple):
    scheduled: list[ScheduledSequence]  # in running order
    preempted: list[Sequence]
    lora_loads: list[tuple[int, str]]  # (slot, adapter name): reserved slots to copy adapters into

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        slot_table: SlotTable,
        adapter_ready: Callable[[str], bool] = lambda name: True,
    ):
        """adapter_ready(name): is the adapter in host memory, ready to be copied into a slot?
        The engine's answer also starts its load when it is not."""
        self.config = config
        self.block_manager = block_manager
        self.slot_table = slot_table
        self.adapter_ready = adapter_ready
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0  # sequences preempted so far (their cache dropped, recomputed later)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence (finished or aborted) from its queue, freeing its blocks and slot."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._drop_resources(seq)
        seq.status = SequenceStatus.FINISHED

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        preempted: list[Sequence] = []
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or budget == 0:
                continue  # preempted earlier in this loop
            n = min(seq.num_uncomputed_tokens, budget)
            while not self.block_manager.can_allocate(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            self.block_manager.allocate(seq, n)
            scheduled.append(ScheduledSequence(seq, n))
            budget -= n
        lora_loads: list[tuple[int, str]] = []
        if not preempted:
            self._admit(scheduled, budget, lora_loads)
        return SchedulerOutput(scheduled, preempted, lora_loads)

    def _admit(self, scheduled: list[ScheduledSequence], budget: int, lora_loads: list[tuple[int, str]]) -> None:
        """Admit waiting sequences in arrival order. One whose adapter is not in a slot yet is
        skipped (others go ahead): when its adapter is in host memory, a slot is reserved and
        a copy into it requested (`lora_loads`); it is admitted once the copy is done. When every
        slot is held, a held slot is set draining so that the oldest skipped adapter gets it
        before any newer request, and no adapter starves."""
        starved = False
        blocks = self.block_manager
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                break
            prefix = blocks.match_prefix(seq)  # cached blocks of its first tokens: not computed again
            n = min(seq.num_uncomputed_tokens - len(prefix) * blocks.block_size, budget)
            if not blocks.can_allocate(seq, n, prefix):
                break
            if seq.lora is not None:
                slot = self.slot_table.acquire(seq.lora)
                if slot is None:
                    starved |= self._request_slot(seq.lora, lora_loads)
                    continue
                seq.lora_slot = slot
            self.waiting.remove(seq)
            blocks.take_prefix(seq, prefix)
            blocks.allocate(seq, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSequence(seq, n))
            budget -= n
        self.slot_table.set_draining(starved)

    def _request_slot(self, name: str, lora_loads: list[tuple[int, str]]) -> bool:
        """Start getting `name` into a slot if it is not on its way; True if no slot is free."""
        table = self.slot_table
        if table.slot_of(name) is not None or not self.adapter_ready(name):
            return name == table.draining  # loading, draining, or still below the slots
        slot = table.reserve(name)
        if slot is None:
            return True
        lora_loads.append((slot, name))
        return False

    def _preempt(self, seq: Sequence) -> None:
        """Drop the sequence's cache; it recomputes prompt + output when readmitted first."""
        self.running.remove(seq)
        self._drop_resources(seq)
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _drop_resources(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        if seq.lora_slot >= 0:
            self.slot_table.release(seq.lora)
            seq.lora_slot = -1
