"""Residency: which expert, in which precision, sits in which device slot of each layer, and whether its
bytes have landed.  No tensors, no copies: the transfer queue (:mod:`.transfer`) owns the slot buffers and
fills slot ``s`` of layer ``l``; this module decides which slot an expert gets and which expert gives its
slot up, through an eviction policy from :mod:`.evict` (one per layer, over the keys ``0..n_experts-1``:
the native class where the extension is built, else the Python reference, which decides the same).

The state is kept as plain per-layer lists indexed by expert and by slot (a lookup is a list index, not
an object per expert), so the decode hot path does a handful of list operations per expert:

* ``slot_of[l][e]``: the slot holding expert ``e`` (-1: none);
* ``expert_at[l][s]``, ``precision_at[l][s]``: what slot ``s`` holds;
* ``pending[l][s]``: its copy is queued or in flight (the transfer clears it when the bytes land);
* ``prefetched[l][s]``: it came because of a prediction, not a demand;
* ``gen[l][s]``: bumped whenever the slot changes hands, so a copy queued for an earlier holder is void.

Only the thread that runs the model changes this state — the native copier's landed copies too, which
that thread settles (:meth:`.transfer.TransferEngine.poll`); the Python transfer worker, where the copier is
not built, only clears ``pending`` of the generation it copied (:meth:`landed`).  The value rule's native
queueing (:mod:`.native_policy`'s ``Queuer``) makes :meth:`reserve`'s list operations on these same lists in
place (``_free`` included): a change to them is made in both.  A slot whose copy is in flight is never evicted or handed out
again: an unneeded prefetch is cancelled only while it is still queued (:meth:`.transfer.TransferEngine.cancel`).
"""

from __future__ import annotations

from typing import Callable, Collection

from fate.runtime.experts.evict import EvictionPolicy, make_policy


class ExpertCache:
    """The slots of every layer; ``slots_per_layer[l]`` slots for layer ``l`` (0 for dense layers)."""

    def __init__(self, slots_per_layer: list[int], n_experts: int, policy: str = "arc",
                 on_evict: Callable[[int], None] | None = None):
        make_policy(policy, 0)  # an unknown name fails here, once, with the policy's message
        for layer, n in enumerate(slots_per_layer):
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"layer {layer}: the number of cache slots must be a non-negative integer, got {n!r}")
        self.policy_name = policy
        self.n_experts = n_experts
        self.n_slots = list(slots_per_layer)
        self.on_evict = on_evict  # called with the layer at every eviction (ExpertStats.evicted)
        L = len(slots_per_layer)
        self.slot_of = [[-1] * n_experts for _ in range(L)]
        self.expert_at = [[-1] * n for n in slots_per_layer]
        self.precision_at = [[""] * n for n in slots_per_layer]
        self.pending = [[False] * n for n in slots_per_layer]
        self.prefetched = [[False] * n for n in slots_per_layer]
        self.gen = [[0] * n for n in slots_per_layer]
        self._free = [list(range(n - 1, -1, -1)) for n in slots_per_layer]  # a stack: the lowest slot on top
        self.policies: list[EvictionPolicy] = [make_policy(policy, n, n_keys=n_experts) for n in slots_per_layer]
        self.evictions = [0] * L

    def __len__(self) -> int:
        return len(self.n_slots)

    @property
    def slots_per_layer(self) -> list[int]:
        return list(self.n_slots)

    @property
    def total_slots(self) -> int:
        return sum(self.n_slots)

    # -- reading ----------------------------------------------------------------------------------
    def lookup(self, layer: int, expert: int) -> int:
        """The slot of a resident expert (its copy landed or not), or -1."""
        return self.slot_of[layer][expert]

    def ready(self, layer: int, slot: int) -> bool:
        return not self.pending[layer][slot]

    def resident(self, layer: int) -> list[int]:
        """Resident experts of ``layer`` in the policy's eviction order (first = evicted first)."""
        return self.policies[layer].resident()

    def free_slots(self, layer: int) -> int:
        return len(self._free[layer])

    # -- changing ---------------------------------------------------------------------------------
    def touch(self, layer: int, expert: int) -> None:
        """A use of a resident expert: a policy hit."""
        self.policies[layer].hit(expert)

    def reserve(self, layer: int, expert: int, precision: str, *, prefetched: bool,
                pinned: Collection[int] = (), victim: int | None = None) -> int:
        """Give a non-resident expert a slot: a free one, else ``victim``'s (which must be resident, settled and
        not pinned) or the one whose expert the policy evicts (never one in ``pinned``, never one whose copy is
        in flight).  The slot comes back ``pending``: the caller queues its copy.  -1 when no slot can be had."""
        slot_of = self.slot_of[layer]
        if slot_of[expert] >= 0:
            raise ValueError(f"layer {layer}: expert {expert} is already cached (slot {slot_of[expert]})")
        free = self._free[layer]
        policy = self.policies[layer]
        if free:
            slot = free.pop()
        else:
            pending = self.pending[layer]
            if victim is None:
                victim = policy.evict_where(expert, pinned, pending, slot_of)
                if victim is None:
                    return -1
            else:
                policy.discard(victim)
            slot = slot_of[victim]
            slot_of[victim] = -1
            self.evictions[layer] += 1
            if self.on_evict is not None:
                self.on_evict(layer)
        policy.admit(expert)
        slot_of[expert] = slot
        self.expert_at[layer][slot] = expert
        self.precision_at[layer][slot] = precision
        self.pending[layer][slot] = True
        self.prefetched[layer][slot] = prefetched
        self.gen[layer][slot] += 1
        return slot

    def evictable(self, layer: int, pinned: Collection[int] = ()) -> list[int]:
        """Resident experts that could give up their slot now (settled, not pinned), in the policy's order."""
        slot_of, pending = self.slot_of[layer], self.pending[layer]
        return [e for e in self.policies[layer].resident() if e not in pinned and not pending[slot_of[e]]]

    def change_precision(self, layer: int, expert: int, precision: str) -> int:
        """A resident expert rewritten in place at another precision (an INT2 → INT4 upgrade): the slot comes
        back ``pending`` under a new generation.  The caller makes sure nothing reads the slot meanwhile."""
        slot = self.slot_of[layer][expert]
        if slot < 0:
            raise KeyError(f"layer {layer}: expert {expert} is not in the cache")
        self.precision_at[layer][slot] = precision
        self.pending[layer][slot] = True
        self.gen[layer][slot] += 1
        return slot

    def drop(self, layer: int, expert: int) -> None:
        """Forget a resident expert whose copy is not in flight and free its slot; no-op if absent."""
        slot = self.slot_of[layer][expert]
        if slot < 0:
            return
        self.slot_of[layer][expert] = -1
        self.expert_at[layer][slot] = -1
        self.pending[layer][slot] = False
        self.gen[layer][slot] += 1
        self.policies[layer].discard(expert)
        self._free[layer].append(slot)

    def landed(self, layer: int, slot: int, gen: int) -> None:
        """The copy of generation ``gen`` into ``slot`` is complete (called by the transfer thread)."""
        if self.gen[layer][slot] == gen:
            self.pending[layer][slot] = False

    def __repr__(self) -> str:
        return (f"ExpertCache(policy={self.policy_name!r}, slots={self.n_slots}, "
                f"evictions={sum(self.evictions)})")
