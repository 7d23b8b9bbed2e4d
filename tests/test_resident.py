"""ResidentExperts and ResidentWeights give bit for bit what DenseExperts over ExpertStore.dense and the
engine's BundleWeights give, on every architecture and stored precision; the dense cache keeps to its
byte bound."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fate
from fate.formats import constants as C
from fate.errors import BundleError
from fate.runtime.weights import BundleWeights
from fate.model.experts import DenseExperts
from fate.runtime.experts.resident import DEFAULT_CHUNK_BYTES, ResidentExperts
from fate.runtime.weights import ResidentWeights
from tests.tiny_models import ARCHS, VOCAB

PRECISIONS = ("f16", "q4", "q2")
TINY_CHUNK = 4096  # bytes: forces row blocks of 16 rows on the tiny models


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def _plain(m, precision):
    """The reference: DenseExperts over ExpertStore.dense and BundleWeights, as the engine had them."""
    experts = DenseExperts(lambda layer, e: m.store.dense(layer, e, precision, dtype=m.dtype, device=m.device),
                           m.config.act)
    return experts, BundleWeights(m.bundle, m.dtype, m.device)


def _run(m, experts, weights) -> list[torch.Tensor]:
    """Logits of a 9-token prefill, 3 one-token steps and a 3-token continuation."""
    m.model.experts, m.model.weights = experts, weights
    kv = m.model.new_cache(32)
    ids = _ids(16, 3)
    out = [m.model.forward(ids[:9], kv)]
    for i in range(9, 12):
        out.append(m.model.forward(ids[i:i + 1], kv))
    out.append(m.model.forward(ids[12:15], kv))
    return out


def _assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for step, (x, y) in enumerate(zip(a, b)):
        assert x.shape == y.shape
        assert torch.equal(x, y), f"step {step}: max |diff| {(x - y).abs().max().item()}"


@pytest.fixture(scope="module")
def models(converted):
    """(arch, precision, compute dtype) -> FateModel, loaded once."""
    out = {}
    yield lambda arch, p, cd="fp32": out.setdefault(
        (arch, p, cd), fate.load(converted[arch][1], experts=p, compute_dtype=cd, device="cpu"))
    for m in out.values():
        m.close()


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_equal_dense_experts(arch, precision, models):
    m = models(arch, precision)
    experts, weights = _plain(m, precision)
    ref = _run(m, experts, weights)
    for cache in (None, 0):
        res = ResidentExperts(m.store, precision, m.dtype, m.device, cache)
        _assert_same(ref, _run(m, res, weights))
    for chunk in (DEFAULT_CHUNK_BYTES, TINY_CHUNK):  # read in place from the map (fate.load's CPU default)
        res = ResidentExperts(m.store, precision, m.dtype, m.device, 0, chunk_bytes=chunk, mapped=True)
        assert res.resident_bytes == 0
        _assert_same(ref, _run(m, res, weights))
    res = ResidentExperts(m.store, precision, m.dtype, m.device, 0, chunk_bytes=TINY_CHUNK)
    assert res._gu_blocks is not None and len(res._gu_blocks) > 1  # the row-block path ran
    rw = ResidentWeights.from_bundle(m.bundle, m.dtype, m.device, chunk_bytes=TINY_CHUNK)
    assert rw.narrow_names  # the bundle stores f16 projections: they stay f16
    _assert_same(ref, _run(m, res, rw))
    _assert_same(ref, _run(m, res, ResidentWeights.from_bundle(m.bundle, m.dtype, m.device)))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral", "gpt_oss", "deepseek_v3"])
def test_logits_equal_dense_experts_bf16(arch, precision, models):
    m = models(arch, precision, "bf16")
    experts, weights = _plain(m, precision)
    ref = _run(m, experts, weights)
    for cache in (None, 0):
        res = ResidentExperts(m.store, precision, m.dtype, m.device, cache, chunk_bytes=TINY_CHUNK)
        rw = ResidentWeights.from_bundle(m.bundle, m.dtype, m.device)
        assert not rw.narrow_names  # only float32 CPU compute keeps narrow matrices
        _assert_same(ref, _run(m, res, rw))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_moe_matches_on_random_routing(precision, models):
    """The executor alone, on routings the router would not produce (repeated and unused experts)."""
    m = models("olmoe", precision)
    cfg = m.config
    experts, _ = _plain(m, precision)
    g = torch.Generator().manual_seed(7)
    for T in (1, 2, 11):
        x = torch.randn(T, cfg.hidden_size, generator=g)
        ids = torch.stack([torch.randperm(cfg.n_experts, generator=g)[:cfg.top_k] for _ in range(T)])
        ids[:, 0] = 3  # every token on one expert
        w = torch.rand(T, cfg.top_k, generator=g)
        for cache, chunk, min_tokens, mapped in (
                (None, 1 << 30, 2, False), (0, 1 << 30, 2, False), (0, TINY_CHUNK, 2, False),
                (None, 1 << 30, 1, False), (2 * 3 * 64 * 64 * 4, TINY_CHUNK, 1, False),
                (0, 1 << 30, 2, True), (0, TINY_CHUNK, 2, True), (64 * 64 * 4, 1 << 30, 1, True)):
            res = ResidentExperts(m.store, precision, m.dtype, m.device, cache, chunk_bytes=chunk, mapped=mapped)
            res.dense_min_tokens = min_tokens  # 1: what other devices do (dense copies for one token too)
            for layer in cfg.moe_layer_ids:
                assert torch.equal(res.moe(layer, x, ids, w), experts.moe(layer, x, ids, w))


def test_row_blocks_cover_every_row():
    from fate.quant.expert import row_blocks as _row_blocks

    for rows, cols, budget in ((128, 64, 4096), (1000, 512, 1 << 20), (7, 64, 1), (2048, 2048, 1 << 20)):
        blocks = _row_blocks(rows, cols, budget)
        assert blocks[0][0] == 0 and blocks[-1][1] == rows
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
        assert all(r1 - r0 == min(rows, 16) or (r1 - r0) * cols * 4 <= budget or (r1 - r0) % 16 == 0
                   for r0, r1 in blocks[:-1])
    assert _row_blocks(4096, 512, 1 << 20) == [(r, r + 512) for r in range(0, 4096, 512)]


def test_get_expert_is_the_stores_dense(models):
    m = models("qwen3_moe", "q4")
    for mapped in (False, True):
        res = ResidentExperts(m.store, "q4", m.dtype, m.device, 0, mapped=mapped)
        layer = m.config.moe_layer_ids[-1]
        for e in (0, m.config.n_experts - 1):
            for a, b in zip(res.get_expert(layer, e), m.store.dense(layer, e, "q4")):
                assert torch.equal(a, b)


@pytest.mark.parametrize("precision", ["f16", "q4"])
def test_dense_cache_respects_its_bound(precision, models):
    m = models("deepseek", precision)  # has a leading dense layer: fewer MoE layers than layers
    cfg = m.config
    total = len(cfg.moe_layer_ids) * cfg.n_experts
    unit = ResidentExperts(m.store, precision, m.dtype, m.device, 0).dense_entry_bytes
    assert unit == 3 * cfg.hidden_size * cfg.expert_ffn * 4
    for bound, want in ((0, 0), (unit - 1, 0), (unit, 1), (5 * unit // 2, 2), (10 ** 12, total), (None, total)):
        res = ResidentExperts(m.store, precision, m.dtype, m.device, bound)
        assert res.dense_entries == want
        assert res.dense_bytes == want * unit
        if bound is not None:
            assert res.dense_bytes <= bound
        held = sum(w.numel() * w.element_size() for pair in res._dense.values() for w in pair)
        assert held == res.dense_bytes
    # the first expert cached is the most popular one of the calibration
    pop = m.bundle.tensor(C.T_CALIB_POPULARITY)
    res = ResidentExperts(m.store, precision, m.dtype, m.device, unit)
    (layer, e), = res._dense
    assert int(pop[layer, e]) == max(int(pop[i].max()) for i in cfg.moe_layer_ids)


def test_resident_bytes_follow_the_precision(models):
    m = models("mixtral", "f16")
    cfg = m.config
    n = 3 * cfg.hidden_size * cfg.expert_ffn * len(cfg.moe_layer_ids) * cfg.n_experts
    assert ResidentExperts(m.store, "f16", m.dtype, m.device, 0).resident_bytes == 2 * n
    groups = n // m.store.specs["q4"].group_size
    assert ResidentExperts(m.store, "q4", m.dtype, m.device, 0).resident_bytes == n + 8 * groups


def test_rejects_bad_arguments(models):
    m = models("qwen2_moe", "f16")
    with pytest.raises(ValueError):
        ResidentExperts(m.store, "f16", m.dtype, m.device, -1)
    with pytest.raises(BundleError):
        ResidentExperts(m.store, "q3", m.dtype, m.device, 0)


def test_resident_weights_get_and_linear(models):
    m = models("qwen2_moe", "f16")
    bw = BundleWeights(m.bundle, m.dtype, m.device)
    rw = ResidentWeights.from_bundle(m.bundle, m.dtype, m.device, chunk_bytes=TINY_CHUNK)
    assert set(rw.narrow_names) | set(rw.tensors) == set(bw.tensors)
    assert C.T_TOKEN_EMBD not in rw.narrow_names and C.T_ATTN_Q_BIAS.format(i=0) not in rw.narrow_names
    assert C.T_ATTN_Q.format(i=0) in rw.narrow_names and C.T_OUTPUT in rw.narrow_names
    x1 = torch.randn(1, m.config.hidden_size)
    x5 = torch.randn(5, m.config.hidden_size)
    for name in bw.tensors:
        assert torch.equal(rw.get(name), bw.get(name))
        if bw.get(name).dim() == 2 and bw.get(name).shape[1] == m.config.hidden_size:
            bias = C.T_ATTN_Q_BIAS.format(i=0) if name == C.T_ATTN_Q.format(i=0) else None
            for x in (x1, x5):
                want = F.linear(x, bw.get(name), None if bias is None else bw.get(bias))
                assert torch.equal(rw.linear(x, name, bias), want), name
    assert rw.get("no.such.tensor") is None
    with pytest.raises(KeyError):
        rw.linear(x1, "no.such.tensor")


def test_generation_unchanged_through_the_engine(converted):
    """Greedy tokens of fate.load(...) with the resident executor and weights installed."""
    m = fate.load(converted["qwen3_moe"][1], experts="q4")
    try:
        ids = _ids(12, 5).tolist()
        experts, weights = _plain(m, "q4")
        m.model.experts, m.model.weights = experts, weights
        ref = list(m.generate_ids(ids, 16, m.sampling_params(temperature=0.0), stop_at_eos=False))
        m.model.experts = ResidentExperts(m.store, "q4", m.dtype, m.device, 0)
        m.model.weights = ResidentWeights.from_bundle(m.bundle, m.dtype, m.device)
        ours = list(m.generate_ids(ids, 16, m.sampling_params(temperature=0.0), stop_at_eos=False))
        assert ours == ref
    finally:
        m.close()
