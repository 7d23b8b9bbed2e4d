"""Eviction policies: hand-worked traces, ARC against a literal transcription of the paper, invariants — each on
the Python reference and on the native classes — and the native classes against the reference, step by step."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections import OrderedDict

import pytest

from fate.runtime.experts import copier
from fate.runtime.experts.evict import (ARCPolicy, EvictionPolicy, LFUPolicy, LRFUPolicy, LRUPolicy, make_policy,
                                       native_policies)

NATIVE = copier.available()
needs_native = pytest.mark.skipif(not NATIVE, reason=f"native extension not built: {copier.why}")
IMPLS = ["py", pytest.param("native", marks=needs_native)]  # the Python reference, the native classes
N_KEYS = 128  # the native policies' key range in the behaviour tests


def new(name: str, capacity: int, impl: str, n_keys: int = N_KEYS) -> EvictionPolicy:
    return make_policy(name, capacity, n_keys=n_keys, native=impl == "native")


def request(pol: EvictionPolicy, key: int, pinned=()) -> str:
    """Drive a policy the way the cache does; returns 'hit', 'fill', 'miss' (evicted) or 'bypass'."""
    if key in pol:
        pol.hit(key)
        return "hit"
    if len(pol) < pol.capacity:
        pol.admit(key)
        return "fill"
    victim = pol.evict(key, lambda k: k not in pinned)
    if victim is None:
        return "bypass"
    pol.admit(key)
    return "miss"


def arc_state(a):
    return list(a.t1), list(a.t2), list(a.b1), list(a.b2), a.p


# ---------------------------------------------------------------------------------------------- LRU

@pytest.mark.parametrize("impl", IMPLS)
def test_lru_hand_trace(impl):
    lru = new("lru", 3, impl)
    for k in (1, 2, 3):
        lru.admit(k)
    assert lru.resident() == [1, 2, 3]          # admitted in order, 1 least recent
    lru.hit(1)
    assert lru.resident() == [2, 3, 1]          # the use of 1 makes it most recent
    assert lru.evict(4, lambda k: True) == 2    # 2 is now least recent
    lru.admit(4)
    assert lru.resident() == [3, 1, 4]
    lru.hit(3)
    assert lru.resident() == [1, 4, 3]
    assert lru.evict(5, lambda k: k != 1) == 4  # 1 is least recent but pinned: the next one goes
    lru.admit(5)
    assert lru.resident() == [1, 3, 5]
    assert lru.evict(6, lambda k: False) is None  # everything pinned: nothing goes, nothing changes
    assert lru.resident() == [1, 3, 5] and len(lru) == 3
    lru.discard(3)                              # dropped, not a victim: the slot is simply free
    assert lru.resident() == [1, 5] and 3 not in lru
    lru.admit(6)
    assert lru.resident() == [1, 5, 6]


# ---------------------------------------------------------------------------------------------- LFU

@pytest.mark.parametrize("impl", IMPLS)
def test_lfu_hand_trace(impl):
    lfu = new("lfu", 3, impl)
    for k in (1, 2, 3):
        lfu.admit(k)                            # counts 1:1 2:1 3:1
    assert lfu.resident() == [1, 2, 3]          # all tied: least recent first
    lfu.hit(1); lfu.hit(1); lfu.hit(2)          # counts 1:3 2:2 3:1
    assert lfu.resident() == [3, 2, 1]
    assert lfu.evict(4, lambda k: True) == 3    # lowest count
    lfu.admit(4)                                # counts 4:1 2:2 1:3
    assert lfu.resident() == [4, 2, 1]
    lfu.hit(4)                                  # 4:2 ties with 2:2; 2 was used longer ago
    assert lfu.resident() == [2, 4, 1]
    assert lfu.evict(5, lambda k: True) == 2    # tie broken by least recent use
    lfu.admit(5)                                # counts 5:1 4:2 1:3
    assert lfu.evict(6, lambda k: k != 5) == 4  # 5 is pinned: the next lowest count goes
    lfu.admit(6)                                # counts 5:1 6:1 1:3
    assert lfu.resident() == [5, 6, 1]
    assert lfu.evict(2, lambda k: False) is None
    lfu.hit(5)                                  # 5:2
    assert lfu.evict(2, lambda k: True) == 6
    lfu.admit(2)                                # 2 comes back with a fresh count of 1 (in-cache LFU)
    assert lfu.count(2) == 1 and lfu.resident() == [2, 5, 1]
    lfu.discard(1)
    assert lfu.count(1) == 0 and lfu.resident() == [2, 5]


# ---------------------------------------------------------------------------------------------- ARC

@pytest.mark.parametrize("impl", IMPLS)
def test_arc_hand_trace(impl):
    """c = 3; lists are written least recent first; (T1, T2, B1, B2, p) after each request."""
    a = new("arc", 3, impl)

    def step(key, pinned=()):
        return request(a, key, pinned)

    # Cold start: new keys go to T1 while slots are free.
    assert [step(k) for k in (1, 2, 3)] == ["fill"] * 3
    assert arc_state(a) == ([1, 2, 3], [], [], [], 0)
    # 1 is used again: promoted from T1 to the MRU end of T2.
    assert step(1) == "hit"
    assert arc_state(a) == ([2, 3], [1], [], [], 0)
    # New 4, cache full: |T1| = 2 > p = 0, so REPLACE takes T1's LRU (2) into B1.
    assert step(4) == "miss"
    assert arc_state(a) == ([3, 4], [1], [2], [], 0)
    # 2 is a B1 ghost hit: p += max(|B2|/|B1|, 1) = max(0/1, 1) → p = 1, *then* REPLACE:
    # |T1| = 2 > 1 → T1's LRU 3 goes to B1; 2 moves from B1 to T2.
    assert step(2) == "miss"
    assert arc_state(a) == ([4], [1, 2], [3], [], 1)
    # New 5: |T1| = 1 is not > p = 1 and 5 is not in B2, so this time T2's LRU (1) goes, to B2.
    assert step(5) == "miss"
    assert arc_state(a) == ([4, 5], [2], [3], [1], 1)
    # 1 is a B2 ghost hit: p -= max(|B1|/|B2|, 1) = max(1/1, 1) → p = 0, then REPLACE:
    # |T1| = 2 > 0 → 4 goes to B1; 1 moves from B2 to T2.
    assert step(1) == "miss"
    assert arc_state(a) == ([5], [2, 1], [3, 4], [], 0)
    # New 6: 5 goes to B1 (|T1| = 1 > 0) which makes |T1| + |B1| = 0 + 3 = c: case IV.A drops
    # B1's LRU ghost (3) before 6 enters T1.
    assert step(6) == "miss"
    assert arc_state(a) == ([6], [2, 1], [4, 5], [], 0)
    # 4 is a B1 ghost hit: p = 0 + max(0/2, 1) = 1; |T1| = 1 is not > 1 → T2's LRU 2 goes to B2.
    assert step(4) == "miss"
    assert arc_state(a) == ([6], [1, 4], [5], [2], 1)
    # New 7: |T1| = 1 is not > 1 → T2's LRU 1 goes to B2; |T1|+|B1| = 2 < 3, total 5 < 6: no trim.
    assert step(7) == "miss"
    assert arc_state(a) == ([6, 7], [4], [5], [2, 1], 1)
    # Hits on 6 and 7 promote both to T2.
    assert step(6) == "hit" and step(7) == "hit"
    assert arc_state(a) == ([], [4, 6, 7], [5], [2, 1], 1)
    # New 9: T1 is empty → T2's LRU 4 goes to B2.  Now |T1| + |B1| = 1 < c but the directory holds
    # 0 + 2 + 1 + 3 = 2c entries: case IV.B drops B2's LRU ghost (2).
    assert step(9) == "miss"
    assert arc_state(a) == ([9], [6, 7], [5], [1, 4], 1)
    # 5 is a B1 ghost hit with |B2| = 2, |B1| = 1: p = 1 + max(2/1, 1) = 3; |T1| = 1 ≤ 3 → 6 to B2.
    assert step(5) == "miss"
    assert arc_state(a) == ([9], [7, 5], [], [1, 4, 6], 3)
    # 1 is a B2 ghost hit: p = 3 - max(0/3, 1) = 2; |T1| = 1 < 2 → T2's LRU 7 goes to B2.
    assert step(1) == "miss"
    assert arc_state(a) == ([9], [5, 1], [], [4, 6, 7], 2)
    # 4 is a B2 ghost hit: p = 2 - 1 = 1.  Now |T1| = 1 == p and the key came from B2: the tie rule
    # sends T1's LRU (9) to B1.
    assert step(4) == "miss"
    assert arc_state(a) == ([], [5, 1, 4], [9], [6, 7], 1)
    # 6 (B2): p = 1 - max(1/2, 1) = 0; T1 empty → 5 to B2.  7 (B2): p would go below 0, clamped.
    assert step(6) == "miss"
    assert arc_state(a) == ([], [1, 4, 6], [9], [7, 5], 0)
    assert step(7) == "miss"
    assert arc_state(a) == ([], [4, 6, 7], [9], [5, 1], 0)
    # 9 (B1) with |B2| = 2, |B1| = 1: p = 0 + max(2/1, 1) = 2; T1 is empty → T2's LRU 4 goes to B2.
    assert step(9) == "miss"
    assert arc_state(a) == ([], [6, 7, 9], [], [5, 1, 4], 2)


@pytest.mark.parametrize("impl", IMPLS)
def test_arc_clamps_p_at_capacity(impl):
    """c = 3: a B1 ghost hit whose step would carry p past c stops at c."""
    a = new("arc", 3, impl)
    trace = [
        (4, ([4], [], [], [], 0)),
        (3, ([4, 3], [], [], [], 0)),
        (4, ([3], [4], [], [], 0)),                 # promotion to T2
        (1, ([3, 1], [4], [], [], 0)),              # full
        (6, ([1, 6], [4], [3], [], 0)),             # |T1| = 2 > 0: 3 to B1
        (6, ([1], [4, 6], [3], [], 0)),
        (0, ([0], [4, 6], [3, 1], [], 0)),          # |T1| = 1 > 0: 1 to B1
        (3, ([0], [6, 3], [1], [4], 1)),            # B1 hit: p = 0 + max(0/2, 1); |T1| = 1 ≤ 1: 4 to B2
        (2, ([0, 2], [3], [1], [4, 6], 1)),         # |T1| = 1 ≤ 1: 6 to B2
        (1, ([0, 2], [1], [], [4, 6, 3], 3)),       # B1 hit: p = 1 + max(2/1, 1) = 3; 3 to B2
        (6, ([2], [1, 6], [0], [4, 3], 2)),         # B2 hit: p = 3 - 1; |T1| = 2 == p, x from B2: T1's 0
        (0, ([2], [6, 0], [], [4, 3, 1], 3)),       # B1 hit: p = min(3, 2 + max(2/1, 1)) = 3, clamped
    ]
    for key, state in trace:
        request(a, key)
        assert arc_state(a) == state, key


@pytest.mark.parametrize("impl", IMPLS)
def test_arc_pinned_falls_back_to_other_list(impl):
    a = new("arc", 3, impl)
    for k in (1, 2, 3):
        request(a, k)
    request(a, 1)                                # T1 [2, 3], T2 [1], p = 0 → REPLACE prefers T1
    assert a.evict(4, lambda k: k not in (2, 3)) == 1   # T1 all pinned: T2's LRU goes, to B2
    a.admit(4)
    assert arc_state(a) == ([2, 3, 4], [], [], [1], 0)
    assert a.evict(5, lambda k: k != 2) == 3     # T1's LRU 2 pinned: the next one in T1
    a.admit(5)                                   # |T1| was c (case IV.A, T1 full): 3 leaves no ghost
    assert arc_state(a) == ([2, 4, 5], [], [], [1], 0)


def _arc_with_a_b1_ghost(impl):
    a = new("arc", 2, impl)
    for k in (1, 2, 1, 3):
        request(a, k)                            # 1 promoted to T2; new 3: |T1| = 1 > 0 → 2 to B1
    assert arc_state(a) == ([3], [1], [2], [], 0)
    return a


@pytest.mark.parametrize("impl", IMPLS)
def test_arc_refused_ghost_request_leaves_no_trace(impl):
    a = _arc_with_a_b1_ghost(impl)
    assert a.evict(2, lambda k: False) is None   # everything pinned: p must not move
    assert arc_state(a) == ([3], [1], [2], [], 0)
    # Now the request goes through: p = 0 + max(0/1, 1) = 1 first, so |T1| = 1 is not > p and
    # REPLACE takes T2's 1 (with p still 0 it would have taken 3 from T1) …
    assert a.evict(2, lambda k: True) == 1
    assert a.p == 1
    a.admit(2)                                   # … and admit does not adapt p a second time.
    assert arc_state(a) == ([3], [2], [], [1], 1)


@pytest.mark.parametrize("impl", IMPLS)
def test_arc_ghost_hit_with_a_free_slot_adapts_in_admit(impl):
    a = _arc_with_a_b1_ghost(impl)
    a.discard(3)                                 # a slot is free again; 3 is forgotten entirely
    assert arc_state(a) == ([], [1], [2], [], 0)
    a.admit(2)                                   # no evict(): admit performs the B1 adaptation
    assert arc_state(a) == ([], [1, 2], [], [], 1)


@pytest.mark.parametrize("impl", IMPLS)
def test_arc_an_abandoned_ghost_eviction(impl):
    """evict(x) for a ghost adapts p once for x's request, however often it is repeated before x is
    admitted; any other eviction in between ends that request, so a later admit(x) adapts afresh."""
    a = _arc_with_a_b1_ghost(impl)
    assert a.evict(2) == 1                       # p = 0 + max(0/1, 1) = 1; |T1| = 1 ≤ p → T2's 1 to B2
    assert arc_state(a) == ([3], [], [2], [1], 1)
    assert a.evict(2) == 3                       # the same request again (its load failed): no second step
    assert arc_state(a) == ([], [], [2, 3], [1], 1)
    a.admit(3)                                   # another key's admission ends 2's request (3 is a B1 ghost)
    assert arc_state(a) == ([], [3], [2], [1], 2)
    assert a.evict(5) == 3 and a.p == 2          # fresh 5; T1 empty → T2's 3 to B2
    a.admit(2)                                   # B1 hit, a free slot: admit adapts, p = min(2, 2 + 2/1)
    assert arc_state(a) == ([], [2], [], [1, 3], 2)
    b = _arc_with_a_b1_ghost(impl)
    assert b.evict(2) == 1 and b.evict(5) == 3   # the fresh 5's eviction ends 2's request …
    b.admit(2)                                   # … so 2's admission adapts: p = min(2, 1 + max(1/2, 1))
    assert arc_state(b) == ([], [2], [3], [1], 2)


class PaperARC:
    """ARC exactly as printed in Megiddo & Modha (FAST 2003), Fig. 4, for comparison."""

    def __init__(self, c):
        self.c, self.p = c, 0.0
        self.T1, self.T2, self.B1, self.B2 = (OrderedDict() for _ in range(4))

    def _replace(self, x):
        if self.T1 and (len(self.T1) > self.p or (x in self.B2 and len(self.T1) == self.p)):
            k, _ = self.T1.popitem(last=False)
            self.B1[k] = None
        else:
            k, _ = self.T2.popitem(last=False)
            self.B2[k] = None

    def request(self, x):
        c = self.c
        if x in self.T1 or x in self.T2:                                  # case I
            self.T1.pop(x, None); self.T2.pop(x, None); self.T2[x] = None
            return True
        if x in self.B1:                                                  # case II
            self.p = min(c, self.p + max(len(self.B2) / len(self.B1), 1))
            self._replace(x)
            del self.B1[x]; self.T2[x] = None
            return False
        if x in self.B2:                                                  # case III
            self.p = max(0, self.p - max(len(self.B1) / len(self.B2), 1))
            self._replace(x)
            del self.B2[x]; self.T2[x] = None
            return False
        l1, total = len(self.T1) + len(self.B1), len(self.T1) + len(self.T2) + len(self.B1) + len(self.B2)
        if l1 == c:                                                       # case IV.A
            if len(self.T1) < c:
                self.B1.popitem(last=False)
                self._replace(x)
            else:
                self.T1.popitem(last=False)
        elif total >= c:                                                  # case IV.B
            if total == 2 * c:
                self.B2.popitem(last=False)
            self._replace(x)
        self.T1[x] = None
        return False


@pytest.mark.parametrize("c", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("impl", IMPLS)
def test_arc_matches_the_paper_on_random_traces(c, impl):
    rng = random.Random(c)
    ours, ref = new("arc", c, impl), PaperARC(c)
    universe = 3 * c + 2
    for _ in range(3000):
        # a skewed key distribution so that hits, ghost hits and fresh keys all happen
        x = int(rng.paretovariate(1.2)) % universe if rng.random() < 0.7 else rng.randrange(universe)
        assert (request(ours, x) == "hit") == ref.request(x)
        assert arc_state(ours) == (list(ref.T1), list(ref.T2), list(ref.B1), list(ref.B2), ref.p)


@pytest.mark.parametrize("c", [0, 1, 2, 4, 7])
@pytest.mark.parametrize("impl", IMPLS)
def test_arc_invariants_on_random_traces_with_pins_and_discards(c, impl):
    rng = random.Random(1000 + c)
    a = new("arc", c, impl)
    universe = 3 * c + 3
    for _ in range(4000):
        x = rng.randrange(universe)
        r = rng.random()
        if r < 0.05:
            a.discard(x)
        else:
            pinned = set(rng.sample(range(universe), rng.randrange(0, c + 2)))
            pinned.discard(x)
            res = request(a, x, pinned)
            assert res in ("hit", "fill", "miss") or (res == "bypass" and all(k in pinned for k in a.resident()))
        t1, t2, b1, b2 = set(a.t1), set(a.t2), set(a.b1), set(a.b2)
        assert len(t1) + len(t2) <= c
        assert len(t1) + len(b1) <= c
        assert len(t1) + len(t2) + len(b1) + len(b2) <= 2 * c
        assert 0 <= a.p <= c
        assert len(t1 | t2 | b1 | b2) == len(t1) + len(t2) + len(b1) + len(b2)  # disjoint
        assert len(a) == len(t1 | t2) and sorted(a.resident()) == sorted(t1 | t2)


def _hit_rates(pol, trace, hot):
    hits = [request(pol, k) == "hit" for k in trace]
    hot_hits = [h for h, k in zip(hits, trace) if k in hot]
    return sum(hits) / len(hits), sum(hot_hits) / len(hot_hits)


@pytest.mark.parametrize("impl", IMPLS)
def test_arc_keeps_the_hot_set_through_a_looping_scan_where_lru_thrashes(impl):
    c = 8
    rng = random.Random(7)
    hot = {100, 101, 102}
    trace = []
    for _ in range(100):
        for k in range(c + 1):               # a loop over c + 1 keys: LRU's worst case
            trace.append(k)
            if rng.random() < 0.5:
                trace.append(rng.choice(sorted(hot)))
    arc_all, arc_hot = _hit_rates(new("arc", c, impl), trace, hot)
    lru_all, lru_hot = _hit_rates(new("lru", c, impl), trace, hot)
    assert arc_hot > 0.97                    # the hot set lives in T2 and stays there
    assert lru_hot < 0.8                     # the scan keeps pushing hot keys out of LRU
    assert arc_all > lru_all + 0.05


# --------------------------------------------------------------------------------------------- LRFU

@pytest.mark.parametrize("impl", IMPLS)
def test_lrfu_hand_trace(impl):
    pol = new("lrfu", 2, impl)                   # half-life 8 requests: each request multiplies scores by d
    d = 0.5 ** (1 / 8)
    assert pol.half_life == 8.0
    pol.admit(1)                                 # clock 1: 1 -> 1
    pol.admit(2)                                 # clock 2: 1 -> d, 2 -> 1
    assert pol.resident() == [1, 2] and pol.score(1) == d and pol.score(2) == 1.0
    pol.hit(1)                                   # clock 3: 1 -> d*d + 1, 2 -> d
    assert pol.score(1) == d ** 2 + 1 and pol.resident() == [2, 1]
    assert pol.evict(3, lambda k: True) == 2     # the lowest score
    pol.admit(3)                                 # clock 4: 3 -> 1, 1 -> (d*d + 1) * d
    assert pol.resident() == [3, 1] and pol.score(2) == 0.0
    for _ in range(3):
        pol.hit(3)                               # clock 7: 3 -> 1*d^3 + d^2 + d + 1
    assert pol.resident() == [1, 3]
    assert pol.evict(4, lambda k: k != 1) == 3   # 1 is pinned: the next lowest goes
    pol.admit(4)
    assert pol.evict(5, lambda k: False) is None and sorted(pol.resident()) == [1, 4]


@pytest.mark.parametrize("impl", IMPLS)
def test_lrfu_keeps_a_popular_key_through_a_burst_and_lets_an_old_one_go(impl):
    """Between LRU and LFU: two fresh keys in a row evict LRU's most used key but not LRFU's; a key used
    often long ago, then no more, keeps LFU's slot for good (three keys taking turns share the other two)
    but leaves LRFU's once its uses have aged."""
    def run(name):
        pol = new(name, 3, impl)
        for k in (0, 0, 0, 0, 1, 2):  # 0 used four times, then 1 and 2
            request(pol, k)
        burst = [request(pol, k) for k in (3, 4)] and (0 in pol)  # two fresh keys: is 0 still there?
        for _ in range(20):  # 0 is never asked for again; 5, 6 and 7 take turns, one slot short
            for k in (5, 6, 7):
                request(pol, k)
        return burst, 0 in pol
    assert run("lru") == (False, False)   # recency: the burst evicts the most used key
    assert run("lfu") == (True, True)     # counts: 0 squats a slot forever
    assert run("lrfu") == (True, False)   # both: 0 survives the burst, and goes once its uses age


@pytest.mark.parametrize("impl", IMPLS)
def test_lrfu_order_kept_between_uses_is_the_order_of_the_scores_now(impl):
    """The order LRFU keeps as keys are used (a log-domain key that does not change between a key's own uses)
    is the order of the scores now, lowest first, after every step of a long skewed sequence — including
    keys untouched for hundreds of requests, whose scores have all decayed by the same factor since."""
    rng = random.Random(5)
    pol = new("lrfu", 6, impl)
    lowest, order = 0, []
    for step in range(3000):
        k = min(19, int(rng.paretovariate(1.1))) if rng.random() < 0.8 else rng.randrange(20)
        if k in pol:
            pol.hit(k)
        else:
            if len(pol) == pol.capacity:
                victim = pol.evict(k, lambda x: True)
                lowest += victim == order[0]
            pol.admit(k)
        order = pol.resident()
        scores = [pol.score(x) for x in order]
        assert all(a <= b * (1 + 1e-12) for a, b in zip(scores, scores[1:])), (step, order, scores)
    assert lowest > 500  # evictions happened, each of the lowest score


def test_fate_caches_by_lrfu_and_the_paper_by_arc():
    from fate.runtime.options import EngineOptions

    assert EngineOptions(policy="fate").eviction() == "lrfu"
    assert EngineOptions(policy="paper").eviction() == "arc"
    assert EngineOptions(policy="lru", evict="lrfu").eviction() == "lru"  # the baseline stays LRU
    assert EngineOptions(policy="fate", evict="arc").eviction() == "arc"


# ------------------------------------------------------------------------------------ all policies

@pytest.mark.parametrize("name", ["arc", "lru", "lfu", "lrfu"])
@pytest.mark.parametrize("impl", IMPLS)
def test_pinned_keys_are_never_evicted(name, impl):
    rng = random.Random(3)
    pol = new(name, 4, impl)
    for _ in range(2000):
        x = rng.randrange(12)
        pinned = set(rng.sample(range(12), rng.randrange(0, 6))) - {x}
        before = set(pol.resident())
        res = request(pol, x, pinned)
        after = set(pol.resident())
        assert before - after <= before - pinned   # whatever left was not pinned
        if res == "bypass":
            assert before <= pinned and after == before
        assert len(pol) <= 4


@pytest.mark.parametrize("name", ["arc", "lru", "lfu", "lrfu"])
@pytest.mark.parametrize("impl", IMPLS)
def test_evict_returns_none_when_all_pinned(name, impl):
    pol = new(name, 2, impl)
    pol.admit(1)
    pol.admit(2)
    assert pol.evict(3, lambda k: False) is None
    assert sorted(pol.resident()) == [1, 2]
    assert pol.evict(3, lambda k: k == 2) == 2


@pytest.mark.parametrize("name", ["arc", "lru", "lfu", "lrfu"])
@pytest.mark.parametrize("impl", IMPLS)
def test_capacity_zero(name, impl):
    pol = new(name, 0, impl)
    for k in range(5):
        assert request(pol, k) == "bypass"
        assert pol.evict(k, lambda _: True) is None
    assert len(pol) == 0 and pol.resident() == [] and 3 not in pol
    with pytest.raises(ValueError, match="full cache"):
        pol.admit(1)


@pytest.mark.parametrize("name", ["arc", "lru", "lfu", "lrfu"])
@pytest.mark.parametrize("impl", IMPLS)
def test_misuse_is_reported(name, impl):
    pol = new(name, 2, impl)
    pol.admit(1)
    with pytest.raises(ValueError, match="already resident"):
        pol.admit(1)
    with pytest.raises(ValueError, match="resident"):
        pol.evict(1, lambda k: True)
    with pytest.raises(KeyError):
        pol.hit(9)
    pol.discard(9)                            # forgetting an unknown key is harmless
    pol.admit(2)
    with pytest.raises(ValueError, match="full cache"):
        pol.admit(3)


def test_make_policy():
    assert isinstance(make_policy("arc", 4), ARCPolicy)
    assert isinstance(make_policy("LRU", 4), LRUPolicy)
    assert isinstance(make_policy(" lfu ", 4), LFUPolicy)
    assert make_policy("arc", 4).capacity == 4
    assert isinstance(make_policy("arc", 1), EvictionPolicy)
    assert isinstance(make_policy("LRFU", 4), LRFUPolicy)
    with pytest.raises(ValueError, match="unknown eviction policy 'fifo'; use one of arc, lru, lfu, lrfu"):
        make_policy("fifo", 4)
    with pytest.raises(ValueError, match="non-negative"):
        make_policy("lru", -1)


@pytest.mark.parametrize("name", ["arc", "lru", "lfu", "lrfu"])
def test_make_policy_picks_the_native_class_given_the_key_range(name):
    classes = native_policies()
    assert (classes is not None) == NATIVE
    pol = make_policy(name, 3, n_keys=8)
    assert type(pol) is (classes[name] if NATIVE else type(make_policy(name, 3)))
    assert isinstance(pol, EvictionPolicy) and pol.name == name and pol.capacity == 3
    assert type(make_policy(name, 3, n_keys=8, native=False)) is type(make_policy(name, 3))
    with pytest.raises(ValueError, match="needs n_keys"):
        make_policy(name, 3, native=True)
    with pytest.raises(ValueError, match="n_keys must be a non-negative integer"):
        make_policy(name, 3, n_keys=-1)
    with pytest.raises(ValueError, match="non-negative"):
        make_policy(name, -1, n_keys=8)


def test_without_the_extension_the_cache_runs_the_python_reference():
    code = ("from fate.runtime.experts.residency import ExpertCache\n"
            "from fate.runtime.experts.evict import make_policy\n"
            "print(type(ExpertCache([2], 8, policy='lfu').policies[0]).__name__, "
            "type(make_policy('arc', 2, n_keys=8)).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "FATE_NATIVE": "0"}).stdout
    assert out.split() == ["LFUPolicy", "ARCPolicy"]


# ------------------------------------------------------------------------- native against the reference

def _outcome(fn):
    """What a call returned, or the type and message of what it raised."""
    try:
        return "ok", fn()
    except Exception as e:  # noqa: BLE001 - any error: the other implementation must raise the same
        return type(e), str(e)


def _state(pol, name: str, n_keys: int):
    st = [pol.resident(), len(pol), [k for k in range(n_keys) if k in pol]]
    if name == "arc":
        st += [pol.p.hex(), pol.t1, pol.t2, pol.b1, pol.b2]  # hex: p to the bit
    if name == "lfu":
        st.append([pol.count(k) for k in range(n_keys)])
    if name == "lrfu":
        st.append([pol.score(k).hex() for k in range(n_keys)])  # the scores to the bit
    return st


class _Asked:
    """An evictable callable that records what it was asked and can raise at its n-th call."""

    def __init__(self, pinned, fail_at=-1):
        self.pinned, self.fail_at, self.asked = pinned, fail_at, []

    def __call__(self, k):
        self.asked.append(k)
        if len(self.asked) == self.fail_at:
            raise ZeroDivisionError(f"asked {k}")
        return k not in self.pinned


@needs_native
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("c", [0, 1, 2, 3, 5, 8])
@pytest.mark.parametrize("name", ["arc", "lru", "lfu", "lrfu"])
def test_native_policies_decide_exactly_as_the_reference(name, c, seed):
    rng = random.Random(f"{name}/{c}/{seed}")
    n_keys = 3 * c + 4
    pols = make_policy(name, c, n_keys=n_keys, native=False), make_policy(name, c, n_keys=n_keys, native=True)
    slot_of = [rng.randrange(-n_keys, n_keys) for _ in range(n_keys)]  # where evict_where reads each key's pending
    pending = [False] * n_keys

    def both(op):
        a, b = (_outcome(lambda: op(pol)) for pol in pols)
        assert a == b
        return a

    for step in range(3000):
        # a skewed key distribution: hits, ghost hits and fresh keys all happen
        x = int(rng.paretovariate(1.1)) % n_keys if rng.random() < 0.7 else rng.randrange(n_keys)
        pending[rng.randrange(n_keys)] = rng.random() < 0.3
        if rng.random() < 0.1:  # everything pinned: the request is refused
            pinned = set(range(n_keys)) - {x}
        else:
            pinned = set(rng.sample(range(n_keys), rng.randrange(c + 2)))
        pinned = rng.choice([set, frozenset, list, tuple])(pinned)
        r = rng.random()
        if r < 0.04:
            both(lambda pol: pol.discard(x))
        elif r < 0.12:  # calls out of turn: errors, or evictions while a slot is free
            op = rng.choice(["admit", "hit", "evict", "evict"])
            both(lambda pol: pol.evict(x) if op == "evict" else getattr(pol, op)(x))
        elif x in pols[0]:
            both(lambda pol: pol.hit(x))
        elif len(pols[0]) < c:
            both(lambda pol: pol.admit(x))
        else:
            mode = rng.random()
            if mode < 0.4:  # an evictable callable: asked the same keys in the same order
                fail_at = rng.randrange(1, 4) if rng.random() < 0.05 else -1
                asks = [_Asked(pinned, fail_at) for _ in pols]
                res = both(lambda pol: pol.evict(x, asks[0] if pol is pols[0] else asks[1]))
                assert asks[0].asked == asks[1].asked
            elif mode < 0.9:  # the cache's call
                res = both(lambda pol: pol.evict_where(x, pinned, pending, slot_of))
            else:
                res = both(lambda pol: pol.evict(x))
            if res[0] == "ok" and res[1] is not None and rng.random() < 0.9:  # else the load "failed"
                both(lambda pol: pol.admit(x))
        assert _state(pols[0], name, n_keys) == _state(pols[1], name, n_keys), step


@needs_native
@pytest.mark.parametrize("name", ["arc", "lru", "lfu", "lrfu"])
def test_native_keys_are_expert_ids(name):
    pol = make_policy(name, 2, n_keys=4, native=True)
    pol.admit(3)
    for bad in (-1, 4, 100):
        for op in (pol.hit, pol.admit, pol.discard, pol.evict):
            with pytest.raises(ValueError, match=rf"expert {bad} is out of range .*0 <= key < 4"):
                op(bad)
        with pytest.raises(ValueError, match="out of range"):
            pol.evict_where(bad, (), [False] * 2, [0] * 4)
        assert bad not in pol
    with pytest.raises(ValueError, match="expert 1180591620717411303424 is out of range"):
        pol.hit(2**70)
    with pytest.raises(TypeError):
        pol.hit(1.5)
    if name in ("lfu", "lrfu"):
        with pytest.raises(ValueError, match="out of range"):
            pol.count(4) if name == "lfu" else pol.score(4)
    assert 3 in pol and 3.0 in pol and 3.5 not in pol and "3" not in pol and None not in pol and 2**80 not in pol
    assert pol.resident() == [3] and len(pol) == 1


@needs_native
@pytest.mark.parametrize("name", ["arc", "lru", "lfu", "lrfu"])
def test_native_evict_where_reads_the_cache_in_place(name):
    pol = make_policy(name, 3, n_keys=6, native=True)
    for k in (0, 1, 2):
        pol.admit(k)
    slot_of, pending = [2, 1, 0, -1, -1, -1], [False, True, False]  # expert 1's copy (slot 1) is in flight
    assert pol.evict_where(5, [0], pending, slot_of) == 2
    pol.admit(5)
    slot_of[2], slot_of[5] = -1, 0
    assert pol.evict_where(4, frozenset({0, 5}), pending, slot_of) is None  # 1 in flight, 0 and 5 pinned
    pending[1] = False
    assert pol.evict_where(4, (), pending, slot_of) == 0
    with pytest.raises(TypeError):
        pol.evict_where(3, (), tuple(pending), slot_of)


@needs_native
@pytest.mark.parametrize("name", ["arc", "lru", "lfu", "lrfu"])
def test_native_evictable_must_not_change_the_policy(name):
    pol = make_policy(name, 2, n_keys=4, native=True)
    pol.admit(0)
    pol.admit(1)

    def meddles(k):
        pol.discard(1 - k)
        return False

    with pytest.raises(RuntimeError, match="changed during evict"):
        pol.evict(2, meddles)


@pytest.mark.parametrize("policy", ["arc", "lru", "lfu", "lrfu"])
def test_the_cache_decides_the_same_on_either_policy(policy):
    from fate.runtime.experts.residency import ExpertCache

    rng = random.Random(policy)
    caches = [ExpertCache([0, 4, 6], 12, policy=policy) for _ in range(2)]
    caches[1].policies = [make_policy(policy, n, n_keys=12, native=False) for n in caches[1].n_slots]
    for _ in range(3000):
        layer, e = rng.choice((1, 2)), rng.randrange(12) if rng.random() < 0.5 else rng.randrange(4)
        pinned = set(rng.sample(range(12), rng.randrange(4)))
        r, lands = rng.random(), [rng.random() < 0.5 for _ in range(6)]
        for c in caches:
            if r < 0.05:
                c.drop(layer, e)
            elif c.lookup(layer, e) >= 0:
                c.touch(layer, e)
            else:
                c.reserve(layer, e, "q4", prefetched=False, pinned=pinned)
            for s, p in enumerate(c.pending[layer]):
                if p and lands[s]:
                    c.landed(layer, s, c.gen[layer][s])
        a, b = caches
        assert (a.slot_of, a.pending, a.evictions) == (b.slot_of, b.pending, b.evictions)
        assert [a.resident(k) for k in range(3)] == [b.resident(k) for k in range(3)]
