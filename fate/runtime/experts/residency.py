"""Bookkeeping of the device expert cache: which expert, in which precision, sits in which slot.

Each MoE layer owns ``n_slots`` slots (the budget decides how many; shallow layers get more).  The
transfer engine owns the slot buffers and fills slot ``entry.slot`` with an expert's blob; this module
only decides which slot an expert gets and which expert gives its slot up, through an eviction policy
from :mod:`fate.runtime.experts.evict`.  No tensors, no copies.

Two threads use a layer at once — the prefetcher (reserving predicted experts of layer i+1) and the
forward pass (looking up, touching and reserving on a miss) — so every :class:`LayerCache` method runs
under that layer's lock and does only dictionary work.

Lifetime of an :class:`Entry`: ``reserve`` creates it with ``ready`` cleared; whoever reserved it copies
the bytes and sets ``ready``.  An entry stops describing its slot when it is evicted, dropped or
replaced by ``replace_precision``: ``released`` becomes True and ``ready`` is set so that nobody stays
blocked on it.  A reader therefore waits on ``ready`` and then checks ``released``.  An entry whose
``ready`` is not set yet is never chosen as a victim (its copy is still in flight into the slot); a
loader whose copy fails must ``drop`` the expert, or its slot stays taken.
"""

from __future__ import annotations

import heapq
import threading
from dataclasses import dataclass, field
from typing import Callable, Collection

from fate.runtime.experts.evict import EvictionPolicy, make_policy


@dataclass(eq=False)
class Entry:
    expert: int
    precision: str
    slot: int  # index into the layer's slot buffers
    prefetched: bool  # loaded because of a prediction, not a demand
    used: bool = False  # used by the forward pass since it was loaded
    ready: threading.Event = field(default_factory=threading.Event)  # the bytes are in the slot
    released: bool = False  # evicted, dropped or superseded: the slot no longer holds this entry


class LayerCache:
    def __init__(self, layer: int, n_slots: int, policy: str = "arc", on_evict: Callable[[int], None] | None = None):
        if isinstance(n_slots, bool) or not isinstance(n_slots, int) or n_slots < 0:
            raise ValueError(f"layer {layer}: the number of cache slots must be a non-negative integer, "
                             f"got {n_slots!r}")
        self.layer = layer
        self.n_slots = n_slots
        self.policy: EvictionPolicy = make_policy(policy, n_slots)
        self.evictions = 0
        self.on_evict = on_evict  # called with the layer id at every eviction (ExpertStats.evicted)
        self._entries: dict[int, Entry] = {}
        self._free = list(range(n_slots))  # a heap: the lowest free slot goes first
        self._lock = threading.Lock()

    def lookup(self, expert: int) -> Entry | None:
        """The entry of a resident expert (ready or still loading), or None.  Leaves the policy alone."""
        with self._lock:
            return self._entries.get(expert)

    def touch(self, expert: int) -> None:
        """Record a use of a resident expert: a policy hit, and ``used`` set."""
        with self._lock:
            entry = self._entries.get(expert)
            if entry is None:
                raise KeyError(f"layer {self.layer}: expert {expert} is not in the cache")
            self.policy.hit(expert)
            entry.used = True

    def reserve(self, expert: int, precision: str, *, prefetched: bool,
                pinned: Collection[int] = ()) -> tuple[Entry, int | None] | None:
        """Give a non-resident expert a slot: a free one, else one whose expert the policy evicts
        (never one in ``pinned``, never one still loading).  Returns the new entry (``ready`` cleared;
        the caller copies the bytes and sets it) and the evicted expert id or None; or None when no
        slot can be had.  Raises ValueError if the expert is already resident: use
        :meth:`lookup_or_reserve` where another thread may have reserved it first."""
        with self._lock:
            if expert in self._entries:
                e = self._entries[expert]
                raise ValueError(f"layer {self.layer}: expert {expert} is already cached ({e.precision}, "
                                 f"slot {e.slot}); look it up, or replace_precision() to change it")
            return self._reserve(expert, precision, prefetched, pinned)

    def lookup_or_reserve(self, expert: int, precision: str, *, prefetched: bool,
                          pinned: Collection[int] = ()) -> tuple[Entry, int | None, bool] | None:
        """Atomic ``lookup`` then ``reserve``: ``(entry, evicted, fresh)`` where ``fresh`` says the caller
        got a new slot and must fill it; a resident entry comes back as ``(entry, None, False)``
        whatever its precision (compare ``entry.precision``).  None when no slot can be had."""
        with self._lock:
            e = self._entries.get(expert)
            if e is not None:
                return e, None, False
            got = self._reserve(expert, precision, prefetched, pinned)
            return None if got is None else (got[0], got[1], True)

    def _reserve(self, expert: int, precision: str, prefetched: bool,
                 pinned: Collection[int]) -> tuple[Entry, int | None] | None:
        victim = None
        if self._free:
            slot = heapq.heappop(self._free)
        else:
            entries = self._entries
            victim = self.policy.evict(expert, lambda k: k not in pinned and entries[k].ready.is_set())
            if victim is None:
                return None
            old = entries.pop(victim)
            old.released = True
            slot = old.slot
            self.evictions += 1
            if self.on_evict is not None:
                self.on_evict(self.layer)
        self.policy.admit(expert)
        entry = Entry(expert, precision, slot, prefetched)
        self._entries[expert] = entry
        return entry, victim

    def replace_precision(self, expert: int, precision: str, *, prefetched: bool | None = None) -> Entry:
        """A new entry for a resident expert in the same slot with another precision (an INT2 → INT4
        upgrade), ``ready`` cleared and ``used`` reset; ``prefetched`` is kept unless given.  The old
        entry is released.  The caller must make sure nobody computes from the slot while it is
        rewritten (pin the expert as it does for eviction)."""
        with self._lock:
            old = self._entries.get(expert)
            if old is None:
                raise KeyError(f"layer {self.layer}: expert {expert} is not in the cache")
            entry = Entry(expert, precision, old.slot, old.prefetched if prefetched is None else prefetched)
            self._entries[expert] = entry
            old.released = True
            old.ready.set()
            return entry

    def drop(self, expert: int) -> None:
        """Forget an expert (a failed copy, or making room by hand) and free its slot; no-op if absent."""
        with self._lock:
            old = self._entries.pop(expert, None)
            if old is None:
                return
            self.policy.discard(expert)
            heapq.heappush(self._free, old.slot)
            old.released = True
            old.ready.set()

    def resident(self) -> list[int]:
        """Resident experts in the policy's eviction order (first = evicted first)."""
        with self._lock:
            return self.policy.resident()

    def entries(self) -> list[Entry]:
        """A snapshot of the resident entries, in slot order."""
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.slot)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, expert: object) -> bool:
        with self._lock:
            return expert in self._entries

    def __repr__(self) -> str:
        return (f"LayerCache(layer={self.layer}, n_slots={self.n_slots}, policy={self.policy.name!r}, "
                f"resident={self.resident()}, evictions={self.evictions})")


class ExpertCache:
    """One :class:`LayerCache` per layer; ``slots_per_layer[i]`` slots for layer i (0 for dense layers)."""

    def __init__(self, slots_per_layer: list[int], policy: str = "arc", on_evict: Callable[[int], None] | None = None):
        make_policy(policy, 0)  # an unknown name fails here, once, with the policy's message
        self.policy = policy
        self.layers = [LayerCache(i, n, policy, on_evict) for i, n in enumerate(slots_per_layer)]

    def layer(self, i: int) -> LayerCache:
        if not 0 <= i < len(self.layers):
            raise IndexError(f"layer {i} is outside the cache's {len(self.layers)} layers")
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def slots_per_layer(self) -> list[int]:
        return [lc.n_slots for lc in self.layers]

    @property
    def total_slots(self) -> int:
        return sum(lc.n_slots for lc in self.layers)

    @property
    def evictions(self) -> int:
        return sum(lc.evictions for lc in self.layers)
