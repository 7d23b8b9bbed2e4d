"""Expert cache bookkeeping: slots, victims, precision upgrades, drops, and two threads at once."""

from __future__ import annotations

import random
import sys
import threading

import pytest

from fate.runtime.experts.residency import Entry, ExpertCache, LayerCache


def fill(lc: LayerCache, expert: int, precision: str = "q4", **kw):
    """Reserve and pretend the copy finished."""
    got = lc.reserve(expert, precision, prefetched=kw.pop("prefetched", False), **kw)
    assert got is not None
    got[0].ready.set()
    return got


def test_reserve_uses_free_slots_then_evicts():
    lc = LayerCache(3, 2, policy="lru")
    e0, v0 = lc.reserve(10, "q4", prefetched=True)
    assert (e0.expert, e0.precision, e0.slot, e0.prefetched, e0.used, v0) == (10, "q4", 0, True, False, None)
    assert not e0.ready.is_set() and not e0.released
    e0.ready.set()
    e1, v1 = fill(lc, 11)
    assert (e1.slot, v1) == (1, None) and lc.evictions == 0
    assert lc.lookup(10) is e0 and lc.lookup(12) is None
    assert lc.resident() == [10, 11]

    e2, v2 = lc.reserve(12, "q2", prefetched=False)     # full: LRU's victim is 10, its slot is reused
    assert (v2, e2.slot, e2.precision) == (10, 0, "q2")
    assert e0.released and lc.lookup(10) is None and lc.evictions == 1
    assert lc.resident() == [11, 12] and len(lc) == 2


def test_touch_marks_use_and_feeds_the_policy_lookup_does_not():
    lc = LayerCache(0, 2, policy="lru")
    a, _ = fill(lc, 1)
    fill(lc, 2)
    lc.lookup(1)                                          # no side effect: 1 stays least recent
    assert lc.resident() == [1, 2]
    lc.touch(1)
    assert a.used and lc.resident() == [2, 1]
    _, victim = fill(lc, 3)
    assert victim == 2
    with pytest.raises(KeyError, match="expert 9 is not in the cache"):
        lc.touch(9)


def test_pinned_and_loading_entries_are_not_victims():
    lc = LayerCache(1, 2, policy="arc")
    fill(lc, 1)
    loading, _ = lc.reserve(2, "q4", prefetched=True)    # copy still in flight: not evictable
    assert lc.reserve(3, "q4", prefetched=False, pinned={1}) is None
    assert lc.resident() and sorted(lc.resident()) == [1, 2] and lc.evictions == 0
    loading.ready.set()
    e, victim = lc.reserve(3, "q4", prefetched=False, pinned={1})
    assert victim == 2 and e.slot == loading.slot and loading.released
    e.ready.set()
    assert lc.reserve(4, "q4", prefetched=False, pinned=[1, 3]) is None


def test_zero_slots():
    lc = LayerCache(0, 0)
    assert lc.reserve(5, "q4", prefetched=False) is None
    assert lc.lookup_or_reserve(5, "q4", prefetched=True) is None
    assert lc.lookup(5) is None and lc.resident() == [] and len(lc) == 0
    lc.drop(5)


def test_reserve_of_a_resident_expert():
    lc = LayerCache(2, 3)
    e, _ = fill(lc, 7, "q2")
    with pytest.raises(ValueError, match="expert 7 is already cached"):
        lc.reserve(7, "q4", prefetched=False)
    got, victim, fresh = lc.lookup_or_reserve(7, "q4", prefetched=False)
    assert got is e and victim is None and not fresh and got.precision == "q2"
    new, victim, fresh = lc.lookup_or_reserve(8, "q4", prefetched=True)
    assert fresh and victim is None and new.slot == 1 and not new.ready.is_set()


def test_replace_precision_keeps_the_slot():
    lc = LayerCache(0, 2)
    old, _ = fill(lc, 4, "q2", prefetched=True)
    lc.touch(4)
    new = lc.replace_precision(4, "q4")
    assert (new.expert, new.slot, new.precision, new.prefetched, new.used) == (4, old.slot, "q4", True, False)
    assert not new.ready.is_set()
    assert old.released and old.ready.is_set()           # nobody stays blocked on the superseded entry
    assert lc.lookup(4) is new and lc.resident() == [4]
    assert lc.replace_precision(4, "q4", prefetched=False).prefetched is False
    with pytest.raises(KeyError):
        lc.replace_precision(5, "q4")


def test_drop_frees_the_slot_and_the_policy_forgets():
    lc = LayerCache(0, 2, policy="lru")
    a, _ = fill(lc, 1)
    waiting, _ = lc.reserve(2, "q4", prefetched=True)   # a copy that will fail
    lc.drop(2)
    assert waiting.released and waiting.ready.is_set()   # a waiter wakes up and sees it is gone
    assert lc.lookup(2) is None and 2 not in lc.policy and lc.resident() == [1]
    e, victim = lc.reserve(3, "q4", prefetched=False)
    assert victim is None and e.slot == waiting.slot     # the freed slot, no eviction
    lc.drop(2)                                           # dropping an absent expert is harmless
    lc.drop(1)
    assert a.released and lc.resident() == [3]
    assert lc.evictions == 0


def test_reserve_flow_with_arc_and_upgrade():
    """Prefill loads a cold expert as INT2, decode upgrades it in place; ARC keeps the hot one."""
    lc = LayerCache(5, 2, policy="arc")
    fill(lc, 1, "q4")
    lc.touch(1)                                          # 1 in T2
    fill(lc, 2, "q2", prefetched=True)                   # 2 in T1
    e3, victim = fill(lc, 3, "q4")                       # |T1| = 1 > p = 0: 2 goes, 1 stays
    assert victim == 2 and lc.lookup(1) is not None
    up = lc.replace_precision(1, "q4")
    up.ready.set()
    assert sorted(lc.resident()) == [1, 3]
    assert {e.slot for e in lc.entries()} == {0, 1}


def test_concurrent_reserve_never_shares_a_slot():
    """A prefetcher thread and a forward-pass thread reserve, touch and drop at once.  Each thread uses
    its own expert ids (as the two roles do for a given expert at a given moment), so the test can
    check, race-free, that a slot handed out was not still owned: a fresh entry's slot may only have
    been held by an entry that is now released, because nothing can take a slot whose copy has not
    finished (ready is set only after the check)."""
    n_slots = 6
    lc = LayerCache(0, n_slots, policy="arc")
    owner: list[Entry | None] = [None] * n_slots
    errors: list[str] = []
    start = threading.Barrier(2)

    def worker(base: int, seed: int):
        try:
            work(base, seed)
        except Exception as e:  # an exception in a thread would otherwise pass unnoticed
            errors.append(f"{type(e).__name__}: {e}")

    def work(base: int, seed: int):
        rng = random.Random(seed)
        mine = list(range(base, base + 10))
        start.wait()
        for _ in range(3000):
            x = rng.choice(mine)
            pinned = set(rng.sample(mine, 2))
            if rng.random() < 0.5:
                got = lc.lookup_or_reserve(x, "q4", prefetched=True, pinned=pinned)
                if got is None:
                    continue
                entry, _, fresh = got
            else:
                if lc.lookup(x) is not None:
                    try:
                        lc.touch(x)
                    except KeyError:                     # the other thread evicted it meanwhile
                        pass
                    continue
                got = lc.reserve(x, "q4", prefetched=False, pinned=pinned)
                if got is None:
                    continue
                entry, fresh = got[0], True
            if not fresh:
                continue
            prev = owner[entry.slot]
            if prev is not None and not prev.released:
                errors.append(f"slot {entry.slot} given to {entry.expert} while {prev.expert} holds it")
            owner[entry.slot] = entry
            entry.ready.set()
            if rng.random() < 0.05:
                lc.drop(x)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)                          # interleave the two threads as much as possible
    try:
        threads = [threading.Thread(target=worker, args=(0, 1)), threading.Thread(target=worker, args=(100, 2))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)

    assert not errors, errors[:5]
    entries = lc.entries()
    slots = [e.slot for e in entries]
    assert len(slots) == len(set(slots)) and len(entries) <= n_slots
    assert sorted(lc.resident()) == sorted(e.expert for e in entries)
    assert sorted(slots + lc._free) == list(range(n_slots))
    assert all(not e.released for e in entries)
    assert lc.evictions > 0


def test_expert_cache_layers():
    ec = ExpertCache([0, 4, 2], policy="lfu")
    assert len(ec) == 3 and ec.slots_per_layer == [0, 4, 2] and ec.total_slots == 6
    assert ec.layer(0).reserve(1, "q4", prefetched=False) is None   # a dense layer caches nothing
    assert ec.layer(1).policy.name == "lfu" and ec.layer(1).layer == 1
    for x in (1, 2, 3):
        fill(ec.layer(2), x)
    assert ec.evictions == 1
    with pytest.raises(IndexError, match="layer 3 is outside the cache's 3 layers"):
        ec.layer(3)
    with pytest.raises(ValueError, match="unknown eviction policy 'mru'"):
        ExpertCache([1], policy="mru")
    with pytest.raises(ValueError, match="non-negative"):
        LayerCache(0, -1)
