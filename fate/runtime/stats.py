"""Expert statistics of an offloaded run: one object, counted per layer and per phase, JSON out.

Definitions (each "needed" expert is one (layer, expert) a forward step routed tokens to):
* hit: the expert was resident and its bytes ready when the layer reached it;
* late prefetch: the prediction had named it and its transfer was under way, but not finished;
* miss: not resident at all; loaded on demand;
* prefetch recall: needed experts the prediction had named, over layers that had a prediction;
* prefetch precision: named experts that were then needed, over all named experts.
"""

from __future__ import annotations

import threading
from collections import defaultdict

PHASES = ("prefill", "decode")
COUNTERS = ("needed", "hits", "late_prefetches", "misses", "predicted_needed", "named", "named_needed",
            "evictions")


class ExpertStats:
    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.c = {ph: [defaultdict(int) for _ in range(self.n_layers)] for ph in PHASES}
        self.stall = {ph: [0.0] * self.n_layers for ph in PHASES}
        self.bytes_by_precision: dict[str, int] = defaultdict(int)

    def add(self, phase: str, layer: int, **counts: int) -> None:
        row = self.c[phase][layer]
        for k, v in counts.items():
            row[k] += v

    def stalled(self, phase: str, layer: int, seconds: float) -> None:
        self.stall[phase][layer] += seconds

    def moved(self, precision: str, nbytes: int) -> None:
        with self._lock:
            self.bytes_by_precision[precision] += nbytes

    @staticmethod
    def _summary(rows: list[dict], stall: float) -> dict:
        tot = defaultdict(int)
        for r in rows:
            for k, v in r.items():
                tot[k] += v
        needed, predicted = tot["needed"], tot["predicted_needed"]
        return {
            "needed": needed,
            "hits": tot["hits"],
            "hit_rate": tot["hits"] / needed if needed else None,
            "misses": tot["misses"],
            "late_prefetches": tot["late_prefetches"],
            "prefetch_recall": tot["named_needed"] / predicted if predicted else None,
            "prefetch_precision": tot["named_needed"] / tot["named"] if tot["named"] else None,
            "evictions": tot["evictions"],
            "stall_seconds": stall,
        }

    def to_dict(self) -> dict:
        out = self._summary([r for ph in PHASES for r in self.c[ph]], sum(sum(self.stall[ph]) for ph in PHASES))
        out["bytes_by_precision"] = dict(self.bytes_by_precision)
        out["by_phase"] = {ph: self._summary(self.c[ph], sum(self.stall[ph])) for ph in PHASES}
        out["by_layer"] = [
            self._summary([self.c[ph][i] for ph in PHASES], sum(self.stall[ph][i] for ph in PHASES))
            for i in range(self.n_layers)]
        return out

    def table(self) -> str:
        d = self.to_dict()
        pct = lambda v: "   -  " if v is None else f"{100 * v:5.1f}%"  # noqa: E731
        lines = ["layer  needed   hits  recall  precision  misses  late  stall_ms"]
        for i, r in enumerate(d["by_layer"]):
            if r["needed"]:
                lines.append(f"{i:5d} {r['needed']:7d} {pct(r['hit_rate'])} {pct(r['prefetch_recall'])} "
                             f"{pct(r['prefetch_precision'])}   {r['misses']:6d} {r['late_prefetches']:5d} "
                             f"{1000 * r['stall_seconds']:9.1f}")
        lines.append(f"total {d['needed']:7d} {pct(d['hit_rate'])} {pct(d['prefetch_recall'])} "
                     f"{pct(d['prefetch_precision'])}   {d['misses']:6d} {d['late_prefetches']:5d} "
                     f"{1000 * d['stall_seconds']:9.1f}")
        moved = ", ".join(f"{p} {n / 2**20:.1f} MiB" for p, n in d["bytes_by_precision"].items()) or "nothing"
        lines.append(f"moved: {moved}")
        return "\n".join(lines)
