"""The device tier of adapter residency: which adapter sits in which slot. Pure bookkeeping, no
tensors (the weights are in lora/slots.py); owned by AdapterResidency (adapters/residency.py)."""

from __future__ import annotations

from collections import OrderedDict


class SlotTable:
    """Which adapter sits in which slot and how many running sequences hold it.

    Pure bookkeeping, used by the engine thread only. A slot's life: `reserve` (the adapter's
    copy into it starts, off the engine step) → `loaded` (copy done; idle) → `acquire`/`release`
    by running sequences → `remove` (adapter unregistered) or eviction. Eviction policy: `reserve`
    reuses an empty slot, else the least recently released idle one (LRU); a slot being loaded or
    held is never evicted. While some request waits for a slot, one held adapter
    is *draining*: it takes no new holders, so its slot frees and no adapter starves.
    """

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._slot_of: dict[str, int] = {}
        self._holders: dict[str, int] = {}
        self._loading: set[str] = set()
        self._idle: OrderedDict[str, None] = OrderedDict()  # loaded, unheld: LRU first
        self._empty: list[int] = list(range(num_slots - 1, -1, -1))
        self.draining: str | None = None
        self.evicted: list[tuple[str, int]] = []  # (adapter, slot) displaced by `reserve`; the owner drains it

    @property
    def num_occupied(self) -> int:
        """Slots holding (or being loaded with) an adapter."""
        return self.num_slots - len(self._empty)

    def residents(self) -> list[dict]:
        """Per occupied slot: its adapter, whether its copy is still in flight, how many running
        sequences hold it (slot order)."""
        return [{"slot": slot, "adapter": name, "loading": name in self._loading, "holders": self._holders[name]}
                for name, slot in sorted(self._slot_of.items(), key=lambda item: item[1])]

    def slot_of(self, name: str) -> int | None:
        return self._slot_of.get(name)

    def acquire(self, name: str) -> int | None:
        """Hold a loaded adapter's slot for one running sequence; None if it is not loaded (or
        is draining)."""
        if name == self.draining or name not in self._slot_of or name in self._loading:
            return None
        self._idle.pop(name, None)
        self._holders[name] += 1
        return self._slot_of[name]

    def reserve(self, name: str) -> int | None:
        """Give a slot to an adapter that has none, to be filled by a copy (then `loaded`);
        None when every slot is held or loading."""
        assert name not in self._slot_of, f"{name} already has a slot"
        if self._empty:
            slot = self._empty.pop()
        elif self._idle:
            evicted, _ = self._idle.popitem(last=False)
            slot = self._slot_of.pop(evicted)
            del self._holders[evicted]
            self.evicted.append((evicted, slot))
        else:
            return None
        self._slot_of[name] = slot
        self._holders[name] = 0
        self._loading.add(name)
        return slot

    def loaded(self, name: str) -> None:
        """The copy into `name`'s slot finished: it may be acquired (or evicted, if unheld)."""
        self._loading.discard(name)
        self._idle[name] = None

    def set_draining(self, wanted: bool) -> None:
        """wanted: a request waits for a slot. Then keep (or pick) one held adapter draining,
        the one with the fewest holders; otherwise stop draining."""
        if not wanted:
            self.draining = None
        elif self.draining is None:
            held = [name for name, count in self._holders.items() if count]
            if held:
                self.draining = min(held, key=lambda name: self._holders[name])

    def release(self, name: str) -> None:
        self._holders[name] -= 1
        if self._holders[name] == 0:
            self._idle[name] = None
            if name == self.draining:
                self.draining = None  # drained: its slot is idle now

    def remove(self, name: str) -> bool:
        """Free an idle adapter's slot (unregistered, or its copy failed); False if held or loading."""
        if name not in self._slot_of:
            return True
        if self._holders[name] or name in self._loading:
            return False
        del self._idle[name], self._holders[name]
        self._empty.append(self._slot_of.pop(name))
        return True

    def abandon(self, name: str) -> None:
        """A copy into `name`'s slot failed: the slot goes back to the empty pool."""
        self._loading.discard(name)
        self._idle[name] = None
        self.remove(name)
