"""Per-layer decode hit rates against what the ``reuse`` allocation expects of them (issue 13).

    python -m benchmarks.layer_hits BUNDLE --mem 50% --link ratio:1 fate@reuse fate@even lru

Each spec is ``policy[@alloc]``.  For each it loads the bundle, warms the caches with one generation, then
counts three more (a 128-token prompt from the calibration text, -n decode tokens, greedy) and prints, per
MoE layer: the slots, the measured decode hit rate, and the bundle's reuse curves at those slots — the share
an LRU cache of that many slots holds on the calibration text (``lru``), and the share the allocation counts
on (held, plus the prediction's named experts up to what the link moves in a layer: ``counted``).  Links
other than none are emulated."""
from __future__ import annotations

import argparse

import fate
from fate.formats.bundle import open_bundle
from fate.runtime.experts import budget
from fate.runtime.experts.offloading import copies_per_layer, reuse_curves
from fate.tools.bench import synthetic_prompt


def measure(bundle: str, mem: str, link: str, specs: list[str], n: int = 64, prompt_tokens: int = 128) -> list[dict]:
    """One row per spec: ``spec``, ``alloc``, the run's ``decode`` summary, and per MoE layer: ``slots``, the
    measured decode ``hit`` rates (None where a layer needed nothing), the experts each ``needed``, and the
    bundle's ``lru`` curve and the allocation's ``counted`` share at those slots (None without reuse curves)."""
    table = reuse_curves(open_bundle(bundle))
    rows = []
    for spec in specs:
        policy, _, alloc = spec.partition("@")
        m = fate.load(bundle, policy=policy, mem=mem, link=link, threads=1, verify=False, cache_alloc=alloc or "auto")
        try:
            off, cfg = m.offloading, m.config
            if off is None:
                raise SystemExit(f"layer_hits: --mem {mem} holds every expert of {bundle}, so nothing is offloaded; "
                                 "give a smaller --mem such as 50%")
            ids = synthetic_prompt(m.tokenizer, prompt_tokens)
            m.generate(ids, max(1, n // 2), temperature=0.0, stop_at_eos=False)
            off.stats.reset()
            for _ in range(3):
                m.generate(ids, n, temperature=0.0, stop_at_eos=False)
            moe = cfg.moe_layer_ids
            slots = [off.plan.slots_per_layer[i] for i in moe]
            row = {"spec": spec, "alloc": off.plan.alloc, "slots": slots,
                   "hit": [off.stats.phase_layer("decode", i)["hit_rate"] for i in moe],
                   "needed": [off.stats.phase_layer("decode", i)["needed"] for i in moe],
                   "decode": off.stats.to_dict()["decode"], "lru": None, "counted": None}
            if table is not None:
                lc = copies_per_layer(off.link, lambda: off.timing, off.plan.slot_bytes)
                counted = budget._reuse_curves(cfg, table, lc)
                row["lru"] = [float(table[0, i, s]) for i, s in zip(moe, slots)]
                row["counted"] = [c[s] for c, s in zip(counted, slots)]
            rows.append(row)
        finally:
            m.close()
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.layer_hits", description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--mem", default="50%")
    ap.add_argument("--link", default="ratio:1")
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("specs", nargs="+", help="policy[@alloc], e.g. fate@even")
    a = ap.parse_args(argv)
    print(f"--mem {a.mem} --link {a.link} (emulated unless none), decode hit rate per MoE layer")

    def fmt(v):
        return " ".join("    - " if x is None else f"{x:6.3f}" for x in v)

    def mean(v):
        v = [x for x in v if x is not None]
        return sum(v) / len(v) if v else float("nan")

    for r in measure(a.bundle, a.mem, a.link, a.specs, a.n):
        print(f"{r['spec']} (alloc {r['alloc']})")
        print(f"  slots    {' '.join(f'{s:6d}' for s in r['slots'])}")
        for key, name in (("hit", "measured"), ("lru", "lru"), ("counted", "counted")):
            if r[key] is not None:
                print(f"  {name:8s} {fmt(r[key])}   mean {mean(r[key]):.3f}")


if __name__ == "__main__":
    main()
