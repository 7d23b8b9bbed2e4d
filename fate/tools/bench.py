"""fate-bench: expert offloading policies side by side, in one process, on the same prompt.

    fate-bench model.gguf                                   # all policies, --mem 25%,50%,75%, --link ratio:1
    fate-bench model.gguf --policies ondemand,fate --mem 25%,50% --link ratio:1,pcie3 -n 32 -r 5
    fate-bench model.gguf --json bench.json --csv bench.csv --plot bench.png

Every configuration (policy, --mem, --link) is loaded afresh for every repetition — an empty expert
cache each time, as a user's first generation would see — and generates ``-n`` tokens greedily after
the same prompt (``-p``, ``-f``/``--prompt-file``, or ``--prompt-tokens N`` tokens of the package's
calibration text).  The repetitions alternate over the configurations (forwards, then backwards) so
that the noise of a shared machine hits all of them alike; the table gives the median and the
min–max spread.  ``resident`` (every expert in memory) runs once per repetition, whatever the budgets
and links, and is the reference of the "x resident" column; ``ondemand`` (Load-on-Demand) at the same
budget and link is the reference of the speedups.

Figures measured under an emulated link (``--link``; see :mod:`fate.runtime.link`) are labelled
``(emulated)``: copies were slowed to what the link would allow, on a machine whose real copies are
memcpy.

Python: ``run_bench(bundle, policies=..., mems=..., links=..., prompt_ids=..., n=..., reps=...)`` returns
the rows as dicts; keys (one row per configuration):

* ``policy``, ``mem`` (as asked; ``"all"`` for resident), ``link`` (as asked; ``"none"`` for resident),
  ``link_label`` (the resolved link, e.g. ``"ratio:1 (60.2 MB/s, emulated)"``), ``emulated`` (bool),
  ``link_bytes_per_s`` (the emulated rate), ``copy_ms`` (one expert at the run's precision over it) and
  ``effective_ratio`` (that copy ÷ resident's measured decode time per layer in this session: what
  ``ratio:R`` came to, as the profile and the runs measured compute at different moments);
* ``reps``, ``prompt_tokens``, ``decode_tokens`` (forward passes after the prefill: ``n - 1``);
* ``prefill_tok_s``, ``decode_tok_s`` (medians), ``prefill_tok_s_min``, ``prefill_tok_s_max``,
  ``decode_tok_s_min``, ``decode_tok_s_max`` (the spread);
* ``prefill_speedup``, ``decode_speedup`` (÷ ondemand's at the same mem and link; None without it),
  ``prefill_frac_resident``, ``decode_frac_resident`` (÷ resident's; None without it);
* ``hit_rate``, ``prefill_hit_rate``, ``decode_hit_rate``, ``decode_prefetch_recall``, ``needed``,
  ``hits``, ``late_prefetches``, ``misses``, ``stall_seconds``, ``bytes_by_precision`` and
  ``mb_by_precision`` (MB = 10^6 bytes) — the engine's ``experts`` figures, medians over the
  repetitions; None where nothing is offloaded (resident, or a budget that holds every expert);
* ``slots``, ``slots_per_layer``, ``slot_fraction``, ``budget_bytes``, ``fully_resident`` (the memory
  plan; None for resident);
* ``by_layer``: per layer, the medians of the engine's ``needed``, ``hits``, ``late_prefetches``,
  ``misses``, ``hit_rate``, ``prefetch_recall`` and ``stall_seconds`` (both phases; None as above);
* ``failed_runs``, ``error``: repetitions in which the engine raised, and the first message (a failed
  configuration is reported, the others are still measured, and the command exits 1); ``reps`` counts
  the repetitions that completed, whose medians the row gives;
* ``runs``: the figures of each repetition, including ``generated_token_ids`` (or its ``error``).
"""

from __future__ import annotations

import csv
import gc
import json
import math
import platform
import statistics
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

import click

from fate.cli_common import user_errors

ALL_POLICIES = ("ondemand", "lru", "fate", "resident")
DEFAULT_MEMS = ("25%", "50%", "75%")
DEFAULT_LINKS = ("ratio:1",)
DEFAULT_PROMPT_TOKENS = 128
PRECISION_ORDER = ("f16", "q4", "q2")

# the figures of one repetition that are medians in a row
_RUN_KEYS = ("prefill_tok_s", "decode_tok_s", "prefill_seconds", "decode_seconds", "hit_rate", "prefill_hit_rate",
             "decode_hit_rate", "decode_prefetch_recall", "needed", "hits", "late_prefetches", "misses",
             "stall_seconds")

_LAYER_KEYS = ("needed", "hits", "late_prefetches", "misses", "hit_rate", "prefetch_recall", "stall_seconds")

ROW_KEYS = ("policy", "mem", "link", "link_label", "emulated", "link_bytes_per_s", "copy_ms", "effective_ratio",
            "reps", "prompt_tokens", "decode_tokens",
            "prefill_tok_s", "prefill_tok_s_min", "prefill_tok_s_max", "decode_tok_s", "decode_tok_s_min",
            "decode_tok_s_max", "prefill_speedup", "decode_speedup", "prefill_frac_resident",
            "decode_frac_resident", "hit_rate", "prefill_hit_rate", "decode_hit_rate", "decode_prefetch_recall",
            "needed", "hits", "late_prefetches", "misses", "stall_seconds", "bytes_by_precision",
            "mb_by_precision", "slots", "slots_per_layer", "slot_fraction", "budget_bytes", "fully_resident",
            "by_layer", "failed_runs", "error",
            "runs")


def _error(msg: str):
    from fate.runtime.engine import RuntimeUserError

    return RuntimeUserError(msg)


# --- parsing the lists ------------------------------------------------------------------------------
def _split(value: str | Iterable[str] | None, option: str) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    out = []
    for item in items:
        s = item.strip()
        if not s:
            raise _error(f"{option} {value if isinstance(value, str) else ','.join(items)!r}: "
                         "an empty item; give a comma-separated list")
        if s not in out:
            out.append(s)
    if not out:
        raise _error(f"{option}: the list is empty")
    return out


def parse_policies(value) -> list[str]:
    out = [p.lower() for p in _split(value, "--policies")]
    bad = [p for p in out if p not in ALL_POLICIES]
    if bad:
        raise _error(f"--policies: unknown policy {bad[0]!r}; choose from {', '.join(ALL_POLICIES)}")
    return out


def _parse_list(value, option: str, parse, error_type) -> list[str]:
    """Split a comma list and check every item with ``parse``; a bad item is one error naming the list."""
    out = _split(value, option)
    for item in out:
        try:
            parse(item)
        except error_type as e:
            raise _error(f"{e} (in the {option} list {','.join(out)!r})") from None
    return out


def parse_mems(value) -> list[str]:
    from fate.runtime.budget import BudgetError, parse_mem

    return _parse_list(value, "--mem", parse_mem, BudgetError)


def parse_links(value) -> list[str]:
    from fate.runtime.link import LinkError, parse_link

    return _parse_list(value, "--link", parse_link, LinkError)


def synthetic_prompt(tokenizer, n_tokens: int) -> list[int]:
    """``n_tokens`` ids of the package's calibration text (BOS first where the tokenizer adds one),
    the text repeated if it is shorter; the same ids on every run."""
    if n_tokens < 1:
        raise _error(f"--prompt-tokens {n_tokens}: give at least 1")
    text = resources.files("fate").joinpath("data/calib.txt").read_text(encoding="utf-8")
    ids = list(tokenizer.encode(text, add_special_tokens=True))
    body = list(tokenizer.encode(text, add_special_tokens=False)) or ids
    if not ids:
        raise _error("the bundle's tokenizer turns the calibration text into no tokens; give a prompt with -p")
    while len(ids) < n_tokens:
        ids.extend(body)
    return ids[:n_tokens]


# --- running ---------------------------------------------------------------------------------------
def _median(values: list):
    vals = [v for v in values if v is not None]
    if not vals or len(vals) != len(values):
        return None
    return statistics.median(vals)


def _ratio(a, b):
    if a is None or b is None or not b:
        return None
    return a / b


def _one_run(bundle, policy, mem, link, prompt_ids, n, opts) -> dict:
    import fate

    kw = dict(experts=opts["experts"], policy=policy, verify=False)
    if policy != "resident":
        kw.update(mem=mem, link=link, prefetch_extra=opts["prefetch_extra"], int2_share=opts["int2_share"])
    m = fate.load(bundle, **kw)
    try:
        out = m.generate(list(prompt_ids), n, temperature=0.0, stop_at_eos=False)
    finally:
        m.close()
    d = out.stats.to_dict()
    del m, out
    gc.collect()  # between runs, not inside the timed part: the next configuration starts clean
    ex = d.get("experts")
    phase = (ex or {}).get("by_phase", {})
    run = {
        "prefill_tok_s": d["prefill.tokens_per_s"],
        "decode_tok_s": d["decode.tokens_per_s"],
        "prefill_seconds": d["prefill.seconds"],
        "decode_seconds": d["decode.seconds"],
        "decode_tokens": d["decode.tokens"],
        "hit_rate": ex["hit_rate"] if ex else None,
        "prefill_hit_rate": phase.get("prefill", {}).get("hit_rate") if ex else None,
        "decode_hit_rate": phase.get("decode", {}).get("hit_rate") if ex else None,
        "decode_prefetch_recall": phase.get("decode", {}).get("prefetch_recall") if ex else None,
        "needed": ex["needed"] if ex else None,
        "hits": ex["hits"] if ex else None,
        "late_prefetches": ex["late_prefetches"] if ex else None,
        "misses": ex["misses"] if ex else None,
        "stall_seconds": ex["stall_seconds"] if ex else None,
        "bytes_by_precision": dict(ex["bytes_by_precision"]) if ex else None,
        "link_label": ex["link"]["label"] if ex else ("none" if policy == "resident" else
                                                       f"{link} (unused: every expert fits the budget)"),
        "emulated": bool(ex and ex["link"].get("emulated")),
        "link_bytes_per_s": (ex["link"].get("bytes_per_s") or None) if ex else None,
        "budget": d.get("budget"),
        "by_layer": [{k: r[k] for k in _LAYER_KEYS} for r in ex["by_layer"]] if ex else None,
        "generated_token_ids": d["generated_token_ids"],
    }
    return run


def _failed_row(policy, mem, link, all_runs: list[dict], prompt_tokens: int) -> dict:
    row = {k: None for k in ROW_KEYS}
    row.update(policy=policy, mem=mem, link=link, link_label=link, emulated=False, reps=0,
               prompt_tokens=prompt_tokens, runs=all_runs)
    return row


def _config_row(policy, mem, link, all_runs: list[dict], prompt_tokens: int) -> dict:
    runs = [r for r in all_runs if "error" not in r]
    errors = [r["error"] for r in all_runs if "error" in r]
    row = _failed_row(policy, mem, link, all_runs, prompt_tokens) if not runs else _measured_row(
        policy, mem, link, runs, prompt_tokens)
    row["failed_runs"] = len(errors)
    row["error"] = errors[0] if errors else None
    row["runs"] = [{k: v for k, v in r.items() if k != "budget"} for r in all_runs]
    return row


def _measured_row(policy, mem, link, runs: list[dict], prompt_tokens: int) -> dict:
    row = {"policy": policy, "mem": mem, "link": link, "reps": len(runs), "prompt_tokens": prompt_tokens,
           "decode_tokens": runs[0]["decode_tokens"]}
    labels = {r["link_label"] for r in runs}
    row["link_label"] = runs[0]["link_label"] if len(labels) == 1 else " | ".join(sorted(labels))
    row["emulated"] = any(r["emulated"] for r in runs)
    row["link_bytes_per_s"] = _median([r["link_bytes_per_s"] for r in runs])
    for k in _RUN_KEYS:
        row[k] = _median([r[k] for r in runs])
    for k in ("prefill_tok_s", "decode_tok_s"):
        row[k + "_min"] = min(r[k] for r in runs)
        row[k + "_max"] = max(r[k] for r in runs)
    for k in ("needed", "hits", "late_prefetches", "misses"):  # integers whenever the median is one
        if row[k] is not None and float(row[k]).is_integer():
            row[k] = int(row[k])
    if all(r["bytes_by_precision"] is not None for r in runs):
        precs = sorted({p for r in runs for p in r["bytes_by_precision"]},
                       key=lambda p: PRECISION_ORDER.index(p) if p in PRECISION_ORDER else 99)
        med = {p: statistics.median(r["bytes_by_precision"].get(p, 0) for r in runs) for p in precs}
        row["bytes_by_precision"] = {p: int(v) if float(v).is_integer() else v for p, v in med.items()}
        row["mb_by_precision"] = {p: v / 1e6 for p, v in med.items()}
    else:
        row["bytes_by_precision"] = row["mb_by_precision"] = None
    plan = runs[0]["budget"]
    row["slots"] = plan["slots"] if plan else None
    row["slots_per_layer"] = plan["slots_per_layer"] if plan else None
    if all(r["by_layer"] is not None for r in runs):
        row["by_layer"] = [{k: _median([r["by_layer"][i][k] for r in runs]) for k in _LAYER_KEYS}
                           for i in range(len(runs[0]["by_layer"]))]
    else:
        row["by_layer"] = None
    row["slot_fraction"] = plan["slot_fraction"] if plan else None
    row["budget_bytes"] = plan["budget_bytes"] if plan else None
    row["fully_resident"] = plan["fully_resident"] if plan else None
    return row


class BenchSession:
    """One benchmark: validated inputs, the prompt, the warm-up, then the runs."""

    def __init__(self, bundle, *, policies=ALL_POLICIES, mems=DEFAULT_MEMS, links=DEFAULT_LINKS,
                 prompt_ids: Sequence[int] | None = None, prompt: str | None = None,
                 prompt_tokens: int | None = None, n: int = 32, reps: int = 3, experts: str = "q4",
                 prefetch_extra: int | None = None, int2_share: float = 0.3, threads: int | None = None,
                 verify: bool = False, warmup: bool = True, reprofile: bool = True):
        import torch

        import fate
        from fate.formats.bundle import BundleError

        self.policies = parse_policies(policies)
        offloaded = [p for p in self.policies if p != "resident"]
        self.mems = parse_mems(mems) if offloaded else []
        self.links = parse_links(links) if offloaded else []
        if n < 2:
            raise _error(f"-n {n}: give at least 2 (decode speed needs one step after the first token)")
        if reps < 1:
            raise _error(f"-r {reps}: give at least 1 repetition")
        if sum(x is not None for x in (prompt_ids, prompt, prompt_tokens)) > 1:
            raise _error("give one prompt: -p TEXT, -f FILE or --prompt-tokens N")
        path = Path(bundle)
        if not path.exists():
            raise BundleError(f"{path}: no such bundle file")
        if path.is_dir():
            raise BundleError(f"{path} is a directory, not a bundle")
        if threads is not None:
            if threads < 1:
                raise _error(f"-t {threads}: give at least 1 thread")
            torch.set_num_threads(threads)
        self.bundle, self.n, self.reps = path, n, reps
        self.opts = {"experts": experts, "prefetch_extra": prefetch_extra, "int2_share": int2_share}
        self.threads = torch.get_num_threads()

        # the resident model: tokenizer, model figures, the optional integrity check and the warm-up
        try:
            ref = fate.load(path, experts=experts, policy="resident", verify=verify)
        except BundleError as e:  # the engine's advice names fate-run's flag; fate-bench's is the opposite
            raise BundleError(str(e).replace("run with --no-verify", "run without --verify")) from None
        try:
            cfg = ref.config
            if prompt_ids is not None:
                ids = [int(t) for t in prompt_ids]
            elif prompt is not None:
                ids = ref.encode_prompt(prompt)
            else:
                ids = synthetic_prompt(ref.tokenizer, prompt_tokens or DEFAULT_PROMPT_TOKENS)
            if not ids:
                raise _error("the prompt is empty (0 tokens); give some text")
            if len(ids) + n > ref.context:
                raise _error(f"the prompt ({len(ids)} tokens) plus -n {n} exceeds the context of {ref.context} "
                             "tokens; shorten the prompt or lower -n")
            self.prompt_ids = ids
            self.model_info = {
                "arch": cfg.model_type, "n_layers": cfg.n_layers,
                "moe_layers": len(cfg.moe_layer_ids), "n_experts": cfg.n_experts, "top_k": cfg.top_k,
                "hidden_size": cfg.hidden_size, "expert_ffn": cfg.expert_ffn, "experts": experts,
                "expert_blob_bytes": ref.store.blob_bytes(ref.precision),
            }
            if verify:  # every blob of every stored precision, once, before anything is timed
                for p in ref.store.precisions:
                    for i in cfg.moe_layer_ids:
                        for e in range(cfg.n_experts):
                            ref.store.blob(i, e, p)
            if warmup:  # torch's first calls (allocator, kernels) stay out of the first configuration
                ref.generate(ids[: min(len(ids), 16)], 2, temperature=0.0, stop_at_eos=False)
            self.profile = self._profile(ref, reprofile) if offloaded else None
        finally:
            ref.close()
        del ref
        gc.collect()
        # every budget must be one that runs: fail now, not after an hour of measuring (the plans kept
        # are fate's; lru spreads the same slots evenly, ondemand keeps top_k per layer)
        self.plans = {}
        for m in self.mems:
            probe = fate.load(path, experts=experts, policy="fate", mem=m, verify=False)
            try:
                self.plans[m] = probe.plan.to_dict() if probe.plan is not None else None
            finally:
                probe.close()

    @staticmethod
    def _profile(ref, reprofile: bool) -> dict:
        """The timing profile with which every configuration of this session resolves ``ratio:R`` links
        and fate's prefetch width: measured afresh and cached under the bundle's key, where the loads
        below find it; or, with ``reprofile=False``, the cached one (measured if there is none).

        Afresh means the fastest of five measurements: the profile stands for undisturbed compute,
        and one measurement disturbed by a busy machine must not set the link speed of the session
        (the engine otherwise keeps whatever it measured first, for good)."""
        from fate.runtime import profile as P

        key = P.profile_key(ref.bundle.path, ref.device, ref.dtype, ref.precision)
        prof = None if reprofile else P.load_cached(key)
        fresh = prof is None
        if fresh:
            prof = min((P.measure(ref.model, ref.store, ref.device, steps=8, precision=ref.precision) for _ in range(5)),
                       key=lambda p: p.layer_decode_seconds)
            P.save_cached(key, prof)
        return {"layer_decode_seconds": prof.layer_decode_seconds, "expert_copy_seconds": prof.expert_copy_seconds,
                "expert_bytes": prof.expert_bytes, "measured_at": prof.measured_at, "fresh": fresh}

    def configs(self) -> list[tuple[str, str, str]]:
        out = []
        for m in self.mems:
            for ln in self.links:
                out += [(p, m, ln) for p in self.policies if p != "resident"]
        if "resident" in self.policies:
            out.append(("resident", "all", "none"))
        return out

    def run(self, progress: bool = False) -> list[dict]:
        from tqdm import tqdm

        configs = self.configs()
        runs: dict[tuple, list[dict]] = {c: [] for c in configs}
        bar = tqdm(total=len(configs) * self.reps, desc="fate-bench", unit="run", file=sys.stderr,
                   disable=not progress, dynamic_ncols=True)
        try:
            for r in range(self.reps):
                order = configs if r % 2 == 0 else list(reversed(configs))
                for c in order:
                    policy, mem, link = c
                    bar.set_postfix_str(f"{policy} mem {mem} link {link} rep {r + 1}/{self.reps}", refresh=False)
                    try:
                        runs[c].append(_one_run(self.bundle, policy, mem, link, self.prompt_ids, self.n, self.opts))
                    except RuntimeError as e:  # an engine failure: record it, measure the others
                        runs[c].append({"error": f"{type(e).__name__}: {e}"})
                        gc.collect()
                    bar.update(1)
        finally:
            bar.close()
        rows = [_config_row(p, m, ln, runs[(p, m, ln)], len(self.prompt_ids)) for p, m, ln in configs]
        res = next((r for r in rows if r["policy"] == "resident"), None)
        base = {(r["mem"], r["link"]): r for r in rows if r["policy"] == "ondemand"}
        blob = self.model_info["expert_blob_bytes"]
        res_layer_s = (1.0 / res["decode_tok_s"] / self.model_info["n_layers"]
                       if res and res["decode_tok_s"] else None)
        for row in rows:
            bps = row["link_bytes_per_s"]
            row["copy_ms"] = 1e3 * blob / bps if bps else None
            row["effective_ratio"] = _ratio(blob / bps if bps else None, res_layer_s)
            od = base.get((row["mem"], row["link"]))
            row["prefill_speedup"] = _ratio(row["prefill_tok_s"], od["prefill_tok_s"]) if od else None
            row["decode_speedup"] = _ratio(row["decode_tok_s"], od["decode_tok_s"]) if od else None
            row["prefill_frac_resident"] = _ratio(row["prefill_tok_s"], res["prefill_tok_s"]) if res else None
            row["decode_frac_resident"] = _ratio(row["decode_tok_s"], res["decode_tok_s"]) if res else None
        return [{k: row[k] for k in ROW_KEYS} for row in rows]

    def meta(self) -> dict:
        import torch

        return {"bundle": str(self.bundle), "model": self.model_info, "prompt_tokens": len(self.prompt_ids),
                "n": self.n, "reps": self.reps, "threads": self.threads, "policies": self.policies,
                "mems": self.mems, "links": self.links, "plans": self.plans, "profile": self.profile,
                "prefetch_extra": self.opts["prefetch_extra"], "int2_share": self.opts["int2_share"],
                "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                "date": time.strftime("%Y-%m-%dT%H:%M:%S")}


def run_bench(bundle, policies: Sequence[str] | str = ALL_POLICIES, mems: Sequence[str] | str = DEFAULT_MEMS,
              links: Sequence[str] | str = DEFAULT_LINKS, prompt_ids: Sequence[int] | None = None, n: int = 32,
              reps: int = 3, *, prompt_tokens: int | None = None, experts: str = "q4",
              prefetch_extra: int | None = None, int2_share: float = 0.3, threads: int | None = None,
              verify: bool = False, warmup: bool = True, reprofile: bool = True,
              progress: bool = False) -> list[dict]:
    """Benchmark ``policies`` x ``mems`` x ``links`` on ``bundle``; one dict per configuration (keys:
    see the module docstring).  Without ``prompt_ids``, ``prompt_tokens`` (default 128) tokens of the
    calibration text are the prompt."""
    s = BenchSession(bundle, policies=policies, mems=mems, links=links, prompt_ids=prompt_ids,
                     prompt_tokens=prompt_tokens, n=n, reps=reps, experts=experts, prefetch_extra=prefetch_extra,
                     int2_share=int2_share, threads=threads, verify=verify, warmup=warmup, reprofile=reprofile)
    return s.run(progress=progress)


# --- output --------------------------------------------------------------------------------------------
def _precisions(rows) -> list[str]:
    seen = {p for r in rows for p in (r["bytes_by_precision"] or {})}
    return sorted(seen, key=lambda p: PRECISION_ORDER.index(p) if p in PRECISION_ORDER else 99)


def _fmt_rate(v, lo, hi) -> str:
    if v is None:
        return "-"
    if lo is None or hi is None or lo == hi:
        return f"{v:.1f}"
    return f"{v:.1f} ({lo:.1f}–{hi:.1f})"


def _fmt_x(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _fmt_pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def link_column(row) -> str:
    return f"{row['link']} (emulated)" if row["emulated"] else row["link"]


def table_text(rows: list[dict]) -> str:
    """The llama-bench-style markdown table: one row per configuration."""
    precs = _precisions(rows)
    head = (["policy", "mem", "link", "prefill t/s", "decode t/s", "prefill x od", "decode x od", "x resident",
             "hit rate", "dec hit", "dec recall"] + [f"MB {p}" for p in precs] + ["stall s"])
    right = [False, True, False] + [True] * (len(head) - 3)
    body = []
    for r in rows:
        mb = r["mb_by_precision"]
        body.append([r["policy"] + (" †" if r["error"] else ""), r["mem"], link_column(r),
                     _fmt_rate(r["prefill_tok_s"], r["prefill_tok_s_min"], r["prefill_tok_s_max"]),
                     _fmt_rate(r["decode_tok_s"], r["decode_tok_s_min"], r["decode_tok_s_max"]),
                     _fmt_x(r["prefill_speedup"]), _fmt_x(r["decode_speedup"]), _fmt_x(r["decode_frac_resident"]),
                     _fmt_pct(r["hit_rate"]), _fmt_pct(r["decode_hit_rate"]), _fmt_pct(r["decode_prefetch_recall"])]
                    + ["-" if mb is None else f"{mb.get(p, 0.0):.1f}" for p in precs]
                    + ["-" if r["stall_seconds"] is None else f"{r['stall_seconds']:.3f}"])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if ra else c.ljust(w) for c, w, ra in zip(cells, widths, right)) + " |"

    sep = "| " + " | ".join(("-" * (w - 1) + ":") if ra else "-" * w for w, ra in zip(widths, right)) + " |"
    return "\n".join([line(head), sep] + [line(b) for b in body])


def header_text(meta: dict) -> str:
    m = meta["model"]
    arch = f"{m['arch']}, " if m.get("arch") else ""
    return (f"fate-bench {Path(meta['bundle']).name}: {arch}{m['n_layers']} layers ({m['moe_layers']} MoE), "
            f"{m['n_experts']} experts top-{m['top_k']}, hidden {m['hidden_size']}, expert ffn {m['expert_ffn']}, "
            f"{m['experts']} experts ({m['expert_blob_bytes'] / 1e6:.3f} MB each); prompt {meta['prompt_tokens']} "
            f"tokens, -n {meta['n']}; median of {meta['reps']} (min–max); {meta['threads']} threads"
            + (f"; profiled layer decode {1e3 * meta['profile']['layer_decode_seconds']:.2f} ms"
               if meta.get("profile") else ""))


def footer_text(rows: list[dict]) -> str:
    notes = ["x od: ÷ ondemand at the same mem and link; x resident: decode t/s ÷ resident's; "
             "dec recall: decode-phase prefetch recall; MB: 10^6 bytes moved to the expert cache"]
    if any(r["emulated"] for r in rows):
        notes.append("(emulated): measured with copies slowed to the emulated link's speed (no real "
                     "host-to-device link); links: " + "; ".join(
                         sorted({f"{r['link']} = {r['link_label']}" for r in rows if r["emulated"]})))
        eff = sorted({(r["link"], round(r["copy_ms"], 3), None if r["effective_ratio"] is None
                       else round(r["effective_ratio"], 2)) for r in rows if r["emulated"] and r["copy_ms"]})
        if eff:
            notes.append("one expert copy: " + "; ".join(
                f"{ln} {ms:.2f} ms" + ("" if er is None else f" = {er:.2f} x resident's measured decode time per layer")
                for ln, ms, er in eff))
    for r in rows:
        if r["error"]:
            notes.append(f"† {r['policy']} mem {r['mem']} link {r['link']}: failed in {r['failed_runs']} of "
                         f"{r['failed_runs'] + r['reps']} repetitions ({r['error']})"
                         + ("; its figures are of the others" if r["reps"] else ""))
    return "\n".join(notes)


CSV_KEYS = [k for k in ROW_KEYS if k not in ("bytes_by_precision", "mb_by_precision", "slots_per_layer", "by_layer",
                                              "runs")]


def per_layer_text(rows: list[dict]) -> str:
    """Per MoE layer, for each offloaded configuration: slots, hit rate, prefetch recall and stall
    (both phases; medians over the repetitions) — where the misses and the waiting are."""
    out = []
    for r in rows:
        if not r["by_layer"]:
            continue
        out.append(f"{r['policy']} mem {r['mem']} link {link_column(r)}:")
        out.append("  layer  slots  needed   hit rate  recall  late  misses  stall s")
        for i, lay in enumerate(r["by_layer"]):
            if not lay["needed"]:
                continue
            slots = r["slots_per_layer"][i] if r["slots_per_layer"] else "-"
            out.append(f"  {i:5d}  {slots:>5}  {lay['needed']:6g}  {_fmt_pct(lay['hit_rate']):>9}  "
                       f"{_fmt_pct(lay['prefetch_recall']):>6}  {lay['late_prefetches']:4g}  {lay['misses']:6g}  "
                       f"{lay['stall_seconds']:7.3f}")
    return "\n".join(out)



def write_csv(path: Path, rows: list[dict]) -> None:
    precs = _precisions(rows)
    keys = CSV_KEYS + [f"mb_{p}" for p in precs]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            out = {k: ("" if r[k] is None else r[k]) for k in CSV_KEYS}
            for p in precs:
                mb = r["mb_by_precision"]
                out[f"mb_{p}"] = "" if mb is None else mb.get(p, 0.0)
            w.writerow(out)


def _mem_x(mems: list[str]):
    from fate.runtime.budget import parse_mem

    parsed = [parse_mem(m) for m in mems]
    if all(k == "percent" for k, _ in parsed):
        return [v for _, v in parsed], "expert budget (% of all experts)"
    if all(k == "bytes" for k, _ in parsed):
        return [v / 2**20 for _, v in parsed], "memory budget (MiB)"
    return list(range(len(mems))), "memory budget"


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise _error("--plot needs matplotlib, which is not installed: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plot(path: Path, rows: list[dict], meta: dict) -> None:
    """Decode (solid) and prefill (dashed) speedup over ondemand, and hit rate, against the budget."""
    plt = require_matplotlib()
    mems = meta["mems"]
    xs, xlabel = _mem_x(mems)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = {}
    for r in rows:
        if r["policy"] != "resident":
            series.setdefault((r["policy"], r["link"], r["emulated"]), {})[r["mem"]] = r
    for (policy, link, emulated), by_mem in series.items():
        label = f"{policy}, {link}" + (" (emulated)" if emulated else "")
        pts = [(x, by_mem[m]) for x, m in zip(xs, mems) if m in by_mem]
        dec = [(x, r["decode_speedup"]) for x, r in pts if r["decode_speedup"] is not None]
        pre = [(x, r["prefill_speedup"]) for x, r in pts if r["prefill_speedup"] is not None]
        hit = [(x, 100 * r["hit_rate"]) for x, r in pts if r["hit_rate"] is not None]
        if dec:
            line, = ax1.plot(*zip(*dec), marker="o", label=f"{label}: decode")
            if pre:
                ax1.plot(*zip(*pre), marker="s", linestyle="--", color=line.get_color(), label=f"{label}: prefill")
        if hit:
            ax2.plot(*zip(*hit), marker="o", label=label)
    ax1.set_title("speedup over ondemand (same budget and link)")
    ax1.set_ylabel("x ondemand")
    ax2.set_title("expert cache hit rate")
    ax2.set_ylabel("hit rate (%)")
    for ax in (ax1, ax2):
        ax.set_xlabel(xlabel)
        ax.set_xticks(xs)
        ax.set_xticklabels(mems)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    emulated = any(r["emulated"] for r in rows)
    fig.suptitle(Path(meta["bundle"]).name + (" — emulated link" if emulated else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- the command -----------------------------------------------------------------------------------------
@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("bundle", required=False, type=click.Path(path_type=str))
@click.option("--policies", default=",".join(ALL_POLICIES), show_default=True,
              help="Comma-separated policies: ondemand, lru, fate, resident.")
@click.option("--mem", "mems", default=",".join(DEFAULT_MEMS), show_default=True,
              help="Comma-separated memory budgets (P% of experts, or sizes like 512MiB).")
@click.option("--link", "links", default=",".join(DEFAULT_LINKS), show_default=True,
              help="Comma-separated emulated links: ratio:R, 12GB/s, pcie1/pcie3/pcie4, none.")
@click.option("-p", "--prompt", default=None, help="Prompt text.")
@click.option("-f", "--prompt-file", type=click.Path(path_type=str), default=None, help="Read the prompt from a file.")
@click.option("--prompt-tokens", type=int, default=None,
              help=f"Synthetic prompt: N tokens of the built-in calibration text [default: {DEFAULT_PROMPT_TOKENS}].")
@click.option("-n", "--n-predict", "n", default=32, show_default=True, help="Tokens to generate per run.")
@click.option("-r", "--repetitions", "reps", default=3, show_default=True, help="Repetitions (median reported).")
@click.option("--experts", "precision", default="q4", show_default=True, help="Expert precision: f16, q4 or q2.")
@click.option("--prefetch-extra", type=int, default=None, help="fate: extra prefetch candidates [default: profiled].")
@click.option("--int2-share", type=float, default=0.3, show_default=True,
              help="fate: INT2 share of prefill assignments.")
@click.option("-t", "--threads", type=int, default=None, help="CPU threads.")
@click.option("--verify", is_flag=True, help="Check every expert blob's crc32 once before measuring.")
@click.option("--cached-profile", is_flag=True,
              help="Use the cached timing profile (ratio:R links, fate's prefetch width) instead of measuring "
                   "it afresh at the start.")
@click.option("--json", "json_path", type=click.Path(path_type=str), default=None, help="Write the rows as JSON.")
@click.option("--csv", "csv_path", type=click.Path(path_type=str), default=None, help="Write the rows as CSV.")
@click.option("--plot", "plot_path", type=click.Path(path_type=str), default=None,
              help="Draw speedup and hit rate against the budget (PNG; needs matplotlib).")
@click.option("--per-layer", is_flag=True,
              help="Also print per-layer hit rate, recall and stalls of each configuration.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def main(bundle, policies, mems, links, prompt, prompt_file, prompt_tokens, n, reps, precision, prefetch_extra,
         int2_share, threads, verify, cached_profile, json_path, csv_path, plot_path, per_layer, no_progress,
         debug):
    """Benchmark expert offloading policies on a fate BUNDLE, side by side in one process.

    \b
    Examples:
      fate-bench model.gguf
      fate-bench model.gguf --policies ondemand,fate,resident --mem 25%,50% --link ratio:1 -r 5
      fate-bench model.gguf --link pcie3,ratio:2 --json bench.json --plot bench.png
    """
    with user_errors(debug):
        _main(bundle, policies, mems, links, prompt, prompt_file, prompt_tokens, n, reps, precision,
              prefetch_extra, int2_share, threads, verify, cached_profile, json_path, csv_path, plot_path,
              per_layer, no_progress)
    sys.exit(0)


def _main(bundle, policies, mems, links, prompt, prompt_file, prompt_tokens, n, reps, precision, prefetch_extra,
          int2_share, threads, verify, cached_profile, json_path, csv_path, plot_path, per_layer, no_progress):
    if not bundle:
        raise _error("no bundle given: fate-bench BUNDLE (see fate-bench --help)")
    # everything that can be checked without measuring is checked first
    parse_policies(policies)
    parse_mems(mems)
    parse_links(links)
    if plot_path:
        require_matplotlib()
    if prompt is not None and prompt_file is not None:
        raise _error("give the prompt with -p or -f, not both")
    if prompt_file is not None:
        try:
            prompt = Path(prompt_file).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise _error(f"-f {prompt_file}: the prompt file is not UTF-8 text") from None
    if prompt is not None and prompt_tokens is not None:
        raise _error("give -p/-f or --prompt-tokens, not both")
    s = BenchSession(bundle, policies=policies, mems=mems, links=links, prompt=prompt, prompt_tokens=prompt_tokens,
                     n=n, reps=reps, experts=precision, prefetch_extra=prefetch_extra, int2_share=int2_share,
                     threads=threads, verify=verify, reprofile=not cached_profile)
    rows = s.run(progress=not no_progress)
    meta = s.meta()
    click.echo(header_text(meta))
    click.echo()
    click.echo(table_text(rows))
    click.echo()
    click.echo(footer_text(rows))
    if per_layer:
        text = per_layer_text(rows)
        if text:
            click.echo()
            click.echo(text)
    if json_path:
        Path(json_path).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=_json_default))
    if csv_path:
        write_csv(Path(csv_path), rows)
    if plot_path:
        write_plot(Path(plot_path), rows, meta)
    failed = [r for r in rows if r["error"]]
    if failed:
        click.echo(f"error: {len(failed)} configuration(s) failed in the engine (marked †)", err=True)
        sys.exit(1)


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


if __name__ == "__main__":
    main()
