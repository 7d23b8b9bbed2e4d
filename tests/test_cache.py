"""Residency bookkeeping (fate.runtime.experts.residency): slots, victims, pins, precision changes, drops,
generations, and the eviction counts the stats see."""

from __future__ import annotations

import random

import pytest

from fate.runtime.experts.residency import ExpertCache


def fill(c: ExpertCache, layer: int, expert: int, precision: str = "q4", **kw) -> int:
    """Reserve and pretend the copy landed."""
    s = c.reserve(layer, expert, precision, prefetched=kw.pop("prefetched", False), **kw)
    assert s >= 0
    c.landed(layer, s, c.gen[layer][s])
    return s


def test_reserve_uses_free_slots_then_evicts():
    c = ExpertCache([0, 2], 8, policy="lru")
    s0 = c.reserve(1, 5, "q4", prefetched=True)
    assert (s0, c.expert_at[1][s0], c.precision_at[1][s0], c.pending[1][s0], c.prefetched[1][s0]) == (0, 5, "q4", True, True)
    c.landed(1, s0, c.gen[1][s0])
    assert c.ready(1, s0) and c.lookup(1, 5) == 0 and c.lookup(1, 6) == -1
    s1 = fill(c, 1, 6)
    assert s1 == 1 and c.free_slots(1) == 0 and sum(c.evictions) == 0
    s2 = c.reserve(1, 7, "q2", prefetched=False)  # full: LRU's victim is 5, its slot is reused
    assert s2 == s0 and c.lookup(1, 5) == -1 and c.expert_at[1][s2] == 7 and c.precision_at[1][s2] == "q2"
    assert c.evictions == [0, 1] and c.resident(1) == [6, 7]


def test_touch_feeds_the_policy_lookup_does_not():
    c = ExpertCache([2], 4, policy="lru")
    fill(c, 0, 1)
    fill(c, 0, 2)
    c.lookup(0, 1)  # no side effect: 1 stays least recent
    assert c.resident(0) == [1, 2]
    c.touch(0, 1)
    assert c.resident(0) == [2, 1]
    assert c.reserve(0, 3, "q4", prefetched=False) == c.lookup(0, 3) and c.lookup(0, 2) == -1


def test_pinned_and_in_flight_experts_are_not_victims():
    c = ExpertCache([2], 8, policy="arc")
    fill(c, 0, 1)
    loading = c.reserve(0, 2, "q4", prefetched=True)  # copy still in flight: not evictable
    assert c.reserve(0, 3, "q4", prefetched=False, pinned={1}) == -1
    assert sorted(c.resident(0)) == [1, 2] and c.evictions == [0]
    c.landed(0, loading, c.gen[0][loading])
    assert c.evictable(0, pinned={1}) == [2]
    s = c.reserve(0, 3, "q4", prefetched=False, pinned={1})
    assert s == loading and c.lookup(0, 2) == -1
    c.landed(0, s, c.gen[0][s])
    assert c.reserve(0, 4, "q4", prefetched=False, pinned=[1, 3]) == -1


def test_an_explicit_victim():
    c = ExpertCache([3], 8, policy="arc")
    for e in (1, 2, 3):
        fill(c, 0, e)
    s3 = c.lookup(0, 3)
    s = c.reserve(0, 7, "q4", prefetched=True, victim=3)  # the prediction says 3 is the least likely
    assert s == s3 and c.lookup(0, 3) == -1 and sorted(c.resident(0)) == [1, 2, 7] and c.evictions == [1]


def test_zero_slots_and_a_resident_expert():
    c = ExpertCache([0, 3], 8)
    assert c.reserve(0, 5, "q4", prefetched=False) == -1
    assert c.lookup(0, 5) == -1 and c.resident(0) == []
    c.drop(0, 5)  # dropping an absent expert is harmless
    fill(c, 1, 7, "q2")
    with pytest.raises(ValueError, match="expert 7 is already cached"):
        c.reserve(1, 7, "q4", prefetched=False)


def test_change_precision_keeps_the_slot_under_a_new_generation():
    c = ExpertCache([2], 8)
    s = fill(c, 0, 4, "q2", prefetched=True)
    gen = c.gen[0][s]
    assert c.change_precision(0, 4, "q4") == s
    assert c.precision_at[0][s] == "q4" and c.pending[0][s] and c.gen[0][s] == gen + 1
    c.landed(0, s, gen)  # a copy of the old generation landing late changes nothing
    assert c.pending[0][s]
    c.landed(0, s, gen + 1)
    assert c.ready(0, s)
    with pytest.raises(KeyError):
        c.change_precision(0, 5, "q4")


def test_drop_frees_the_slot_and_the_policy_forgets():
    c = ExpertCache([2], 8, policy="lru")
    fill(c, 0, 1)
    s = fill(c, 0, 2)
    c.drop(0, 2)
    assert c.lookup(0, 2) == -1 and 2 not in c.policies[0] and c.resident(0) == [1] and c.free_slots(0) == 1
    assert c.reserve(0, 3, "q4", prefetched=False) == s and c.evictions == [0]  # the freed slot, no eviction


def test_evictions_reach_the_stats_in_their_layer():
    seen = []
    c = ExpertCache([0, 2, 1], 8, on_evict=seen.append)
    for e in (1, 2, 3):
        fill(c, 1, e)
    fill(c, 2, 5)
    fill(c, 2, 6)
    assert seen == [1, 2] and c.evictions == [0, 1, 1]


def test_random_operations_keep_slots_consistent():
    """Thousands of reserves, landings, touches, drops and precision changes: every expert's slot holds
    that expert, no slot holds two, free + held = all, and an in-flight slot is never handed out again."""
    rng = random.Random(3)
    E = 12
    c = ExpertCache([0, 5, 3], E, policy="arc")
    for _ in range(5000):
        layer = rng.choice([1, 2])
        e = rng.randrange(E)
        s = c.lookup(layer, e)
        op = rng.random()
        if s < 0:
            pinned = set(rng.sample(range(E), 2))
            in_flight = {x for x in range(c.n_slots[layer]) if c.pending[layer][x]}
            s = c.reserve(layer, e, rng.choice(["q4", "q2"]), prefetched=op < 0.5, pinned=pinned)
            assert s < 0 or s not in in_flight
        elif c.pending[layer][s]:
            if op < 0.7:
                c.landed(layer, s, c.gen[layer][s])
        elif op < 0.6:
            c.touch(layer, e)
        elif op < 0.8:
            c.drop(layer, e)
        else:
            c.change_precision(layer, e, "q4")
        for lay in (1, 2):
            held = [x for x in range(E) if c.slot_of[lay][x] >= 0]
            slots = [c.slot_of[lay][x] for x in held]
            assert len(slots) == len(set(slots)) and all(c.expert_at[lay][c.slot_of[lay][x]] == x for x in held)
            assert sorted(slots + c._free[lay]) == list(range(c.n_slots[lay]))
            assert sorted(c.resident(lay)) == held
    assert sum(c.evictions) > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown eviction policy 'mru'"):
        ExpertCache([1], 4, policy="mru")
    with pytest.raises(ValueError, match="non-negative"):
        ExpertCache([-1], 4)
