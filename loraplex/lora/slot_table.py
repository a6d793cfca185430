"""Which adapter sits in which device slot: pure bookkeeping, no tensors (the scheduler's view)."""

from __future__ import annotations

from collections import OrderedDict


class SlotTable:
    """Which adapter sits in which slot and how many running sequences hold it. Pure bookkeeping
    (no tensors), used by the scheduler. A slot held by a running sequence is never evicted;
    among free slots the least recently used is reused first. While some request waits for a
    slot, one held adapter is *draining*: it takes no new holders, so its slot frees."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._slot_of: dict[str, int] = {}
        self._holders: dict[str, int] = {}
        self._idle: OrderedDict[str, None] = OrderedDict()  # loaded, unheld: LRU first
        self._empty: list[int] = list(range(num_slots - 1, -1, -1))
        self.draining: str | None = None

    def slot_of(self, name: str) -> int | None:
        return self._slot_of.get(name)

    def acquire(self, name: str) -> tuple[int, bool] | None:
        """Hold `name` in a slot: (slot, needs_load), or None when every slot is held."""
        if name == self.draining:
            return None
        if name in self._slot_of:
            self._idle.pop(name, None)
            self._holders[name] += 1
            return self._slot_of[name], False
        if self._empty:
            slot = self._empty.pop()
        elif self._idle:
            evicted, _ = self._idle.popitem(last=False)
            slot = self._slot_of.pop(evicted)
            del self._holders[evicted]
            if evicted == self.draining:
                self.draining = None
        else:
            return None
        self._slot_of[name] = slot
        self._holders[name] = 1
        return slot, True

    def set_draining(self, wanted: bool) -> None:
        """wanted: a request waits for a slot. Then keep (or pick) one held adapter draining,
        the one with the fewest holders; otherwise stop draining."""
        if not wanted:
            self.draining = None
        elif self.draining is None and self._holders:
            held = [name for name, count in self._holders.items() if count]
            if held:
                self.draining = min(held, key=lambda name: self._holders[name])

    def release(self, name: str) -> None:
        self._holders[name] -= 1
        if self._holders[name] == 0:
            self._idle[name] = None

    def evict(self, name: str) -> bool:
        """Forget an unheld adapter (e.g. removed by its owner); False if it is held."""
        if name not in self._slot_of:
            return True
        if self._holders[name]:
            return False
        del self._idle[name], self._holders[name]
        self._empty.append(self._slot_of.pop(name))
        if name == self.draining:
            self.draining = None
        return True
