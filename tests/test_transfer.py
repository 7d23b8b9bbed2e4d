"""TransferEngine on a throttled link: demand loads go before queued prefetches, a promoted prefetch goes
before the other prefetches, a cancelled one is never copied, short inline copies land at once and long ones
go to the copy thread, and every copy lands byte for byte in the slot the cache gave it."""

from __future__ import annotations

import time

import pytest
import torch

import fate
from fate.runtime.experts.link import LinkSpec, Throttle
from fate.runtime.experts.residency import ExpertCache
from fate.runtime.experts import transfer as T
from fate.runtime.experts.transfer import TransferEngine


@pytest.fixture()
def setup(converted):
    m = fate.load(converted["mixtral"][1], experts="q4", device="cpu")
    layer = m.config.moe_layer_ids[0]
    n = m.store.blob_bytes("q4")

    def engine(seconds_per_blob: float, slots: int = 4):
        cache = ExpertCache([slots if i == layer else 0 for i in range(m.config.n_layers)], m.config.n_experts)
        link = LinkSpec("bandwidth", bytes_per_s=n / seconds_per_blob, label="test", emulated=True)
        return TransferEngine(m.store, cache, n, torch.device("cpu"), Throttle(link)), cache

    yield m, layer, n, engine
    m.close()


def _landed(t: TransferEngine, m, layer: int, slot: int, expert: int, n: int) -> bool:
    return torch.equal(t.slot(layer, slot, n), m.store.blob(layer, expert, "q4"))


def _reserve(cache, layer, expert, prefetched=True):
    s = cache.reserve(layer, expert, "q4", prefetched=prefetched)
    assert s >= 0
    return s


def test_promoted_prefetch_goes_before_the_other_prefetches(setup):
    m, layer, n, engine = setup
    t, cache = engine(0.2)
    a, b, c = (_reserve(cache, layer, e) for e in (0, 1, 2))
    t.prefetch(layer, a, 1.0)
    t.prefetch(layer, b, 2.0)
    t.prefetch(layer, c, 3.0)
    t.promote(layer, c, inline=False)  # a layer waits for it now (queued: ahead of b)
    t.wait(layer, c)
    assert cache.pending[layer][b]
    t.wait(layer, a)
    t.wait(layer, b)
    assert all(_landed(t, m, layer, s, e, n) for s, e in ((a, 0), (b, 1), (c, 2)))
    t.close()


def test_a_queued_prefetch_a_layer_needs_is_copied_inline_at_once(setup, monkeypatch):
    """Where copies are short enough to copy on the model's thread (here: the bound raised past this link's
    copies, so the order on the link can be watched)."""
    monkeypatch.setattr(T, "INLINE_MAX_SECONDS", 1.0)
    m, layer, n, engine = setup
    t, cache = engine(0.15)
    a, b = _reserve(cache, layer, 0), _reserve(cache, layer, 1)
    t.prefetch(layer, a, 1.0)  # on the link at once
    t.prefetch(layer, b, 2.0)  # queued behind it
    time.sleep(0.02)
    t.promote(layer, b, inline=True)  # taken off the queue and copied on this thread, after the copy on the link
    assert not cache.pending[layer][b] and _landed(t, m, layer, b, 1, n)
    t.wait(layer, a)
    assert _landed(t, m, layer, a, 0, n)
    t.close()


def test_a_long_one_token_demand_load_goes_to_the_copy_thread(setup):
    """A one-token step's demand load longer than a hand-off (an emulated link's 0.2 s) is not copied on the
    calling thread: ``demand`` returns at once, the layer computes meanwhile, and ``wait`` gives the rest."""
    m, layer, n, engine = setup
    t, cache = engine(0.2)
    d = _reserve(cache, layer, 3, prefetched=False)
    t0 = time.perf_counter()
    t.demand(layer, d, inline=True)
    assert time.perf_counter() - t0 < 0.1 and cache.pending[layer][d]
    waited = t.wait(layer, d)
    assert 0.0 < waited and _landed(t, m, layer, d, 3, n)
    assert T.copies_inline(5e-6) and not T.copies_inline(0.2)
    t.close()


def test_a_demand_load_goes_before_queued_prefetches(setup):
    m, layer, n, engine = setup
    t, cache = engine(0.1)
    p1, p2, d = _reserve(cache, layer, 0), _reserve(cache, layer, 1), _reserve(cache, layer, 2, prefetched=False)
    t.prefetch(layer, p1, 1.0)
    t.prefetch(layer, p2, 2.0)
    t.demand(layer, d, inline=False)
    t.wait(layer, d)
    assert cache.pending[layer][p2]  # the demand load went before the prefetch still queued
    t.wait(layer, p1)
    t.wait(layer, p2)
    t.close()


def test_a_cancelled_prefetch_is_not_copied(setup):
    m, layer, n, engine = setup
    t, cache = engine(0.15)
    a, b = _reserve(cache, layer, 0), _reserve(cache, layer, 1)
    t.prefetch(layer, a, 1.0)
    t.prefetch(layer, b, 2.0)
    assert t.cancel(layer, b)  # still queued: cancelled
    cache.drop(layer, 1)
    c = _reserve(cache, layer, 2)  # its slot goes to another expert
    assert c == b
    t.prefetch(layer, c, 3.0)
    t.wait(layer, a)
    t.wait(layer, c)
    assert _landed(t, m, layer, c, 2, n)
    assert not t.cancel(layer, a)  # landed: nothing to cancel
    t.close()


def test_free_at_counts_what_is_queued(setup):
    m, layer, n, engine = setup
    t, cache = engine(0.1)
    assert t.free_at() == pytest.approx(t.now(), abs=0.01) and t.copy_seconds("q4") == pytest.approx(0.1)
    for e in range(3):
        t.prefetch(layer, _reserve(cache, layer, e), 1.0 + e)
    assert t.free_at() - t.now() == pytest.approx(0.3, abs=0.05)  # one on the link, two queued
    d = _reserve(cache, layer, 3, prefetched=False)
    t.demand(layer, d, inline=False)
    assert t.free_at() - t.now() == pytest.approx(0.4, abs=0.05)
    # the demand load goes first: the link is done with it after the copy on the link (if the copy thread
    # has started it yet) and itself, not after the queued prefetches
    assert 0.05 < t.free_at(demand_only=True) - t.now() < 0.25
    for s in range(4):
        t.wait(layer, s)
    t.close()


def test_free_at_counts_what_is_queued_on_the_python_worker(setup, monkeypatch):
    """The same figures where the native copy thread is not built (the Python worker, also CUDA's)."""
    from fate.runtime.experts import copier

    monkeypatch.setattr(copier, "available", lambda: False)
    test_free_at_counts_what_is_queued(setup)


def test_queued_copies_run_back_to_back_on_the_links_timeline(setup):
    """Three queued copies of 0.1 s take 0.3 s of link from the first submission: never less (the link's
    rate), and the copy thread's sleeps do not add their wake-up lateness to the timeline (each queued copy
    starts when the one before it ended, not when the thread woke)."""
    m, layer, n, engine = setup
    t, cache = engine(0.1)
    slots = [_reserve(cache, layer, e) for e in range(3)]
    t0 = time.perf_counter()
    for i, s in enumerate(slots):
        t.prefetch(layer, s, 1.0 + i)
    t.wait(layer, slots[-1])
    elapsed = time.perf_counter() - t0
    assert 0.3 - 1e-3 <= elapsed < 0.4
    assert all(t.wait(layer, s) < 0.01 for s in slots[:-1])  # the earlier ones had landed by then
    assert all(_landed(t, m, layer, s, e, n) for e, s in enumerate(slots))
    t.close()


def test_poll_settles_every_landed_copy_in_one_call(setup):
    """The native copier settles the queued copies that landed since it was last asked (never a cancelled
    one, each once): ``poll`` clears their ``pending`` flags and counts their bytes in one native call, and
    copies that ``wait`` already settled are not settled again."""
    from fate.runtime.experts import copier
    from fate.runtime.experts.stats import ExpertStats

    if not copier.available():
        pytest.skip(f"native copier not built: {copier.why}")
    m, layer, n, engine = setup
    cache = ExpertCache([4 if i == layer else 0 for i in range(m.config.n_layers)], m.config.n_experts)
    stats = ExpertStats(m.config.n_layers)
    link = LinkSpec("bandwidth", bytes_per_s=n / 0.02, label="test", emulated=True)
    t = TransferEngine(m.store, cache, n, torch.device("cpu"), Throttle(link), stats=stats)
    a, b, c = (_reserve(cache, layer, e) for e in (0, 1, 2))
    t.prefetch(layer, a, 1.0)
    t.prefetch(layer, b, 2.0)
    t.prefetch(layer, c, 3.0)
    assert t.cancel(layer, c)
    cache.drop(layer, 2)
    t.wait(layer, a)  # settled by the wait
    assert not cache.pending[layer][a] and stats.bytes_by_precision == {"q4": n}
    time.sleep(0.1)  # b lands meanwhile
    assert cache.pending[layer][b]
    t.poll(layer)
    assert not cache.pending[layer][b] and _landed(t, m, layer, b, 1, n)
    assert stats.bytes_by_precision == {"q4": 2 * n}  # c was cancelled: never counted
    t.poll(layer)
    assert stats.bytes_by_precision == {"q4": 2 * n} and t._native.settle() == 0
    stats.reset()  # emptied in place: the copier goes on counting into it
    s = _reserve(cache, layer, 3)
    t.prefetch(layer, s, 1.0)
    t.wait(layer, s)
    assert stats.bytes_by_precision == {"q4": n}
    t.close()


def test_the_copiers_settle_clears_each_landed_copys_flag_once():
    from fate.runtime.experts import copier

    if not copier.available():
        pytest.skip(f"native copier not built: {copier.why}")
    c = copier.Copier(0.0)
    src, dst = torch.arange(64, dtype=torch.uint8), torch.zeros(3, 64, dtype=torch.uint8)
    flags, moved = [True, True, True], {}
    tickets = [c.submit(src.data_ptr(), dst[i].data_ptr(), 64, 1.0 + i, flags, i, moved, "q4") for i in range(3)]
    for tk in tickets:
        c.wait(tk)
    assert flags == [False] * 3 and moved == {"q4": 192} and c.settle() == 0
    c.copy_now(src.data_ptr(), dst[0].data_ptr(), 64)  # inline: never reported
    t = c.submit(src.data_ptr(), dst[1].data_ptr(), 64, 1.0)  # no flag, no count
    c.wait(t)
    assert c.settle() == 0 and moved == {"q4": 192} and torch.equal(dst, src.expand(3, 64))
    with pytest.raises(RuntimeError, match="flags is a list"):
        c.submit(src.data_ptr(), dst[1].data_ptr(), 64, 1.0, flags, 3)
    c.close()
