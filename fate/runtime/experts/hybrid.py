"""Which stored precision each expert travels in: INT4 by default, INT2 for the least popular prefill
experts (the Fate paper's popularity-aware hybrid precision), and which cached copy serves which request."""

from __future__ import annotations

RANK = {"q2": 0, "q4": 1, "f16": 2}
"""A cached copy of higher rank serves a request for a lower one (an INT4 copy serves an INT2 request)."""


def hybrid_precisions(ranked: list[int], counts, share: float, high: str, low: str | None) -> dict[int, str]:
    """``ranked`` experts (most tokens first; ``counts[e]`` tokens each) → precision: the least popular
    ones whose assignments add up to ≤ ``share`` of all get ``low``, the others ``high``."""
    out = {e: high for e in ranked}
    if low is None or share <= 0:
        return out
    total = sum(counts[e] for e in ranked)
    acc = 0
    for e in reversed(ranked):  # least popular first
        acc += counts[e]
        if acc > share * total:
            break
        out[e] = low
    return out
