"""fate.convert.calibrate on tiny checkpoints, against an independent count.

The reference runs fate's model straight from the checkpoint (tests.tiny_models.load_fate_model, checked
against transformers in test_model.py) one calibration sequence at a time, records every gate input with
an observer, and counts by hand, token by token with Python sets: which experts each router picks
(popularity), and how many of them the fitted prediction names among its top k+m on the previous gate input
(recall); the fitted maps and their held-out scores come from an independent least-squares oracle
(tests.tiny_models.oracle_prediction_fit)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from fate.convert.calibrate import RIDGES, FitSource, calibrate, fit_map, folds_of
from fate.formats import constants as C
from fate.formats.hf import HFCheckpoint
from fate.model import arch as A
from tests.tiny_models import load_fate_model, make_checkpoint, oracle_prediction_fit, read_checkpoint_tensors

SEQ_LEN = 40
N_TOKENS = 100  # sequences of 40, 40 and 20 tokens

CASES = {  # name -> (arch, overrides): each with a dense layer among the MoE ones
    "deepseek": ("deepseek", {}),  # layer 0 dense (first_k_dense_replace)
    "qwen2_moe-dense-middle": ("qwen2_moe", {"mlp_only_layers": [1]}),
}


class _Recorder:
    def __init__(self):
        self.g: dict[int, torch.Tensor] = {}

    def on_gate_input(self, layer, g):
        self.g[layer] = g.clone()


class _Count:
    def __init__(self):
        self.n = 0

    def update(self, k):
        self.n += k


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    arch, overrides = CASES[request.param]
    d = tmp_path_factory.mktemp(request.param)
    make_checkpoint(arch, d, n_layers=3, **overrides)
    hf = json.loads((d / "config.json").read_text())
    spec, cfg = A.spec_for(hf), A.model_config(hf)
    raw = read_checkpoint_tensors(d)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, cfg.vocab_size, (N_TOKENS,), generator=g).tolist()
    count = _Count()
    stats = calibrate(HFCheckpoint(d), spec, cfg, ids, SEQ_LEN,
                      lambda layer, e: tuple(raw[n].float() for n in A.expert_tensor_names(spec, layer, e)),
                      progress=count)
    # the reference: gate inputs of every layer (and layer 0's predictor input, "-1"), sequence by sequence
    rec = _Recorder()
    model, _ = load_fate_model(d, observer=rec)
    gates: dict[int, list[torch.Tensor]] = {}
    with torch.inference_mode():
        for s in range(0, N_TOKENS, SEQ_LEN):
            model.forward(torch.tensor(ids[s:s + SEQ_LEN]), None)
            for layer, x in rec.g.items():
                gates.setdefault(layer, []).append(x)
    gates = {layer: torch.cat(xs) for layer, xs in gates.items()}
    routers = {i: raw[A.non_expert_tensors(spec, cfg)[C.T_FFN_GATE_INP.format(i=i)][0]].float()
               for i in cfg.moe_layer_ids}
    return cfg, ids, stats, count, gates, routers


def _fits(case):
    """The oracle's prediction fits: (a, i) -> (map, held-out scores), from the gate input a layers back."""
    cfg, ids, _, _, gates, routers = case
    fold = folds_of([len(ids[s:s + SEQ_LEN]) for s in range(0, len(ids), SEQ_LEN)])
    out = {}
    for a in (1, 2):
        for i in cfg.moe_layer_ids:
            if i - a >= -1:
                topk = torch.tensor([sorted(c) for c in _topk_sets(gates[i], routers[i], cfg.top_k)])
                out[(a, i)] = oracle_prediction_fit(gates[i - a], gates[i] @ routers[i].T, routers[i], topk, fold,
                                                    RIDGES)
    return out


def test_one_progress_step_per_layer_and_the_shapes(case):
    cfg, ids, stats, count, _, _ = case
    L, E = cfg.n_layers, cfg.n_experts
    assert count.n == L and stats.tokens == len(ids) == N_TOKENS
    assert stats.popularity.shape == (L, E) and stats.popularity.dtype == torch.int64
    assert stats.cosine.shape == (L,) and stats.recall.shape == (L, len(C.RECALL_EXTRA))
    assert C.RECALL_EXTRA == (0, 1, 2, 4)


def _topk_sets(g: torch.Tensor, router: torch.Tensor, n: int) -> list[set[int]]:
    probs = torch.softmax(g @ router.T, dim=-1)
    return [set(row) for row in probs.topk(n, dim=-1).indices.tolist()]


def test_popularity_is_an_independent_count_of_the_routers_top_k(case):
    cfg, ids, stats, _, gates, routers = case
    for i in range(cfg.n_layers):
        if not cfg.moe_layers[i]:
            assert stats.popularity[i].sum() == 0
            continue
        want = [0] * cfg.n_experts
        for chosen in _topk_sets(gates[i], routers[i], cfg.top_k):
            for e in chosen:
                want[e] += 1
        assert stats.popularity[i].tolist() == want, i
        assert sum(want) == len(ids) * cfg.top_k


def test_recall_is_a_hand_count_of_top_k_within_the_previous_inputs_top_k_plus_m(case):
    cfg, ids, stats, _, gates, routers = case
    k = cfg.top_k
    fits = _fits(case)
    for i in cfg.moe_layer_ids:
        chosen = _topk_sets(gates[i], routers[i], k)
        prev = gates[i - 1]  # layer 0: the embedding through its post-attention norm (gates[-1])
        scores = fits[(1, i)][1]  # each token's scores under the map fitted on the other fold
        for j, m in enumerate(C.RECALL_EXTRA):
            named = [set(r) for r in scores.topk(min(k + m, cfg.n_experts), dim=-1).indices.tolist()]
            hits = sum(len(c & n) for c, n in zip(chosen, named))
            assert stats.recall[i, j].item() == pytest.approx(hits / (k * len(ids)), abs=1e-6), (i, m)
        cos = F.cosine_similarity(prev.double(), gates[i].double(), dim=-1).mean().item()
        assert stats.cosine[i].item() == pytest.approx(cos, abs=1e-5), i


def test_the_prediction_maps_are_the_cross_validated_fit_to_the_router_logits(case):
    cfg, _, stats, _, gates, routers = case
    L, E = cfg.n_layers, cfg.n_experts
    H = gates[0].shape[1]
    assert stats.predict.shape == (2, L, E, H)
    fits = _fits(case)
    for a in (1, 2):
        for i in range(L):
            if (a, i) not in fits:
                assert torch.isnan(stats.predict[a - 1, i]).all(), (a, i)
                continue
            want = fits[(a, i)][0]
            got = stats.predict[a - 1, i].double()
            assert torch.allclose(got, want, rtol=0, atol=2e-3 * want.abs().max().item()), (a, i)


def test_the_held_out_prediction_names_at_least_what_the_next_router_does(case):
    """The router is one of the candidates, so the chosen fit names at least as many of the other fold's
    needed experts among the top k as the router (on 100 calibration tokens the router wins here)."""
    cfg, ids, stats, _, gates, routers = case
    k = cfg.top_k
    fits = _fits(case)
    fitted = router = 0
    for i in cfg.moe_layer_ids:
        chosen = _topk_sets(gates[i], routers[i], k)
        named = [set(r) for r in fits[(1, i)][1].topk(k, dim=-1).indices.tolist()]
        fitted += sum(len(c & n) for c, n in zip(chosen, named))
        router += sum(len(c & n) for c, n in zip(chosen, _topk_sets(gates[i - 1], routers[i], k)))
    assert fitted >= router


def test_fit_map_learns_a_true_map_given_tokens_and_keeps_the_router_where_nothing_beats_it():
    """Logits that are a linear map of the input, unlike the router: with 4000 tokens for 16 dimensions the
    fit is chosen and recovers the map.  Six tokens routed by the router itself: no candidate names more of
    the other fold's experts, and a tie keeps the router, exactly."""
    g = torch.Generator().manual_seed(3)
    H, E, k = 16, 8, 2
    true, router = torch.randn(E, H, generator=g), torch.randn(E, H, generator=g)
    x = torch.randn(4000, H, generator=g)
    y = x @ true.T
    topk = y.topk(k, dim=-1).indices
    p, scores = fit_map(FitSource(x, folds_of([2000, 2000])), y, router, topk)
    torch.testing.assert_close(p, true, rtol=0, atol=2e-2)
    assert (scores.topk(k, dim=-1).indices.sort(-1).values == topk.sort(-1).values).float().mean() > 0.99
    few = x[:6]
    p, scores = fit_map(FitSource(few, folds_of([6])), few @ router.T, router, (few @ router.T).topk(k, -1).indices)
    assert torch.equal(p, router.half().float()) and torch.equal(scores, few @ router.T)


def test_recall_grows_with_m_and_cosine_is_a_cosine(case):
    cfg, _, stats, _, _, _ = case
    for i in cfg.moe_layer_ids:
        r = stats.recall[i]
        assert torch.isfinite(r).all() and (r >= 0).all() and (r <= 1).all()
        assert (r[1:] >= r[:-1]).all(), r  # more candidates never name fewer of the chosen experts
        assert -1 <= stats.cosine[i].item() <= 1
    assert any(stats.recall[i, -1] > stats.recall[i, 0] for i in cfg.moe_layer_ids)  # and m matters here


def test_dense_layers_have_nan_rows(case):
    cfg, _, stats, _, _, _ = case
    dense = [i for i in range(cfg.n_layers) if not cfg.moe_layers[i]]
    assert dense  # every case has one
    for i in dense:
        assert torch.isnan(stats.recall[i]).all() and torch.isnan(stats.cosine[i])
    for i in cfg.moe_layer_ids:
        assert not torch.isnan(stats.recall[i]).any() and not torch.isnan(stats.cosine[i])
