"""Continuous batching: which sequences run this step, and how many tokens each computes.

The scheduler never touches tensors. Each step it first serves the running sequences (a decode
token each, or the next chunk of a long prompt), preempting the newest running sequence by
recompute when blocks run out, then admits waiting sequences in arrival order while the token
budget, the sequence limit and free blocks allow; an admitted sequence starts after the longest
prefix of its tokens that the block manager has cached (prefix caching). A waiting sequence
whose adapter is not in a device slot yet is skipped, never left blocking the queue: the
residency manager is asked to bring it (`want`), and the sequence is admitted at the first step
after it is there.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple, Protocol

from loraplex.config import SchedulerConfig
from loraplex.engine.sequence import Sequence, SequenceStatus
from loraplex.kvcache.block_manager import BlockManager


class SlotResidency(Protocol):
    """What the scheduler asks of the adapters' residency (AdapterResidency implements it)."""

    def acquire(self, name: str) -> int | None: ...  # its slot, held for one running sequence; None if not in one
    def release(self, name: str) -> None: ...
    def want(self, name: str) -> bool: ...  # start bringing it into a slot; True if every slot is held
    def set_draining(self, wanted: bool) -> None: ...  # wanted: some adapter waits for a held slot


class ScheduledSequence(NamedTuple):
    seq: Sequence
    num_tokens: int  # tokens computed this step, from seq.num_computed_tokens on

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the sequence, so a token is sampled."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


class SchedulerOutput(NamedTuple):
    scheduled: list[ScheduledSequence]  # in running order

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        adapters: SlotResidency,
    ):
        self.config = config
        self.block_manager = block_manager
        self.adapters = adapters
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
        preempted = False
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or budget == 0:
                continue  # preempted earlier in this loop
            n = min(seq.num_uncomputed_tokens, budget)
            while not self.block_manager.can_allocate(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            self.block_manager.allocate(seq, n)
            scheduled.append(ScheduledSequence(seq, n))
            budget -= n
        if not preempted:
            self._admit(scheduled, budget)
        return SchedulerOutput(scheduled)

    def _admit(self, scheduled: list[ScheduledSequence], budget: int) -> None:
        """Admit waiting sequences in arrival order. One whose adapter is not in a slot yet is
        skipped (others go ahead) and its adapter wanted; it is admitted once the adapter is in
        a slot. When every slot is held, a held slot is set draining so that the oldest skipped
        adapter gets it before any newer request, and no adapter starves."""
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
                slot = self.adapters.acquire(seq.lora)
                if slot is None:
                    starved |= self.adapters.want(seq.lora)
                    continue
                seq.lora_slot = slot
            self.waiting.remove(seq)
            blocks.take_prefix(seq, prefix)
            blocks.allocate(seq, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSequence(seq, n))
            budget -= n
        self.adapters.set_draining(starved)

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
            self.adapters.release(seq.lora)
            seq.lora_slot = -1
