"""Architecture specs: Hugging Face ``config.json`` → ModelConfig, and HF tensor names → bundle names.

One small spec per ``model_type``; the model itself is implemented once (fate.model.transformer) and
driven by the flags the spec sets.  Adding an architecture means adding a spec here, nothing else,
as long as its blocks are made of the pieces ModelConfig describes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from fate.formats import constants as C
from fate.errors import ConfigError, UnsupportedArchitecture
from fate.model.config import ModelConfig
from fate.quant.mxfp4 import dequantize_mxfp4


def _get(hf: dict, *names, default=None):
    for n in names:
        if n in hf and hf[n] is not None:
            return hf[n]
    return default


def _rope_params(hf: dict) -> tuple[float, dict]:
    """(theta, the scaling parameters) from either transformers 5 (``rope_parameters``) or 4 style keys."""
    params = hf.get("rope_parameters") or {}
    if isinstance(params, dict) and params:
        return float(params.get("rope_theta", hf.get("rope_theta", 10000.0))), params
    rs = hf.get("rope_scaling") or {}
    return float(hf.get("rope_theta", 10000.0)), rs if isinstance(rs, dict) else {}


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention-scale correction (transformers' ``get_mscale`` / ``yarn_get_mscale``)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _rope(hf: dict) -> tuple[float, dict]:
    """rope theta and scaling (fate's form: {} or {"type": ..., "factor": ..., and YaRN's parameters})."""
    theta, rs = _rope_params(hf)
    kind = rs.get("rope_type", rs.get("type", "default")) if rs else "default"
    if kind == "default":
        return theta, {}
    factor = rs.get("factor")
    if kind != "yarn":
        return theta, {"type": kind, "factor": float(1.0 if factor is None else factor)}
    # YaRN exactly as transformers' _compute_yarn_parameters resolves it
    orig = int(rs.get("original_max_position_embeddings") or _get(hf, "max_position_embeddings", default=4096))
    factor = float(hf["max_position_embeddings"] / orig if factor is None else factor)
    attn = rs.get("attention_factor")
    if attn is None:
        mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")
        attn = (float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)) if mscale and mscale_all
                else _yarn_mscale(factor))
    return theta, {"type": "yarn", "factor": factor, "original_max_position_embeddings": orig,
                   "beta_fast": float(rs.get("beta_fast") or 32), "beta_slow": float(rs.get("beta_slow") or 1),
                   "truncate": bool(rs.get("truncate", True)), "attention_factor": float(attn)}


def _mla_softmax_scale(hf: dict, qk_head_dim: int) -> float:
    """DeepSeek-V2/V3's softmax scale: ``qk_head_dim ** -0.5``, times YaRN's mscale squared when
    ``mscale_all_dim`` is set (transformers' ``yarn_apply_mscale``)."""
    _, rs = _rope_params(hf)
    scaling = qk_head_dim ** (-0.5)
    if rs.get("rope_type", rs.get("type", "default")) != "default":
        mscale_all = rs.get("mscale_all_dim", 0)
        if mscale_all:
            m = _yarn_mscale(rs["factor"], mscale_all)
            scaling = scaling * m * m
    return scaling


def _partial_rotary(hf: dict) -> float:
    _, rs = _rope_params(hf)
    return float(rs.get("partial_rotary_factor") or hf.get("partial_rotary_factor") or 1.0)


def _common(hf: dict, model_type: str, rms_eps_default: float = 1e-6) -> dict:
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", False)  # Mixtral's window: its spec; gpt-oss's: per layer
    if uses_window and window and int(window) < int(_get(hf, "max_position_embeddings", default=0)):
        raise UnsupportedArchitecture(
            f"{model_type} with sliding-window attention (window {window}) is not supported; fate implements "
            "Mixtral's and gpt-oss's")
    if model_type in ("qwen3_moe", "olmoe", "deepseek", "mixtral") and hf.get("attention_bias"):
        raise UnsupportedArchitecture(f"{model_type} with attention_bias=true (biased projections) is not supported")
    hidden = int(hf["hidden_size"])
    n_heads = int(hf["num_attention_heads"])
    theta, scaling = _rope(hf)
    return dict(
        model_type=model_type,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(_get(hf, "num_key_value_heads", default=n_heads)),
        head_dim=int(_get(hf, "head_dim", default=hidden // n_heads)),
        rms_eps=float(_get(hf, "rms_norm_eps", default=rms_eps_default)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position=int(_get(hf, "max_position_embeddings", default=4096)),
        tie_embeddings=bool(_get(hf, "tie_word_embeddings", default=False)),
    )


def _qwen_moe_layers(hf: dict, *expert_keys: str) -> tuple[int, list[bool]]:
    """Qwen-MoE's layer pattern: (experts, which layers are MoE) — every ``decoder_sparse_step``-th layer
    not listed in ``mlp_only_layers``, where there are experts at all."""
    step = int(_get(hf, "decoder_sparse_step", default=1))
    mlp_only = set(_get(hf, "mlp_only_layers", default=[]) or [])
    n_exp = int(_get(hf, *expert_keys, default=0))
    layers = range(int(hf["num_hidden_layers"]))
    return n_exp, [(i not in mlp_only) and n_exp > 0 and (i + 1) % step == 0 for i in layers]


def _qwen2_moe(hf: dict) -> ModelConfig:
    n_exp, moe = _qwen_moe_layers(hf, "num_experts")
    shared = int(_get(hf, "shared_expert_intermediate_size", default=5632))  # transformers' default
    return ModelConfig(
        **_common(hf, "qwen2_moe"),
        n_experts=n_exp,
        top_k=int(hf["num_experts_per_tok"]),
        expert_ffn=int(hf["moe_intermediate_size"]),
        moe_layers=moe,
        dense_ffn=int(_get(hf, "intermediate_size", default=0)) if not all(moe) else 0,
        norm_topk_prob=bool(_get(hf, "norm_topk_prob", default=False)),
        shared_ffn=shared,
        shared_gate=shared > 0,
        qkv_bias=bool(_get(hf, "qkv_bias", default=True)),  # Qwen1.5/2-MoE always carry q/k/v biases
    )


def _qwen3_moe(hf: dict) -> ModelConfig:
    n_exp, moe = _qwen_moe_layers(hf, "num_experts", "num_local_experts")  # transformers 5 saves the latter
    return ModelConfig(
        **_common(hf, "qwen3_moe"),
        n_experts=n_exp,
        top_k=int(hf["num_experts_per_tok"]),
        expert_ffn=int(hf["moe_intermediate_size"]),
        moe_layers=moe,
        dense_ffn=int(_get(hf, "intermediate_size", default=0)) if not all(moe) else 0,
        norm_topk_prob=bool(_get(hf, "norm_topk_prob", default=False)),
        qk_norm="head",
    )


def _mixtral(hf: dict) -> ModelConfig:
    n_layers = int(hf["num_hidden_layers"])
    window = int(hf.get("sliding_window") or 0)  # every layer (Mistral's design); None in Mixtral's releases
    return ModelConfig(
        **_common(hf, "mixtral", rms_eps_default=1e-5),
        n_experts=int(hf["num_local_experts"]),
        top_k=int(hf["num_experts_per_tok"]),
        expert_ffn=int(hf["intermediate_size"]),
        moe_layers=[True] * n_layers,
        norm_topk_prob=True,
        layer_windows=[window] * n_layers if window else [],
    )


def _olmoe(hf: dict) -> ModelConfig:
    n_layers = int(hf["num_hidden_layers"])
    return ModelConfig(
        **_common(hf, "olmoe", rms_eps_default=1e-5),
        n_experts=int(hf["num_experts"]),
        top_k=int(hf["num_experts_per_tok"]),
        expert_ffn=int(hf["intermediate_size"]),
        moe_layers=[True] * n_layers,
        norm_topk_prob=bool(_get(hf, "norm_topk_prob", default=False)),
        qk_norm="full",
        clip_qkv=float(_get(hf, "clip_qkv", default=0.0)),
    )


def _deepseek(hf: dict) -> ModelConfig:
    n_layers = int(hf["num_hidden_layers"])
    n_exp = int(_get(hf, "n_routed_experts", default=0))
    first_dense = int(_get(hf, "first_k_dense_replace", default=0))
    freq = int(_get(hf, "moe_layer_freq", default=1))
    moe = [n_exp > 0 and i >= first_dense and i % freq == 0 for i in range(n_layers)]
    expert_ffn = int(hf["moe_intermediate_size"])
    scoring = _get(hf, "scoring_func", default="softmax")
    if scoring != "softmax":
        raise UnsupportedArchitecture(f"deepseek scoring_func {scoring!r} is not supported (only softmax, DeepSeekMoE v1)")
    return ModelConfig(
        **_common(hf, "deepseek"),
        n_experts=n_exp,
        top_k=int(hf["num_experts_per_tok"]),
        expert_ffn=expert_ffn,
        moe_layers=moe,
        dense_ffn=int(hf["intermediate_size"]) if not all(moe) else 0,
        norm_topk_prob=bool(_get(hf, "norm_topk_prob", default=False)),
        shared_ffn=expert_ffn * int(_get(hf, "n_shared_experts", default=0)),
    )


def _gpt_oss(hf: dict) -> ModelConfig:
    n_layers = int(hf["num_hidden_layers"])
    window = int(hf.get("sliding_window") or 0)
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)]
    if not isinstance(types, list) or len(types) != n_layers or \
            not set(types) <= {"sliding_attention", "full_attention"}:
        raise ConfigError(f"config.json: layer_types {types!r} is not one sliding_attention/full_attention per layer")
    bias = bool(_get(hf, "attention_bias", default=True))
    return ModelConfig(
        **_common(hf, "gpt_oss", rms_eps_default=1e-5),
        n_experts=int(_get(hf, "num_local_experts", "num_experts")),
        top_k=int(hf["num_experts_per_tok"]),
        expert_ffn=int(hf["intermediate_size"]),
        moe_layers=[True] * n_layers,
        qkv_bias=bias,
        attn_out_bias=bias,
        attn_sinks=True,
        layer_windows=[window if t == "sliding_attention" else 0 for t in types] if window else [],
        norm_f32_weight=True,
        router="softmax_topk",
        router_bias=True,
        expert_bias=True,
        expert_act="clamped",
        swiglu_alpha=float(_get(hf, "swiglu_alpha", default=1.702)),
        swiglu_limit=float(_get(hf, "swiglu_limit", default=7.0)),
    )


def _mla(hf: dict, model_type: str) -> dict:
    """What DeepSeek-V2 and V3 share: latent attention, leading dense layers, shared experts."""
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise UnsupportedArchitecture(f"{model_type} with attention_bias or mlp_bias is not supported")
    if int(_get(hf, "moe_layer_freq", default=1)) != 1:
        raise UnsupportedArchitecture(f"{model_type} with moe_layer_freq != 1 is not supported "
                                      "(transformers makes every layer from first_k_dense_replace on a MoE layer)")
    n_layers = int(hf["num_hidden_layers"])
    n_exp = int(_get(hf, "n_routed_experts", default=0))
    first_dense = int(_get(hf, "first_k_dense_replace", default=0))
    moe = [n_exp > 0 and i >= first_dense for i in range(n_layers)]
    nope, rope, v = int(hf["qk_nope_head_dim"]), int(hf["qk_rope_head_dim"]), int(hf["v_head_dim"])
    common = _common(hf, model_type)
    expert_ffn = int(hf["moe_intermediate_size"])
    common.update(n_kv_heads=common["n_heads"], head_dim=nope + rope)
    return dict(
        **common,
        n_experts=n_exp,
        top_k=int(hf["num_experts_per_tok"]),
        expert_ffn=expert_ffn,
        moe_layers=moe,
        dense_ffn=int(hf["intermediate_size"]) if not all(moe) else 0,
        shared_ffn=expert_ffn * int(_get(hf, "n_shared_experts", default=0)),
        attention="mla",
        q_lora_rank=int(_get(hf, "q_lora_rank", default=0)),
        kv_lora_rank=int(hf["kv_lora_rank"]),
        v_head_dim=v,
        rope_dim=rope,
        attn_scale=_mla_softmax_scale(hf, nope + rope),
        routed_scaling=float(_get(hf, "routed_scaling_factor", default=1.0)),
    )


def _deepseek_v2(hf: dict) -> ModelConfig:
    method = _get(hf, "topk_method", default="greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise UnsupportedArchitecture(f"deepseek_v2 topk_method {method!r} is not supported "
                                      "(greedy, group_limited_greedy)")
    scoring = _get(hf, "scoring_func", default="softmax")
    if scoring != "softmax":
        raise UnsupportedArchitecture(f"deepseek_v2 scoring_func {scoring!r} is not supported (softmax)")
    grouped = method == "group_limited_greedy"
    return ModelConfig(
        **_mla(hf, "deepseek_v2"),
        rope_style="complex",
        router="softmax_group",
        n_group=int(_get(hf, "n_group", default=1)) if grouped else 1,
        topk_group=int(_get(hf, "topk_group", default=1)) if grouped else 1,
    )


def _deepseek_v3(hf: dict) -> ModelConfig:
    return ModelConfig(
        **_mla(hf, "deepseek_v3"),
        rope_style="interleave" if _get(hf, "rope_interleave", default=True) else "half",
        router="sigmoid_group",
        score_bias=True,
        n_group=int(_get(hf, "n_group", default=1)),
        topk_group=int(_get(hf, "topk_group", default=1)),
        norm_topk_prob=bool(_get(hf, "norm_topk_prob", default=True)),
    )


def _glm4_moe(hf: dict) -> ModelConfig:
    n_layers = int(hf["num_hidden_layers"])
    first_dense = int(_get(hf, "first_k_dense_replace", default=1))
    n_exp = int(_get(hf, "n_routed_experts", "num_local_experts", default=0))
    moe = [n_exp > 0 and i >= first_dense for i in range(n_layers)]
    expert_ffn = int(hf["moe_intermediate_size"])
    common = _common(hf, "glm4_moe", rms_eps_default=1e-5)
    return ModelConfig(
        **common,
        n_experts=n_exp,
        top_k=int(hf["num_experts_per_tok"]),
        expert_ffn=expert_ffn,
        moe_layers=moe,
        dense_ffn=int(hf["intermediate_size"]) if not all(moe) else 0,
        shared_ffn=expert_ffn * int(_get(hf, "n_shared_experts", default=1)),
        qkv_bias=bool(_get(hf, "attention_bias", default=False)),
        qk_norm="head" if _get(hf, "use_qk_norm", default=False) else "none",
        rope_dim=int(common["head_dim"] * _partial_rotary(hf)),
        router="sigmoid_group",
        score_bias=True,
        n_group=int(_get(hf, "n_group", default=1)),
        topk_group=int(_get(hf, "topk_group", default=1)),
        norm_topk_prob=bool(_get(hf, "norm_topk_prob", default=True)),
        routed_scaling=float(_get(hf, "routed_scaling_factor", default=1.0)),
    )


def _ernie4_5_moe(hf: dict) -> ModelConfig:
    if hf.get("use_bias"):
        raise UnsupportedArchitecture("ernie4_5_moe with use_bias=true (biased projections) is not supported")
    n_layers = int(hf["num_hidden_layers"])
    n_exp, top_k = _get(hf, "moe_num_experts", "num_experts"), _get(hf, "moe_k", "num_experts_per_tok")
    if not isinstance(n_exp, int) or not isinstance(top_k, int):
        raise UnsupportedArchitecture("ernie4_5_moe with several expert groups (moe_num_experts a list: the "
                                      "vision-language models) is not supported")
    start = int(_get(hf, "moe_layer_start_index", default=1))
    end = int(_get(hf, "moe_layer_end_index", default=-1))
    end = n_layers - 1 if end == -1 else end
    interval = int(_get(hf, "moe_layer_interval", default=1))
    if interval <= 0:
        raise ConfigError(f"config.json: moe_layer_interval={interval} is not positive")
    moe = [n_exp > 0 and (i + 1) % interval == 0 and start <= i <= end for i in range(n_layers)]
    expert_ffn = int(hf["moe_intermediate_size"])
    return ModelConfig(
        **_common(hf, "ernie4_5_moe", rms_eps_default=1e-5),
        n_experts=n_exp,
        top_k=top_k,
        expert_ffn=expert_ffn,
        moe_layers=moe,
        dense_ffn=int(hf["intermediate_size"]) if not all(moe) else 0,
        shared_ffn=expert_ffn * int(_get(hf, "moe_num_shared_experts", default=0)),
        rope_style="pairs_f32",
        router="softmax_biased",
        score_bias=True,
        norm_min=float(_get(hf, "moe_norm_min", default=1e-12)),
    )


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    to_config: Callable[[dict], ModelConfig]
    moe_prefix: str  # HF module holding router + experts, under model.layers.N.
    router: str  # router weight, relative to moe_prefix
    expert_proj: tuple[str, str, str]  # (gate, up, down) names under {moe_prefix}.experts.E.
    shared_prefix: str = ""  # shared expert MLP, under model.layers.N.
    shared_gate: str = ""  # shared expert sigmoid gate weight, under model.layers.N.
    score_bias: str = ""  # expert score correction bias, under model.layers.N.
    score_bias_2d: bool = False  # stored as [1, experts] (ERNIE) rather than [experts]
    fused: str = "concat"  # how fused expert tensors are laid out: "concat" (transformers 5: gate_up
    # [E, 2F, H], down [E, H, F]) or "gpt_oss" (gate_up [E, H, 2F] with gate and up interleaved, down
    # [E, F, H], biases; or MXFP4 blocks and scales of the same matrices in [out, in] order)


ARCHS: dict[str, ArchSpec] = {
    "qwen2_moe": ArchSpec("qwen2_moe", _qwen2_moe, "mlp", "gate", ("gate_proj", "up_proj", "down_proj"),
                          shared_prefix="mlp.shared_expert", shared_gate="mlp.shared_expert_gate.weight"),
    "qwen3_moe": ArchSpec("qwen3_moe", _qwen3_moe, "mlp", "gate", ("gate_proj", "up_proj", "down_proj")),
    "mixtral": ArchSpec("mixtral", _mixtral, "block_sparse_moe", "gate", ("w1", "w3", "w2")),
    "olmoe": ArchSpec("olmoe", _olmoe, "mlp", "gate", ("gate_proj", "up_proj", "down_proj")),
    "deepseek": ArchSpec("deepseek", _deepseek, "mlp", "gate", ("gate_proj", "up_proj", "down_proj"),
                         shared_prefix="mlp.shared_experts"),
    "gpt_oss": ArchSpec("gpt_oss", _gpt_oss, "mlp", "router", ("gate_proj", "up_proj", "down_proj"), fused="gpt_oss"),
    "deepseek_v2": ArchSpec("deepseek_v2", _deepseek_v2, "mlp", "gate", ("gate_proj", "up_proj", "down_proj"),
                            shared_prefix="mlp.shared_experts"),
    "deepseek_v3": ArchSpec("deepseek_v3", _deepseek_v3, "mlp", "gate", ("gate_proj", "up_proj", "down_proj"),
                            shared_prefix="mlp.shared_experts", score_bias="mlp.gate.e_score_correction_bias"),
    "glm4_moe": ArchSpec("glm4_moe", _glm4_moe, "mlp", "gate", ("gate_proj", "up_proj", "down_proj"),
                         shared_prefix="mlp.shared_experts", score_bias="mlp.gate.e_score_correction_bias"),
    "ernie4_5_moe": ArchSpec("ernie4_5_moe", _ernie4_5_moe, "mlp", "gate", ("gate_proj", "up_proj", "down_proj"),
                             shared_prefix="mlp.shared_experts",
                             score_bias="mlp.moe_statics.e_score_correction_bias", score_bias_2d=True),
}


def spec_for(hf_config: dict) -> ArchSpec:
    mt = hf_config.get("model_type")
    if mt not in ARCHS:
        raise UnsupportedArchitecture(
            f"model_type {mt!r} is not supported; supported: {', '.join(sorted(ARCHS))}")
    return ARCHS[mt]


def model_config(hf_config: dict) -> ModelConfig:
    spec = spec_for(hf_config)
    try:
        return spec.to_config(hf_config).validate()
    except KeyError as e:
        raise ConfigError(f"config.json lacks {e.args[0]!r}, which {spec.model_type} needs") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, (ConfigError, UnsupportedArchitecture)):
            raise
        raise ConfigError(f"config.json has a bad value: {e}") from None


def non_expert_tensors(spec: ArchSpec, cfg: ModelConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """bundle name → (HF name, expected shape) for every tensor that is not a routed expert."""
    H, D = cfg.hidden_size, cfg.head_dim
    q_dim, kv_dim = cfg.n_heads * D, cfg.n_kv_heads * D
    o_dim, v_dim = cfg.n_heads * cfg.value_dim, cfg.n_kv_heads * cfg.value_dim
    out: dict[str, tuple[str, tuple[int, ...]]] = {
        C.T_TOKEN_EMBD: ("model.embed_tokens.weight", (cfg.vocab_size, H)),
        C.T_OUTPUT_NORM: ("model.norm.weight", (H,)),
    }
    if not cfg.tie_embeddings:
        out[C.T_OUTPUT] = ("lm_head.weight", (cfg.vocab_size, H))
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        f = lambda t: t.format(i=i)  # noqa: E731
        out[f(C.T_ATTN_NORM)] = (p + "input_layernorm.weight", (H,))
        out[f(C.T_FFN_NORM)] = (p + "post_attention_layernorm.weight", (H,))
        a = p + "self_attn."
        if cfg.attention == "mla":
            r, rd = cfg.kv_lora_rank, cfg.rotary_dim
            if cfg.q_lora_rank:
                out[f(C.T_ATTN_Q_A)] = (a + "q_a_proj.weight", (cfg.q_lora_rank, H))
                out[f(C.T_ATTN_Q_A_NORM)] = (a + "q_a_layernorm.weight", (cfg.q_lora_rank,))
                out[f(C.T_ATTN_Q_B)] = (a + "q_b_proj.weight", (q_dim, cfg.q_lora_rank))
            else:
                out[f(C.T_ATTN_Q)] = (a + "q_proj.weight", (q_dim, H))
            out[f(C.T_ATTN_KV_A_MQA)] = (a + "kv_a_proj_with_mqa.weight", (r + rd, H))
            out[f(C.T_ATTN_KV_A_NORM)] = (a + "kv_a_layernorm.weight", (r,))
            out[f(C.T_ATTN_KV_B)] = (a + "kv_b_proj.weight", (cfg.n_heads * (D - rd + cfg.value_dim), r))
        else:
            out[f(C.T_ATTN_Q)] = (a + "q_proj.weight", (q_dim, H))
            out[f(C.T_ATTN_K)] = (a + "k_proj.weight", (kv_dim, H))
            out[f(C.T_ATTN_V)] = (a + "v_proj.weight", (v_dim, H))
        out[f(C.T_ATTN_OUT)] = (a + "o_proj.weight", (H, o_dim))
        if cfg.qkv_bias:
            out[f(C.T_ATTN_Q_BIAS)] = (a + "q_proj.bias", (q_dim,))
            out[f(C.T_ATTN_K_BIAS)] = (a + "k_proj.bias", (kv_dim,))
            out[f(C.T_ATTN_V_BIAS)] = (a + "v_proj.bias", (v_dim,))
        if cfg.attn_out_bias:
            out[f(C.T_ATTN_OUT_BIAS)] = (a + "o_proj.bias", (H,))
        if cfg.attn_sinks:
            out[f(C.T_ATTN_SINKS)] = (a + "sinks", (cfg.n_heads,))
        if cfg.qk_norm == "head":
            out[f(C.T_ATTN_Q_NORM)] = (p + "self_attn.q_norm.weight", (D,))
            out[f(C.T_ATTN_K_NORM)] = (p + "self_attn.k_norm.weight", (D,))
        elif cfg.qk_norm == "full":
            out[f(C.T_ATTN_Q_NORM)] = (p + "self_attn.q_norm.weight", (q_dim,))
            out[f(C.T_ATTN_K_NORM)] = (p + "self_attn.k_norm.weight", (kv_dim,))
        if cfg.moe_layers[i]:
            out[f(C.T_FFN_GATE_INP)] = (p + f"{spec.moe_prefix}.{spec.router}.weight", (cfg.n_experts, H))
            if cfg.router_bias:
                out[f(C.T_FFN_GATE_INP_BIAS)] = (p + f"{spec.moe_prefix}.{spec.router}.bias", (cfg.n_experts,))
            if cfg.score_bias:
                out[f(C.T_FFN_EXP_PROBS_B)] = (p + spec.score_bias,
                                               (1, cfg.n_experts) if spec.score_bias_2d else (cfg.n_experts,))
            if cfg.shared_ffn:
                sp = p + spec.shared_prefix + "."
                out[f(C.T_FFN_GATE_SHEXP)] = (sp + "gate_proj.weight", (cfg.shared_ffn, H))
                out[f(C.T_FFN_UP_SHEXP)] = (sp + "up_proj.weight", (cfg.shared_ffn, H))
                out[f(C.T_FFN_DOWN_SHEXP)] = (sp + "down_proj.weight", (H, cfg.shared_ffn))
            if cfg.shared_gate:
                out[f(C.T_FFN_GATE_INP_SHEXP)] = (p + spec.shared_gate, (1, H))
        else:
            out[f(C.T_FFN_GATE)] = (p + "mlp.gate_proj.weight", (cfg.dense_ffn, H))
            out[f(C.T_FFN_UP)] = (p + "mlp.up_proj.weight", (cfg.dense_ffn, H))
            out[f(C.T_FFN_DOWN)] = (p + "mlp.down_proj.weight", (H, cfg.dense_ffn))
    return out


def expert_tensor_names(spec: ArchSpec, layer: int, expert: int) -> tuple[str, str, str]:
    """HF names of routed expert ``expert``'s (gate, up, down) weights in layer ``layer``."""
    base = f"model.layers.{layer}.{spec.moe_prefix}.experts.{expert}."
    return tuple(base + n + ".weight" for n in spec.expert_proj)  # type: ignore[return-value]


def fused_expert_tensor_names(spec: ArchSpec, layer: int) -> tuple[str, str]:
    """transformers-5 in-memory layout some exporters save: gate_up_proj [E, 2F, H], down_proj [E, H, F]
    (gpt-oss: gate_up_proj [E, H, 2F] interleaved, down_proj [E, F, H]; see ArchSpec.fused)."""
    base = f"model.layers.{layer}.{spec.moe_prefix}.experts."
    return base + "gate_up_proj", base + "down_proj"


def expert_storage(spec: ArchSpec, cfg: ModelConfig, layer: int, has: Callable[[str], bool]
                   ) -> tuple[str, dict[str, tuple[int, ...]]]:
    """How layer ``layer``'s routed experts are stored in a checkpoint, given ``has(name)``: (kind, {HF name:
    expected shape}).  Kinds: ``per_expert`` (one gate/up/down tensor each), ``concat`` (transformers 5's
    stacked gate_up [E, 2F, H] and down [E, H, F]), ``gpt_oss`` (stacked [E, H, 2F] with gate and up
    interleaved, [E, F, H], and their biases) and ``mxfp4`` (gpt-oss's published form: those matrices as
    MXFP4 blocks and scales in [out, in] order, biases as they are)."""
    E, H, Fd = cfg.n_experts, cfg.hidden_size, cfg.expert_ffn
    base = f"model.layers.{layer}.{spec.moe_prefix}.experts."
    if spec.fused == "gpt_oss":
        biases = {base + "gate_up_proj_bias": (E, 2 * Fd), base + "down_proj_bias": (E, H)}
        if has(base + "gate_up_proj_blocks"):
            return "mxfp4", {base + "gate_up_proj_blocks": (E, 2 * Fd, H // 32, 16),
                             base + "gate_up_proj_scales": (E, 2 * Fd, H // 32),
                             base + "down_proj_blocks": (E, H, Fd // 32, 16),
                             base + "down_proj_scales": (E, H, Fd // 32), **biases}
        return "gpt_oss", {base + "gate_up_proj": (E, H, 2 * Fd), base + "down_proj": (E, Fd, H), **biases}
    gu, dn = fused_expert_tensor_names(spec, layer)
    if has(gu) and has(dn):
        return "concat", {gu: (E, 2 * Fd, H), dn: (E, H, Fd)}
    names: dict[str, tuple[int, ...]] = {}
    for e in range(E):
        g, u, d = expert_tensor_names(spec, layer, e)
        names.update({g: (Fd, H), u: (Fd, H), d: (H, Fd)})
    return "per_expert", names


def expert_weights(spec: ArchSpec, cfg: ModelConfig, layer: int, e: int, kind: str,
                   read: Callable[[str, int | None], torch.Tensor]) -> tuple:
    """Routed expert ``e`` of ``layer`` as float32 (gate [F, H], up [F, H], down [H, F]), plus (gate_up bias
    [2F] — gate's, then up's —, down bias [H]) for experts with biases; ``read(name, e)`` gives expert
    ``e``'s entry of a stacked tensor, ``read(name, None)`` a whole per-expert tensor."""
    Fd = cfg.expert_ffn
    if kind == "per_expert":
        return tuple(read(n, None).float() for n in expert_tensor_names(spec, layer, e))
    if kind == "concat":
        gu_name, dn_name = fused_expert_tensor_names(spec, layer)
        gu = read(gu_name, e).float()
        return gu[:Fd].contiguous(), gu[Fd:].contiguous(), read(dn_name, e).float().contiguous()
    base = f"model.layers.{layer}.{spec.moe_prefix}.experts."
    if kind == "mxfp4":
        gu = dequantize_mxfp4(read(base + "gate_up_proj_blocks", e), read(base + "gate_up_proj_scales", e))
        down = dequantize_mxfp4(read(base + "down_proj_blocks", e), read(base + "down_proj_scales", e))
    else:  # gpt_oss: [in, out] as transformers multiplies them
        gu = read(base + "gate_up_proj", e).float().t()
        down = read(base + "down_proj", e).float().t()
    b = read(base + "gate_up_proj_bias", e).float()
    # gate and up are interleaved (gate = even columns): de-interleave into fate's gate rows, then up rows
    return (gu[0::2].contiguous(), gu[1::2].contiguous(), down.contiguous(),
            torch.cat((b[0::2], b[1::2])), read(base + "down_proj_bias", e).float().contiguous())
