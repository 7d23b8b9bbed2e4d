"""The figures of one generation, in the one nested schema fate-run --stats-json, fate-bench --json and
fate-serve /metrics share (docs/STATS.md is the table; change both together).

    {"prefill": {"tokens", "seconds", "tokens_per_s"},
     "decode":  {"tokens", "seconds", "tokens_per_s"},
     "generated_tokens", "stop_reason", "load_seconds", "peak_rss_bytes",
     "prompt_token_ids", "generated_token_ids",
     "experts": null | {"policy", "evict", "link", "bytes_by_precision",
                        "total": C, "prefill": C, "decode": C, "layers": [C + {"layer"}]},
     "budget": null | the memory plan (fate.runtime.experts.budget.BudgetPlan.to_dict)}

``C`` is one set of expert counters (:data:`EXPERT_FIELDS`): ``total`` is the sum of ``prefill`` and
``decode``, and of the ``layers``.  ``decode.tokens`` counts forward passes after the prefill (one per
generated token but the last), as llama.cpp's "eval" does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fate.units import format_size

PHASE_FIELDS = {
    "tokens": "tokens processed (prefill: the prompt; decode: forward passes after the prefill)",
    "seconds": "wall time of the phase",
    "tokens_per_s": "tokens / seconds",
}
EXPERT_FIELDS = {
    "needed": "(layer, expert) pairs a forward step routed tokens to",
    "hits": "needed experts resident with their bytes ready",
    "late_prefetches": "needed experts whose prefetch was still in flight",
    "misses": "needed experts loaded on demand",
    "evictions": "experts that gave up their slot to another",
    "predicted_needed": "needed experts in layers that had a prediction",
    "named": "experts the prediction named",
    "named_needed": "named experts that were needed",
    "stall_seconds": "time computation waited for expert copies",
    "host_seconds": "the offloading policy's own work on the model's thread (neither computing nor waiting)",
    "hit_rate": "hits / needed",
    "prefetch_recall": "named_needed / predicted_needed",
    "prefetch_precision": "named_needed / named",
}
RATES = ("hit_rate", "prefetch_recall", "prefetch_precision")


def phase(tokens: int, seconds: float) -> dict:
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds if seconds > 0 else 0.0}


@dataclass
class GenerationStats:
    prompt_token_ids: list[int] = field(default_factory=list)
    generated_token_ids: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_tokens: int = 0  # forward passes after the prefill (one per generated token but the last)
    decode_seconds: float = 0.0
    load_seconds: float = 0.0
    peak_rss_bytes: int = 0
    stop_reason: str = ""  # "eos", "length" or "context"
    experts: dict | None = None  # the "experts" block of the schema, when experts are offloaded
    budget: dict | None = None  # the memory plan, when --mem was given

    @property
    def prefill(self) -> dict:
        return phase(len(self.prompt_token_ids), self.prefill_seconds)

    @property
    def decode(self) -> dict:
        return phase(self.decode_tokens, self.decode_seconds)

    def to_dict(self) -> dict:
        return {
            "prefill": self.prefill,
            "decode": self.decode,
            "generated_tokens": len(self.generated_token_ids),
            "stop_reason": self.stop_reason,
            "load_seconds": self.load_seconds,
            "peak_rss_bytes": self.peak_rss_bytes,
            "prompt_token_ids": list(self.prompt_token_ids),
            "generated_token_ids": list(self.generated_token_ids),
            "experts": self.experts,
            "budget": self.budget,
        }

    def timings_text(self) -> str:
        p, d = self.prefill, self.decode
        ms = lambda s, n: (1000 * s / n) if n else 0.0  # noqa: E731
        return "\n".join([
            f"load time      = {1000 * self.load_seconds:10.2f} ms",
            f"prompt eval    = {1000 * p['seconds']:10.2f} ms / {p['tokens']:5d} tokens "
            f"({ms(p['seconds'], p['tokens']):8.2f} ms per token, {p['tokens_per_s']:8.2f} tokens per second)",
            f"eval time      = {1000 * d['seconds']:10.2f} ms / {d['tokens']:5d} runs   "
            f"({ms(d['seconds'], d['tokens']):8.2f} ms per token, {d['tokens_per_s']:8.2f} tokens per second)",
            f"generated      = {len(self.generated_token_ids):10d} tokens (stop: {self.stop_reason})",
            f"peak RSS       = {format_size(self.peak_rss_bytes):>13}",
        ] + ([experts_line(self.experts)] if self.experts else []))


def experts_line(e: dict) -> str:
    """One line of the offloading figures (the ``experts`` block)."""
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    t = e["total"]
    moved = ", ".join(f"{p} {format_size(n)}" for p, n in e["bytes_by_precision"].items()) or "nothing"
    link = e["link"]
    tag = f" [link {link['label']}]" if link.get("kind") != "none" else ""
    name = f"{e['policy']}, {e['evict']} caching" if e.get("evict") else e["policy"]
    return (f"experts ({name}) = hit rate {pct(t['hit_rate'])}, prefetch recall {pct(t['prefetch_recall'])}, "
            f"misses {t['misses']}, evictions {t['evictions']}, stall {1000 * t['stall_seconds']:.1f} ms, "
            f"moved {moved}{tag}")
