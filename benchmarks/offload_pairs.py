"""Offloading policies measured in pairs: every policy of one (budget, link) cell loaded at once, beside a
resident reference, and the rounds alternated, so each ratio is taken between runs seconds apart.

fate-bench loads every configuration afresh for each run and goes through them one after another; on a
shared VM whose speed drifts by 20-30 % over minutes, two configurations a minute apart differ by more
than the policies do.  Here each round runs every model once (in reverse order every other round) and the
ratios (``x resident``, ``x lru``) are medians of the per-round ratios.  The price is memory: every model of
a cell is in memory at once (meant for the small trained models of docs/BENCHMARKS.md).

A policy may name its predictor: ``paper/router`` is the paper's rule with the paper's predictor (the next
layer's router), ``fate/router`` fate's rule with it; a plain name takes the default (the bundle's fitted
maps where it has them).  A ``:evict`` suffix names the cache's eviction policy: ``fate:arc`` is fate with
ARC caching instead of its default LRFU.  An ``@alloc`` suffix names the slot allocation: ``fate@even`` is
fate with lru's equal caches instead of its default (the reuse curves).

Per policy: decode ms per token, split into the stall (waiting for copies), fate's host work (prediction,
lookups, queueing: the ``host_seconds`` of the stats) and the rest (the model's compute); the decode hit
rate; whether its greedy tokens equal the resident run's.  Emulated links are labelled so.

    python -m benchmarks.offload_pairs /tmp/offload2.gguf --mem 25%,50% --link ratio:1,ratio:2 --rounds 8
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics

import fate
from fate.tools.bench import DEFAULT_PROMPT_TOKENS, synthetic_prompt

POLICIES = ("ondemand", "lru", "paper", "fate")


def measure_cell(bundle: str, mem: str, link: str, policies, rounds: int, n: int, threads: int,
                 prompt_ids: list[int]) -> list[dict]:
    """One cell: ``policies`` at ``mem`` over ``link`` and the resident reference, ``rounds`` alternated rounds."""
    models = {"resident": fate.load(bundle, policy="resident", no_mmap=True, threads=threads, verify=False)}
    for p in policies:  # "policy[/predictor][:evict][@alloc]" (paper/router: the paper's rule, the paper's predictor)
        spec, _, alloc = p.partition("@")
        spec, _, evict = spec.partition(":")
        name, _, predictor = spec.partition("/")
        extra = {k: v for k, v in (("predictor", predictor), ("evict", evict), ("cache_alloc", alloc)) if v}
        models[p] = fate.load(bundle, policy=name, mem=mem, link=link, threads=threads, verify=False, **extra)
    try:
        for m in models.values():  # torch's first calls, the caches' first fill
            m.generate(prompt_ids, 8, temperature=0.0, stop_at_eos=False)
        runs: dict[str, list[dict]] = {k: [] for k in models}
        tokens: dict[str, list[int]] = {}
        order = list(models)
        for r in range(rounds):
            for k in (order if r % 2 == 0 else order[::-1]):
                out = models[k].generate(prompt_ids, n, temperature=0.0, stop_at_eos=False)
                s = out.stats
                ex = s.experts["decode"] if s.experts else None
                t = s.decode["tokens"]
                runs[k].append({"ms": 1e3 * s.decode["seconds"] / t,
                                "stall": 1e3 * ex["stall_seconds"] / t if ex else 0.0,
                                "host": 1e3 * ex["host_seconds"] / t if ex else 0.0,
                                "hit": ex["hit_rate"] if ex else None})
                tokens.setdefault(k, out.token_ids)
        label = models[policies[0]].link.label if policies else "none"
        emulated = bool(policies) and models[policies[0]].link.emulated
    finally:
        for m in models.values():
            m.close()
        del models
        gc.collect()
    med = statistics.median
    rows = []
    for k, rs in runs.items():
        paired = {ref: med(b["ms"] / a["ms"] for a, b in zip(rs, runs[ref])) for ref in ("resident", "lru") if ref in runs}
        rows.append({
            "policy": k, "mem": "all" if k == "resident" else mem, "link": "none" if k == "resident" else label,
            "emulated": emulated and k != "resident", "rounds": rounds,
            "decode_ms_per_token": med(x["ms"] for x in rs), "stall_ms": med(x["stall"] for x in rs),
            "host_ms": med(x["host"] for x in rs), "rest_ms": med(x["ms"] - x["stall"] - x["host"] for x in rs),
            "hit_rate": None if rs[0]["hit"] is None else med(x["hit"] for x in rs),
            "x_resident": paired.get("resident"), "x_lru": paired.get("lru"),
            "tokens_equal_resident": tokens[k] == tokens["resident"],
        })
    return rows


def table(rows: list[dict], n_layers: int) -> str:
    out = ["| policy | mem | link | decode ms/token | stall ms | host ms (µs/layer) | rest ms | dec hit | "
           "x resident | x lru | tokens = resident |", "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|---|"]
    for r in rows:
        link = r["link"]  # an emulated link's label says so
        hit = "-" if r["hit_rate"] is None else f"{100 * r['hit_rate']:.1f}%"
        xl = "-" if r["x_lru"] is None else f"{r['x_lru']:.2f}"
        out.append(f"| {r['policy']} | {r['mem']} | {link} | {r['decode_ms_per_token']:.2f} | {r['stall_ms']:.2f} | "
                   f"{r['host_ms']:.2f} ({1e3 * r['host_ms'] / n_layers:.0f}) | {r['rest_ms']:.2f} | {hit} | "
                   f"{r['x_resident']:.2f} | {xl} | {'yes' if r['tokens_equal_resident'] else 'no'} |")
    return "\n".join(out)


def cell_parser(prog: str, doc: str, mem: str, rounds: int) -> argparse.ArgumentParser:
    """The arguments every side-by-side offloading benchmark takes: a bundle, budgets and links to cross,
    rounds, tokens per run, threads, the prompt's length and a JSON file for the rows."""
    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--mem", default=mem, help=f"comma-separated budgets [{mem.replace('%', '%%')}]")
    ap.add_argument("--link", default="ratio:1", help="comma-separated links [ratio:1]")
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("-n", type=int, default=64, help="tokens generated per run [64]")
    ap.add_argument("-t", "--threads", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=DEFAULT_PROMPT_TOKENS)
    ap.add_argument("--json", help="write the rows here")
    return ap


def probe(bundle: str, threads: int, prompt_tokens: int) -> tuple[list[int], int]:
    """The synthetic prompt of ``prompt_tokens`` for this bundle's tokenizer, and its number of MoE layers."""
    m = fate.load(bundle, policy="resident", threads=threads, verify=False)
    try:
        return synthetic_prompt(m.tokenizer, prompt_tokens), len(m.config.moe_layer_ids)
    finally:
        m.close()


def write_json(path: str | None, rows: list[dict]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)


def main() -> None:
    ap = cell_parser("python -m benchmarks.offload_pairs", __doc__, "25%,50%", 8)
    ap.add_argument("--policies", default=",".join(POLICIES),
                    help="policies, each NAME[/PREDICTOR][:EVICT] (paper/router, fate/router, fate:arc) "
                         f"[{','.join(POLICIES)}]")
    a = ap.parse_args()
    prompt, n_layers = probe(a.bundle, a.threads, a.prompt_tokens)
    policies = [p for p in a.policies.split(",") if p]
    rows = []
    for mem in a.mem.split(","):
        for link in a.link.split(","):
            cell = measure_cell(a.bundle, mem, link, policies, a.rounds, a.n, a.threads, prompt)
            rows += cell
            print(table(cell, n_layers), "\n", flush=True)
    print(f"{a.rounds} alternated rounds per cell, -n {a.n}, {a.prompt_tokens}-token prompt, {a.threads} thread(s); "
          "x resident / x lru: medians of per-round ratios of decode time; host µs per MoE layer and token")
    write_json(a.json, rows)

if __name__ == "__main__":
    main()
