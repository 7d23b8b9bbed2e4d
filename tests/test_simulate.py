"""The trace and the simulator: a recorded trace is the engine's routing; the simulator runs the engine's own
policy objects, so on a deterministic policy its counts are the engine's; its timing model and bounds behave
as they must; and on synthetic traces the policy does what it promises (nothing that cannot land in time,
demand loads never behind a prefetch)."""

from __future__ import annotations

import pytest
import torch

import fate
from fate.formats import constants as C
from fate.runtime.experts import simulate as S
from fate.runtime.experts.offload import Offloader
from fate.runtime.experts.prefetch import Prediction, prediction_maps, rank_chances
from fate.runtime.experts.residency import ExpertCache
from fate.runtime.experts.stats import ExpertStats
from fate.runtime.experts.trace import RoutingTrace, record_trace

PROMPT = "the quick brown fox jumps over the lazy dog and the"


def _setup(path, n=12):
    m = fate.load(path, experts="q4", verify=False)
    ids = m.encode_prompt(PROMPT)
    out = m.generate(ids, n, temperature=0.0, stop_at_eos=False)
    trace = record_trace(m.model, ids + out.token_ids[:-1])
    return m, ids, out, trace


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_a_traces_prediction_scores_are_the_fitted_maps_products(converted, arch):
    """With the bundle's fitted maps, the scores recorded for the prediction at a gate input are that input
    times the stacked maps of the layers ahead (whatever the family's router ranks by); without them, the
    routers' (here: the embedding's predictor input, by hand)."""
    m = fate.load(converted[arch][1], experts="q4", verify=False)
    cfg = m.config
    ids = m.encode_prompt(PROMPT)
    maps = prediction_maps(m.bundle, cfg)
    fitted, plain = record_trace(m.model, ids, maps=maps), record_trace(m.model, ids)
    with torch.inference_mode():
        x = m.model.predictor_input(m.model.embed(torch.tensor(ids))).float()
    targets = [j for j in (0, 1) if cfg.moe_layers[j]]
    w = torch.cat([maps[(-1, j)] for j in targets])
    torch.testing.assert_close(fitted.logits[-1], x @ w.T, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fitted.logits[-1], plain.logits[-1])
    m.close()


def test_a_trace_is_the_engines_routing(converted):
    """The trace's top-k per token and layer are what the router chose while the engine decoded."""
    m, ids, out, trace = _setup(converted["qwen3_moe"][1])
    seen = []

    class Spy:
        def __init__(self, inner):
            self.inner = inner

        def moe(self, layer, x, topk_ids, topk_weights):
            if x.shape[0] == 1:
                seen.append((layer, topk_ids[0].tolist()))
            return self.inner.moe(layer, x, topk_ids, topk_weights)

    m.model.experts = Spy(m.experts)
    again = m.generate(ids, 12, temperature=0.0, stop_at_eos=False)
    assert again.token_ids == out.token_ids
    L = m.config.n_layers
    moe = m.config.moe_layer_ids
    for step in range(11):
        for j, layer in enumerate(moe):
            got = seen[step * len(moe) + j]
            assert got[0] == layer and got[1] == trace.ids[len(ids) + step, layer].tolist()
    assert trace.tokens == len(ids) + 11 and trace.ids.shape == (trace.tokens, L, m.config.top_k)
    # the recorded prediction logits are the next layers' routers on this layer's gate input
    assert set(trace.logits) <= set(range(-1, L - 1)) and -1 in trace.logits
    m.close()


@pytest.mark.parametrize("policy", ["lru", "ondemand"])
def test_deterministic_policies_count_what_the_engine_counts(converted, policy):
    """No prediction, no link: every decision depends on the routing alone, so the simulator's counts equal
    the engine's on the same tokens, to the expert."""
    path = converted["mixtral"][1]
    m, ids, out, trace = _setup(path)
    e = fate.load(path, experts="q4", verify=False, policy=policy, mem="50%", int2_share=0.0)
    got = e.generate(ids, 12, temperature=0.0, stop_at_eos=False)
    assert got.token_ids == out.token_ids
    engine = got.stats.experts["decode"]
    timing = S.SimTiming(1e-3, 1e-4, {p: 1e-5 for p in m.store.precisions})
    make = S.factory(trace, timing, m.config, e.plan.slots_per_layer, policy)
    sim = S.simulate(trace, timing, make, warmup=len(ids), policy=policy).experts["decode"]
    for k in ("needed", "hits", "misses", "late_prefetches", "evictions"):
        assert sim[k] == engine[k], (k, sim, engine)
    e.close()
    m.close()


def test_bounds_and_ordering_on_a_real_trace(converted):
    path = converted["qwen2_moe"][1]
    m, ids, out, trace = _setup(path, n=24)
    cfg = m.config
    layer_s = 1e-3
    routers = {i: m.weights.get(C.T_FFN_GATE_INP.format(i=i)) for i in cfg.moe_layer_ids}
    slots = [cfg.top_k + 1 if x else 0 for x in cfg.moe_layers]
    kw = dict(chances=rank_chances(m.bundle, cfg), routers=routers, extra=2, max_new=1, warmup=len(ids))
    resident = cfg.n_layers * layer_s
    for ratio in (0.5, 2.0):
        timing = S.SimTiming(layer_s, 1e-4, {p: ratio * layer_s for p in m.store.precisions})
        r = {p: S.simulate_policy(trace, timing, cfg, slots, p, **kw) for p in ("ondemand", "lru", "fate", "perfect")}
        for p, res in r.items():
            t = res.experts["decode"]
            assert t["needed"] == 23 * len(cfg.moe_layer_ids) * cfg.top_k
            assert t["hits"] + t["late_prefetches"] + t["misses"] == t["needed"]
            assert res.seconds_per_token >= resident * 0.999  # nothing beats having everything resident
        assert r["ondemand"].experts["decode"]["hits"] == 0
        # ondemand copies every needed expert, one after another on the link (the copies are long: the copy
        # thread's), and the first one computes while the second crosses
        od = r["ondemand"]
        want = resident + (2 * ratio * layer_s - 1e-4) * len(cfg.moe_layer_ids)
        assert od.seconds_per_token == pytest.approx(want, rel=1e-3)
        assert r["perfect"].seconds_per_token <= r["lru"].seconds_per_token
        assert r["perfect"].seconds_per_token <= r["ondemand"].seconds_per_token
    m.close()


# --- synthetic traces: the policy's promises ---------------------------------------------------------

def _synthetic(T=40, L=3, E=8, k=1, seed=0) -> RoutingTrace:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, E, (T, L, k), generator=g)
    return RoutingTrace(L, E, k, [True] * L, ids, {})


class _Told:
    """A predictor that names, for the next layer, the given experts with the given chances."""

    def __init__(self, trace, names):
        self.trace, self.names, self.t = trace, names, 0

    def targets(self, layer):
        return [layer + 1] if layer + 1 < self.trace.n_layers else []

    def predict(self, layer, limit):
        return [Prediction(j, 1, *self.names(self.t, j)) for j in self.targets(layer)]


def _run(trace, names, ratio, slots=2):
    cfg = type("Cfg", (), {"n_layers": trace.n_layers, "n_experts": trace.n_experts, "top_k": trace.top_k,
                           "moe_layers": trace.moe_layers})()
    timing = S.SimTiming(1e-3, 1e-4, {"q4": ratio * 1e-3})

    def make():
        stats = ExpertStats(trace.n_layers)
        cache = ExpertCache([slots] * trace.n_layers, trace.n_experts, on_evict=stats.evicted)
        link = S.SimLink(cache, timing)
        pred = _Told(trace, names)
        off = Offloader(cfg, cache, link, stats, predictor=pred, rule="value", extra=2, layer_seconds=1e-3)
        return off, link, pred

    return S.simulate(trace, timing, make, warmup=0)


def test_a_prefetch_that_cannot_land_in_time_is_not_issued():
    """Copies that take three layers cannot land before the next layer needs them: a prediction that is right
    60 % of the time (and says so) is then not worth the link — when wrong, its copy would make the layer's
    real demand load wait two layers — so nothing is prefetched, and the run is exactly plain caching.  With
    copies of half a layer the same prediction lands in time and is used."""
    tr = _synthetic()
    g = torch.Generator().manual_seed(5)
    right = torch.rand(tr.tokens, tr.n_layers, generator=g) < 0.6

    def names(t, j):
        e = tr.ids[t, j, 0].item()
        return ([e if right[t, j] else (e + 1) % tr.n_experts], [0.6])

    told = _run(tr, names, ratio=3.0)
    plain = _run(tr, lambda t, j: ([], []), ratio=3.0)
    assert told.experts["decode"]["late_prefetches"] == 0 and told.link_busy == pytest.approx(plain.link_busy)
    assert told.experts["decode"]["hits"] == plain.experts["decode"]["hits"]
    assert told.seconds_per_token == pytest.approx(plain.seconds_per_token)
    fast = _run(tr, names, ratio=0.5)
    slow_plain = _run(tr, lambda t, j: ([], []), ratio=0.5)
    assert fast.experts["decode"]["hits"] > slow_plain.experts["decode"]["hits"]
    assert fast.seconds_per_token < slow_plain.seconds_per_token


def test_a_demand_load_never_waits_behind_a_prefetch():
    """A prediction that is always wrong, with chances that make it look worth fetching: whatever it queues,
    no demand load waits longer than the copy already on the link (nothing queued goes first) — the stall
    per miss is at most two copies (the one on the link, then its own)."""
    tr = _synthetic(seed=1)
    wrong = lambda t, j: ([(tr.ids[t, j, 0].item() + 1) % tr.n_experts], [0.9])  # noqa: E731
    r = _run(tr, wrong, ratio=0.8)
    d = r.experts["decode"]
    assert d["misses"] > 0 and d["prefetch_recall"] == 0.0
    assert d["stall_seconds"] <= d["misses"] * 2 * 0.8e-3 + 1e-9


def test_a_prefetch_delays_the_next_layers_loads_once():
    """The value rule's cost of a copy that overruns into layer i+1: its delay counts once, however many
    demand loads layer i+1 is expected to have (they cross the link one after another, so each waits the
    same), weighed by the chance of any miss there (at most 1, at most the expected misses).  A copy of 1.5
    layers for layer i+2 with chance 0.5 saves 0.75 layers and delays layer i+1 by 0.5: fetched when layer
    i+1 expects two misses (0.5 < 0.75; counted per miss the delay would be 1.0), refused beside a prefetch
    that already holds the link (then its delay is a whole copy)."""
    from types import SimpleNamespace

    from fate.runtime.experts.offload import value_plan

    E, k = 8, 2
    slot_of = [[-1] * E for _ in range(4)]
    cache = SimpleNamespace(slot_of=slot_of, pending=[[False] * 2 for _ in range(4)], free_slots=lambda j: 2,
                            resident=lambda j: [])
    preds = [Prediction(1, 1, [3, 4], [0.0, 0.0]),  # layer i+1: nothing cached, nothing worth fetching
             Prediction(2, 2, [5], [0.5])]
    assert value_plan(0, k, 0.0, 0.0, 1.0, 1.5, 1e-6, preds, cache) == [(2, 5, -1, 0.5)]
    assert value_plan(0, k, 0.0, 1.0, 1.0, 1.5, 1e-6, preds, cache) == []  # the link is busy until i+1 starts


def test_prefill_short_of_slots_computes_the_smallest_hits_first():
    """A prefill step that needs more experts than its layer has slots: the cached experts are computed
    fewest tokens first, so a slot frees soonest and the first waiting load starts after the shortest
    compute; the loads go most tokens first."""
    cfg = type("Cfg", (), {"n_layers": 1, "n_experts": 4, "top_k": 1, "moe_layers": [True]})()
    stats = ExpertStats(1)
    cache = ExpertCache([2], 4, on_evict=stats.evicted)
    link = S.SimLink(cache, S.SimTiming(1e-3, 1e-4, {"q4": 1e-3}))
    for e in (0, 1):
        s = cache.reserve(0, e, "q4", prefetched=False)
        cache.landed(0, s, cache.gen[0][s])
    off = Offloader(cfg, cache, link, stats, layer_seconds=1e-3)
    counts = {0: 10, 1: 3, 2: 5, 3: 1}
    order, starts = [], []
    demand = link.demand
    link.demand = lambda layer, slot, inline: (starts.append((cache.expert_at[layer][slot], len(order))),
                                                demand(layer, slot, inline=inline))

    def compute(e, s, p):
        order.append(e)
        link.compute(1e-4 * counts[e])

    off.run_layer(0, [0, 2, 1, 3], counts, 19, None, compute)
    assert order == [1, 0, 2, 3]
    assert starts == [(2, 1), (3, 2)]  # expert 2's load once expert 1 (3 tokens) is done, then expert 3's


def test_int2_in_prefill_only_where_the_link_limits_it():
    """A prefill step's loads go as INT2 (the least popular, within --int2-share) only where copying them at
    the decode precision would outlast half the layer's compute (19 tokens x one expert of 0.1 ms here):
    two loads of 1 ms do, two of 10 µs do not.  Where they do not, an INT2 copy already held (a prefill
    prefetch decided on the prediction) still serves the expert the share rule allows: no upgrade."""
    cfg = type("Cfg", (), {"n_layers": 1, "n_experts": 4, "top_k": 1, "moe_layers": [True]})()
    counts = {0: 10, 1: 3, 2: 5, 3: 1}

    def served(copy, held_q2=()):
        stats = ExpertStats(1)
        cache = ExpertCache([4], 4, on_evict=stats.evicted)
        link = S.SimLink(cache, S.SimTiming(1e-3, 1e-4, {"q4": copy, "q2": copy / 2}))
        for e, p in [(0, "q4"), (1, "q4")] + [(e, "q2") for e in held_q2]:
            slot = cache.reserve(0, e, p, prefetched=True)
            cache.landed(0, slot, cache.gen[0][slot])
        off = Offloader(cfg, cache, link, stats, low_precision="q2", int2_share=0.5, layer_seconds=1e-3,
                        expert_seconds=1e-4)
        got = {}
        off.run_layer(0, [0, 2, 1, 3], counts, 19, None, lambda e, slot, p: got.__setitem__(e, p))
        return got

    assert served(1e-3) == {0: "q4", 1: "q4", 2: "q2", 3: "q2"}  # 2 ms of copies against 0.95 ms
    assert served(1e-5) == {0: "q4", 1: "q4", 2: "q4", 3: "q4"}  # 20 µs: INT2 would save nothing
    assert served(1e-5, held_q2=(3,)) == {0: "q4", 1: "q4", 2: "q4", 3: "q2"}


def test_int2_copies_a_prefill_leaves_are_rewritten_in_int4_while_the_link_is_idle():
    """The INT2 copies a prefill leaves in the cache would each be a miss when decode wants the expert: after
    each decode step, while nothing is on the link, one of them is rewritten in place at the decode
    precision (the next layer's first), behind every other copy; while the link is busy, none is."""
    cfg = type("Cfg", (), {"n_layers": 2, "n_experts": 4, "top_k": 1, "moe_layers": [True, True]})()
    stats = ExpertStats(2)
    cache = ExpertCache([4, 4], 4, on_evict=stats.evicted)
    link = S.SimLink(cache, S.SimTiming(1e-3, 1e-4, {"q4": 1e-3, "q2": 5e-4}))
    off = Offloader(cfg, cache, link, stats, low_precision="q2", int2_share=0.5, layer_seconds=1e-3,
                    expert_seconds=1e-4)
    compute = lambda e, slot, p: link.compute(1e-4)  # noqa: E731
    for layer in (0, 1):  # 19 tokens, 3 loads of 1 ms against 0.95 ms: the link limits this prefill
        off.run_layer(layer, [0, 2, 1, 3], {0: 10, 1: 3, 2: 5, 3: 1}, 19, None, compute)

    def int2():
        return {(j, e) for j in (0, 1) for e in range(4) if cache.precision_at[j][cache.slot_of[j][e]] == "q2"}

    assert int2() == {(j, e) for j in (0, 1) for e in (1, 2, 3)}  # the least popular, within the share
    link.compute(1e-2)
    slot = cache.change_precision(0, 0, "q4")  # a copy on the link (1 ms) while layer 1 decodes
    link.prefetch(0, slot, 2.0)
    off.run_layer(1, [0], None, 1, None, compute)
    assert len(int2()) == 6 and cache.pending[0][slot]  # busy: nothing rewritten
    left, layers = [], []
    for step in range(7):
        link.compute(2e-3)  # everything on the link lands: idle again
        layer = step % 2
        before = int2()
        off.run_layer(layer, [0], None, 1, None, compute)
        gone = before - int2()
        layers.append([j for j, _ in gone])
        left.append(len(int2()))
    assert left == [5, 4, 3, 2, 1, 0, 0]
    assert layers[:6] == [[1], [0], [1], [0], [1], [0]] and layers[6] == []  # the next layer's first
    link.compute(2e-3)
    assert not any(cache.pending[j][cache.slot_of[j][e]] for j in (0, 1) for e in range(4))
    assert all(cache.precision_at[j][cache.slot_of[j][e]] == "q4" for j in (0, 1) for e in range(4))


@pytest.mark.parametrize("copy", [1e-3, 1e-5])
def test_a_long_demand_load_crosses_the_link_while_the_layer_computes_its_hits(copy):
    """A one-token step with one cached and one missing expert: a copy longer than a hand-off
    (:func:`fate.runtime.experts.transfer.copies_inline`) runs while the cached expert computes, so the layer
    takes the copy and then the missing expert's compute; a short one is copied first, on the layer's own
    time, as the engine does on its thread."""
    from fate.runtime.experts.transfer import copies_inline

    cfg = type("Cfg", (), {"n_layers": 1, "n_experts": 4, "top_k": 2, "moe_layers": [True]})()
    stats = ExpertStats(1)
    cache = ExpertCache([2], 4, on_evict=stats.evicted)
    link = S.SimLink(cache, S.SimTiming(1e-3, 3e-4, {"q4": copy}))
    s = cache.reserve(0, 0, "q4", prefetched=False)
    cache.landed(0, s, cache.gen[0][s])
    off = Offloader(cfg, cache, link, stats, layer_seconds=1e-3)
    off.run_layer(0, [1, 0], None, 1, None, lambda e, s, p: link.compute(3e-4))
    want = copy + 3e-4 if not copies_inline(copy) else copy + 2 * 3e-4
    assert link.t == pytest.approx(want)
    assert stats.to_dict()["decode"]["stall_seconds"] == pytest.approx(want - 2 * 3e-4)


def test_the_next_layers_are_planned_while_the_layers_own_loads_cross():
    """While a one-token step's miss crosses the link on the copy thread, the next layers are predicted at
    once (the host work overlaps the copy), on the value rule's clock of when layer i+1 will start: the miss
    lands at 1.0 ms, the hit computed meanwhile, so layer 1 starts at 1.7 ms (not a layer after the
    prediction, 1.0 ms).  A copy for layer 1 with chance 0.9 then saves 0.63 ms against a 0.3 ms delay and is
    queued straight behind the miss; on the plain clock it would look a whole copy late and be refused."""
    cfg = type("Cfg", (), {"n_layers": 2, "n_experts": 4, "top_k": 2, "moe_layers": [True, True]})()
    stats = ExpertStats(2)
    cache = ExpertCache([2, 2], 4, on_evict=stats.evicted)
    link = S.SimLink(cache, S.SimTiming(1e-3, 3e-4, {"q4": 1e-3}))
    s = cache.reserve(0, 0, "q4", prefetched=False)
    cache.landed(0, s, cache.gen[0][s])
    told = []

    class Once:
        def targets(self, layer):
            return [1]

    off = Offloader(cfg, cache, link, stats, predictor=Once(), rule="value", layer_seconds=1e-3,
                    expert_seconds=3e-4)

    def predict():
        told.append(link.t)
        return [Prediction(1, 1, [3], [0.9])]

    off.run_layer(0, [1, 0], None, 1, predict, lambda e, s, p: link.compute(3e-4))
    assert told == [0.0]
    assert cache.slot_of[1][3] >= 0 and cache.prefetched[1][cache.slot_of[1][3]]
    link.compute(1e-3)
    assert not cache.pending[1][cache.slot_of[1][3]]  # crossed from 1.0 to 2.0 ms, behind the miss
    assert link.link_seconds == pytest.approx(2e-3)


def test_the_value_rule_predicts_in_decode_only_where_the_reuse_curves_say_it_pays():
    """With the bundle's reuse curves, a decode step predicts at a gate input only where layer i+1 or i+2 is
    expected to miss more copy time than twice a prediction's host work: with 2 slots, layers 0, 1 and 3
    hold 99 % of their experts (2 × 1 % × 1 ms = 20 µs a token, under 60 µs) and layer 2 half (1 ms), so
    only the gate inputs of layers 0 and 1 (which serve layer 2) predict; without the curves every one
    does.  Prefill predicts everywhere."""
    cfg = type("Cfg", (), {"n_layers": 4, "n_experts": 4, "top_k": 2, "moe_layers": [True] * 4,
                           "moe_layer_ids": [0, 1, 2, 3]})()
    reuse = torch.zeros(2, 4, 5)
    reuse[:, :, 2] = torch.tensor([0.99, 0.99, 0.5, 0.99])

    class Twice:
        def targets(self, layer):
            return [layer + 1, layer + 2]

    def offloader(curves):
        stats = ExpertStats(4)
        cache = ExpertCache([2] * 4, 4, on_evict=stats.evicted)
        link = S.SimLink(cache, S.SimTiming(1e-3, 3e-4, {"q4": 1e-3}))
        return Offloader(cfg, cache, link, stats, predictor=Twice(), rule="value", layer_seconds=1e-3,
                         expert_seconds=3e-4, reuse=curves), link

    off, link = offloader(reuse)
    assert off._predicts_at == [False, True, True, False, False]
    assert offloader(None)[0]._predicts_at == [True, True, True, True, False]
    told = []
    for layer in range(4):
        def predict(layer=layer):
            told.append(layer)
            return [Prediction(layer + 1, 1, [3], [0.9])] if layer + 1 < 4 else []

        off.run_layer(layer, [0, 1], None, 1, predict, lambda e, s, p: link.compute(3e-4))
        link.compute(1e-3)
    assert told == [0, 1]  # decode: the gate inputs of layers 0 and 1 only
    # prefill (4 tokens: up to 4 loads a layer, 2 held, 2 ms of copies against 0.5 × 4 × 2 × 0.3 ms): every one
    assert [off.wants_prediction(i, decode=False, tokens=4) for i in range(-1, 4)] == [True] * 4 + [False]


def test_a_prefill_under_the_value_rule_predicts_only_where_the_next_layers_loads_could_limit_it():
    """The most a prefill's loads into layer j could take — every expert its tokens can route to that j does not
    hold at the decode precision — against half its compute (tokens × top_k × one expert's product): with 2 of
    4 experts held, 1 ms copies and 0.3 ms products, 4 tokens may load 2 (2 ms > 1.2 ms: predict) and 8 tokens
    too (2 ms < 2.4 ms: not); with nothing held 8 tokens may load 4 (4 ms: predict).  INT2 copies count as not
    held.  The paper's window rule predicts wherever its prefill does."""
    cfg = type("Cfg", (), {"n_layers": 2, "n_experts": 4, "top_k": 2, "moe_layers": [True] * 2,
                           "moe_layer_ids": [0, 1]})()

    class Ahead:
        def targets(self, layer):
            return [layer + 1]

    def offloader(rule="value"):
        stats = ExpertStats(2)
        cache = ExpertCache([4, 4], 4, on_evict=stats.evicted)
        link = S.SimLink(cache, S.SimTiming(1e-3, 3e-4, {"q4": 1e-3, "q2": 5e-4}))
        return Offloader(cfg, cache, link, stats, predictor=Ahead(), rule=rule, layer_seconds=1e-3,
                         expert_seconds=3e-4, low_precision="q2"), cache

    off, cache = offloader()
    assert off.predicts_at(0, False, 8)  # nothing held: up to 4 loads
    for e in (0, 1):
        cache.reserve(1, e, "q4", prefetched=False)
    assert off.predicts_at(0, False, 4) and not off.predicts_at(0, False, 8)
    assert not off.predicts_at(1, False, 4)  # nothing after the last layer
    cache.change_precision(1, 1, "q2")  # an INT2 copy is a load at the decode precision: 3 loads, 3 ms > 2.4 ms
    assert off.predicts_at(0, False, 8)
    for rule, predicts in (("value", False), ("window", True)):  # everything held: no loads to save
        off, cache = offloader(rule)
        for e in range(4):
            cache.reserve(1, e, "q4", prefetched=False)
        assert off.predicts_at(0, False, 8) is predicts
