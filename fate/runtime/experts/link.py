"""Link emulation: make host→device copies take as long as they would on a given link.

On a machine without a GPU the "device cache" is a RAM pool and a copy into it is a memcpy, far faster
than PCIe; and a real GPU's link speed varies from box to box.  ``--link`` makes transfers take the time
a chosen link would need, so CPU-only runs and benchmarks show the overlap (or stalls) the policies would
see on real hardware.  Figures measured this way are labelled *emulated*.

``--link`` accepts ``none``; a rate such as ``12GB/s``, ``80MB/s``, ``1.5GiB/s`` (bytes, not bits); a
PCIe preset (``pcie1``, ``pcie3``, ``pcie4``: effective pinned host→device rates of x16 links); or
``ratio:R``, where one INT4 expert transfer takes R times a layer's profiled decode compute time — the
machine-independent way to say "copies are this much slower than compute" (see :func:`resolve_ratio`).
"""

from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import dataclass

from fate.errors import LinkError
from fate.units import SizeError, format_rate, parse_size

LINK_KINDS = ("none", "bandwidth", "ratio")

# Effective pinned host→device copy rates of x16 links (shared/reference/models.md), bytes per second.
PRESETS = {"pcie1": 3e9, "pcie3": 12e9, "pcie4": 25e9}

_RATE = re.compile(r"^\s*(.+?)\s*/\s*s\s*$", re.IGNORECASE)
_BITS = re.compile(r"[KMGT]i?b\s*$")  # "12Gb/s": an upper-case prefix with a lower-case b reads as bits
_RATIO = re.compile(r"^\s*ratio\s*:\s*([0-9]*\.?[0-9]+)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class LinkSpec:
    kind: str  # "none", "bandwidth", "ratio"
    bytes_per_s: float = 0.0  # for "bandwidth" (presets and resolved ratios become bandwidth)
    ratio: float = 0.0  # "ratio:R": one INT4 expert transfer takes R x the per-layer decode compute time
    label: str = "none"  # e.g. "pcie3 (12 GB/s, emulated)"
    emulated: bool = False

    def __post_init__(self):
        if self.kind not in LINK_KINDS:
            raise LinkError(f"link kind {self.kind!r} is not one of {', '.join(LINK_KINDS)}")
        if self.kind == "bandwidth" and not (math.isfinite(self.bytes_per_s) and self.bytes_per_s > 0):
            raise LinkError(f"link bandwidth {self.bytes_per_s!r} is not a positive rate")
        if self.kind == "ratio" and not (math.isfinite(self.ratio) and self.ratio > 0):
            raise LinkError(f"link ratio {self.ratio!r} is not a positive number")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "bytes_per_s": self.bytes_per_s, "ratio": self.ratio, "label": self.label,
                "emulated": self.emulated}


NO_LINK = LinkSpec("none")

_HELP = "write it like none, 12GB/s, 80MB/s, 1.5GiB/s, pcie1, pcie3, pcie4 or ratio:0.5"


def parse_link(text: str | None) -> LinkSpec:
    """``None``/``"none"`` → no throttle; ``"12GB/s"`` → bandwidth; ``"pcie3"`` → its preset bandwidth;
    ``"ratio:R"`` → a ratio to resolve with :func:`resolve_ratio` once compute time is profiled."""
    if text is None:
        return NO_LINK
    s = str(text).strip()
    low = s.lower()
    if low == "none":
        return NO_LINK
    if low in PRESETS:
        bps = PRESETS[low]
        return LinkSpec("bandwidth", bytes_per_s=bps, label=f"{low} ({format_rate(bps)}, emulated)", emulated=True)
    m = _RATIO.match(s)
    if m:
        r = float(m.group(1))
        if not (math.isfinite(r) and r > 0):
            raise LinkError(f"--link {s!r}: the ratio must be positive")
        return LinkSpec("ratio", ratio=r, label=f"ratio:{r:g} (emulated)", emulated=True)
    m = _RATE.match(s)
    if m:
        size = m.group(1)
        if _BITS.search(size):
            bits = parse_size(size[:-1] + "B")
            raise LinkError(f"--link {s!r} reads as bits per second; give bytes per second "
                            f"({s} = {format_rate(bits / 8)})")
        try:
            bps = float(parse_size(size))
        except SizeError:
            raise LinkError(f"--link {s!r} is not a link; {_HELP}") from None
        if bps <= 0:
            raise LinkError(f"--link {s!r}: the rate must be positive")
        return LinkSpec("bandwidth", bytes_per_s=bps, label=f"{format_rate(bps)} (emulated)", emulated=True)
    raise LinkError(f"--link {s!r} is not a link; {_HELP}")


def resolve_ratio(spec: LinkSpec, layer_compute_s: float, int4_expert_bytes: int) -> LinkSpec:
    """A ``ratio:R`` link as the bandwidth at which one INT4 expert (``int4_expert_bytes``) takes
    ``R x layer_compute_s`` to copy: ``int4_expert_bytes / (R * layer_compute_s)``.  Other links pass
    through unchanged."""
    if spec.kind != "ratio":
        return spec
    if not (math.isfinite(layer_compute_s) and layer_compute_s > 0):
        raise LinkError(f"cannot resolve {spec.label}: per-layer compute time {layer_compute_s!r} s is not positive")
    if not (isinstance(int4_expert_bytes, int) and int4_expert_bytes > 0):
        raise LinkError(f"cannot resolve {spec.label}: INT4 expert size {int4_expert_bytes!r} is not positive")
    bps = int4_expert_bytes / (spec.ratio * layer_compute_s)
    return LinkSpec("bandwidth", bytes_per_s=bps, ratio=spec.ratio,
                    label=f"ratio:{spec.ratio:g} ({format_rate(bps)}, emulated)", emulated=True)


class Throttle:
    """Emulates one serial link: transfers queue on it, each taking ``nbytes / bytes_per_s`` of link time.

    A transfer asked for at ``now`` completes at ``max(now, end of the previous transfer) + nbytes / rate``;
    :meth:`transfer` blocks the calling (transfer worker) thread until then.  The bookkeeping is under a
    lock and the sleep outside it, so several workers queue on the link in the order they arrive.
    ``clock`` and ``sleep`` are injectable so tests run on a fake clock.  A ``none`` link never waits.
    """

    def __init__(self, spec: LinkSpec, clock=time.perf_counter, sleep=time.sleep):
        if spec.kind == "ratio":
            raise LinkError(f"{spec.label} must be resolved to a bandwidth (resolve_ratio) before use")
        self.spec = spec
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._link_free_at = -math.inf  # when the last queued transfer finishes on the link
        self.busy_seconds = 0.0  # emulated link time of all transfers
        self.bytes_moved = 0

    @property
    def active(self) -> bool:
        return self.spec.kind == "bandwidth"

    @property
    def link_free_at(self) -> float:
        """When the last transfer queued on the link finishes (``-inf`` before the first)."""
        return self._link_free_at

    def transfer(self, nbytes: int) -> float:
        """Wait until a transfer of ``nbytes`` would have completed; return the seconds waited."""
        if nbytes < 0:
            raise ValueError(f"transfer of {nbytes} bytes")
        if not self.active:
            with self._lock:
                self.bytes_moved += nbytes
            return 0.0
        duration = nbytes / self.spec.bytes_per_s
        with self._lock:
            start = self._clock()
            done = max(start, self._link_free_at) + duration
            self._link_free_at = done
            self.busy_seconds += duration
            self.bytes_moved += nbytes
        while True:
            left = done - self._clock()
            if left <= 0:
                break
            self._sleep(left)
        return self._clock() - start

    def stats(self) -> dict:
        with self._lock:
            return {"link": self.spec.label, "emulated": self.spec.emulated, "busy_seconds": self.busy_seconds,
                    "bytes_moved": self.bytes_moved}
