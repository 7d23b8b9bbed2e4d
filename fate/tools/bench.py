"""fate-bench: expert offloading policies side by side, in one process, on the same prompt.

    fate-bench model.gguf                                   # all policies, --mem 25%,50%,75%, --link ratio:1
    fate-bench model.gguf --policies ondemand,fate --mem 25%,50% --link ratio:1,pcie3 -n 32 -r 5
    fate-bench model.gguf --json bench.json --csv bench.csv --plot bench.png

Every configuration (policy, --mem, --link) is loaded afresh for every repetition — an empty expert
cache each time, as a user's first generation would see — and generates ``-n`` tokens greedily after
the same prompt (``-p``, ``-f``/``--prompt-file``, or ``--prompt-tokens N`` tokens of the package's
calibration text).  The repetitions alternate over the configurations (forwards, then backwards) so
that the noise of a shared machine hits all of them alike; the table gives the median and the
min–max spread.  ``resident`` (every expert read into memory at load, as ``--no-mmap``) runs once per repetition, whatever the budgets
and links, and is the reference of the "x resident" column; ``ondemand`` (Load-on-Demand) at the same
budget and link is the reference of the speedups.

Figures measured under an emulated link (``--link``; see :mod:`fate.runtime.experts.link`) are labelled
``(emulated)``: copies were slowed to what the link would allow, on a machine whose real copies are
memcpy.

Python: ``run_bench(bundle, policies=..., mems=..., links=..., prompt_ids=..., n=..., reps=...)`` returns one
row per configuration, in the stats schema of docs/STATS.md (the names fate-run --stats-json uses):

* ``policy``, ``mem`` (as asked; ``"all"`` for resident), ``link`` (as asked; ``"none"`` for resident),
  ``link_label`` (the resolved link, e.g. ``"ratio:1 (60.2 MB/s, emulated)"``), ``emulated``,
  ``link_bytes_per_s``, ``copy_ms`` (one expert at the run's precision over it) and ``effective_ratio``
  (that copy ÷ resident's measured decode time per layer in this session), ``reps`` (repetitions that
  completed), ``failed_runs`` and ``error`` (the first message of a failed repetition);
* ``prefill`` and ``decode``: ``tokens``, ``seconds``, ``tokens_per_s`` (medians), ``tokens_per_s_min``,
  ``tokens_per_s_max`` (the spread), ``x_ondemand`` (÷ ondemand's tokens_per_s at the same mem and link)
  and ``x_resident`` (÷ resident's); None where there is no reference;
* ``experts``: the engine's ``experts`` block (``total``, ``prefill``, ``decode``, ``layers``,
  ``bytes_by_precision``), every figure the median over the repetitions, plus ``mb_by_precision``
  (MB = 10^6 bytes); None where nothing is offloaded (resident, or a budget that holds every expert);
* ``budget``: ``slots``, ``slots_per_layer``, ``slot_fraction``, ``budget_bytes``, ``fully_resident`` (the
  memory plan; None for resident);
* ``runs``: each repetition's own stats (``prefill``, ``decode``, ``experts``, ``budget``,
  ``generated_token_ids``, ...), or its ``error``.
"""

from __future__ import annotations

import csv
import gc
import platform
import statistics
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tqdm import tqdm

import fate
from fate.errors import BundleError, EngineError, UsageError, UserError
from fate.runtime.experts import profile as P
from fate.runtime.experts.budget import parse_mem
from fate.runtime.experts.link import parse_link
from fate.runtime.options import EngineOptions
from fate.sysinfo import default_threads

ALL_POLICIES = ("ondemand", "lru", "paper", "fate", "resident")
DEFAULT_POLICIES = ("ondemand", "lru", "fate", "resident")
DEFAULT_MEMS = ("25%", "50%", "75%")
DEFAULT_LINKS = ("ratio:1",)
DEFAULT_PROMPT_TOKENS = 128
PRECISION_ORDER = ("f16", "q4", "q2")
PHASES = ("prefill", "decode")

ROW_KEYS = ("policy", "mem", "link", "link_label", "emulated", "link_bytes_per_s", "copy_ms", "effective_ratio",
            "reps", "failed_runs", "error", "prefill", "decode", "experts", "budget", "simulated", "runs")
BUDGET_KEYS = ("slots", "slots_per_layer", "slot_fraction", "budget_bytes", "fully_resident")


# --- parsing the lists ------------------------------------------------------------------------------
def _split(value: str | Iterable[str] | None, option: str) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    out = []
    for item in items:
        s = item.strip()
        if not s:
            raise UsageError(f"{option} {value if isinstance(value, str) else ','.join(items)!r}: "
                             "an empty item; give a comma-separated list")
        if s not in out:
            out.append(s)
    if not out:
        raise UsageError(f"{option}: the list is empty")
    return out


def parse_policies(value) -> list[str]:
    out = [p.lower() for p in _split(value, "--policies")]
    bad = [p for p in out if p not in ALL_POLICIES]
    if bad:
        raise UsageError(f"--policies: unknown policy {bad[0]!r}; choose from {', '.join(ALL_POLICIES)}")
    return out


def _parse_list(value, option: str, parse) -> list[str]:
    """Split a comma list and check every item with ``parse``; a bad item is one error naming the list."""
    out = _split(value, option)
    for item in out:
        try:
            parse(item)
        except UserError as e:
            raise UsageError(f"{e} (in the {option} list {','.join(out)!r})") from None
    return out


def parse_mems(value) -> list[str]:
    return _parse_list(value, "--mem", parse_mem)


def parse_links(value) -> list[str]:
    return _parse_list(value, "--link", parse_link)


def synthetic_prompt(tokenizer, n_tokens: int) -> list[int]:
    """``n_tokens`` ids of the package's calibration text (BOS first where the tokenizer adds one),
    the text repeated if it is shorter; the same ids on every run."""
    if n_tokens < 1:
        raise UsageError(f"--prompt-tokens {n_tokens}: give at least 1")
    text = resources.files("fate").joinpath("data/calib.txt").read_text(encoding="utf-8")
    ids = list(tokenizer.encode(text, add_special_tokens=True))
    body = list(tokenizer.encode(text, add_special_tokens=False)) or ids
    if not ids:
        raise UsageError("the bundle's tokenizer turns the calibration text into no tokens; give a prompt with -p")
    while len(ids) < n_tokens:
        ids.extend(body)
    return ids[:n_tokens]


# --- medians over the repetitions ---------------------------------------------------------------------
def _median(values: list):
    """The median of numbers (an int when it is one); None when any is None; a shared string as is."""
    if any(v is None for v in values):
        return None
    if all(isinstance(v, str) for v in values):
        return values[0] if len(set(values)) == 1 else " | ".join(sorted(set(values)))
    if all(isinstance(v, bool) for v in values):
        return any(values)
    m = statistics.median(values)
    return int(m) if float(m).is_integer() and all(isinstance(v, int) for v in values) else m


def median_tree(trees: list):
    """Same-shaped dicts/lists (the runs' stats) → one of that shape whose leaves are the medians; a key
    missing from some runs (a precision one run never moved) counts as 0 there."""
    first = trees[0]
    if isinstance(first, dict):
        keys = list(dict.fromkeys(k for t in trees for k in t))
        return {k: median_tree([t.get(k, 0) for t in trees]) for k in keys}
    if isinstance(first, list):
        if any(len(t) != len(first) for t in trees):
            return None
        return [median_tree([t[i] for t in trees]) for i in range(len(first))]
    return _median(trees)


def _ratio(a, b):
    if a is None or b is None or not b:
        return None
    return a / b


# --- running ---------------------------------------------------------------------------------------
def _one_run(bundle, policy, mem, link, prompt_ids, n, opts) -> dict:
    """One fresh load and generation; its stats in the schema of docs/STATS.md."""
    kw = dict(experts=opts["experts"], policy=policy, verify=False, threads=opts["threads"])
    if policy != "resident":
        kw.update(mem=mem, link=link, predictor=opts["predictor"], prefetch_extra=opts["prefetch_extra"],
                  int2_share=opts["int2_share"], evict=opts["evict"])
    m = fate.load(bundle, **kw)
    try:
        out = m.generate(list(prompt_ids), n, temperature=0.0, stop_at_eos=False)
    finally:
        m.close()
    d = out.stats.to_dict()
    del m, out
    gc.collect()  # between runs, not inside the timed part: the next configuration starts clean
    d.pop("prompt_token_ids")
    return d


def _link_of(run: dict, policy: str, link: str) -> tuple[str, bool, float | None]:
    ex = run["experts"]
    if ex is None:
        return ("none" if policy == "resident" else f"{link} (unused: every expert fits the budget)"), False, None
    return ex["link"]["label"], bool(ex["link"]["emulated"]), ex["link"]["bytes_per_s"] or None


def _config_row(policy, mem, link, all_runs: list[dict]) -> dict:
    runs = [r for r in all_runs if "error" not in r]
    errors = [r["error"] for r in all_runs if "error" in r]
    row = dict.fromkeys(ROW_KEYS)
    row.update(policy=policy, mem=mem, link=link, link_label=link, emulated=False, reps=len(runs),
               failed_runs=len(errors), error=errors[0] if errors else None, runs=all_runs)
    if not runs:
        return row
    links = [_link_of(r, policy, link) for r in runs]
    row["link_label"] = _median([ln[0] for ln in links])
    row["emulated"] = any(ln[1] for ln in links)
    row["link_bytes_per_s"] = _median([ln[2] for ln in links])
    for ph in PHASES:
        p = median_tree([r[ph] for r in runs])
        rates = [r[ph]["tokens_per_s"] for r in runs]
        row[ph] = {**p, "tokens_per_s_min": min(rates), "tokens_per_s_max": max(rates), "x_ondemand": None,
                   "x_resident": None}
    if all(r["experts"] is not None for r in runs):
        ex = median_tree([{k: v for k, v in r["experts"].items() if k not in ("policy", "evict", "link")} for r in runs])
        order = sorted(ex["bytes_by_precision"], key=lambda q: PRECISION_ORDER.index(q) if q in PRECISION_ORDER else 99)
        ex["bytes_by_precision"] = {q: ex["bytes_by_precision"][q] for q in order}
        ex["mb_by_precision"] = {q: v / 1e6 for q, v in ex["bytes_by_precision"].items()}
        row["experts"] = ex
    plan = runs[0]["budget"]
    row["budget"] = {k: plan[k] for k in BUDGET_KEYS} if plan else None
    return row


class BenchSession:
    """One benchmark: validated inputs, the prompt, the warm-up, then the runs."""

    def __init__(self, bundle, *, policies=DEFAULT_POLICIES, mems=DEFAULT_MEMS, links=DEFAULT_LINKS,
                 prompt_ids: Sequence[int] | None = None, prompt: str | None = None,
                 prompt_tokens: int | None = None, n: int = 32, reps: int = 3, experts: str = "q4",
                 prefetch_extra: int | None = None, int2_share: float = 0.3, threads: int | None = None,
                 verify: bool = False, warmup: bool = True, reprofile: bool = True, simulate: bool = False,
                 measure: bool = True, predictor: str = "fitted", evict: str = "auto"):
        self.policies = parse_policies(policies)
        offloaded = [p for p in self.policies if p != "resident"]
        self.mems = parse_mems(mems) if offloaded else []
        self.links = parse_links(links) if offloaded else []
        if n < 2:
            raise UsageError(f"-n {n}: give at least 2 (decode speed needs one step after the first token)")
        if reps < 1:
            raise UsageError(f"-r {reps}: give at least 1 repetition")
        if sum(x is not None for x in (prompt_ids, prompt, prompt_tokens)) > 1:
            raise UsageError("give one prompt: -p TEXT, -f FILE or --prompt-tokens N")
        path = Path(bundle)
        if not path.exists():
            raise BundleError(f"{path}: no such bundle file")
        if path.is_dir():
            raise BundleError(f"{path} is a directory, not a bundle")
        if threads is not None and threads < 1:
            raise UsageError(f"-t {threads}: give at least 1 thread")
        self.bundle, self.n, self.reps, self.measure = path, n, reps, measure
        # every model of the session, the reference and each run, computes with the same -t (a model applies
        # its own thread split: fate's kernels get the threads where they compute, torch otherwise)
        self.threads = threads if threads is not None else default_threads()
        EngineOptions(predictor=predictor, evict=evict).validate()
        self.opts = {"experts": experts, "predictor": predictor, "prefetch_extra": prefetch_extra, "evict": evict,
                     "int2_share": int2_share,
                     "threads": self.threads}

        # the resident model: tokenizer, model figures, the optional integrity check and the warm-up
        try:
            # every expert read into memory (--no-mmap): computing from the map's 4 KiB pages measured up
            # to 1.4x slower per token on a 2-vCPU VM (TLB misses), a slower reference than offloading's slots
            ref = fate.load(path, experts=experts, policy="resident", verify=verify, no_mmap=True,
                            threads=self.threads)
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
                raise UsageError("the prompt is empty (0 tokens); give some text")
            if len(ids) + n > ref.context:
                raise UsageError(f"the prompt ({len(ids)} tokens) plus -n {n} exceeds the context of {ref.context} "
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
            self.simulated = self._simulate(ref) if simulate and offloaded else {}
        finally:
            ref.close()
        del ref
        gc.collect()
        # every budget must be one that runs: fail now, not after an hour of measuring (the plans kept
        # are fate's; lru spreads the same slots evenly, ondemand keeps top_k per layer)
        self.plans = {}
        for m in self.mems:
            probe = fate.load(path, experts=experts, policy="fate", mem=m, verify=False, threads=self.threads)
            try:
                self.plans[m] = probe.plan.to_dict() if probe.plan is not None else None
            finally:
                probe.close()

    def _profile(self, ref, reprofile: bool) -> dict:
        """The timing profile with which every configuration of this session resolves ``ratio:R`` links
        and fate's prefetch width: measured afresh and cached under the bundle's key, where the loads
        below find it; or, with ``reprofile=False``, the cached one (measured if there is none).

        Afresh means the fastest of five measurements: the profile stands for undisturbed compute,
        and one measurement disturbed by a busy machine must not set the link speed of the session
        (the engine otherwise keeps whatever it measured first, for good)."""
        kernels = ref.options.kernels
        key = P.profile_key(ref.bundle.path, ref.device, ref.dtype, ref.precision, kernels, ref.threads)
        prof = None if reprofile else P.load_cached(key)
        fresh = prof is None
        if fresh:
            ref.use_threads()  # measured with the session's -t, as its runs compute
            prof = min((P.measure(ref.config, ref.weights, ref.store, ref.device, ref.dtype, ref.precision, steps=8,
                                  kernels=kernels)
                        for _ in range(5)), key=lambda p: p.layer_decode_seconds)
            P.save_cached(key, prof)
        self._profile_obj = prof
        return {"layer_decode_seconds": prof.layer_decode_seconds, "expert_copy_seconds": prof.expert_copy_seconds,
                "expert_bytes": prof.expert_bytes, "measured_at": prof.measured_at, "fresh": fresh}

    def _simulate(self, ref) -> dict:
        """Every configuration replayed by the trace simulator: the routing of this prompt and its greedy
        continuation (``n`` tokens) through the engine's own policy objects, with this session's profile."""
        from fate.runtime.experts import offloading as OFF
        from fate.runtime.experts import simulate as S
        from fate.runtime.experts.link import resolve_ratio
        from fate.runtime.experts.prefetch import prediction_maps, rank_chances
        from fate.runtime.experts.trace import record_trace
        from fate.formats import constants as C

        ids = self.prompt_ids
        out = ref.generate(ids, self.n, temperature=0.0, stop_at_eos=False)
        cfg = ref.config
        maps = prediction_maps(ref.bundle, cfg) if self.opts["predictor"] == "fitted" else None
        trace = record_trace(ref.model, ids + out.token_ids[:-1], maps=maps)
        prof = self._profile_obj
        store = ref.store
        routers = {i: ref.weights.get(C.T_FFN_GATE_INP.format(i=i)) for i in cfg.moe_layer_ids}
        chances = rank_chances(ref.bundle, cfg)
        slot_bytes = store.blob_bytes(ref.precision)
        res: dict = {}
        reuse = OFF.reuse_curves(ref.bundle)

        def replay(policy: str, mem: str, ln: str, bound: bool = False):
            """The replay of ``policy`` at this budget and link (None: the plan keeps every expert resident);
            ``bound``: the perfect-prediction replay of ``policy``'s plan and caching instead."""
            link = parse_link(ln)
            if link.kind == "ratio":
                link = resolve_ratio(link, prof.layer_decode_seconds, slot_bytes)
            opts = EngineOptions(experts=ref.precision, policy=policy, mem=mem, link=ln, evict=self.opts["evict"])
            copies = OFF.copies_per_layer(parse_link(ln), lambda: prof, slot_bytes)
            plan = OFF.plan(cfg, store, ref.bundle, opts, ref.precision, ref.weights.nbytes, ref.kv.nbytes,
                            ref.dtype, ref.context, copies)
            if plan.fully_resident:
                return None
            timing = S.timing_for(prof, link, store, ref.precision)
            rate = link.bytes_per_s if link.kind == "bandwidth" else None
            extra = prof.extra_candidates(cfg.top_k, cfg.n_experts, ref.precision, rate)
            max_new = prof.copies_in_window(ref.precision, rate)
            if self.opts["prefetch_extra"] is not None:
                extra, max_new = self.opts["prefetch_extra"], None
            elif policy == "fate":
                extra = max(extra, cfg.top_k)
            kw = dict(chances=chances, routers=routers, evict=opts.eviction(), extra=extra,
                      max_new=max_new, decode_precision=ref.precision, warmup=len(ids), reuse=reuse)
            return S.simulate_policy(trace, timing, cfg, plan.slots_per_layer, "perfect" if bound else policy, **kw)

        bounds: dict = {}  # (mem, link) -> the cell's ceiling: fate's plan and caching, told the experts exactly
        for policy, mem, ln in self.configs():
            if policy == "resident":
                continue
            r = replay(policy, mem, ln)
            if r is None:
                continue
            if (mem, ln) not in bounds:
                bounds[mem, ln] = replay("fate", mem, ln, bound=True)
            perfect = bounds[mem, ln]
            resident = 1.0 / (cfg.n_layers * prof.layer_decode_seconds)
            res[(policy, mem, ln)] = {"decode": {"tokens_per_s": r.tokens_per_s}, "experts": r.experts,
                                      "link_busy": r.link_busy,
                                      "perfect_tokens_per_s": None if perfect is None else perfect.tokens_per_s,
                                      "resident_tokens_per_s": resident}
        return res

    def configs(self) -> list[tuple[str, str, str]]:
        out = []
        for m in self.mems:
            for ln in self.links:
                out += [(p, m, ln) for p in self.policies if p != "resident"]
        if "resident" in self.policies:
            out.append(("resident", "all", "none"))
        return out

    def run(self, progress: bool = False) -> list[dict]:
        configs = self.configs()
        runs: dict[tuple, list[dict]] = {c: [] for c in configs}
        bar = tqdm(total=len(configs) * self.reps, desc="fate-bench", unit="run", file=sys.stderr,
                   disable=not progress, dynamic_ncols=True)
        try:
            for r in range(self.reps if self.measure else 0):
                order = configs if r % 2 == 0 else list(reversed(configs))
                for c in order:
                    policy, mem, link = c
                    bar.set_postfix_str(f"{policy} mem {mem} link {link} rep {r + 1}/{self.reps}", refresh=False)
                    try:
                        runs[c].append(_one_run(self.bundle, policy, mem, link, self.prompt_ids, self.n, self.opts))
                    except (EngineError, RuntimeError) as e:  # an engine failure: record it, measure the others
                        runs[c].append({"error": f"{type(e).__name__}: {e}"})
                        gc.collect()
                    bar.update(1)
        finally:
            bar.close()
        rows = [_config_row(p, m, ln, runs[(p, m, ln)]) for p, m, ln in configs]
        res = next((r for r in rows if r["policy"] == "resident" and r["reps"]), None)
        res_tps = res["decode"]["tokens_per_s"] if res else None
        for row in rows:
            sim = self.simulated.get((row["policy"], row["mem"], row["link"]))
            if sim is not None:
                measured = _get(row, "decode", "tokens_per_s")
                anchored = _anchored(sim["decode"]["tokens_per_s"], sim["resident_tokens_per_s"], res_tps)
                row["simulated"] = {**sim, "efficiency": _ratio(measured, sim["decode"]["tokens_per_s"]),
                                    "anchored_tokens_per_s": anchored,
                                    "anchored_efficiency": _ratio(measured, anchored)}
        base = {(r["mem"], r["link"]): r for r in rows if r["policy"] == "ondemand" and r["reps"]}
        blob = self.model_info["expert_blob_bytes"]
        res_layer_s = 1.0 / res_tps / self.model_info["n_layers"] if res_tps else None
        for row in rows:
            bps = row["link_bytes_per_s"]
            row["copy_ms"] = 1e3 * blob / bps if bps else None
            row["effective_ratio"] = _ratio(blob / bps if bps else None, res_layer_s)
            if not row["reps"]:
                continue
            od = base.get((row["mem"], row["link"]))
            for ph in PHASES:
                tps = row[ph]["tokens_per_s"]
                row[ph]["x_ondemand"] = _ratio(tps, od[ph]["tokens_per_s"]) if od else None
                row[ph]["x_resident"] = _ratio(tps, res[ph]["tokens_per_s"]) if res else None
        return rows

    def meta(self) -> dict:
        return {"bundle": str(self.bundle), "model": self.model_info, "prompt_tokens": len(self.prompt_ids),
                "n": self.n, "reps": self.reps, "threads": self.threads, "policies": self.policies,
                "mems": self.mems, "links": self.links, "plans": self.plans, "profile": self.profile,
                "predictor": self.opts["predictor"], "prefetch_extra": self.opts["prefetch_extra"],
                "int2_share": self.opts["int2_share"], "evict": self.opts["evict"],
                "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                "date": time.strftime("%Y-%m-%dT%H:%M:%S")}


def run_bench(bundle, policies: Sequence[str] | str = DEFAULT_POLICIES, mems: Sequence[str] | str = DEFAULT_MEMS,
              links: Sequence[str] | str = DEFAULT_LINKS, prompt_ids: Sequence[int] | None = None, n: int = 32,
              reps: int = 3, *, prompt_tokens: int | None = None, experts: str = "q4",
              prefetch_extra: int | None = None, int2_share: float = 0.3, threads: int | None = None,
              verify: bool = False, warmup: bool = True, reprofile: bool = True,
              progress: bool = False, simulate: bool = False, measure: bool = True,
              predictor: str = "fitted", evict: str = "auto") -> list[dict]:
    """Benchmark ``policies`` x ``mems`` x ``links`` on ``bundle``; one dict per configuration (keys:
    see the module docstring).  Without ``prompt_ids``, ``prompt_tokens`` (default 128) tokens of the
    calibration text are the prompt.  ``simulate`` adds each configuration's trace replay (``simulated``);
    ``measure=False`` runs nothing but the replay."""
    s = BenchSession(bundle, policies=policies, mems=mems, links=links, prompt_ids=prompt_ids,
                     prompt_tokens=prompt_tokens, n=n, reps=reps, experts=experts, prefetch_extra=prefetch_extra,
                     int2_share=int2_share, threads=threads, verify=verify, warmup=warmup, reprofile=reprofile,
                     simulate=simulate or not measure, measure=measure, predictor=predictor, evict=evict)
    return s.run(progress=progress)


# --- output --------------------------------------------------------------------------------------------
def _get(row, *path):
    v = row
    for p in path:
        if v is None:
            return None
        v = v.get(p)
    return v


def _precisions(rows) -> list[str]:
    seen = {p for r in rows for p in (_get(r, "experts", "bytes_by_precision") or {})}
    return sorted(seen, key=lambda p: PRECISION_ORDER.index(p) if p in PRECISION_ORDER else 99)


def _fmt_rate(ph) -> str:
    if ph is None or ph["tokens_per_s"] is None:
        return "-"
    v, lo, hi = ph["tokens_per_s"], ph["tokens_per_s_min"], ph["tokens_per_s_max"]
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
             "hit rate", "dec hit", "dec recall"] + [f"MB {p}" for p in precs] + ["stall s", "host µs/layer"])
    right = [False, True, False] + [True] * (len(head) - 3)
    body = []
    for r in rows:
        mb = _get(r, "experts", "mb_by_precision")
        stall = _get(r, "experts", "total", "stall_seconds")
        body.append([r["policy"] + (" †" if r["error"] else ""), r["mem"], link_column(r),
                     _fmt_rate(r["prefill"]), _fmt_rate(r["decode"]),
                     _fmt_x(_get(r, "prefill", "x_ondemand")), _fmt_x(_get(r, "decode", "x_ondemand")),
                     _fmt_x(_get(r, "decode", "x_resident")),
                     _fmt_pct(_get(r, "experts", "total", "hit_rate")), _fmt_pct(_get(r, "experts", "decode", "hit_rate")),
                     _fmt_pct(_get(r, "experts", "decode", "prefetch_recall"))]
                    + ["-" if mb is None else f"{mb.get(p, 0.0):.1f}" for p in precs]
                    + ["-" if stall is None else f"{stall:.3f}"]
                    + ["-" if (hu := host_us_per_layer(r)) is None else f"{hu:.0f}"])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if ra else c.ljust(w) for c, w, ra in zip(cells, widths, right)) + " |"

    sep = "| " + " | ".join(("-" * (w - 1) + ":") if ra else "-" * w for w, ra in zip(widths, right)) + " |"
    return "\n".join([line(head), sep] + [line(b) for b in body])


def host_us_per_layer(row) -> float | None:
    """The offloading policy's own host time per MoE layer and decode token, in µs (measured)."""
    host = _get(row, "experts", "decode", "host_seconds")
    tokens = _get(row, "decode", "tokens")
    layers = sum(1 for lay in (_get(row, "experts", "layers") or []) if lay["needed"])
    if host is None or not tokens or not layers:
        return None
    return 1e6 * host / (tokens * layers)


def _anchored(sim_tps: float, sim_resident_tps: float, measured_resident_tps: float | None) -> float | None:
    """The simulated decode with the simulator's compute replaced by the resident run's measured compute:
    per token, the measured resident time plus what the replay adds to its own resident time (stalls).
    The profile's compute is the fastest of a few layer measurements and leaves out what is not a layer
    (embedding, LM head, sampling), so the plain replay is faster than any run, resident included;
    measured / anchored is what the engine itself loses (host work, and the link model's error)."""
    if not sim_tps or not sim_resident_tps or not measured_resident_tps:
        return None
    t = 1.0 / measured_resident_tps + max(0.0, 1.0 / sim_tps - 1.0 / sim_resident_tps)
    return 1.0 / t


def simulated_text(rows: list[dict]) -> str:
    """The trace simulator's figures beside the measured ones: per configuration the simulated decode
    (zero host cost), its hit rate, the perfect-prediction bound (the budget and link's: the same in each of
    its rows), measured / simulated, and the measured host time per layer."""
    out = ["| policy | mem | link | sim decode t/s | sim x resident | sim hit rate | perfect x resident | "
           "measured / sim | anchored sim t/s | measured / anchored | host µs/layer |",
           "| --- | --: | --- | --: | --: | --: | --: | --: | --: | --: | --: |"]
    for r in rows:
        sim = r.get("simulated")
        if not sim:
            continue
        res = sim["resident_tokens_per_s"]
        anc = sim.get("anchored_tokens_per_s")
        hu = host_us_per_layer(r)
        out.append(f"| {r['policy']} | {r['mem']} | {link_column(r)} | {sim['decode']['tokens_per_s']:.1f} | "
                   f"{_fmt_x(_ratio(sim['decode']['tokens_per_s'], res))} | {_fmt_pct(sim['experts']['decode']['hit_rate'])} | "
                   f"{_fmt_x(_ratio(sim['perfect_tokens_per_s'], res))} | {_fmt_x(sim['efficiency'])} | "
                   f"{'-' if anc is None else f'{anc:.1f}'} | "
                   f"{_fmt_x(sim.get('anchored_efficiency'))} | {'-' if hu is None else f'{hu:.0f}'} |")
    return "\n".join(out) if len(out) > 2 else ""


def header_text(meta: dict) -> str:
    m = meta["model"]
    arch = f"{m['arch']}, " if m.get("arch") else ""
    return (f"fate-bench {Path(meta['bundle']).name}: {arch}{m['n_layers']} layers ({m['moe_layers']} MoE), "
            f"{m['n_experts']} experts top-{m['top_k']}, hidden {m['hidden_size']}, expert ffn {m['expert_ffn']}, "
            f"{m['experts']} experts ({m['expert_blob_bytes'] / 1e6:.3f} MB each); prompt {meta['prompt_tokens']} "
            f"tokens, -n {meta['n']}; median of {meta['reps']} (min–max); {meta['threads']} threads"
            + (f"; profiled layer decode {1e3 * meta['profile']['layer_decode_seconds']:.2f} ms"
               if meta.get("profile") else "")
            + "".join(f"; --{k} {meta[k]}" for k, default in (("predictor", "fitted"), ("evict", "auto"))
                      if meta.get(k, default) != default))


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


def per_layer_text(rows: list[dict]) -> str:
    """Per MoE layer, for each offloaded configuration: slots, hit rate, prefetch recall, evictions and
    stall (both phases; medians over the repetitions) — where the misses and the waiting are."""
    out = []
    for r in rows:
        layers = _get(r, "experts", "layers")
        if not layers:
            continue
        slots = _get(r, "budget", "slots_per_layer")
        out.append(f"{r['policy']} mem {r['mem']} link {link_column(r)}:")
        out.append("  layer  slots  needed   hit rate  recall  late  misses  evict  stall s")
        for i, lay in enumerate(layers):
            if not lay["needed"]:
                continue
            out.append(f"  {i:5d}  {slots[i] if slots else '-':>5}  {lay['needed']:6g}  {_fmt_pct(lay['hit_rate']):>9}  "
                       f"{_fmt_pct(lay['prefetch_recall']):>6}  {lay['late_prefetches']:4g}  {lay['misses']:6g}  "
                       f"{lay['evictions']:5g}  {lay['stall_seconds']:7.3f}")
    return "\n".join(out)


def _flat(prefix: str, d, out: dict) -> None:
    for k, v in d.items():
        if isinstance(v, dict):
            _flat(f"{prefix}{k}.", v, out)
        elif not isinstance(v, list):
            out[prefix + k] = v


def csv_record(row: dict, precs: list[str]) -> dict:
    """One CSV line: every scalar of the row under its dotted schema name (``decode.tokens_per_s``,
    ``experts.total.hits``; no per-layer or per-run figures), MB moved per precision as ``mb_<p>``."""
    rec: dict = {}
    flat = {k: v for k, v in row.items() if k not in ("runs", "experts")}
    flat["experts"] = {k: v for k, v in (row["experts"] or {}).items()
                       if k in ("total", "prefill", "decode")}
    _flat("", flat, rec)
    mb = _get(row, "experts", "mb_by_precision")
    for p in precs:
        rec[f"mb_{p}"] = None if mb is None else mb.get(p, 0.0)
    return rec


def write_csv(path: Path, rows: list[dict]) -> None:
    precs = _precisions(rows)
    recs = [csv_record(r, precs) for r in rows]
    keys = list(dict.fromkeys(k for rec in recs for k in rec))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for rec in recs:
            w.writerow({k: "" if rec.get(k) is None else rec[k] for k in keys})


def _mem_x(mems: list[str]):
    parsed = [parse_mem(m) for m in mems]
    if all(k == "percent" for k, _ in parsed):
        return [v for _, v in parsed], "expert budget (% of all experts)"
    if all(k == "bytes" for k, _ in parsed):
        return [v / 2**20 for _, v in parsed], "memory budget (MiB)"
    return list(range(len(mems))), "memory budget"


def require_matplotlib():
    """matplotlib is an optional dependency (the ``plot`` extra): imported only to draw."""
    try:
        import matplotlib  # optional dependency: the plot extra
    except ImportError:
        raise UsageError("--plot needs matplotlib, which is not installed: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional dependency, as above

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
        dec = [(x, v) for x, r in pts if (v := _get(r, "decode", "x_ondemand")) is not None]
        pre = [(x, v) for x, r in pts if (v := _get(r, "prefill", "x_ondemand")) is not None]
        hit = [(x, 100 * v) for x, r in pts if (v := _get(r, "experts", "total", "hit_rate")) is not None]
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


__all__ = ["BenchSession", "run_bench", "synthetic_prompt", "table_text", "header_text", "footer_text",
           "per_layer_text", "write_csv", "write_plot", "require_matplotlib", "parse_policies", "parse_mems",
           "parse_links", "median_tree", "ROW_KEYS", "ALL_POLICIES", "DEFAULT_POLICIES", "DEFAULT_MEMS", "DEFAULT_LINKS",
           "DEFAULT_PROMPT_TOKENS"]
