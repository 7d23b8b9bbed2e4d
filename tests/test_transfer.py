"""TransferEngine on a throttled link: a prefetch a layer needs now is promoted ahead of the other
prefetches, a cancelled one is never copied, and every copy lands byte for byte."""

from __future__ import annotations

import threading

import pytest
import torch

import fate
from fate.runtime.experts.link import LinkSpec, Throttle
from fate.runtime.experts.transfer import TransferEngine


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
