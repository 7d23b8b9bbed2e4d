"""fate's decode host work under its five implementations of one step, on one loaded model.

The prediction and the value rule of a decode step (:mod:`fate.runtime.experts.offload`) run as

* ``python``: the prediction (native product and ranking, Python objects), then the rule's Python reference
  (``offload.value_plan``) — what runs where the extension is not built;
* ``native``: the same prediction, then the rule as one native call (``native_policy.value_plan``);
* ``fused``: both in one native call per layer and step (``Predictor.value_planner``), its decisions then
  reserved and queued by Python (``Offloader._queue_planned``);
* ``queued``: the same call also reserving the slots and queueing the copies (the planner's native
  ``Queuer``, ``TransferEngine.native_queue``);
* ``step``: the whole step before the experts are computed in one native call (:mod:`.native_step`:
  settling landed copies, cancelling, classifying, the demand loads, and the planner), the default.

The first four run the Python step (``Offloader._classify``) around the rule.  All five take the same decisions on the same state (tests/test_offload.py holds them equal), so a run's
tokens are the same; what differs is the host time.  The paths are switched on the live ``Offloader`` of
one model and the rounds alternated, so each ratio is between runs seconds apart on the same weights and
cache (on a shared VM separate loads, or runs a minute apart, differ by more than these paths do).

    python -m benchmarks.host_paths /tmp/offload2.gguf --mem 50% --link ratio:1 --rounds 10
"""

from __future__ import annotations

import statistics

import fate
from benchmarks.offload_pairs import cell_parser, probe, write_json
from fate.runtime.experts import copier
from fate.runtime.experts.offload import value_plan

PATHS = ("python", "native", "fused", "queued", "step")


def _use(model, path: str) -> None:
    off = model.offloading.executor.offloader
    off._value_plan = value_plan if path == "python" else (copier.value_plan() or value_plan)
    off.predictor._fused = copier.value_planner() if path in ("fused", "queued", "step") else None
    off._queuer = False if path in ("queued", "step") else None  # False: the mover's, resolved on first use
    off._step = False if path == "step" else None
    off._planners = {}  # made again on the next step, with the path's choice


def measure(bundle: str, mem: str, link: str, rounds: int, n: int, threads: int, prompt_ids: list[int],
            int2_share: float = 0.0) -> list[dict]:
    """One fate model at ``mem`` over ``link``; per path: medians over ``rounds`` alternated rounds of decode
    ms per token, host µs per MoE layer and token, and the decode-time ratio against ``python``."""
    m = fate.load(bundle, policy="fate", mem=mem, link=link, threads=threads, verify=False, int2_share=int2_share)
    try:
        layers = len(m.config.moe_layer_ids)
        m.generate(prompt_ids, 8, temperature=0.0, stop_at_eos=False)
        runs: dict[str, list[tuple[float, float]]] = {p: [] for p in PATHS}
        tokens: dict[str, list[int]] = {}
        for r in range(rounds):
            for p in (PATHS if r % 2 == 0 else PATHS[::-1]):
                _use(m, p)
                out = m.generate(prompt_ids, n, temperature=0.0, stop_at_eos=False)
                s, t = out.stats, out.stats.decode["tokens"]
                runs[p].append((1e3 * s.decode["seconds"] / t, 1e6 * s.experts["decode"]["host_seconds"] / (t * layers)))
                tokens.setdefault(p, out.token_ids)
        _use(m, "step")
        label = m.link.label
    finally:
        m.close()
    med = statistics.median
    return [{"path": p, "mem": mem, "link": label, "rounds": rounds,
             "decode_ms_per_token": med(x[0] for x in rs), "host_us_per_layer": med(x[1] for x in rs),
             "host_us_less_than_python": med(a[1] - b[1] for a, b in zip(runs["python"], rs)),
             "time_x_python": med(b[0] / a[0] for a, b in zip(runs["python"], rs)),
             "tokens_equal_python": tokens[p] == tokens["python"]} for p, rs in runs.items()]


def main() -> None:
    a = cell_parser("python -m benchmarks.host_paths", __doc__, "50%", 10).parse_args()
    if copier.value_planner() is None:
        raise SystemExit(f"error: the native extension is not built ({copier.why}): nothing to compare")
    prompt, _ = probe(a.bundle, a.threads, a.prompt_tokens)
    rows = []
    print("| mem | link | path | decode ms/token | host µs/layer | host µs less than python | time x python | tokens = python |")
    print("|--:|---|---|--:|--:|--:|--:|---|")
    for mem in a.mem.split(","):
        for link in a.link.split(","):
            for r in measure(a.bundle, mem, link, a.rounds, a.n, a.threads, prompt):
                rows.append(r)
                print(f"| {mem} | {r['link']} | {r['path']} | {r['decode_ms_per_token']:.2f} | {r['host_us_per_layer']:.1f} | "
                      f"{r['host_us_less_than_python']:.1f} | {r['time_x_python']:.3f} | "
                      f"{'yes' if r['tokens_equal_python'] else 'no'} |", flush=True)
    print(f"{a.rounds} alternated rounds, -n {a.n}, {a.prompt_tokens}-token prompt, {a.threads} thread(s), INT2 off; "
          "medians of per-round figures")
    write_json(a.json, rows)

if __name__ == "__main__":
    main()
