"""The offloading engine through fate.load / fate-run: results never change, the counters are right,
the budget is enforced, INT2 is used only where the prefill rule says."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import fate
from fate.formats import constants as C
from fate.cli.run import main as run_main
from fate.model.experts import DenseExperts
from tests.conftest import DEVICES
from tests.tiny_models import ARCHS

PROMPT = "the quick brown fox jumps over the lazy dog and"


def _tokens(path, n=16, **opts):
    m = fate.load(path, experts="q4", **opts)
    if opts.get("policy") == "resident" and opts.get("device") == "cuda":
        # the plain executor: the offloaded one's math (on CPU the engine's resident default already is:
        # q4 products through fate.quant.kernels, --kernels int8, on both sides)
        m.model.experts = DenseExperts(lambda layer, e: m.store.dense(layer, e, "q4", dtype=m.dtype, device=m.device),
                                       m.config.act)
    out = m.generate(PROMPT, n, temperature=0.0, stop_at_eos=False)
    m.close()
    return out.token_ids, out.stats


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
def test_offloading_never_changes_greedy_tokens(converted, arch, device):
    path = converted[arch][1]
    want, _ = _tokens(path, policy="resident", device=device)
    for mem in ("25%", "50%"):
        got, stats = _tokens(path, mem=mem, int2_share=0.0, device=device)
        assert got == want, (arch, mem)
        e = stats.experts["total"]
        assert e["needed"] > 0 and e["hits"] + e["misses"] + e["late_prefetches"] == e["needed"]
        assert stats.budget["slots_per_layer"] and not stats.budget["fully_resident"]
        assert stats.experts["evict"] == "lrfu"  # fate's caching
    for policy, evict, caching in (("ondemand", "auto", "arc"), ("lru", "lfu", "lru"), ("paper", "auto", "arc"),
                                   ("fate", "arc", "arc")):
        got, stats = _tokens(path, mem="25%", policy=policy, evict=evict, device=device, int2_share=0.0)
        assert got == want, (arch, policy, evict)
        assert stats.experts["evict"] == caching  # what --evict resolved to (lru caching is always LRU)


@pytest.mark.parametrize("device", DEVICES)
def test_offloaded_logits_equal_resident_under_slot_reuse(converted, device):
    """Every prefill step reuses slots right after their expert is computed (2 slots per layer, more
    experts wanted): on cuda the copy into a slot must wait for the device's last read of it."""
    path = converted["qwen2_moe"][1]
    ids = list(range(3, 40))
    ref = fate.load(path, experts="q4", policy="resident", device=device, kernels="torch")
    ref.model.experts = DenseExperts(lambda layer, e: ref.store.dense(layer, e, "q4", dtype=ref.dtype, device=ref.device),
                                     ref.config.act)
    want = ref.model.forward(torch.tensor(ids, device=ref.device), None).float().cpu()
    for policy in ("ondemand", "fate"):
        m = fate.load(path, experts="q4", mem="25%", policy=policy, int2_share=0.0, device=device,
                      prefetch_extra=4, kernels="torch")  # the reference's arithmetic: torch's, bit for bit
        for _ in range(3):
            m.kv.reset()
            got = m.model.forward(torch.tensor(ids, device=m.device), m.kv).float().cpu()
            torch.testing.assert_close(got, want, atol=0, rtol=0)
        m.close()


def test_ondemand_counts_every_use_as_a_miss(converted):
    path = converted["mixtral"][1]
    toks, stats = _tokens(path, n=6, policy="ondemand")
    e = stats.experts
    n_moe = 3
    assert e["decode"]["needed"] == 5 * 2 * n_moe  # 5 decode steps x top-2 x MoE layers
    t = e["total"]
    assert t["hits"] == 0 and t["misses"] == t["needed"] and t["prefetch_recall"] is None
    blob = fate.load(path).store.blob_bytes("q4")
    assert e["bytes_by_precision"] == {"q4": t["needed"] * blob}


class _Recorder:
    """An observer on the resident model recording what the prefetcher would have named."""

    def __init__(self, model, k, maps=None):
        self.m, self.k, self.named, self.g, self.maps = model, k, {}, {}, maps

    def on_gate_input(self, layer, g):
        self.g[layer] = g.clone()
        j, cfg = layer + 1, self.m.config
        if j not in cfg.moe_layer_ids or g.shape[0] != 1:
            return
        if self.maps is not None:  # the bundle's fitted map for the next layer, by hand (whatever the router)
            self.named[j] = set((g.float() @ self.maps[0, j].float().T)[0].topk(self.k).indices.tolist())
        elif cfg.router_ranks_by_logits:  # the next router's own product, by hand
            r = self.m.weights.get(C.T_FFN_GATE_INP.format(i=j))
            self.named[j] = set((g.float() @ r.float().T)[0].topk(self.k).indices.tolist())
        else:  # a bias, groups or a sigmoid: what the next layer's router would select for this input
            self.named[j] = set(self.m.model.route(j, g)[1][0].tolist())


# qwen3: softmax over logits; the others order experts by more than their router's product (gpt-oss's
# bias, DeepSeek-V3/GLM's sigmoid plus correction in groups, ERNIE's correction)
@pytest.mark.parametrize("predictor", ["fitted", "router"])
@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "deepseek_v3", "glm4_moe", "ernie4_5_moe"])
def test_prefetch_recall_matches_an_independent_count(converted, arch, predictor):
    path = converted[arch][1]
    ref = fate.load(path, experts="q4")
    cfg = ref.config
    maps = ref.bundle.tensor(C.T_CALIB_PREDICT) if predictor == "fitted" else None
    rec = _Recorder(ref, cfg.top_k, maps)
    ref.model.observer = rec
    needed_total = hit_total = 0
    ids = ref.encode_prompt(PROMPT)
    tokens = ref.generate(ids, 10, temperature=0.0, stop_at_eos=False).token_ids
    # replay the decode steps on the resident model and count by hand
    kv = ref.model.new_cache(64) if hasattr(ref.model, "new_cache") else None
    ref.model.forward(torch.tensor(ids), kv)
    for t in tokens[:-1]:
        rec.named.clear()
        ref.model.forward(torch.tensor([t]), kv)
        for i in cfg.moe_layer_ids:
            if i in rec.named:
                _, topk, _ = ref.model.route(i, rec.g[i])
                actual = set(topk[0].tolist())
                needed_total += len(actual)
                hit_total += len(actual & rec.named[i])
    # the paper's rule names the top k of every next layer (fate's value rule skips predictions the link
    # could not act on, so its named sets depend on timing)
    _, stats = _tokens(path, n=10, mem="50%", prefetch_extra=0, int2_share=0.0, policy="paper", predictor=predictor)
    d = stats.experts["decode"]
    assert d["prefetch_recall"] == pytest.approx(hit_total / needed_total)
    assert d["prefetch_precision"] == pytest.approx(hit_total / needed_total)  # k named, k needed per layer


def test_int2_share_respected_in_prefill(converted):
    """INT2 in prefill where the link limits it: over a slow link (each copy four layers' decode compute) some
    prefill experts go as INT2; where copies are a memcpy they cost less than the compute they cross beside,
    and every expert goes as INT4 whatever --int2-share (INT2 would only leave decode misses behind)."""
    path = converted["olmoe"][1]
    m = fate.load(path, experts="q4", mem="50%", int2_share=0.3, link="ratio:4")
    m.generate(PROMPT * 3, 1, temperature=0.0)
    moved = m.last_stats.experts["bytes_by_precision"]
    assert moved.get("q2", 0) > 0  # some prefill experts went as INT2
    fast = fate.load(path, experts="q4", mem="50%", int2_share=0.3)
    fast.generate(PROMPT * 3, 1, temperature=0.0)
    assert "q2" not in fast.last_stats.experts["bytes_by_precision"]
    assert fast.last_stats.experts["prefill"]["misses"] > 0  # it did copy experts, all of them INT4
    # the rule itself: least popular experts, share of assignments ≤ 30 %
    from fate.runtime.experts.hybrid import hybrid_precisions

    counts = [10, 1, 5, 0, 2, 30, 1, 1]
    ranked = sorted((e for e in range(8) if counts[e]), key=lambda e: -counts[e])
    p = hybrid_precisions(ranked, counts, 0.3, "q4", "q2")
    # total 50, share 15: from the least popular up, 7,6,1 (1 each), 4 (2), 2 (5) make 10; adding 0 (10) passes 15
    assert {e for e in ranked if p[e] == "q2"} == {7, 6, 1, 4, 2}
    # and with --int2-share 0 nothing is INT2
    m2 = fate.load(path, experts="q4", mem="50%", int2_share=0.0)
    m2.generate(PROMPT * 3, 1, temperature=0.0)
    assert "q2" not in m2.last_stats.experts["bytes_by_precision"]


def test_cli_budget_errors_and_stats_json(converted, tmp_path):
    path = converted["deepseek"][1]
    res = CliRunner().invoke(run_main, [str(path), "-p", PROMPT, "--mem", "1KiB"])
    assert res.exit_code == 2 and res.output.startswith("error: ") and "minimum" in res.output
    res = CliRunner().invoke(run_main, [str(path), "-p", PROMPT, "--mem", "lots"])
    assert res.exit_code == 2 and "--mem" in res.output
    res = CliRunner().invoke(run_main, [str(path), "-p", PROMPT, "--link", "warp9"])
    assert res.exit_code == 2 and "warp9" in res.output
    out = tmp_path / "s.json"
    res = CliRunner().invoke(run_main, [str(path), "-p", PROMPT, "-n", 4, "--temp", 0, "--mem", "50%",
                                        "--link", "ratio:1", "--stats-json", str(out), "-v"])
    assert res.exit_code == 0, res.output
    d = json.loads(out.read_text())
    ex = d["experts"]
    assert set(ex) == {"policy", "evict", "link", "total", "prefill", "decode", "layers", "bytes_by_precision"}
    for part in [ex["total"], ex["prefill"], ex["decode"]] + ex["layers"]:
        for k in ("needed", "hits", "late_prefetches", "misses", "evictions", "predicted_needed", "named",
                  "named_needed", "stall_seconds", "hit_rate", "prefetch_recall", "prefetch_precision"):
            assert k in part
    # every count is in exactly one (phase, layer) cell: layers and phases add up to the totals
    for k in ("needed", "hits", "late_prefetches", "misses", "evictions", "named", "named_needed"):
        assert sum(r[k] for r in ex["layers"]) == ex["total"][k] == ex["prefill"][k] + ex["decode"][k], k
    assert ex["total"]["evictions"] > 0 and sum(r["evictions"] > 0 for r in ex["layers"]) >= 1
    assert d["prefill"]["tokens"] == len(d["prompt_token_ids"]) and d["decode"]["tokens"] == 3
    assert d["experts"]["link"]["emulated"] and "emulated" in res.output
    assert d["budget"]["slots_per_layer"][0] == 0  # DeepSeekMoE's dense first layer has no slots
    assert "slots per MoE layer" in res.output


def test_timing_profile_is_measured_once_and_cached(converted, monkeypatch, tmp_path):
    import os

    from fate.runtime.experts import profile as P

    monkeypatch.setenv("FATE_CACHE_DIR", str(tmp_path))
    path = converted["mixtral"][1]
    m = fate.load(path, mem="50%")
    files = list((tmp_path / "profiles").glob("*.json"))
    assert len(files) == 1
    prof = json.loads(files[0].read_text())
    assert prof["layer_decode_seconds"] > 0 and set(prof["expert_copy_seconds"]) == {"f16", "q4", "q2"}
    assert m.offloading.prefetch_extra == m.timing.extra_candidates(2, 8, "q4", None)

    def boom(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(P, "measure", boom)
    fate.load(path, mem="50%")  # read from the cache
    with pytest.raises(AssertionError):
        fate.load(path, mem="50%", profile=True)  # --profile re-measures
    assert os.environ["FATE_CACHE_DIR"] == str(tmp_path)


def test_profile_window_bounds_extra_candidates():
    from fate.runtime.experts.profile import TimingProfile

    p = TimingProfile(0.010, {"q4": 0.001}, {"q4": 1_000_000}, "cpu", "now")
    assert p.extra_candidates(2, 8, "q4", None) == 6  # 10 copies fit a layer: capped at E - k
    assert p.extra_candidates(2, 64, "q4", None) == 8  # 10 fit, 2 of them are the top-k
    assert p.extra_candidates(2, 64, "q4", 200e6) == 0  # 5 ms per copy on a 200 MB/s link: 2 fit
    assert p.extra_candidates(4, 64, "q4", 1e6) == 0  # slower than a layer: top-k only


def test_slow_link_with_every_slot_in_flight_still_runs(converted):
    """2 slots per layer, a link slower than compute and a long prompt: every slot can hold an in-flight,
    mispredicted prefetch when the layer needs its experts; the layer waits for a copy, never fails."""
    path = converted["qwen2_moe"][1]
    want, _ = _tokens(path, n=6, policy="resident")
    m = fate.load(path, experts="q4", mem="25%", link="ratio:1", int2_share=0.0)
    ids = m.encode_prompt(PROMPT * 4)[:32]
    got = m.generate(ids, 6, temperature=0.0, stop_at_eos=False)
    ref = fate.load(path, experts="q4").generate(ids, 6, temperature=0.0, stop_at_eos=False)
    assert got.token_ids == ref.token_ids
    assert got.stats.experts["link"]["emulated"]
    m.close()
    assert want


def test_weights_outlive_close(converted):
    m = fate.load(converted["mixtral"][1])
    m.close()  # unmaps the bundle; the non-expert weights are copies, not views of it
    norm = m.weights.get(C.T_OUTPUT_NORM)
    assert torch.isfinite(norm).all()


class _RecordingTransfer:
    """The transfer queue's interface, recording the order of submissions (copies done by the real one)."""

    def __init__(self, store, cache):
        from fate.runtime.experts.transfer import TransferEngine

        self.real = TransferEngine(store, cache, store.blob_bytes("q4"), torch.device("cpu"),
                                   copy_seconds={"q4": 0.5})  # copies worth predicting for
        self.cache = cache
        self.jobs = []

    def demand(self, layer, slot, *, inline):
        self.jobs.append((layer, self.cache.expert_at[layer][slot], "demand"))
        self.real.demand(layer, slot, inline=inline)

    def prefetch(self, layer, slot, priority):
        self.jobs.append((layer, self.cache.expert_at[layer][slot], priority))
        self.real.prefetch(layer, slot, priority)

    def native_queue(self, precision, queued):
        return None  # every prefetch through prefetch() above, where it is recorded

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.mark.parametrize("policy", ["fate", "paper"])
def test_prefetches_queue_after_the_layers_own_loads(converted, policy):
    """A MoE layer predicts the next ones only once its own demand loads are queued (a copy on the link
    cannot be interrupted); after a dense layer, which queues none, at once."""
    from fate.runtime.experts.offload import OffloadedExperts, Offloader
    from fate.runtime.experts.prefetch import Predictor, rank_chances
    from fate.runtime.experts.residency import ExpertCache
    from fate.runtime.experts.stats import ExpertStats

    m = fate.load(converted["deepseek"][1], experts="q4", device="cpu")
    cfg = m.config
    assert not cfg.moe_layers[0] and cfg.moe_layers[1] and cfg.moe_layers[2]
    routers = {i: m.weights.get(C.T_FFN_GATE_INP.format(i=i)) for i in cfg.moe_layer_ids}
    cache = ExpertCache([0] + [cfg.top_k + 2] * (cfg.n_layers - 1), cfg.n_experts)
    rec = _RecordingTransfer(m.store, cache)
    predictor = Predictor(cfg, routers, rank_chances(m.bundle, cfg), decode_precision="q4", low_precision=None,
                          int2_share=0.0, ahead=(1,))
    off = Offloader(cfg, cache, rec, ExpertStats(cfg.n_layers), predictor=predictor, extra=2,
                    rule="value" if policy == "fate" else "window", layer_seconds=1.0)
    ex = OffloadedExperts(off, m.store, rec, dtype=m.dtype, device="cpu")
    g = torch.randn(1, cfg.hidden_size)
    ex.on_gate_input(1, g)  # a MoE layer's gate input: nothing yet, moe() predicts after its own loads
    assert rec.jobs == []
    _, ids, w = m.model.route(1, g)
    ex.moe(1, g, ids, w)
    kinds = [(j[0], j[2] == "demand") for j in rec.jobs]
    assert kinds[:cfg.top_k] == [(1, True)] * cfg.top_k  # this layer's demand loads first
    assert kinds[cfg.top_k:] and all(layer == 2 and not d for layer, d in kinds[cfg.top_k:])  # then prefetches
    assert set(j[1] for j in rec.jobs[:cfg.top_k]) == set(ids[0].tolist())
    rec.jobs.clear()
    for s in range(cache.n_slots[2]):  # the link idle again (the Python worker counts queued copies as busy)
        rec.real.wait(2, s)
    ex.on_gate_input(0, g)  # dense layer 0 names layer 1's: queued at once
    assert rec.jobs and {j[0] for j in rec.jobs} == {1}
    rec.real.close()
    m.close()


def test_native_one_token_ranking_equals_numpy(converted, monkeypatch):
    """The native one-token prediction (product and partial sort in one call) names the same experts in the
    same order as the numpy path: ties go to the lower id, as numpy's stable argsort gives them."""
    from fate.runtime.experts import copier
    from fate.runtime.experts.prefetch import Predictor, rank_chances

    rank = copier.rank_topn()
    if rank is None:
        pytest.skip(f"native extension not built: {copier.why}")
    gen = torch.Generator().manual_seed(0)
    for groups, E, H, n in ((2, 16, 128, 6), (2, 60, 2048, 8), (1, 64, 96, 64), (2, 32, 7, 3)):
        w = torch.randn(groups * E, H, generator=gen)
        w[1] = w[0]  # a tie
        x = torch.randn(1, H, generator=gen)
        ref = np.argsort(-(w.numpy() @ x.numpy()[0]).reshape(groups, E), axis=1, kind="stable")[:, :n].tolist()
        assert rank(w.data_ptr(), x.data_ptr(), groups, E, H, n) == ref
    m = fate.load(converted["qwen3_moe"][1], experts="q4", device="cpu")
    cfg = m.config
    routers = {i: m.weights.get(C.T_FFN_GATE_INP.format(i=i)) for i in cfg.moe_layer_ids}
    limit = {j: cfg.top_k + 2 for j in range(cfg.n_layers)}

    def named(native):
        p = Predictor(cfg, routers, rank_chances(m.bundle, cfg), decode_precision="q4", low_precision=None,
                      int2_share=0.0)
        if not native:
            p._rank_native = None  # the numpy path
        g = torch.randn(1, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
        return [(q.layer, q.experts, q.chances) for i in range(-1, cfg.n_layers - 1) for q in p.predict(i, g, limit)]

    assert named(True) == named(False) and named(True)
    m.close()


def test_native_value_rule_equals_its_reference():
    """The value rule's native decisions (:mod:`fate.runtime.experts.native_policy`) are its Python reference's
    (``offload.value_plan``), decision for decision, on random cache states, predictions (ties and zero
    chances included) and link clocks; and the states are varied enough that both free slots and victims
    are taken, and some candidates are refused."""
    import random
    from types import SimpleNamespace

    from fate.runtime.experts import copier
    from fate.runtime.experts.offload import value_plan
    from fate.runtime.experts.prefetch import Prediction

    native = copier.value_plan()
    if native is None:
        pytest.skip(f"native extension not built: {copier.why}")
    rng = random.Random(0)
    seen = {"free": 0, "victim": 0, "refused": 0}
    L = 8
    for _ in range(3000):
        E, k, n_slots = rng.choice((8, 16, 64)), rng.choice((1, 2, 4)), rng.randint(1, 12)
        layer = rng.randint(-1, 4)
        slot_of = [[-1] * E for _ in range(L)]
        pending = [[rng.random() < 0.3 for _ in range(n_slots)] for _ in range(L)]
        order, n_free, preds = {}, {}, []
        for j in range(L):
            full = min(E, n_slots)
            resident = rng.sample(range(E), full if rng.random() < 0.5 else rng.randint(0, full))
            for s, e in enumerate(resident):
                slot_of[j][e] = s
            order[j], n_free[j] = rng.sample(resident, len(resident)), n_slots - len(resident)
        for a in (1, 2)[:rng.randint(1, 2)]:
            ranked = rng.sample(range(E), rng.randint(0, min(E, 2 * k + 2)))
            levels = (0.0, 0.25, 0.5, 0.9)
            chances = [rng.choice(levels) if rng.random() < 0.5 else rng.random() for _ in ranked]
            preds.append(Prediction(layer + a, a, ranked, chances))
        cache = SimpleNamespace(slot_of=slot_of, pending=pending, free_slots=n_free.__getitem__,
                                resident=lambda j: list(order[j]))
        t_layer = rng.choice((0.0, 1e-4, 3e-4))
        t_copy = rng.choice((1e-9, 5e-5, 3e-4, 9e-4))
        now = 1.0 + rng.random() * 1e-3
        link_free = now + rng.choice((0.0, 1e-4, 6e-4))
        args = (layer, k, now, link_free, t_layer, t_copy, 1e-5, preds, cache)
        want = value_plan(*args)
        assert list(native(*args)) == want
        seen["free"] += sum(v < 0 for _, _, v, _ in want)
        seen["victim"] += sum(v >= 0 for _, _, v, _ in want)
        cands = sum(1 for q in preds for e, p in zip(q.experts, q.chances) if slot_of[q.layer][e] < 0 and p > 0)
        seen["refused"] += cands - len(want)
    assert min(seen.values()) > 100, seen


def test_native_queueing_equals_its_reference(converted):
    """The planner's native queueing (``TransferEngine.native_queue``) makes exactly the reference's changes
    (``Offloader._queue_planned``: the cache's reserve, then the transfer's prefetch) on twin caches and
    copiers: the same slots, victims, flags, generations, free lists, eviction order and counts, tickets and
    queued lists, decision for decision, on random states whose decisions take free slots and victims; and
    every copy lands in its slot.  (A flag changes only when the model's thread settles: the twins compare
    exactly, whatever their copy threads have done meanwhile.)"""
    import random

    from fate.runtime.experts import copier
    from fate.runtime.experts.link import LinkSpec, Throttle
    from fate.runtime.experts.offload import Offloader, value_plan
    from fate.runtime.experts.prefetch import Prediction
    from fate.runtime.experts.residency import ExpertCache
    from fate.runtime.experts.stats import ExpertStats
    from fate.runtime.experts.transfer import TransferEngine

    if copier.queuer() is None:
        pytest.skip(f"native extension not built: {copier.why}")
    m = fate.load(converted["mixtral"][1], experts="q4", device="cpu")
    cfg, n = m.config, m.store.blob_bytes("q4")
    rng = random.Random(5)
    seen = {"free": 0, "victim": 0}
    for _ in range(40):
        n_slots, policy = rng.randint(1, cfg.n_experts), rng.choice(("lrfu", "arc", "lru"))
        ops = []  # the same random history for both twins
        for j in range(cfg.n_layers):
            for e in rng.sample(range(cfg.n_experts), rng.randint(0, n_slots)):
                ops.append((j, e, rng.random() < 0.7, rng.random() < 0.5))
        layer = rng.randint(-1, cfg.n_layers - 2)
        twins = []
        for _ in range(2):
            stats = ExpertStats(cfg.n_layers)
            cache = ExpertCache([n_slots] * cfg.n_layers, cfg.n_experts, policy=policy, on_evict=stats.evicted)
            link = LinkSpec("bandwidth", bytes_per_s=n / 0.005, label="test", emulated=True)
            t = TransferEngine(m.store, cache, n, torch.device("cpu"), Throttle(link), stats=stats)
            off = Offloader(cfg, cache, t, stats, predictor=None, layer_seconds=1e-3)
            for j, e, landed, used in ops:
                if cache.slot_of[j][e] < 0:
                    s = cache.reserve(j, e, "q4", prefetched=False)
                    if s >= 0 and landed:
                        cache.landed(j, s, cache.gen[j][s])
                    if s >= 0 and used:
                        cache.touch(j, e)
            twins.append((cache, t, off, stats))
        preds = [Prediction(layer + a, a, rng.sample(range(cfg.n_experts), cfg.n_experts),
                            sorted((rng.random() for _ in range(cfg.n_experts)), reverse=True))
                 for a in (1, 2) if layer + a < cfg.n_layers]
        decisions = value_plan(layer, cfg.top_k, 1.0, 1.0, 1e-3, 1e-4, 1e-6, preds, twins[0][0])
        seen["free"] += sum(v < 0 for _, _, v, _ in decisions)
        seen["victim"] += sum(v >= 0 for _, _, v, _ in decisions)
        (ca, ta, oa, sa), (cb, tb, ob, sb) = twins
        oa._queue_planned(decisions)
        q = tb.native_queue("q4", ob._queued)
        q.queue(decisions)
        for name in ("slot_of", "expert_at", "precision_at", "pending", "prefetched", "gen", "_free", "evictions"):
            assert getattr(ca, name) == getattr(cb, name), name
        assert [ca.resident(j) for j in range(cfg.n_layers)] == [cb.resident(j) for j in range(cfg.n_layers)]
        assert ta._tickets == tb._tickets and oa._queued == ob._queued
        assert sa.to_dict() == sb.to_dict()
        for (j, e, _, _) in decisions:  # every copy lands in its slot, byte for byte, settled by the wait
            for c, t in ((ca, ta), (cb, tb)):
                s = c.slot_of[j][e]
                t.wait(j, s)
                assert not c.pending[j][s] and torch.equal(t.slot(j, s, n), m.store.blob(j, e, "q4"))
        assert sa.bytes_by_precision == sb.bytes_by_precision == ({"q4": n * len(decisions)} if decisions else {})
        ta.close()
        tb.close()
    assert min(seen.values()) > 20, seen
    m.close()


def _twin_offloaders(m, n_slots: int, policy: str, seconds_per_copy: float | None):
    """Two identical Offloaders (plain caching) over their own caches and native copiers: the native decode
    step in the first, the Python reference (``_classify``) in the second."""
    from fate.runtime.experts.link import LinkSpec, Throttle
    from fate.runtime.experts.offload import Offloader
    from fate.runtime.experts.residency import ExpertCache
    from fate.runtime.experts.stats import ExpertStats
    from fate.runtime.experts.transfer import TransferEngine

    cfg, n = m.config, m.store.blob_bytes("q4")
    twins = []
    for native in (True, False):
        stats = ExpertStats(cfg.n_layers)
        cache = ExpertCache([n_slots] * cfg.n_layers, cfg.n_experts, policy=policy, on_evict=stats.evicted)
        throttle = None
        if seconds_per_copy is not None:
            throttle = Throttle(LinkSpec("bandwidth", bytes_per_s=n / seconds_per_copy, label="test", emulated=True))
        t = TransferEngine(m.store, cache, n, torch.device("cpu"), throttle, stats=stats, copy_seconds={"q4": 1e-6})
        off = Offloader(cfg, cache, t, stats, predictor=None, layer_seconds=1e-3)
        if not native:
            off._step = None
        twins.append((off, cache, t, stats))
    return twins


def _same_state(a, b, n_layers):
    (oa, ca, ta, sa), (ob, cb, tb, sb) = a, b
    for name in ("slot_of", "expert_at", "precision_at", "pending", "prefetched", "gen", "_free", "evictions"):
        assert getattr(ca, name) == getattr(cb, name), name
    assert [ca.resident(j) for j in range(n_layers)] == [cb.resident(j) for j in range(n_layers)]
    assert oa._queued == ob._queued and ta._tickets == tb._tickets  # the same copies queued, in the same order
    da, db = sa.to_dict(), sb.to_dict()
    for d in (da, db):
        for row in [d["total"], d["prefill"], d["decode"], *d["layers"]]:
            row.pop("stall_seconds"), row.pop("host_seconds")
    assert da == db


@pytest.mark.parametrize("link", [None, 0.004])
def test_native_decode_step_equals_its_reference(converted, link):
    """The native decode step (:mod:`fate.runtime.experts.native_step`) changes the cache exactly as the Python
    step (``Offloader._classify``) does: twin offloaders serve the same random one-token steps (hits, misses
    evicting by ARC or LRFU, slots short of the experts a step needs, prefetches settled on landing), and after
    every step their caches, eviction orders, queued lists and counts are the same, and each computed expert
    read its own bytes from the slot — with inline copies (no link) and with the copy thread's (``link``)."""
    import random

    from fate.runtime.experts import copier

    if copier.decode_step() is None:
        pytest.skip(f"native extension not built: {copier.why}")
    m = fate.load(converted["mixtral"][1], experts="q4", device="cpu")
    cfg, n = m.config, m.store.blob_bytes("q4")
    rng = random.Random(11)
    native_steps = 0
    for n_slots, policy in ((1, "arc"), (cfg.top_k, "lrfu"), (cfg.n_experts - 1, "lrfu"), (3, "arc")):
        twins = _twin_offloaders(m, n_slots, policy, link)
        for step in range(30):
            layer = rng.choice(cfg.moe_layer_ids)
            ranked = rng.sample(range(cfg.n_experts), cfg.top_k)
            seed = [e for e in rng.sample(range(cfg.n_experts), 2) if e not in ranked] if rng.random() < 0.3 else []
            for off, cache, t, _ in twins:  # prefetches landed before the step
                for e in seed:
                    if cache.slot_of[layer][e] < 0:
                        s = cache.reserve(layer, e, "q4", prefetched=True, pinned=())
                        if s >= 0:
                            t.prefetch(layer, s, 1.5)
                            off._queued[layer].append(s)
                            t.wait(layer, s)
            for off, cache, t, _ in twins:
                seen = []

                def compute(e, s, precision, _t=t, _seen=seen):
                    assert torch.equal(_t.slot(layer, s, n), m.store.blob(layer, e, "q4"))
                    _seen.append((e, s, precision))

                off.run_layer(layer, list(ranked), None, 1, None, compute)
                assert sorted(e for e, _, _ in seen) == sorted(ranked)
            native_steps += twins[0][0]._step is not None
            _same_state(twins[0], twins[1], cfg.n_layers)
        for _, _, t, _ in twins:
            t.close()
    assert native_steps == 120
    m.close()


def test_native_decode_step_promotes_and_cancels_queued_prefetches(converted):
    """Behind a prefetch on the link, a queued prefetch the layer needs is promoted (a demand load now) and one
    it does not need is cancelled and its slot freed; the one on the link is left to land (and has, by the time
    the promoted one behind it has) — as the Python step does, on a twin."""
    from fate.runtime.experts import copier

    if copier.decode_step() is None:
        pytest.skip(f"native extension not built: {copier.why}")
    m = fate.load(converted["mixtral"][1], experts="q4", device="cpu")
    cfg = m.config
    layer = cfg.moe_layer_ids[0]
    twins = _twin_offloaders(m, 6, "lrfu", 0.1)
    a, b, c = 0, 1, 2
    for off, cache, t, stats in twins:  # one after the other: the same copies on each link at the step
        for prio, e in enumerate((a, b, c)):
            s = cache.reserve(layer, e, "q4", prefetched=True)
            t.prefetch(layer, s, 1.0 + prio)
            off._queued[layer].append(s)
        time.sleep(0.03)  # a is on the link now; b and c are queued
        off.run_layer(layer, [b, 3], None, 1, None, lambda e, s, p: None)
        assert cache.slot_of[layer][c] < 0  # cancelled, its slot free again
        assert cache.slot_of[layer][a] >= 0 and cache.prefetched[layer][cache.slot_of[layer][a]]  # left to land
        d = stats.to_dict()["decode"]
        assert (d["late_prefetches"], d["misses"], d["hits"]) == (1, 1, 0)
    _same_state(twins[0], twins[1], cfg.n_layers)
    for _, _, t, _ in twins:
        t.close()
    m.close()


def test_fused_prediction_and_value_rule_equal_the_two_steps(converted):
    """fate's decode hot path in one native call (``Predictor.value_planner``) names the same experts and
    takes the same decisions as the prediction followed by the value rule's reference, on a real model's
    routers with random gate inputs, cache states and link clocks."""
    import random

    from fate.runtime.experts import copier
    from fate.runtime.experts.offload import value_plan
    from fate.runtime.experts.prefetch import Predictor, rank_chances
    from fate.runtime.experts.residency import ExpertCache

    if copier.value_planner() is None:
        pytest.skip(f"native extension not built: {copier.why}")
    m = fate.load(converted["qwen3_moe"][1], experts="q4", device="cpu")
    cfg = m.config
    routers = {i: m.weights.get(C.T_FFN_GATE_INP.format(i=i)) for i in cfg.moe_layer_ids}
    p = Predictor(cfg, routers, rank_chances(m.bundle, cfg), decode_precision="q4", low_precision=None, int2_share=0.0)
    rng = random.Random(3)
    gen = torch.Generator().manual_seed(3)
    decided = 0
    for _ in range(300):
        n_slots = rng.randint(1, cfg.n_experts)
        cache = ExpertCache([n_slots] * cfg.n_layers, cfg.n_experts)
        for j in range(cfg.n_layers):
            for e in rng.sample(range(cfg.n_experts), rng.randint(0, n_slots)):
                s = cache.reserve(j, e, "q4", prefetched=False)
                if rng.random() < 0.7:
                    cache.landed(j, s, cache.gen[j][s])
        limit = {j: min(n_slots, cfg.top_k + rng.randint(0, 3)) for j in range(cfg.n_layers)}
        layer = rng.randint(-1, cfg.n_layers - 2)
        g = torch.randn(1, cfg.hidden_size, generator=gen)
        plan = (cfg.top_k, 1.0, 1.0 + rng.choice((0.0, 1e-4, 5e-4)), rng.choice((1e-4, 3e-4)),
                rng.choice((5e-5, 2e-4, 6e-4)), 1e-5)
        preds = p.predict(layer, g, limit)
        named = next((q.experts for q in preds if q.ahead == 1), None)
        want = (named, value_plan(layer, *plan, preds, cache))
        k, now, link_free, t_layer, t_copy, host = plan
        planner = p.value_planner(layer, limit, k, t_layer, t_copy, host, cache)
        if planner is None:  # nothing to rank at this layer under this limit: predict names nothing either
            assert want == (None, [])
            continue
        got = planner(g, now, link_free)
        assert planner(g.to(torch.float64), now, link_free) is None  # not float32: the caller predicts itself
        assert (got[0], list(got[1])) == want
        decided += len(want[1])
    assert decided > 50
    m.close()


def test_native_decode_step_predicts_only_at_the_layers_it_is_told(converted):
    """The native decode step predicts at a layer's gate input only where the Offloader's per-layer flags (from
    the bundle's reuse curves, ``Offloader._prediction_layers``) say so: told to predict after the first MoE
    layer only, a fate decode names experts for the second MoE layer and for no other; told to predict from
    the embedding too, it names the first MoE layer's as well, through that gate input's own native planner.
    Where a decode step does not predict, the executor is not even handed the gate input: the model computes
    no predictor input (a norm) and makes no prediction object for that layer."""
    from fate.runtime.experts import copier

    if copier.decode_step() is None:
        pytest.skip(f"native extension not built: {copier.why}")
    ids = None
    for embedding in (False, True):
        m = fate.load(converted["qwen2_moe"][1], policy="fate", mem="50%", link="ratio:1", int2_share=0.0)
        ex = m.offloading.executor
        off, cfg = ex.offloader, m.config
        first, second = cfg.moe_layer_ids[:2]
        assert first == 0
        off._predicts_at = [i == first + 1 or (embedding and i == 0) for i in range(cfg.n_layers + 1)]
        seen = []  # (what, layer, tokens): the predictor inputs the model computed, the predictions made
        inp, made = m.model.predictor_input, ex._predict
        m.model.predictor_input = lambda h: seen.append(("input", -1, h.shape[0])) or inp(h)
        ex._predict = lambda layer, g: seen.append(("predict", layer, g.shape[0])) or made(layer, g)
        ids = ids or m.encode_prompt("The module defines functions")
        m.generate(ids, 6, temperature=0.0, stop_at_eos=False)
        assert type(off._step).__name__ == "DecodeStep"
        named = [row[6] for row in off.stats._c["decode"]]
        told = {second} | ({first} if embedding else set())
        assert all(named[i] > 0 for i in told) and sum(named[i] for i in told) == sum(named), named
        assert (off._planners.get(-1) is not None) == embedding
        decode = [(what, layer) for what, layer, T in seen if T == 1]
        want = [("predict", first)] + ([("input", -1), ("predict", -1)] if embedding else [])
        assert sorted(set(decode)) == sorted(want) and len(decode) == 5 * len(want), decode
        prefill = {(what, layer) for what, layer, T in seen if T > 1}  # prefill predicts everywhere
        assert ("input", -1) in prefill and ("predict", cfg.moe_layer_ids[-1]) not in prefill, prefill
        m.close()


def test_a_prefill_predicts_only_where_the_next_layers_loads_could_limit_it(converted):
    """fate's prefill predicts the next layer only where its loads could outlast half its compute
    (``Offloader._prefill_pays``): with the profile's one-expert product made long (compute that hides any
    copy) the prefill names no expert and queues no prefetch, with it made nil it names them at every layer
    that loads anything; the tokens are resident's either way."""
    path = converted["olmoe"][1]
    want, _ = _tokens(path, n=4, policy="resident")
    named = {}
    for name, expert_s in (("long", 1.0), ("nil", 0.0)):
        m = fate.load(path, experts="q4", mem="50%", link="ratio:1", int2_share=0.0)
        m.offloading.executor.offloader.expert_seconds = expert_s
        out = m.generate(PROMPT, 4, temperature=0.0, stop_at_eos=False)
        assert out.token_ids == want
        named[name] = m.last_stats.experts["prefill"]["named"]
        m.close()
    assert named["long"] == 0 and named["nil"] > 0
