"""Offloading benchmark: fate vs Load-on-Demand vs LRU (mixtral-offloading) vs everything resident,
side by side in one process, on a model whose bytes are mostly experts.

All offloaded policies run under the same ``--mem`` budget and the same emulated link (default
``ratio:1``: one INT4 expert copy takes as long as one layer's decode compute). Figures measured
under link emulation are emulated, and the table says so.

    python -m benchmarks.offload --mem 50% --link ratio:1        # from the repository root
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

import fate
from tests.tiny_models import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]

POLICIES = ("ondemand", "lru", "fate", "resident")


def build(work: Path, arch: str, layers: int, hidden: int, experts: int, top_k: int, ffn: int) -> Path:
    ckpt = work / "ckpt"
    over = dict(hidden_size=hidden, num_attention_heads=8, num_key_value_heads=4)
    if arch == "mixtral":
        over.update(num_local_experts=experts, num_experts_per_tok=top_k, intermediate_size=ffn)
    else:
        over.update(num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=ffn,
                    shared_expert_intermediate_size=ffn, intermediate_size=ffn)
    make_checkpoint(arch, ckpt, n_layers=layers, **over)
    bundle = work / "model.gguf"
    fate.convert(ckpt, bundle, experts="q4,q2", calib_tokens=2048, progress=False)
    return bundle


def run_once(bundle: Path, policy: str, mem: str, link: str, prompt_ids: list[int], n: int, extra,
             device: str = "cpu") -> dict:
    opts = dict(experts="q4", policy=policy, device=device)
    if policy != "resident":
        opts.update(mem=mem, link=link, prefetch_extra=extra)
    m = fate.load(bundle, **opts)
    out = m.generate(prompt_ids, n, temperature=0.0, stop_at_eos=False)
    d = out.stats.to_dict()
    m.close()
    return d


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.offload",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="qwen2_moe")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--mem", default="50%")
    ap.add_argument("--link", default="ratio:1")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("-n", type=int, default=32, help="decode tokens")
    ap.add_argument("-r", type=int, default=3, help="repetitions (median reported)")
    ap.add_argument("--prefetch-extra", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (compute fp32 on cpu, fp16 on cuda)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = build(Path(tmp), args.arch, args.layers, args.hidden, args.experts, args.top_k, args.ffn)
        m = fate.load(bundle)
        text = open(ROOT / "fate" / "data" / "calib.txt", encoding="utf-8").read()[5000:20000]
        prompt = m.tokenizer.encode(text, add_special_tokens=False)[: args.prompt_tokens]
        m.close()
        runs = {p: [] for p in POLICIES}
        for _ in range(args.r):  # alternate policies so machine noise hits all of them alike
            for p in POLICIES:
                runs[p].append(run_once(bundle, p, args.mem, args.link, prompt, args.n, args.prefetch_extra,
                                            args.device))
    # the stats schema of docs/STATS.md: {"prefill": {"tokens_per_s", ...}, "decode": {...}, "experts": ...}
    med = lambda p, ph: statistics.median(r[ph]["tokens_per_s"] for r in runs[p])  # noqa: E731
    base_pre, base_dec = med("ondemand", "prefill"), med("ondemand", "decode")
    res_dec = med("resident", "decode")
    emulated = any((r["experts"] or {}).get("link", {}).get("emulated") for p in POLICIES for r in runs[p])
    print(f"model: {args.arch}, {args.layers} layers, hidden {args.hidden}, {args.experts} experts top-{args.top_k}, "
          f"expert ffn {args.ffn}; --mem {args.mem} --link {args.link}{' (EMULATED link)' if emulated else ''}; "
          f"prompt {len(prompt)} tokens, decode {args.n}; median of {args.r}; {args.threads} threads; "
          f"device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    print(f"{'policy':9s} {'prefill tok/s':>13s} {'x ondemand':>10s} {'decode tok/s':>12s} {'x ondemand':>10s} "
          f"{'x resident':>10s} {'hit rate':>8s} {'recall':>7s} {'stall s':>7s} {'MB q4':>7s} {'MB q2':>7s}")
    table = {}
    for p in POLICIES:
        pre, dec = med(p, "prefill"), med(p, "decode")
        ex = runs[p][len(runs[p]) // 2]["experts"] or {}  # None when every expert is resident
        total = ex.get("total", {})
        hit = total.get("hit_rate")
        rec = ex.get("decode", {}).get("prefetch_recall")
        moved = ex.get("bytes_by_precision", {})
        table[p] = {"prefill_tok_s": pre, "decode_tok_s": dec, "prefill_x_ondemand": pre / base_pre,
                    "decode_x_ondemand": dec / base_dec, "decode_x_resident": dec / res_dec, "hit_rate": hit,
                    "decode_prefetch_recall": rec, "experts": ex}
        f = lambda v: "    -" if v is None else f"{100 * v:6.1f}%"  # noqa: E731
        print(f"{p:9s} {pre:13.1f} {pre / base_pre:10.2f} {dec:12.1f} {dec / base_dec:10.2f} {dec / res_dec:10.2f} "
              f"{f(hit):>8s} {f(rec):>7s} {total.get('stall_seconds', 0):7.2f} {moved.get('q4', 0) / 1e6:7.1f} "
              f"{moved.get('q2', 0) / 1e6:7.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "table": table}, indent=1, default=str))


if __name__ == "__main__":
    main()
