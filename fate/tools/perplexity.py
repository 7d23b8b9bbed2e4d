"""fate-perplexity: perplexity of a bundle on a text file, per expert precision.

The text is tokenized as a prompt is (the bundle's tokenizer, BOS added when the bundle says so) and
cut into windows of ``-c`` tokens that start every ``--stride`` tokens; the last window ends at the
last token.  Each window runs from scratch (``model.model.forward(ids, None)``: full window, no KV
cache, positions from 0), its logits go through a float32 log-softmax, and a window scores only the
tokens no earlier window scored — the usual sliding-window evaluation:

* ``--stride`` = ``-c`` (the default): windows do not overlap, and every window scores all its tokens
  but the first (which has no context inside the window);
* ``--stride`` < ``-c``: window ``[b, e)`` scores tokens ``prev_e .. e-1``, each with at least
  ``c - stride`` tokens of context (the first window scores tokens ``1 .. e-1``).

Perplexity is ``exp(mean NLL)`` over all scored tokens; its standard error is
``ppl x sd(NLL) / sqrt(n)`` (delta method).

``--experts``: ``f16``, ``q4``, ``q2`` compute every routed expert in that stored precision (if a
``--mem`` budget offloads experts, INT2 substitution is turned off, so the result is exactly that
precision's); ``hybrid`` is Fate's prefill rule: decode precision q4 (f16 when the bundle has no q4),
offloaded with ``--policy fate`` under ``--mem`` (50% when not given), and in each layer the least popular
experts covering at most ``--int2-share`` (0.3) of the token->expert assignments computed as INT2 — in every
layer that loads experts, as the paper's rule does (``fate-run`` sends INT2 only where the link limits the
prefill), so the figure is INT2 substitution's whatever the link.
``--compare`` runs every stored precision, plus ``hybrid`` when q2 is stored, and prints each one's
difference to f16 (to q4 when there is no f16).

Python: ``perplexity(bundle_or_model, text, ctx, stride, experts=...) -> dict`` (the keys of one
result below); ``compare(bundle, text, ctx, stride) -> dict`` (the ``--json`` document).

``--json FILE`` writes ``{"bundle", "file", "text_tokens", "ctx", "stride", "reference", "results"}``:
``reference`` is the precision the deltas are taken against (``null`` without ``--compare``) and
``results`` holds one object per run with the keys

* ``experts`` (``f16``/``q4``/``q2``/``hybrid``), ``perplexity``, ``perplexity_stderr``, ``nll`` (mean
  negative log-likelihood per scored token, nats), ``tokens`` (scored), ``text_tokens``, ``windows``,
  ``ctx``, ``stride``, ``policy``, ``mem`` (as given; ``null``: everything resident), ``int2_share``
  (0 unless hybrid), ``seconds``, ``tokens_per_s`` (window tokens run per second), ``offload`` (the
  offloading figures — hits, misses, bytes moved per precision — when experts are offloaded, else
  ``null``);
* with ``--compare`` also ``delta`` (perplexity − the reference's) and ``delta_pct`` (in percent of the
  reference's).
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

import fate
from fate.errors import BundleError, BundleMetadataError, ConfigError, RequestError
from fate.formats import constants as C
from fate.formats.bundle import Bundle
from fate.model.config import ModelConfig
from fate.runtime.engine import FateModel
from fate.units import format_size

MODES = ("f16", "q4", "q2", "hybrid")
PRECISION_ORDER = ("f16", "q4", "q2")
DEFAULT_CTX = 512
HYBRID_MEM = "50%"
HYBRID_INT2_SHARE = 0.3


class PerplexityError(RequestError):
    """A perplexity request that cannot be served (bad window sizes, too little text, ...)."""


# --- windows ---------------------------------------------------------------------------------------

def windows(n_tokens: int, ctx: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` of every window over ``n_tokens`` tokens: ``[begin, end)`` runs,
    tokens ``first_scored .. end-1`` are scored (each predicted from the logits of the token before it).
    Windows that would score nothing are left out."""
    if ctx < 2:
        raise PerplexityError(f"-c {ctx}: a window needs at least 2 tokens")
    if not 0 < stride <= ctx:
        raise PerplexityError(f"--stride {stride}: give a stride between 1 and -c ({ctx})")
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + ctx, n_tokens)
        first = max(begin + 1, prev_end)
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return out


def _check_ctx(ctx: int, stride: int, max_position: int) -> None:
    if ctx > max_position:
        raise PerplexityError(f"-c {ctx} is larger than the model's context ({max_position} tokens); "
                              f"use -c {max_position} or less")
    windows(0, ctx, stride)  # validates ctx and stride


def _resolve_ctx(ctx: int | None, stride: int | None, max_position: int) -> tuple[int, int]:
    ctx = min(DEFAULT_CTX, max_position) if ctx is None else int(ctx)
    stride = ctx if stride is None else int(stride)
    _check_ctx(ctx, stride, max_position)
    return ctx, stride


def read_text(path: str | os.PathLike) -> str:
    """The UTF-8 text of ``path``; a missing, unreadable, non-UTF-8 or empty file is a PerplexityError."""
    p = Path(path)
    if not p.exists():
        raise PerplexityError(f"-f {path}: no such file")
    if p.is_dir():
        raise PerplexityError(f"-f {path} is a directory, not a text file")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise PerplexityError(f"-f {path}: the text file is not UTF-8") from None
    if not text.strip():
        raise PerplexityError(f"-f {path}: the text file is empty")
    return text


# --- models ----------------------------------------------------------------------------------------

def _bundle_facts(path) -> tuple[int, list[str]]:
    """(context length, stored precisions) read from the bundle's metadata, without loading a model."""
    b = Bundle(path)
    try:
        try:
            cfg = ModelConfig.from_json(b.require(C.K_MODEL_CONFIG))
        except ConfigError as e:
            raise BundleMetadataError(f"{b.path}: {e}") from None
        precisions = b.require(C.K_PRECISIONS)
        if not isinstance(precisions, list):
            raise BundleError(f"{b.path}: {C.K_PRECISIONS} is not a list of precisions")
        return cfg.max_position, [str(p) for p in precisions]
    finally:
        b.close()


def _hybrid_high(precisions: Sequence[str]) -> str:
    if "q2" not in precisions:
        raise PerplexityError(f"--experts hybrid needs INT2 experts (q2), and this bundle stores only "
                              f"{', '.join(precisions)}; re-convert with --experts q4,q2")
    for p in ("q4", "f16"):
        if p in precisions:
            return p
    raise PerplexityError("--experts hybrid needs q4 (or f16) experts beside q2, and this bundle stores only q2")


def load_model(path, experts: str = "q4", *, ctx: int, mem: str | int | None = None, policy: str | None = None,
               int2_share: float = HYBRID_INT2_SHARE, precisions: Sequence[str] | None = None, **options):
    """``fate.load`` for one ``--experts`` mode (see the module docstring); ``options`` go to fate.load."""
    if experts not in MODES:
        raise PerplexityError(f"--experts {experts!r}: choose one of {', '.join(MODES)}")
    if experts != "hybrid":
        return fate.load(path, experts=experts, context=ctx, mem=mem, policy=policy or "fate", int2_share=0.0,
                         **options)
    if policy not in (None, "fate"):
        raise PerplexityError(f"--experts hybrid runs the fate policy (INT2 for the least popular prefill experts); "
                              f"--policy {policy} has no INT2 rule")
    if not 0.0 < int2_share <= 1.0:
        raise PerplexityError(f"--int2-share {int2_share}: --experts hybrid needs a share in (0, 1]")
    if precisions is None:
        _, precisions = _bundle_facts(path)
    high = _hybrid_high(precisions)
    mem = HYBRID_MEM if mem is None else mem
    model = fate.load(path, experts=high, context=ctx, mem=mem, policy="fate", int2_share=int2_share, **options)
    if model.offloading is not None:  # INT2 wherever a layer loads, not only where the link limits it
        model.offloading.executor.offloader.int2_link_share = 0.0
    if not model.hybrid:
        model.close()
        raise PerplexityError(f"--experts hybrid: --mem {mem} holds every expert, so nothing is offloaded and no "
                              f"prefill expert runs as INT2; give a smaller --mem (e.g. {HYBRID_MEM})")
    return model


def _mode_of(model) -> str:
    return "hybrid" if model.hybrid else model.precision


# --- scoring ---------------------------------------------------------------------------------------

def _encode(model, text) -> list[int]:
    if isinstance(text, str):
        ids = model.tokenizer.encode(text, add_special_tokens=True)
    else:
        ids = [int(t) for t in text]
    bad = [t for t in ids if not 0 <= t < model.config.vocab_size]
    if bad:
        raise PerplexityError(f"token id {bad[0]} is outside the vocabulary (0..{model.config.vocab_size - 1})")
    if len(ids) < 2:
        raise PerplexityError(f"the text is {len(ids)} token{'s' if len(ids) != 1 else ''} long; "
                              "perplexity needs at least 2")
    return ids


def _ppl(nll: float) -> float:
    try:
        return math.exp(nll)
    except OverflowError:
        return float("inf")


def _score(model, ids: list[int], ctx: int, stride: int, *, chunks: int | None, progress: bool, label: str) -> dict:
    wins = windows(len(ids), ctx, stride)
    if chunks is not None:
        if chunks <= 0:
            raise PerplexityError(f"--chunks {chunks}: give a positive number of windows")
        wins = wins[:chunks]
    model.reset_stats()
    all_ids = torch.tensor(ids, dtype=torch.long)
    total = total_sq = 0.0
    n = run = 0
    t0 = time.perf_counter()
    with torch.inference_mode(), tqdm(total=len(wins), desc=f"perplexity {label}", unit="window",
                                      disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
        for begin, end, first in wins:
            logits = model.logits(all_ids[begin:end])
            # logits at window position j predict the token at j + 1
            lp = torch.log_softmax(logits[first - begin - 1:end - begin - 1].float(), dim=-1)
            target = all_ids[first:end].to(lp.device)
            nll = -lp.gather(1, target.unsqueeze(1)).squeeze(1).to("cpu", torch.float64)
            total += float(nll.sum())
            total_sq += float((nll * nll).sum())
            n += nll.numel()
            run += end - begin
            bar.set_postfix(ppl=f"{_ppl(total / n):.4f}", refresh=False)
            bar.update(1)
    seconds = time.perf_counter() - t0
    mean = total / n
    var = max(total_sq / n - mean * mean, 0.0) * n / (n - 1) if n > 1 else 0.0
    ppl = _ppl(mean)
    plan = model.plan
    offload = model.experts_report()
    return {
        "experts": label,
        "perplexity": ppl,
        "perplexity_stderr": ppl * math.sqrt(var / n) if math.isfinite(ppl) else float("inf"),
        "nll": mean,
        "tokens": n,
        "text_tokens": len(ids),
        "windows": len(wins),
        "ctx": ctx,
        "stride": stride,
        "policy": model.policy,
        "mem": plan.request if plan is not None and plan.request else None,
        "int2_share": float(model.options.int2_share) if label == "hybrid" else 0.0,
        "seconds": seconds,
        "tokens_per_s": run / seconds if seconds > 0 else 0.0,
        "offload": offload,
    }


def perplexity(bundle_or_model, text: str | Sequence[int], ctx: int | None = None, stride: int | None = None, *,
               experts: str | None = None, mem: str | int | None = None, policy: str | None = None,
               int2_share: float = HYBRID_INT2_SHARE, chunks: int | None = None, progress: bool = False,
               **load_options) -> dict:
    """Perplexity of ``text`` (a string, or token ids) under a bundle path or a loaded ``FateModel``.

    ``ctx`` defaults to min(512, the model's context), ``stride`` to ``ctx``; ``experts`` is one of
    f16, q4 (default), q2, hybrid; ``mem``/``policy`` are fate.load's (``--mem``/``--policy``);
    ``int2_share`` is the hybrid mode's; ``chunks`` limits the number of windows; ``load_options`` go to
    ``fate.load`` (device, compute_dtype, threads, verify, ...).  A loaded model is used as it is: then
    leave ``experts``, ``mem``, ``policy`` and ``load_options`` unset.  Returns one result (keys: module
    docstring)."""
    if isinstance(bundle_or_model, FateModel):
        model = bundle_or_model
        if experts is not None and experts != _mode_of(model):
            raise PerplexityError(f"experts={experts!r}, but the model given was loaded as {_mode_of(model)}; "
                                  "pass the bundle path instead to choose the precision")
        if mem is not None or policy is not None or load_options:
            raise PerplexityError("mem, policy and load options apply when loading: pass the bundle path instead")
        ctx, stride = _resolve_ctx(ctx, stride, model.config.max_position)
        return _score(model, _encode(model, text), ctx, stride, chunks=chunks, progress=progress,
                      label=_mode_of(model))
    max_position, precisions = _bundle_facts(bundle_or_model)
    ctx, stride = _resolve_ctx(ctx, stride, max_position)
    model = load_model(bundle_or_model, experts or "q4", ctx=ctx, mem=mem, policy=policy, int2_share=int2_share,
                       precisions=precisions, **load_options)
    try:
        return _score(model, _encode(model, text), ctx, stride, chunks=chunks, progress=progress,
                      label=experts or "q4")
    finally:
        model.close()


def compare_modes(precisions: Sequence[str], policy: str | None = None) -> list[str]:
    """The modes --compare runs: the stored precisions (f16, q4, q2 order), then hybrid when q2 is stored
    beside q4 or f16 and the policy is fate."""
    modes = [p for p in PRECISION_ORDER if p in precisions]
    if "q2" in precisions and ("q4" in precisions or "f16" in precisions) and policy in (None, "fate"):
        modes.append("hybrid")
    return modes


def compare(bundle, text: str | Sequence[int], ctx: int | None = None, stride: int | None = None, *,
            mem: str | int | None = None, policy: str | None = None, int2_share: float = HYBRID_INT2_SHARE,
            chunks: int | None = None, progress: bool = False, notes: list | None = None, on_result=None,
            **load_options) -> dict:
    """Every stored precision (and hybrid) on the same windows; the ``--json`` document, with ``delta``
    and ``delta_pct`` against f16 (q4 without f16).  ``notes`` receives why a mode was left out;
    ``on_result(result)`` is called as each run finishes."""
    max_position, precisions = _bundle_facts(bundle)
    ctx, stride = _resolve_ctx(ctx, stride, max_position)
    modes = compare_modes(precisions, policy)
    if "q2" in precisions and "hybrid" not in modes and notes is not None and policy not in (None, "fate"):
        notes.append(f"hybrid left out: it runs the fate policy, and --policy {policy} was asked for")
    results, ids = [], None
    for mode in modes:
        try:
            model = load_model(bundle, mode, ctx=ctx, mem=mem, policy=policy, int2_share=int2_share,
                               precisions=precisions, **load_options)
        except PerplexityError as e:
            if mode != "hybrid":
                raise
            if notes is not None:
                notes.append(f"hybrid left out: {e}")
            continue
        try:
            if ids is None:
                ids = _encode(model, text)
            r = _score(model, ids, ctx, stride, chunks=chunks, progress=progress, label=mode)
        finally:
            model.close()
        results.append(r)
        if on_result is not None:
            on_result(r)
    reference = next((p for p in ("f16", "q4") if p in precisions), modes[0] if modes else None)
    ref = next((r for r in results if r["experts"] == reference), None)
    for r in results:
        if ref is None:
            r["delta"] = r["delta_pct"] = None
        else:
            r["delta"] = r["perplexity"] - ref["perplexity"]
            r["delta_pct"] = 100 * r["delta"] / ref["perplexity"] if ref["perplexity"] else None
    return {"bundle": str(bundle), "text_tokens": len(ids) if ids is not None else 0, "ctx": ctx, "stride": stride,
            "reference": reference, "results": results}


# --- text output ------------------------------------------------------------------------------------

def _moved(r: dict) -> str:
    off = r.get("offload")
    if not off:
        return ""
    moved = ", ".join(f"{p} {format_size(n)}" for p, n in off["bytes_by_precision"].items()) or "nothing"
    return f"; experts moved: {moved}"


def _n(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def summary(r: dict) -> str:
    where = f"--mem {r['mem']}, policy {r['policy']}" if r["mem"] else (
        f"policy {r['policy']}" if r["offload"] else "all experts resident")
    share = f", int2-share {r['int2_share']:g}" if r["experts"] == "hybrid" else ""
    return (f"{r['experts']}: PPL = {r['perplexity']:.4f} +/- {r['perplexity_stderr']:.4f}  "
            f"({_n(r['tokens'], 'token')} scored in {_n(r['windows'], 'window')}, -c {r['ctx']}, "
            f"stride {r['stride']}; "
            f"{where}{share}; {r['seconds']:.2f} s, {r['tokens_per_s']:.1f} tokens/s{_moved(r)})")


def table(doc: dict) -> str:
    ref = doc["reference"]
    lines = [f"{'experts':<8} {'perplexity':>14} {'+/-':>12} {('delta vs ' + str(ref)):>14} {'delta %':>9} "
             f"{'tokens':>8} {'tokens/s':>10}"]
    for r in doc["results"]:
        same = r["experts"] == ref
        delta = "-" if same or r["delta"] is None else f"{r['delta']:+.4f}"
        pct = "-" if same or r["delta_pct"] is None else f"{r['delta_pct']:+.2f}%"
        lines.append(f"{r['experts']:<8} {r['perplexity']:>14.4f} {r['perplexity_stderr']:>12.4f} {delta:>14} "
                     f"{pct:>9} {r['tokens']:>8} {r['tokens_per_s']:>10.1f}")
    return "\n".join(lines)
