"""fate's model against transformers' own forward, on tiny random checkpoints of every architecture."""

from __future__ import annotations

import json

import pytest
import torch

from fate.model import arch as A
from fate.formats import constants as C
from fate.errors import ContextFullError
from fate.model.kv import KVCache
from fate.model.experts import DenseExperts
from fate.model.transformer import DictWeights, MoEModel
from tests import tiny_models as TM

ATOL = 1e-4
GEN_TOKENS = 32


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    # skip the special tokens (0-2) so prompts look like text
    return torch.randint(3, TM.VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


class Recorder:
    def __init__(self):
        self.gate_inputs: dict[int, torch.Tensor] = {}

    def on_gate_input(self, layer: int, g: torch.Tensor) -> None:
        self.gate_inputs[layer] = g.clone()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for arch in TM.ARCHS:
        d = root / arch
        TM.make_checkpoint(arch, d, seed=TM.ARCHS.index(arch), shards=2 if arch == "olmoe" else 1)
        out[arch] = d
    return out


@pytest.fixture(scope="module")
def oracles(ckpts):
    return {arch: TM.load_oracle(arch, d) for arch, d in ckpts.items()}


@pytest.mark.parametrize("arch", TM.ARCHS)
def test_prefill_logits_match_transformers(arch, ckpts, oracles):
    model, _ = TM.load_fate_model(ckpts[arch])
    ids = _ids(24)
    ours = model.forward(ids)
    with torch.no_grad():
        ref = oracles[arch](ids[None]).logits[0].float()
    assert ours.dtype == torch.float32 and ours.shape == (24, TM.VOCAB)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    last = model.forward(ids, last_only=True)
    assert last.shape == (1, TM.VOCAB)
    torch.testing.assert_close(last, ours[-1:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", TM.ARCHS)
def test_greedy_generation_matches_transformers(arch, ckpts, oracles):
    model, cfg = TM.load_fate_model(ckpts[arch])
    prompt = _ids(8, seed=2)
    oracle = oracles[arch]
    oracle.generation_config.eos_token_id = None  # generate all 32 tokens on both sides
    with torch.no_grad():
        ref = oracle.generate(prompt[None], attention_mask=torch.ones(1, 8, dtype=torch.long),
                              max_new_tokens=GEN_TOKENS, do_sample=False, pad_token_id=0)[0, 8:].tolist()
    kv = KVCache.for_model(cfg, 64)
    logits = model.forward(prompt, kv, last_only=True)
    ours = []
    for _ in range(GEN_TOKENS):
        tok = int(logits[0].argmax())
        ours.append(tok)
        logits = model.forward(torch.tensor([tok]), kv, last_only=True)
    assert kv.length == 8 + GEN_TOKENS
    assert ours == ref


@pytest.mark.parametrize("arch", TM.ARCHS)
def test_kv_cache_decode_equals_full_recompute(arch, ckpts):
    model, cfg = TM.load_fate_model(ckpts[arch])
    ids = _ids(20, seed=3)
    full = model.forward(ids)
    kv = KVCache.for_model(cfg, 32)
    chunks = [model.forward(ids[:7], kv), model.forward(ids[7:12], kv)]  # second chunk: masked path
    chunks += [model.forward(ids[i:i + 1], kv) for i in range(12, 20)]
    torch.testing.assert_close(torch.cat(chunks), full, atol=ATOL, rtol=0)
    assert kv.length == 20
    # roll back and continue differently: the cache forgets what was truncated; a sliding-window layer
    # (gpt-oss) only holds its window, so it can roll back only that far, and says so otherwise
    back = 12
    if any(cfg.layer_windows):
        with pytest.raises(ValueError, match="sliding window"):
            kv.truncate(12)
        assert kv.length == 20
        back = 19  # the window's rows hold positions 12..19: enough to redo the last token
    kv.truncate(back)
    again = model.forward(ids[back:], kv)
    torch.testing.assert_close(again, full[back:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", TM.ARCHS)
def test_observer_sees_every_gate_input(arch, ckpts, oracles):
    rec = Recorder()
    model, cfg = TM.load_fate_model(ckpts[arch], observer=rec)
    oracle = oracles[arch]
    captured: dict[int, torch.Tensor] = {}
    hooks = [layer.post_attention_layernorm.register_forward_hook(
        lambda mod, args, out, i=i: captured.__setitem__(i, out[0].detach().clone()))
        for i, layer in enumerate(oracle.model.layers)]
    emb = []
    hooks.append(oracle.model.embed_tokens.register_forward_hook(lambda mod, args, out: emb.append(out[0].detach())))
    try:
        ids = _ids(16, seed=4)
        model.forward(ids)
        with torch.no_grad():
            oracle(ids[None])
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():  # before layer 0: the embedding through layer 0's post-attention norm (its predictor)
        captured[-1] = oracle.model.layers[0].post_attention_layernorm(emb[0])
    assert sorted(rec.gate_inputs) == list(range(-1, cfg.n_layers)) == sorted(captured)
    for i in range(-1, cfg.n_layers):
        torch.testing.assert_close(rec.gate_inputs[i], captured[i], atol=1e-5, rtol=0)


class Choosy(Recorder):
    """A recorder that wants the embedding's gate input in decode only, and layer 1's in prefill only."""

    def __init__(self):
        super().__init__()
        self.asked: list[tuple[int, int]] = []
        self.seen: list[tuple[int, int]] = []

    def observes(self, layer: int, tokens: int) -> bool:
        self.asked.append((layer, tokens))
        return layer == -1 if tokens == 1 else layer == 1

    def on_gate_input(self, layer: int, g: torch.Tensor) -> None:
        self.seen.append((layer, g.shape[0]))


def test_observer_is_shown_only_the_gate_inputs_it_observes(ckpts):
    """An observer's ``observes(layer, tokens)`` decides which gate inputs it is shown; the predictor input is
    computed only where the embedding's is wanted (no norm for nothing), and the logits do not change."""
    arch = TM.ARCHS[0]
    rec = Choosy()
    model, cfg = TM.load_fate_model(ckpts[arch], observer=rec)
    plain, _ = TM.load_fate_model(ckpts[arch])
    inputs = []
    made = model.predictor_input
    model.predictor_input = lambda h: inputs.append(h.shape[0]) or made(h)
    ids = _ids(8, seed=6)
    kv = model.new_cache(16)
    first = model.forward(ids, kv)
    nxt = model.forward(ids[:1], kv)
    kv2 = plain.new_cache(16)
    torch.testing.assert_close(first, plain.forward(ids, kv2), atol=0, rtol=0)
    torch.testing.assert_close(nxt, plain.forward(ids[:1], kv2), atol=0, rtol=0)
    assert rec.asked == [(i, 8) for i in range(-1, cfg.n_layers)] + [(i, 1) for i in range(-1, cfg.n_layers)]
    assert rec.seen == [(1, 8), (-1, 1)] and inputs == [1]


@pytest.mark.parametrize("arch", TM.ARCHS)
def test_bfloat16_rounds_like_transformers(arch, tmp_path):
    """In bfloat16 every cast and reduction happens where transformers does it: prefill logits and every
    greedy decode step's logits are bit-for-bit transformers' (same CPU kernels on both sides)."""
    TM.make_checkpoint(arch, tmp_path, seed=5, n_layers=2, dtype=torch.bfloat16)
    model, _ = TM.load_fate_model(tmp_path, dtype=torch.bfloat16)
    oracle = TM.load_oracle(arch, tmp_path, dtype=torch.bfloat16)
    oracle.generation_config.eos_token_id = None
    ids = _ids(24, seed=6)
    ours = model.forward(ids)
    with torch.no_grad():
        ref = oracle(ids[None]).logits[0].float()
        gen = oracle.generate(ids[None], attention_mask=torch.ones(1, 24, dtype=torch.long), max_new_tokens=12,
                              do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(ours, ref), f"prefill: max |diff| {(ours - ref).abs().max().item()}"
    kv = model.new_cache(40)
    logits = model.forward(ids, kv, last_only=True)
    for step, ref_step in enumerate(gen.logits):
        assert torch.equal(logits[0], ref_step[0].float()), f"decode step {step}"
        tok = int(gen.sequences[0, 24 + step])
        assert tok == int(logits[0].argmax())
        logits = model.forward(torch.tensor([tok]), kv, last_only=True)


VARIANTS = [
    ("qwen2_moe", dict(mlp_only_layers=[1], tie_word_embeddings=True, norm_topk_prob=True)),
    ("qwen3_moe", dict(decoder_sparse_step=2, norm_topk_prob=False)),
    ("mixtral", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0})),
    ("olmoe", dict(clip_qkv=0.3, norm_topk_prob=True)),
    ("deepseek", dict(first_k_dense_replace=2, n_shared_experts=1, norm_topk_prob=True,
                      rope_scaling={"type": "linear", "factor": 4.0})),
    ("mixtral", dict(sliding_window=8)),
    ("gpt_oss", dict(sliding_window=4, layer_types=["full_attention", "sliding_attention", "sliding_attention"],
                     rope_parameters={"rope_type": "yarn", "factor": 8.0, "beta_fast": 16.0, "beta_slow": 2.0,
                                      "truncate": True, "original_max_position_embeddings": 64,
                                      "rope_theta": 10000.0})),
    ("deepseek_v2", dict(q_lora_rank=16, topk_method="greedy", n_group=None, topk_group=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    ("deepseek_v3", dict(rope_interleave=False, norm_topk_prob=False, n_group=1, topk_group=1, q_lora_rank=None,
                         # DeepSeek-V3's own: YaRN factor 40 with mscale = mscale_all_dim = 1
                         rope_parameters={"rope_type": "yarn", "factor": 40.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                          "mscale": 1.0, "mscale_all_dim": 1.0,
                                          "original_max_position_embeddings": 64, "rope_theta": 10000.0})),
    ("glm4_moe", dict(use_qk_norm=True, n_group=2, topk_group=1, attention_bias=False, first_k_dense_replace=0)),
    ("ernie4_5_moe", dict(moe_layer_start_index=0, moe_layer_interval=2, tie_word_embeddings=False)),
]


@pytest.mark.parametrize("arch,overrides", VARIANTS, ids=[f"{a}-{i}" for i, (a, _) in enumerate(VARIANTS)])
def test_config_variants(arch, overrides, tmp_path):
    """Flags the default tiny models leave off: dense layers among MoE layers, tied embeddings,
    renormalized top-k, linear RoPE scaling, qkv clipping, Mixtral's sliding window, other window layouts
    and YaRN parameters, a low-rank query, greedy and ungrouped routing, non-interleaved RoPE, q/k norm,
    MoE layers at an interval."""
    TM.make_checkpoint(arch, tmp_path, seed=7, **overrides)
    model, cfg = TM.load_fate_model(tmp_path)
    oracle = TM.load_oracle(arch, tmp_path)
    ids = _ids(40, seed=8)
    with torch.no_grad():
        ref = oracle(ids[None]).logits[0].float()
    torch.testing.assert_close(model.forward(ids), ref, atol=ATOL, rtol=0)
    kv = KVCache.for_model(cfg, 40)
    out = torch.cat([model.forward(ids[:30], kv)] + [model.forward(ids[i:i + 1], kv) for i in range(30, 40)])
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_gpt_oss_window_clamp_and_sinks_bind(tmp_path):
    """The tiny gpt-oss really exercises what makes it gpt-oss (else the oracle checks prove little): the
    sliding window changes the logits from position WINDOW on and nothing before it, the clamp of the
    SwiGLU is reached, the sinks move the attention."""
    import dataclasses

    TM.make_checkpoint("gpt_oss", tmp_path, seed=7)
    model, cfg = TM.load_fate_model(tmp_path)
    assert cfg.layer_windows == [TM.WINDOW, 0, TM.WINDOW] and cfg.attn_sinks and cfg.expert_act == "clamped"
    ids = _ids(24)
    ref = model.forward(ids)
    full = MoEModel(dataclasses.replace(cfg, layer_windows=[]), model.weights, model.experts)
    unwindowed = full.forward(ids)
    # the same attention before WINDOW, up to the float32 rounding of another attention kernel (the masked one)
    torch.testing.assert_close(unwindowed[:TM.WINDOW], ref[:TM.WINDOW], atol=2e-5, rtol=0)
    assert (unwindowed[TM.WINDOW:] - ref[TM.WINDOW:]).abs().amax(-1).min() > 1e-3
    g = model.gate_input(0, model.attention(0, model.embed(ids), torch.arange(24), None))
    gate = g @ model.experts.get_expert(0, 0)[0].T + model.experts.get_expert(0, 0)[3][:TM.EXPERT_FFN]
    assert (gate > TM.SWIGLU_LIMIT).any()
    sinks = model.weights.get("blk.1.attn_sinks.weight")
    model.weights._ready["blk.1.attn_sinks.weight"] = torch.full_like(sinks, -1e4)  # no sink at all
    assert not torch.allclose(model.forward(ids), ref, atol=1e-3)


@pytest.mark.parametrize("arch", ["gpt_oss", "deepseek_v2", "deepseek_v3", "glm4_moe", "ernie4_5_moe"])
def test_selection_scores_rank_what_route_selects(arch, ckpts):
    """selection_scores is the family's selection rule: its top-k are route()'s experts; with expert
    groups the chosen groups' experts rank first, and the group limit changes some choices."""
    model, cfg = TM.load_fate_model(ckpts[arch])
    g = torch.randn(64, TM.HIDDEN, generator=torch.Generator().manual_seed(12))
    layer = cfg.moe_layer_ids[0]
    _, ids, w = model.route(layer, g)
    scores = model.selection_scores(layer, g)
    assert scores.dtype == torch.float32 and scores.shape == (64, cfg.n_experts)
    top = scores.topk(cfg.top_k, dim=-1).indices
    assert torch.equal(top.sort(-1).values, ids.sort(-1).values)
    assert w.shape == ids.shape and torch.isfinite(w).all()
    if cfg.n_group > 1:
        per = cfg.n_experts // cfg.n_group
        groups = (scores.argsort(-1, descending=True)[:, :cfg.topk_group * per] // per)
        assert all(len(set(row.tolist())) == cfg.topk_group for row in groups)  # chosen groups' experts first
        assert all(set((row // per).tolist()) <= set(grp.tolist()) for row, grp in zip(ids, groups))
        import dataclasses
        flat = MoEModel(dataclasses.replace(cfg, n_group=1, topk_group=1), model.weights, model.experts)
        assert not torch.equal(flat.route(layer, g)[1].sort(-1).values, ids.sort(-1).values)


def test_kv_cache_holds_windows_and_latents(ckpts):
    """gpt-oss's sliding layers hold their window, DeepSeek's latent attention caches the latent and the
    rope key; bytes_needed is exactly what the cache allocates."""
    for arch, want in (("gpt_oss", [(2, TM.WINDOW, 16), (2, 64, 16), (2, TM.WINDOW, 16)]),
                       ("deepseek_v3", [(1, 64, 32)] * 3)):
        _, cfg = TM.load_fate_model(ckpts[arch])
        kv = KVCache.for_model(cfg, 64)
        assert [tuple(t.shape) for t in kv.k] == want
        assert kv.nbytes == KVCache.bytes_needed(cfg, 64)
    assert [tuple(t.shape) for t in kv.v] == [(1, 64, 8)] * 3  # the rope key
    # 40 elements a token and layer, where expanded keys and values would take 4 heads x (24 + 16)
    assert KVCache.bytes_needed(cfg, 64) == 3 * 64 * 40 * 4


def test_olmoe_clip_binds(tmp_path):
    """The clip_qkv variant really clips (otherwise the variant test above proves nothing)."""
    TM.make_checkpoint("olmoe", tmp_path, seed=7, clip_qkv=0.3)
    model, cfg = TM.load_fate_model(tmp_path)
    assert cfg.clip_qkv == pytest.approx(0.3)
    h = model.embed(_ids(8))
    from fate.model.transformer import rms_norm
    x = rms_norm(h, model.weights.get("blk.0.attn_norm.weight"), cfg.rms_eps)
    q = rms_norm(torch.nn.functional.linear(x, model.weights.get("blk.0.attn_q.weight")),
                 model.weights.get("blk.0.attn_q_norm.weight"), cfg.rms_eps)
    assert q.abs().max() > 0.3


# --- DeepSeekMoE: the hand-written checkpoint and its Qwen2-MoE oracle -----------------------------

def test_deepseek_checkpoint_layout(ckpts):
    d = ckpts["deepseek"]
    hf = json.loads((d / "config.json").read_text())
    assert hf["model_type"] == "deepseek" and hf["first_k_dense_replace"] == 1
    names = set(TM.read_checkpoint_tensors(d))
    assert "model.layers.0.mlp.gate_proj.weight" in names
    assert not any(n.startswith("model.layers.0.mlp.experts.") or n == "model.layers.0.mlp.gate.weight" for n in names)
    assert "model.layers.1.mlp.gate.weight" in names
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names
    assert "model.layers.1.mlp.shared_experts.gate_proj.weight" in names
    cfg = A.model_config(hf)
    assert cfg.moe_layers == [False, True, True]
    assert cfg.shared_ffn == 2 * TM.EXPERT_FFN and not cfg.shared_gate and cfg.dense_ffn == TM.DENSE_FFN


def _deepseek_moe_by_hand(raw: dict, layer: int, x: torch.Tensor, top_k: int) -> torch.Tensor:
    """DeepSeekMoE's MoE layer from its definition, on the raw tensors: softmax gate over the routed
    experts, top-k without renormalization, weighted sum of expert MLPs, plus the shared experts' MLP."""
    p = f"model.layers.{layer}.mlp."
    silu = torch.nn.functional.silu

    def mlp(t, prefix):
        return (silu(t @ raw[prefix + "gate_proj.weight"].T) * (t @ raw[prefix + "up_proj.weight"].T)) \
            @ raw[prefix + "down_proj.weight"].T

    scores = torch.softmax(x @ raw[p + "gate.weight"].T, dim=-1)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        w, idx = torch.topk(scores[t], top_k)
        for wk, e in zip(w.tolist(), idx.tolist()):
            out[t] += wk * mlp(x[t:t + 1], p + f"experts.{e}.")[0]
    return out + mlp(x, p + "shared_experts.")


def test_deepseek_oracle_reproduces_deepseek_semantics(ckpts, oracles):
    d = ckpts["deepseek"]
    raw = TM.read_checkpoint_tensors(d)
    hf = json.loads((d / "config.json").read_text())
    x = torch.randn(10, TM.HIDDEN, generator=torch.Generator().manual_seed(9))
    expected = _deepseek_moe_by_hand(raw, 1, x, hf["num_experts_per_tok"])
    with torch.no_grad():
        got = oracles["deepseek"].model.layers[1].mlp(x[None])[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    model, _ = TM.load_fate_model(d)
    torch.testing.assert_close(model.ffn(1, x), expected, atol=1e-5, rtol=0)
    # and the leading dense layer is a plain MLP
    dense = model.ffn(0, x)
    silu = torch.nn.functional.silu
    p = "model.layers.0.mlp."
    by_hand = (silu(x @ raw[p + "gate_proj.weight"].T) * (x @ raw[p + "up_proj.weight"].T)) @ raw[p + "down_proj.weight"].T
    torch.testing.assert_close(dense, by_hand, atol=1e-5, rtol=0)


# --- pieces ----------------------------------------------------------------------------------------

def test_route_matches_transformers_router(ckpts, oracles):
    model, cfg = TM.load_fate_model(ckpts["qwen3_moe"])
    g = torch.randn(6, TM.HIDDEN, generator=torch.Generator().manual_seed(10))
    logits, ids, w = model.route(0, g)
    ref_logits, ref_w, ref_ids = oracles["qwen3_moe"].model.layers[0].mlp.gate(g)
    assert logits.dtype == torch.float32 and ids.shape == (6, cfg.top_k)
    torch.testing.assert_close(logits, ref_logits.float())
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w)
    torch.testing.assert_close(w.sum(-1), torch.ones(6))  # qwen3: renormalized


def test_dense_experts_runs_only_chosen_experts():
    H, Fd, E = 8, 4, 5
    gen = torch.Generator().manual_seed(11)
    weights = {e: (torch.randn(Fd, H, generator=gen), torch.randn(Fd, H, generator=gen),
                   torch.randn(H, Fd, generator=gen)) for e in range(E)}
    calls = []

    def get(layer, e):
        calls.append(e)
        return weights[e]

    ex = DenseExperts(get)
    x = torch.randn(3, H, generator=gen)
    ids = torch.tensor([[4, 1], [1, 0], [4, 0]])
    w = torch.rand(3, 2, generator=gen)
    out = ex.moe(0, x, ids, w)
    assert sorted(calls) == [0, 1, 4]
    silu = torch.nn.functional.silu
    ref = torch.stack([sum(w[t, j] * (weights[int(e)][2] @ (silu(weights[int(e)][0] @ x[t]) * (weights[int(e)][1] @ x[t])))
                           for j, e in enumerate(ids[t])) for t in range(3)])
    torch.testing.assert_close(out, ref)
    calls.clear()
    torch.testing.assert_close(ex.moe(0, x[:1], ids[:1], w[:1]), ref[:1])  # decode path
    assert sorted(calls) == [1, 4]


def test_kv_cache_full_is_a_clear_error(ckpts):
    model, cfg = TM.load_fate_model(ckpts["mixtral"])
    kv = KVCache.for_model(cfg, 10)
    assert kv.nbytes == KVCache.bytes_needed(cfg, 10)
    with pytest.raises(ValueError, match="new_cache"):
        model.forward(_ids(2), KVCache.for_model(cfg, 10, dtype=torch.bfloat16))
    model.forward(_ids(8), kv)
    with pytest.raises(ContextFullError, match="KV cache full"):
        model.forward(_ids(3), kv)
    assert kv.length == 8  # refused before any layer ran
    model.forward(_ids(2), kv)
    assert kv.length == 10 and kv.free == 0
    kv.reset()
    assert kv.length == 0
    torch.testing.assert_close(model.forward(_ids(8), kv), model.forward(_ids(8)), atol=ATOL, rtol=0)


def test_model_holds_no_weights(ckpts):
    """Every weight comes from the source on use: swapping the source's tensors changes the output."""
    model, cfg = TM.load_fate_model(ckpts["olmoe"])
    ids = _ids(5)
    before = model.forward(ids)
    src: DictWeights = model.weights
    src._ready[C.T_OUTPUT_NORM] = src.get(C.T_OUTPUT_NORM) * 2
    assert not torch.allclose(model.forward(ids), before)


def test_missing_weight_names_the_tensor(ckpts):
    _, cfg = TM.load_fate_model(ckpts["mixtral"])
    model = MoEModel(cfg, DictWeights({}), DenseExperts(lambda l, e: None))
    with pytest.raises(KeyError, match="token_embd.weight"):
        model.forward(_ids(2))


def test_rope_tables_grow_past_max_ctx(ckpts, oracles):
    model, cfg = TM.load_fate_model(ckpts["qwen2_moe"], max_ctx=4)
    ids = _ids(12)
    with torch.no_grad():
        ref = oracles["qwen2_moe"](ids[None]).logits[0].float()
    torch.testing.assert_close(model.forward(ids), ref, atol=ATOL, rtol=0)


def test_sharded_checkpoint_and_tokenizer(ckpts):
    d = ckpts["olmoe"]
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    assert tok.get_vocab_size() == TM.VOCAB
    assert tok.token_to_id(TM.EOS) == TM.token_id(TM.EOS)
    text = "hello world, experts stream from disk"
    assert tok.decode(tok.encode(text).ids) == text
    tc = json.loads((d / "tokenizer_config.json").read_text())
    assert tc["eos_token"] == "<|im_end|>" and "<|im_start|>" in tc["chat_template"]
    gen = json.loads((d / "generation_config.json").read_text())
    assert TM.token_id(TM.EOS) in gen["eos_token_id"]


# --- a bundle's config is untrusted: every field of the newer families is checked -------------------

BAD_FIELDS = [
    ("gpt_oss", "layer_windows", [8, 0], "layer_windows"), ("gpt_oss", "layer_windows", [8, -1, 8], "layer_windows"),
    ("gpt_oss", "attn_sinks", 1, "attn_sinks"), ("gpt_oss", "expert_act", "gelu", "expert_act"),
    ("gpt_oss", "swiglu_limit", float("nan"), "swiglu_limit"), ("gpt_oss", "router", "argmax", "router"),
    ("gpt_oss", "rope_scaling", {"type": "yarn", "factor": 4.0}, "original_max_position_embeddings"),
    ("gpt_oss", "rope_scaling", {"type": "dynamic", "factor": 4.0}, "not supported"),
    ("deepseek_v3", "attention", "sparse", "attention"), ("deepseek_v3", "kv_lora_rank", 0, "kv_lora_rank"),
    ("deepseek_v3", "rope_dim", 24, "rope_dim"), ("deepseek_v3", "rope_dim", 7, "rope_dim"),
    ("deepseek_v3", "n_kv_heads", 2, "kv heads"), ("deepseek_v3", "n_group", 3, "groups"),
    ("deepseek_v3", "topk_group", 5, "groups"), ("deepseek_v3", "routed_scaling", -1.0, "routed_scaling"),
    ("deepseek_v3", "layer_windows", [4, 4, 4], "grouped-query"), ("deepseek_v3", "q_lora_rank", -2, "q_lora_rank"),
    ("deepseek_v2", "rope_style", "spiral", "rope_style"), ("glm4_moe", "rope_style", "complex", "complex"),
    ("glm4_moe", "score_bias", "yes", "score_bias"), ("glm4_moe", "kv_lora_rank", 8, "latent attention only"),
    ("ernie4_5_moe", "norm_min", -1.0, "norm_min"), ("gpt_oss", "n_group", 2, "no expert groups"), ("ernie4_5_moe", "router", "softmax", "score_bias"),
]


@pytest.mark.parametrize("arch,field,value,needle", BAD_FIELDS, ids=[f"{a}-{f}" for a, f, _, _ in BAD_FIELDS])
def test_bad_config_fields_are_refused(arch, field, value, needle, ckpts):
    import dataclasses

    from fate.errors import ConfigError
    from fate.model.config import ModelConfig

    _, cfg = TM.load_fate_model(ckpts[arch])
    text = json.loads(cfg.to_json())
    assert ModelConfig.from_json(json.dumps(text)) == cfg  # the good one reads back
    text[field] = value
    with pytest.raises(ConfigError, match=needle):
        ModelConfig.from_json(json.dumps(text))
    with pytest.raises(ConfigError):
        dataclasses.replace(cfg, **{field: value}).validate()


UNSUPPORTED = [
    ("deepseek_v2", dict(topk_method="noaux_tc"), "topk_method"),
    ("deepseek_v2", dict(attention_bias=True), "attention_bias"),
    ("ernie4_5_moe", dict(use_bias=True), "use_bias"),
    ("ernie4_5_moe", dict(moe_num_experts=[8, 8]), "several expert groups"),
]


@pytest.mark.parametrize("arch,change,needle", UNSUPPORTED, ids=[n for _, _, n in UNSUPPORTED])
def test_unsupported_variants_are_named(arch, change, needle, ckpts):
    from fate.errors import UnsupportedArchitecture

    hf = json.loads((ckpts[arch] / "config.json").read_text())
    with pytest.raises(UnsupportedArchitecture, match=needle):
        A.model_config({**hf, **change})
