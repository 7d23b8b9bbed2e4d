"""Expert statistics of an offloaded run: counted per phase and per layer, summed into the schema of
:mod:`fate.runtime.stats` (the same names in fate-run --stats-json, fate-bench and fate-serve).

Definitions (each "needed" expert is one (layer, expert) a forward step routed tokens to):
* hit: the expert was resident and its bytes ready when the layer reached it;
* late prefetch: the prediction had named it and its transfer was under way, but not finished;
* miss: not resident at all (or resident at a lower precision): loaded on demand;
* eviction: an expert gave up its slot to another (counted in the layer and phase where it happened);
* prefetch recall: needed experts the prediction had named, over layers that had a prediction;
* prefetch precision: named experts that were then needed, over all named experts;
* host seconds: the policy's own work on the thread that runs the model — prediction, lookups,
  reservations, queueing and these counts — that is, the time in the offloading executor that is neither
  computing an expert nor waiting for a copy.

Every figure is counted in exactly one (phase, layer) cell, so per-layer and per-phase figures add up to
the totals.  The phase is the executor's: a one-token step is decode, anything longer prefill.
"""

from __future__ import annotations

import threading

PHASES = ("prefill", "decode")
COUNTERS = ("needed", "hits", "late_prefetches", "misses", "evictions", "predicted_needed", "named",
            "named_needed")
_AT = {k: i for i, k in enumerate(COUNTERS)}  # a counter's place in a row (rows are lists: the hot path indexes)


def summarize(counts: dict, stall_seconds: float, host_seconds: float = 0.0) -> dict:
    """Counters (every name of COUNTERS, missing ones 0), the stall and host time, with the derived rates."""
    c = {k: int(counts.get(k, 0)) for k in COUNTERS}
    needed, predicted, named = c["needed"], c["predicted_needed"], c["named"]
    return {**c, "stall_seconds": float(stall_seconds), "host_seconds": float(host_seconds),
            "hit_rate": c["hits"] / needed if needed else None,
            "prefetch_recall": c["named_needed"] / predicted if predicted else None,
            "prefetch_precision": c["named_needed"] / named if named else None}


class ExpertStats:
    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self._lock = threading.Lock()
        self.phase = "prefill"  # set by the executor at each step
        self.reset()

    def reset(self) -> None:
        self._c = {ph: [[0] * len(COUNTERS) for _ in range(self.n_layers)] for ph in PHASES}
        self._stall = {ph: [0.0] * self.n_layers for ph in PHASES}
        self._host = {ph: [0.0] * self.n_layers for ph in PHASES}
        # emptied in place, never replaced: the native copier adds the bytes of its landed copies to it
        # (:meth:`.transfer.TransferEngine.poll`)
        if not hasattr(self, "bytes_by_precision"):
            self.bytes_by_precision: dict[str, int] = {}
        self.bytes_by_precision.clear()

    def add(self, layer: int, **counts: int) -> None:
        row = self._c[self.phase][layer]
        for k, v in counts.items():
            row[_AT[k]] += v

    def count(self, layer: int, needed: int, hits: int, late: int, misses: int, predicted_needed: int, named: int,
              named_needed: int, stall: float = 0.0, host: float = 0.0) -> None:
        """One step's counts of ``layer``, and its stall and host seconds (the executor's hot path: one call, no
        keyword dictionary)."""
        ph = self.phase
        self._stall[ph][layer] += stall
        self._host[ph][layer] += host
        row = self._c[ph][layer]  # in COUNTERS' order
        row[0] += needed
        row[1] += hits
        row[2] += late
        row[3] += misses
        row[5] += predicted_needed
        row[6] += named
        row[7] += named_needed

    def evicted(self, layer: int) -> None:
        self._c[self.phase][layer][4] += 1

    def stalled(self, layer: int, seconds: float) -> None:
        self._stall[self.phase][layer] += seconds

    def hosted(self, layer: int, seconds: float) -> None:
        self._host[self.phase][layer] += seconds

    def moved(self, precision: str, nbytes: int) -> None:
        with self._lock:  # the transfer thread
            self.bytes_by_precision[precision] = self.bytes_by_precision.get(precision, 0) + nbytes

    def _sum(self, cells) -> dict:
        tot = dict.fromkeys(COUNTERS, 0)
        stall = host = 0.0
        for ph, i in cells:
            for k, v in zip(COUNTERS, self._c[ph][i]):
                tot[k] += v
            stall += self._stall[ph][i]
            host += self._host[ph][i]
        return summarize(tot, stall, host)

    def phase_layer(self, phase: str, layer: int) -> dict:
        """The summary of one layer in one phase (``prefill`` or ``decode``)."""
        return self._sum([(phase, layer)])

    def to_dict(self) -> dict:
        """``total``, ``prefill``, ``decode`` and ``layers`` (one per layer) summaries, and
        ``bytes_by_precision``: the expert figures of :mod:`fate.runtime.stats`' schema."""
        L = range(self.n_layers)
        with self._lock:
            moved = dict(self.bytes_by_precision)
        return {
            "total": self._sum([(ph, i) for ph in PHASES for i in L]),
            **{ph: self._sum([(ph, i) for i in L]) for ph in PHASES},
            "layers": [{"layer": i, **self._sum([(ph, i) for ph in PHASES])} for i in L],
            "bytes_by_precision": moved,
        }

    def table(self) -> str:
        d = self.to_dict()
        pct = lambda v: "   -  " if v is None else f"{100 * v:5.1f}%"  # noqa: E731
        lines = ["layer  needed   hits  recall  precision  misses  late  evict  stall_ms"]
        rows = [(str(r["layer"]), r) for r in d["layers"] if r["needed"]] + [("total", d["total"])]
        for name, r in rows:
            lines.append(f"{name:>5} {r['needed']:7d} {pct(r['hit_rate'])} {pct(r['prefetch_recall'])} "
                         f"{pct(r['prefetch_precision'])}   {r['misses']:6d} {r['late_prefetches']:5d} "
                         f"{r['evictions']:6d} {1000 * r['stall_seconds']:9.1f}")
        return "\n".join(lines)
