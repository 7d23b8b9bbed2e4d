"""TransferEngine on a throttled link: demand loads never wait behind a prefetch, a prefetch a layer
needs now is promoted, and every copy lands byte for byte."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import fate
from fate.runtime.link import LinkSpec, Throttle
from fate.runtime.transfer import TransferEngine


class _Entry:
    def __init__(self):
        self.ready = threading.Event()
        self.released = False


@pytest.fixture()
def setup(converted):
    m = fate.load(converted["mixtral"][1], experts="q4", device="cpu")
    layer = m.config.moe_layer_ids[0]
    n = m.store.blob_bytes("q4")

    def engine(seconds_per_blob: float) -> TransferEngine:
        link = LinkSpec("bandwidth", bytes_per_s=n / seconds_per_blob, label="test", emulated=True)
        return TransferEngine(m.store, [4 if i == layer else 0 for i in range(m.config.n_layers)], n,
                              torch.device("cpu"), Throttle(link))

    yield m, layer, n, engine
    m.close()


def _landed(t: TransferEngine, m, layer: int, slot: int, expert: int, n: int) -> bool:
    return torch.equal(t.slot(layer, slot, n), m.store.blob(layer, expert, "q4"))


def test_demand_load_preempts_a_prefetch_in_flight(setup):
    m, layer, n, engine = setup
    t = engine(0.8)
    pre, dem = _Entry(), _Entry()
    t.submit(layer, 0, "q4", 0, pre, priority=1.0)
    time.sleep(0.05)  # the prefetch is on the link now
    if pre.ready.is_set():
        pytest.skip("the machine stalled long enough for the prefetch to finish before the demand came")
    t.submit(layer, 1, "q4", 1, dem, priority=TransferEngine.DEMAND)
    t.wait(dem)
    assert not pre.ready.is_set()  # it yielded the link
    t.wait(pre)  # and resumes where it stopped
    assert _landed(t, m, layer, 0, 0, n) and _landed(t, m, layer, 1, 1, n)
    t.close()


def test_promoted_prefetch_goes_before_the_other_prefetches(setup):
    m, layer, n, engine = setup
    t = engine(0.3)
    a, b, c = _Entry(), _Entry(), _Entry()
    t.submit(layer, 0, "q4", 0, a, priority=1.0)
    t.submit(layer, 1, "q4", 1, b, priority=2.0)
    t.submit(layer, 2, "q4", 2, c, priority=3.0)
    t.promote(c)  # a layer waits for it now
    t.wait(c)
    assert not b.ready.is_set()
    t.wait(a)
    t.wait(b)
    assert all(_landed(t, m, layer, s, s, n) for s in range(3))
    t.close()


def test_released_prefetch_is_not_copied(setup):
    m, layer, n, engine = setup
    t = engine(0.2)
    a, b, c = _Entry(), _Entry(), _Entry()
    t.submit(layer, 0, "q4", 0, a, priority=1.0)
    t.submit(layer, 1, "q4", 1, b, priority=2.0)
    b.released = True  # dropped before its turn (cancelled): its slot may belong to another expert
    t.submit(layer, 2, "q4", 1, c, priority=3.0)
    t.wait(a)
    t.wait(c)
    assert not b.ready.is_set() and _landed(t, m, layer, 1, 2, n)
    t.close()
