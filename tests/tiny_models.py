"""Tiny random Hugging Face checkpoints for every supported architecture, made in the test (nothing is
downloaded), plus the oracles they are checked against.

* :func:`make_checkpoint` writes a real checkpoint directory — ``config.json``, ``model.safetensors``
  (or shards with ``model.safetensors.index.json``), ``tokenizer.json``, ``tokenizer_config.json`` and
  ``generation_config.json`` — exactly as a converter would find one on disk.
* :func:`load_oracle` returns a transformers model computing the same function.
* :func:`load_fate_model` builds fate's :class:`~fate.model.transformer.MoEModel` straight from the
  checkpoint (through ``fate.model.arch``'s tensor mapping), with experts as plain tensors.

Dimensions: hidden 64, 4 heads, 2 kv heads, expert FFN 64, 8 experts, top-2, vocab 384 (the
multi-head latent attention of DeepSeek-V2/V3: 4 heads, q/k heads of 16 + 8 rope dims, values 16, kv
latent 32).  hidden and the expert FFN are multiples of 64, the converter's default q4 group size
(checkpoints that are not convert with smaller groups; tests/test_convert.py has one).  Weights are drawn with a larger spread than transformers' default init so activations stay
well away from zero, and router weights larger still so top-k choices are decisive (no near-ties that
a different summation order could flip); the LM head is scaled up so greedy choices are decisive too.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ARCHS = ("qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek", "gpt_oss", "deepseek_v2", "deepseek_v3",
         "glm4_moe", "ernie4_5_moe")

VOCAB = 384
HIDDEN = 64
HEADS = 4
KV_HEADS = 2
EXPERT_FFN = 64
DENSE_FFN = 128
SHARED_FFN = 128
EXPERTS = 8
TOP_K = 2
MAX_POS = 512
WINDOW = 8  # gpt-oss's sliding window (128 in gpt-oss-20b): small, so prompts and generations pass it
SWIGLU_LIMIT = 1.0  # gpt-oss's clamp (7.0 in gpt-oss-20b): small, so random activations reach it

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS = "<|im_end|>"
PAD = "<|endoftext|>"
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# standard deviations of the random weights, by kind
STD_LINEAR = 0.08
STD_EMBED = 0.5
STD_ROUTER = 0.7
STD_HEAD = 0.5
STD_BIAS = 0.1
STD_NORM = 0.1  # norms are 1 + N(0, STD_NORM)
STD_SCORE_BIAS = 0.2  # expert score correction biases (sigmoid scores are in (0, 1)): they change choices
STD_SINKS = 1.0

_CORPUS_WORDS = (
    "the quick brown fox jumps over the lazy dog while experts stream from disk into a small cache "
    "mixture of experts models route every token to a few experts chosen by a learned router "
    "prefetching predicts the next layer's experts from this layer's gate input one layer early "
    "hello world tiny models are built in the test and never downloaded from anywhere at all "
    "numbers 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 and punctuation , . ; : ! ? ( ) [ ] { } - + = * / "
    "user assistant system chat template message content role answer question why how what when"
).split()


def _corpus() -> list[str]:
    g = torch.Generator().manual_seed(1234)
    lines = []
    for _ in range(400):
        n = int(torch.randint(4, 16, (1,), generator=g))
        idx = torch.randint(0, len(_CORPUS_WORDS), (n,), generator=g).tolist()
        lines.append(" ".join(_CORPUS_WORDS[i] for i in idx))
    return lines


@functools.lru_cache(maxsize=8)
def tokenizer_json(vocab_size: int = VOCAB) -> str:
    """A byte-level BPE tokenizer trained on a few hundred generated sentences, ``vocab_size`` entries
    (specials first: <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    if tok.get_vocab_size() > vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} entries for a vocab of {vocab_size}")
    return tok.to_str()


def token_id(token: str) -> int:
    return SPECIAL_TOKENS.index(token)


def _rope_params(theta: float = 10000.0) -> dict:
    return {"rope_type": "default", "rope_theta": theta}


def hf_config_kwargs(arch: str, n_layers: int) -> dict:
    """transformers config kwargs of the tiny model of ``arch`` (before overrides)."""
    common = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=n_layers, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, rms_norm_eps=1e-6, max_position_embeddings=MAX_POS,
        rope_parameters=_rope_params(), tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=token_id(EOS), pad_token_id=token_id(PAD),
    )
    if arch == "qwen2_moe":
        return dict(common, intermediate_size=DENSE_FFN, moe_intermediate_size=EXPERT_FFN,
                    shared_expert_intermediate_size=SHARED_FFN, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                    norm_topk_prob=False, qkv_bias=True, decoder_sparse_step=1, mlp_only_layers=[])
    if arch == "qwen3_moe":
        return dict(common, head_dim=32, intermediate_size=DENSE_FFN, moe_intermediate_size=EXPERT_FFN,
                    num_experts=EXPERTS, num_experts_per_tok=TOP_K, norm_topk_prob=True,
                    decoder_sparse_step=1, mlp_only_layers=[])
    if arch == "mixtral":
        return dict(common, intermediate_size=EXPERT_FFN, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K,
                    sliding_window=None)
    if arch == "olmoe":
        return dict(common, intermediate_size=EXPERT_FFN, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                    norm_topk_prob=False, clip_qkv=None)
    if arch == "gpt_oss":
        # gpt-oss-20b's rope: YaRN with factor 32 over 4096 positions; here a factor 4 over 128
        rope = {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 128, "rope_theta": 150000.0}
        return dict(common, head_dim=16, intermediate_size=EXPERT_FFN, num_local_experts=EXPERTS,
                    num_experts_per_tok=TOP_K, sliding_window=WINDOW, rms_norm_eps=1e-5, rope_parameters=rope,
                    attention_bias=True, swiglu_limit=SWIGLU_LIMIT)
    mla = dict(num_key_value_heads=HEADS, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
               v_head_dim=16, intermediate_size=DENSE_FFN, moe_intermediate_size=EXPERT_FFN,
               n_routed_experts=EXPERTS, num_experts_per_tok=TOP_K, first_k_dense_replace=1)
    if arch == "deepseek_v2":
        # DeepSeek-V2-Lite's rope: YaRN with mscale = mscale_all_dim = 0.707 (the softmax scale changes too)
        rope = {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707,
                "mscale_all_dim": 0.707, "original_max_position_embeddings": 128, "rope_theta": 10000.0}
        # groups ranked by their best expert bind only when fewer groups are kept than experts chosen
        return dict(common, **mla, q_lora_rank=None, n_shared_experts=2, topk_method="group_limited_greedy",
                    n_group=4, topk_group=1, routed_scaling_factor=1.5, rope_parameters=rope)
    if arch == "deepseek_v3":
        return dict(common, **mla, q_lora_rank=24, n_shared_experts=1, n_group=4, topk_group=2,
                    norm_topk_prob=True, routed_scaling_factor=2.5, rope_interleave=True)
    if arch == "glm4_moe":
        # GLM-4.5-Air: half of each head rotated, q/k/v biases, no q/k norm, one expert group
        return dict(common, head_dim=32, intermediate_size=DENSE_FFN, moe_intermediate_size=EXPERT_FFN,
                    n_routed_experts=EXPERTS, num_experts_per_tok=TOP_K, n_shared_experts=1, first_k_dense_replace=1,
                    n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0, use_qk_norm=False,
                    attention_bias=True, rope_parameters={**_rope_params(), "partial_rotary_factor": 0.5})
    if arch == "ernie4_5_moe":
        return dict(common, intermediate_size=DENSE_FFN, moe_intermediate_size=EXPERT_FFN, moe_num_experts=EXPERTS,
                    moe_k=TOP_K, moe_num_shared_experts=2, moe_layer_start_index=1, moe_layer_end_index=-1,
                    moe_layer_interval=1, use_bias=False, tie_word_embeddings=True,
                    rope_parameters=_rope_params(500000.0))
    raise ValueError(f"no transformers class for {arch!r}")


def deepseek_config(n_layers: int, **overrides) -> dict:
    """config.json of a DeepSeekMoE (v1, ``model_type: deepseek``) checkpoint."""
    cfg = {
        "architectures": ["DeepseekForCausalLM"],
        "model_type": "deepseek",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": DENSE_FFN,
        "moe_intermediate_size": EXPERT_FFN,
        "num_hidden_layers": n_layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "n_routed_experts": EXPERTS,
        "n_shared_experts": 2,
        "num_experts_per_tok": TOP_K,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "norm_topk_prob": False,
        "scoring_func": "softmax",
        "aux_loss_alpha": 0.001,
        "seq_aux": True,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POS,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": token_id(EOS),
        "pad_token_id": token_id(PAD),
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    cfg.update(overrides)
    return cfg


def _std_for(name: str) -> tuple[float, float]:
    """(mean, std) of the random init of the tensor called ``name``."""
    if name.endswith("norm.weight"):
        return 1.0, STD_NORM
    if name == "lm_head.weight":
        return 0.0, STD_HEAD
    if name.endswith("embed_tokens.weight"):
        return 0.0, STD_EMBED
    if name.endswith(".bias"):
        return 0.0, STD_BIAS
    if name.endswith("mlp.gate.weight") or name.endswith("block_sparse_moe.gate.weight") \
            or name.endswith("mlp.router.weight"):
        return 0.0, STD_ROUTER
    if name.endswith("e_score_correction_bias"):
        return 0.0, STD_SCORE_BIAS
    if name.endswith("self_attn.sinks"):
        return 0.0, STD_SINKS
    return 0.0, STD_LINEAR


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    # DeepSeek-V3's and GLM's correction biases are buffers (saved with the weights), not parameters
    tensors = dict(model.named_parameters())
    tensors.update({n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")})
    with torch.no_grad():
        for name, p in sorted(tensors.items()):
            mean, std = _std_for(name)
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std + mean)


def _deepseek_tensors(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors of a DeepSeekMoE checkpoint in its own Hugging Face naming."""
    g = torch.Generator().manual_seed(seed)
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = H // nh
    F_exp, F_dense = cfg["moe_intermediate_size"], cfg["intermediate_size"]
    F_sh = F_exp * cfg["n_shared_experts"]
    out: dict[str, torch.Tensor] = {}

    def put(name: str, *shape: int) -> None:
        mean, std = _std_for(name)
        out[name] = torch.randn(shape, generator=g, dtype=torch.float32) * std + mean

    put("model.embed_tokens.weight", V, H)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        put(p + "input_layernorm.weight", H)
        put(p + "post_attention_layernorm.weight", H)
        put(p + "self_attn.q_proj.weight", nh * D, H)
        put(p + "self_attn.k_proj.weight", nkv * D, H)
        put(p + "self_attn.v_proj.weight", nkv * D, H)
        put(p + "self_attn.o_proj.weight", H, nh * D)
        if deepseek_layer_is_moe(cfg, i):
            put(p + "mlp.gate.weight", cfg["n_routed_experts"], H)
            for e in range(cfg["n_routed_experts"]):
                q = p + f"mlp.experts.{e}."
                put(q + "gate_proj.weight", F_exp, H)
                put(q + "up_proj.weight", F_exp, H)
                put(q + "down_proj.weight", H, F_exp)
            if F_sh:
                put(p + "mlp.shared_experts.gate_proj.weight", F_sh, H)
                put(p + "mlp.shared_experts.up_proj.weight", F_sh, H)
                put(p + "mlp.shared_experts.down_proj.weight", H, F_sh)
        else:
            put(p + "mlp.gate_proj.weight", F_dense, H)
            put(p + "mlp.up_proj.weight", F_dense, H)
            put(p + "mlp.down_proj.weight", H, F_dense)
    put("model.norm.weight", H)
    if not cfg.get("tie_word_embeddings", False):
        put("lm_head.weight", V, H)
    return out


def deepseek_layer_is_moe(cfg: dict, i: int) -> bool:
    """DeepSeekMoE's own rule: routed experts from ``first_k_dense_replace`` on, every ``moe_layer_freq``."""
    return (cfg.get("n_routed_experts") or 0) > 0 and i >= cfg.get("first_k_dense_replace", 0) \
        and i % cfg.get("moe_layer_freq", 1) == 0


def _write_shards(tensors: dict[str, torch.Tensor], out_dir: Path, shards: int) -> None:
    for f in out_dir.glob("model*.safetensors*"):
        f.unlink()
    names = sorted(tensors)
    if shards <= 1:
        save_file({n: tensors[n].contiguous() for n in names}, str(out_dir / "model.safetensors"),
                  metadata={"format": "pt"})
        return
    shards = min(shards, len(names))
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[s * per:(s + 1) * per]}
        save_file(part, str(out_dir / fname), metadata={"format": "pt"})
        for n, t in part.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))


def _write_tokenizer(out_dir: Path, vocab_size: int) -> None:
    (out_dir / "tokenizer.json").write_text(tokenizer_json(vocab_size))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "add_bos_token": False,
        "model_max_length": MAX_POS,
        "chat_template": CHATML,
    }, indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps({
        "bos_token_id": None,
        "eos_token_id": [token_id(EOS), token_id(PAD)],
        "pad_token_id": token_id(PAD),
        "do_sample": False,
    }, indent=2))


_FP4 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def mxfp4_encode(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., out, in] float weights → MXFP4 (blocks uint8 [..., out, in/32, 16], scales uint8 [..., out,
    in/32]) as gpt-oss publishes them: per 32 values a power-of-two scale that brings the largest to at most
    6, each value rounded to the nearest E2M1 code (low nibble first)."""
    groups = w.float().reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    exp = torch.ceil(torch.log2(groups.abs().amax(-1).clamp_min(2.0 ** -100) / 6.0))
    scaled = groups / torch.exp2(exp).unsqueeze(-1)
    codes = (scaled.unsqueeze(-1) - torch.tensor(_FP4)).abs().argmin(-1).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exp + 127).to(torch.uint8)


def _to_mxfp4(out: Path, cfg: dict) -> None:
    """Rewrite a saved gpt-oss checkpoint with its experts in MXFP4, as openai/gpt-oss-* are published."""
    tensors = read_checkpoint_tensors(out)
    for i in range(cfg["num_hidden_layers"]):
        base = f"model.layers.{i}.mlp.experts."
        for proj in ("gate_up_proj", "down_proj"):
            # stored [E, in, out]; MXFP4 blocks run along `in` of [E, out, in]
            blocks, scales = mxfp4_encode(tensors.pop(base + proj).transpose(1, 2))
            tensors[base + proj + "_blocks"], tensors[base + proj + "_scales"] = blocks, scales
    _write_shards(tensors, out, 1)
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))


def make_checkpoint(arch: str, out_dir: str | os.PathLike, *, seed: int = 0, n_layers: int = 3,
                    dtype: torch.dtype = torch.float32, shards: int = 1, mxfp4: bool = False,
                    **overrides) -> dict:
    """Write a tiny random ``arch`` checkpoint to ``out_dir``; return its config dict (config.json).

    ``overrides`` are config keys (transformers' names; DeepSeekMoE's for ``deepseek``), e.g.
    ``tie_word_embeddings=True``, ``mlp_only_layers=[1]``, ``clip_qkv=0.5``, ``norm_topk_prob=True``,
    ``rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}``.  ``mxfp4`` (gpt_oss
    only): the experts are stored as MXFP4 blocks and scales, as gpt-oss is published.
    qwen2_moe/qwen3_moe/mixtral/olmoe are built with transformers' own classes and written with
    ``save_pretrained`` (per-expert tensor names); deepseek, which transformers lacks, is written by hand
    in DeepSeekMoE's naming.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; known: {ARCHS}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if arch == "deepseek":
        cfg = deepseek_config(n_layers, **overrides)
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
        tensors = {n: t.to(dtype) for n, t in _deepseek_tensors(cfg, seed).items()}
        _write_shards(tensors, out, shards)
        (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    else:
        import transformers

        cls_cfg, cls_model = {
            "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
            "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
            "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
            "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM),
            "gpt_oss": (transformers.GptOssConfig, transformers.GptOssForCausalLM),
            "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM),
            "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM),
            "glm4_moe": (transformers.Glm4MoeConfig, transformers.Glm4MoeForCausalLM),
            "ernie4_5_moe": (transformers.Ernie4_5_MoeConfig, transformers.Ernie4_5_MoeForCausalLM),
        }[arch]
        hf_cfg = cls_cfg(**{**hf_config_kwargs(arch, n_layers), **overrides})
        model = cls_model(hf_cfg)
        _randomize(model, seed)
        model = model.to(dtype)
        model.save_pretrained(out)
        if shards > 1:
            tensors = read_checkpoint_tensors(out)
            _write_shards(tensors, out, shards)
        cfg = json.loads((out / "config.json").read_text())
        if mxfp4:
            if arch != "gpt_oss":
                raise ValueError("only gpt-oss publishes MXFP4 experts")
            _to_mxfp4(out, cfg)
        if arch == "qwen3_moe" and "num_local_experts" in cfg:
            # transformers 5 writes Qwen3-MoE's expert count as num_local_experts (its attribute_map);
            # released Qwen3-MoE checkpoints say num_experts.  Keep the released spelling.
            cfg["num_experts"] = cfg.pop("num_local_experts")
            (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    _write_tokenizer(out, cfg["vocab_size"])
    return cfg


# --- reading a checkpoint back -------------------------------------------------------------------

def checkpoint_files(ckpt_dir: str | os.PathLike) -> list[Path]:
    d = Path(ckpt_dir)
    index = d / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [d / f for f in sorted(set(weight_map.values()))]
    return [d / "model.safetensors"]


def read_checkpoint_tensors(ckpt_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in checkpoint_files(ckpt_dir):
        with safe_open(str(f), "pt") as sf:
            for n in sf.keys():
                out[n] = sf.get_tensor(n)
    return out


def load_fate_model(ckpt_dir: str | os.PathLike, *, dtype: torch.dtype = torch.float32, observer=None,
                    max_ctx: int | None = None):
    """(MoEModel, ModelConfig) for a checkpoint: non-expert tensors through ``arch.non_expert_tensors``
    (shape-checked), routed experts through ``arch.expert_tensor_names`` as plain tensors."""
    from fate.model import arch as A
    from fate.model.experts import DenseExperts
    from fate.model.transformer import DictWeights, MoEModel

    hf = json.loads((Path(ckpt_dir) / "config.json").read_text())
    spec = A.spec_for(hf)
    cfg = A.model_config(hf)
    raw = read_checkpoint_tensors(ckpt_dir)
    bundle: dict[str, torch.Tensor] = {}
    for name, (hf_name, shape) in A.non_expert_tensors(spec, cfg).items():
        t = raw[hf_name]
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{hf_name}: shape {tuple(t.shape)}, expected {shape}")
        bundle[name] = t
    experts: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
    for layer in cfg.moe_layer_ids:
        kind, _ = A.expert_storage(spec, cfg, layer, raw.__contains__)
        for e in range(cfg.n_experts):
            w = A.expert_weights(spec, cfg, layer, e, kind, lambda n, i: raw[n] if i is None else raw[n][i])
            experts[layer, e] = tuple(t.to(dtype) for t in w)
    model = MoEModel(cfg, DictWeights(bundle, dtype=dtype), DenseExperts(lambda l, e: experts[l, e], cfg.act),
                     dtype=dtype, observer=observer, max_ctx=max_ctx)
    return model, cfg


# --- oracles ---------------------------------------------------------------------------------------

def load_oracle(arch: str, ckpt_dir: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """A transformers model computing the same function as the checkpoint in ``ckpt_dir``.

    Every architecture but deepseek: the checkpoint loaded with ``AutoModelForCausalLM`` (MXFP4 experts
    dequantized by transformers itself).

    deepseek: transformers has no DeepSeekMoE (v1) class, so the oracle is an independent construction
    — an equivalent ``Qwen2MoeForCausalLM`` built from the raw DeepSeek tensors:
      * ``qkv_bias=False`` (DeepSeekMoE attention has no biases; otherwise it is Llama attention, as is
        Qwen2-MoE's);
      * the shared expert is DeepSeek's ``shared_experts`` MLP (the ``n_shared_experts`` shared experts
        are already one MLP of width ``n_shared_experts * moe_intermediate_size``);
      * Qwen2-MoE multiplies the shared expert by ``sigmoid(shared_expert_gate(x))``: its weight is set
        to zero, so the factor is sigmoid(0) = 0.5, and the shared down projection is doubled to cancel
        it (both scalings are by powers of two, hence exact);
      * DeepSeek's dense layers (before ``first_k_dense_replace``, or off the ``moe_layer_freq`` grid)
        become Qwen2-MoE ``mlp_only_layers`` with ``intermediate_size`` = DeepSeek's dense width;
      * routing: softmax over the routed experts, top-k, no renormalization (``norm_topk_prob`` carried
        over) — Qwen2-MoE's router computes the same.
    """
    import transformers

    if arch != "deepseek":
        extra = {}
        if "quantization_config" in json.loads((Path(ckpt_dir) / "config.json").read_text()):
            extra["quantization_config"] = transformers.Mxfp4Config(dequantize=True)  # gpt-oss's MXFP4 experts
        model = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt_dir), dtype=dtype, **extra)
        return model.eval()

    ds = json.loads((Path(ckpt_dir) / "config.json").read_text())
    raw = read_checkpoint_tensors(ckpt_dir)
    L = ds["num_hidden_layers"]
    moe = [deepseek_layer_is_moe(ds, i) for i in range(L)]
    E = ds["n_routed_experts"]
    rope = {"rope_type": "default", "rope_theta": float(ds.get("rope_theta", 10000.0))}
    rs = ds.get("rope_scaling") or {}
    if rs:
        rope = {"rope_type": rs.get("type", rs.get("rope_type")), "factor": float(rs["factor"]),
                "rope_theta": rope["rope_theta"]}
    qcfg = transformers.Qwen2MoeConfig(
        vocab_size=ds["vocab_size"], hidden_size=ds["hidden_size"], intermediate_size=ds["intermediate_size"],
        moe_intermediate_size=ds["moe_intermediate_size"],
        shared_expert_intermediate_size=ds["moe_intermediate_size"] * ds["n_shared_experts"],
        num_hidden_layers=L, num_attention_heads=ds["num_attention_heads"],
        num_key_value_heads=ds.get("num_key_value_heads", ds["num_attention_heads"]),
        num_experts=E, num_experts_per_tok=ds["num_experts_per_tok"], norm_topk_prob=ds["norm_topk_prob"],
        decoder_sparse_step=1, mlp_only_layers=[i for i in range(L) if not moe[i]], qkv_bias=False,
        rms_norm_eps=ds["rms_norm_eps"], max_position_embeddings=ds["max_position_embeddings"],
        rope_parameters=rope, tie_word_embeddings=ds.get("tie_word_embeddings", False),
        bos_token_id=ds.get("bos_token_id"), eos_token_id=ds.get("eos_token_id"),
        pad_token_id=ds.get("pad_token_id"),
    )
    model = transformers.Qwen2MoeForCausalLM(qcfg)
    sd = {}
    for name, t in raw.items():
        sd[name] = t.float()
    for i in range(L):
        p = f"model.layers.{i}."
        if moe[i]:
            gate_up, down = [], []
            for e in range(E):
                q = p + f"mlp.experts.{e}."
                gate_up.append(torch.cat([sd.pop(q + "gate_proj.weight"), sd.pop(q + "up_proj.weight")], 0))
                down.append(sd.pop(q + "down_proj.weight"))
            sd[p + "mlp.experts.gate_up_proj"] = torch.stack(gate_up)
            sd[p + "mlp.experts.down_proj"] = torch.stack(down)
            for proj in ("gate_proj", "up_proj", "down_proj"):
                w = sd.pop(p + f"mlp.shared_experts.{proj}.weight")
                sd[p + f"mlp.shared_expert.{proj}.weight"] = 2.0 * w if proj == "down_proj" else w
            sd[p + "mlp.shared_expert_gate.weight"] = torch.zeros(1, ds["hidden_size"])
    if qcfg.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd, strict=True)
    # .to(dtype) would also round RoPE's inverse frequencies (a buffer); from_pretrained keeps them in
    # float32, and so must this oracle.
    rot = model.model.rotary_emb
    inv, orig = rot.inv_freq.clone(), rot.original_inv_freq.clone()
    model = model.to(dtype)
    rot.inv_freq, rot.original_inv_freq = inv, orig
    return model.eval()


def oracle_prediction_fit(x: torch.Tensor, y: torch.Tensor, router: torch.Tensor, topk: torch.Tensor,
                          fold: torch.Tensor, ridges) -> tuple[torch.Tensor, torch.Tensor]:
    """What fate.convert.calibrate.fit_map should give, written independently: each candidate map pulled
    towards ``router`` solved as one least-squares problem on the stacked system [x; sqrt(lam) I] P^T =
    [y; sqrt(lam) router^T] (float64), the candidates (the router, then each ridge) scored by the other fold's
    needed experts among their top k and top 2k, counted with sets; returns the winner's map over all tokens
    and each token's scores under the winner fitted on the other fold."""
    x, y, w = x.double(), y.double(), router.double()
    H, E, k = x.shape[1], w.shape[0], topk.shape[1]
    masks = (~fold, fold)

    def solve(m, ridge):
        xm = x[m]
        lam = ridge * (xm.T @ xm).diagonal().mean()
        a = torch.cat([xm, lam.sqrt() * torch.eye(H, dtype=x.dtype)])
        b = torch.cat([y[m], lam.sqrt() * w.T])
        return torch.linalg.lstsq(a, b).solution.T

    def hits(scores, need):
        total = 0
        for n in (k, min(2 * k, E)):
            top = scores.topk(n, dim=-1).indices.tolist()
            total += sum(len(set(t) & set(c)) for t, c in zip(top, need.tolist()))
        return total

    best = (sum(hits(x[m] @ w.T, topk[m]) for m in masks), None, None)
    for ridge in ridges:
        maps = [solve(masks[1 - f], ridge) for f in (0, 1)]
        h = sum(hits(x[m] @ p.T, topk[m]) for p, m in zip(maps, masks))
        if h > best[0]:
            best = (h, ridge, maps)
    _, ridge, maps = best
    if ridge is None:
        return w, x @ w.T
    scores = torch.empty(x.shape[0], E, dtype=x.dtype)
    for p, m in zip(maps, masks):
        scores[m] = x[m] @ p.T
    return solve(torch.ones_like(fold), ridge), scores
