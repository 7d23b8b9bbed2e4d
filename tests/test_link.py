"""parse_link, resolve_ratio and the serial-link Throttle on a fake clock."""

from __future__ import annotations

import threading

import pytest

from fate.errors import LinkError
from fate.runtime.experts.link import LinkSpec, Throttle, parse_link, resolve_ratio


class FakeClock:
    """A clock that only moves when someone sleeps on it; records every sleep."""

    def __init__(self, t: float = 100.0):
        self.t = t
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s


# --- parse_link --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [None, "none", "NONE", " none "])
def test_parse_link_none(text):
    spec = parse_link(text)
    assert spec.kind == "none" and not spec.emulated


@pytest.mark.parametrize("text,bps,label", [
    ("12GB/s", 12e9, "12 GB/s (emulated)"),
    ("80MB/s", 80e6, "80 MB/s (emulated)"),
    ("1.5GiB/s", 1.5 * 2**30, "1.61 GB/s (emulated)"),
    ("12 GB / s", 12e9, "12 GB/s (emulated)"),
    ("1000/s", 1000.0, "1 KB/s (emulated)"),
    ("500B/s", 500.0, "500 B/s (emulated)"),
    ("pcie1", 3e9, "pcie1 (3 GB/s, emulated)"),
    ("pcie3", 12e9, "pcie3 (12 GB/s, emulated)"),
    ("PCIe4", 25e9, "pcie4 (25 GB/s, emulated)"),
])
def test_parse_link_bandwidth(text, bps, label):
    spec = parse_link(text)
    assert spec.kind == "bandwidth" and spec.bytes_per_s == bps and spec.emulated
    assert spec.label == label


@pytest.mark.parametrize("text,r", [("ratio:1", 1.0), ("ratio:0.5", 0.5), ("RATIO: 2", 2.0)])
def test_parse_link_ratio(text, r):
    spec = parse_link(text)
    assert spec.kind == "ratio" and spec.ratio == r and spec.emulated and spec.bytes_per_s == 0.0


@pytest.mark.parametrize("text,msg", [
    ("fast", "is not a link; write it like none, 12GB/s"),
    ("12GB", "is not a link"),
    ("", "is not a link"),
    ("pcie5", "is not a link"),
    ("ratio:", "is not a link"),
    ("ratio:-1", "is not a link"),
    ("ratio:0", "the ratio must be positive"),
    ("0GB/s", "the rate must be positive"),
    ("twelve GB/s", "is not a link"),
    ("12Gb/s", r"reads as bits per second; give bytes per second \(12Gb/s = 1.5 GB/s\)"),
])
def test_parse_link_bad(text, msg):
    with pytest.raises(LinkError, match=msg):
        parse_link(text)
    assert issubclass(LinkError, ValueError)


def test_linkspec_validates():
    with pytest.raises(LinkError):
        LinkSpec("wire")
    with pytest.raises(LinkError):
        LinkSpec("bandwidth", bytes_per_s=0.0)
    assert LinkSpec("none").to_dict()["kind"] == "none"


# --- resolve_ratio -----------------------------------------------------------------------------------

def test_resolve_ratio():
    # One INT4 expert of 4.9e6 bytes, a layer computes in 2 ms: ratio 1 -> 4.9e6 / 2e-3 = 2.45 GB/s;
    # ratio 0.5 (copies twice as fast as compute) -> 4.9 GB/s.
    one = resolve_ratio(parse_link("ratio:1"), 2e-3, 4_900_000)
    assert one.kind == "bandwidth" and one.bytes_per_s == pytest.approx(2.45e9) and one.ratio == 1.0
    assert one.label == "ratio:1 (2.45 GB/s, emulated)" and one.emulated
    half = resolve_ratio(parse_link("ratio:0.5"), 2e-3, 4_900_000)
    assert half.bytes_per_s == pytest.approx(4.9e9)
    # One expert then takes exactly R x the compute time on the link.
    assert 4_900_000 / half.bytes_per_s == pytest.approx(0.5 * 2e-3)
    bw = parse_link("pcie3")
    assert resolve_ratio(bw, 2e-3, 4_900_000) is bw
    with pytest.raises(LinkError, match="compute time"):
        resolve_ratio(parse_link("ratio:1"), 0.0, 4_900_000)
    with pytest.raises(LinkError, match="INT4 expert size"):
        resolve_ratio(parse_link("ratio:1"), 1e-3, 0)


# --- Throttle ----------------------------------------------------------------------------------------

def test_throttle_none_never_waits():
    clock = FakeClock()
    th = Throttle(parse_link(None), clock=clock, sleep=clock.sleep)
    assert th.transfer(10**9) == 0.0 and clock.sleeps == [] and th.bytes_moved == 10**9


def test_throttle_refuses_unresolved_ratio():
    with pytest.raises(LinkError, match="resolve_ratio"):
        Throttle(parse_link("ratio:1"))


def test_throttle_single_transfer():
    clock = FakeClock(100.0)
    th = Throttle(parse_link("1000B/s"), clock=clock, sleep=clock.sleep)
    assert th.transfer(500) == 0.5 and clock.t == 100.5
    assert th.busy_seconds == 0.5 and th.bytes_moved == 500


def test_throttle_serial_queue():
    """Transfers issued while the link is busy queue behind it: done = max(now, previous done) + n / rate.

    Link 1000 B/s.  Three workers ask at t=100 for 500, 250 and 1000 bytes: they complete at
    100.5, 100.75 and 101.75.  After an idle gap (t=103) a 100-byte transfer takes only its own 0.1 s."""
    # Each worker thread has its own view of a fake clock that starts at t=100 and that its sleep moves to
    # the wake-up it asked for, so the waits are 0.5, 0.75 and 1.75 s.
    clock = FakeClock(100.0)
    local = threading.local()
    gate = threading.Barrier(3)
    lock = threading.Lock()
    ends: dict[int, float] = {}
    order = iter([500, 250, 1000])
    turn = threading.Lock()

    def now():
        return getattr(local, "t", clock.t)

    def sleep(s):
        local.t = now() + s

    th = Throttle(parse_link("1000/s"), clock=now, sleep=sleep)

    def worker():
        gate.wait()
        with turn:  # issue in a fixed order so the test is deterministic
            n = next(order)
            local.t = 100.0
            waited = th.transfer(n)
        with lock:
            ends[n] = waited

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ends == {500: 0.5, 250: 0.75, 1000: 1.75}
    assert th.bytes_moved == 1750 and th.busy_seconds == pytest.approx(1.75)
    clock.t = 103.0  # the link has been idle since 101.75
    assert th.transfer(100) == pytest.approx(0.1) and local.t == pytest.approx(103.1)


def test_throttle_queue_with_arrivals_over_time():
    # 1000 B/s.  t=0: 400 B -> done 0.4.  t=0.1 (busy until 0.4): 300 B -> done 0.7, waits 0.6.
    # t=2.0 (idle): 100 B -> done 2.1, waits 0.1.
    t = [0.0]

    def jump(s):  # sleeping moves the clock to the requested wake-up
        t[0] += s

    th = Throttle(parse_link("1000/s"), clock=lambda: t[0], sleep=jump)
    assert th.transfer(400) == pytest.approx(0.4) and t[0] == pytest.approx(0.4)
    t[0] = 0.1  # a second worker arrives while the first transfer is still on the link
    assert th.transfer(300) == pytest.approx(0.6) and t[0] == pytest.approx(0.7)
    t[0] = 2.0
    assert th.transfer(100) == pytest.approx(0.1) and t[0] == pytest.approx(2.1)
    assert th.busy_seconds == pytest.approx(0.8) and th.bytes_moved == 800
    assert th.stats() == {"link": "1 KB/s (emulated)", "emulated": True,
                          "busy_seconds": pytest.approx(0.8), "bytes_moved": 800}


def test_throttle_sleeps_again_after_an_early_wakeup():
    # A real sleep may return a little early relative to the clock; the throttle sleeps the rest.
    clock = FakeClock(0.0)

    def short_sleep(s):
        clock.sleeps.append(s)
        clock.t += s / 2 if len(clock.sleeps) == 1 else s

    th = Throttle(parse_link("1000/s"), clock=clock, sleep=short_sleep)
    assert th.transfer(1000) == 1.0
    assert clock.sleeps == [1.0, 0.5]


def test_throttle_real_clock_small():
    th = Throttle(parse_link("1MB/s"))
    waited = th.transfer(2000)  # 2 ms
    assert waited >= 0.002 - 1e-4
    with pytest.raises(ValueError):
        th.transfer(-1)
