"""Which stored precision each expert travels in: INT4 by default, INT2 for the least popular prefill
experts (the Fate paper's popularity-aware hybrid precision) where the link limits the prefill, and which
cached copy serves which request."""

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


PREFILL_LINK_SHARE = 0.5
"""INT2 pays in prefill only where the link limits it: where a layer's copies at the decode precision would
take more than this share of the compute they cross beside.  Measured on the trained offload model
(docs/BENCHMARKS.md, 2026-12-02): with copies well inside the compute (`ratio:0.5` at any budget, `ratio:1`
at 50-75 %) INT2 made prefill 2-10 % slower, not faster (INT2's own compute, no link time to save), and
decode 3-9 % slower — the INT2 copies left in the cache are misses when decode wants them in INT4; where
the copies outlast the compute (`ratio:2`, `ratio:1` at 25 %) it made prefill 5-15 % faster."""


def link_limits_prefill(loads: int, copy_seconds: float, tokens: int, top_k: int, expert_seconds: float,
                        share: float = PREFILL_LINK_SHARE) -> bool:
    """Whether ``loads`` copies of ``copy_seconds`` each (the decode precision's, over the link) into one layer
    of a ``tokens``-token prefill outlast ``share`` of its compute, estimated as ``tokens × top_k`` routed
    products of ``expert_seconds`` (one expert on one token, the timing profile's); ``share`` 0: wherever
    the layer copies anything (the paper's rule)."""
    return loads * copy_seconds > share * tokens * top_k * expert_seconds
