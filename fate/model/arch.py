"""Architecture specs: Hugging Face ``config.json`` → ModelConfig, and HF tensor names → bundle names.

One small spec per ``model_type``; the model itself is implemented once (fate.model.transformer) and
driven by the flags the spec sets.  Adding an architecture means adding a spec here, nothing else,
as long as its blocks are made of the pieces ModelConfig describes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from fate.formats import constants as C
from fate.errors import ConfigError, UnsupportedArchitecture
from fate.model.config import ModelConfig


def _get(hf: dict, *names, default=None):
    for n in names:
        if n in hf and hf[n] is not None:
            return hf[n]
    return default


def _rope(hf: dict) -> tuple[float, dict]:
    """rope theta and scaling from either transformers 5 (``rope_parameters``) or 4 style keys."""
    params = hf.get("rope_parameters") or {}
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        kind = params.get("rope_type", params.get("type", "default"))
        scaling = {} if kind == "default" else {"type": kind, "factor": float(params.get("factor", 1.0))}
        return float(theta), scaling
    theta = float(hf.get("rope_theta", 10000.0))
    rs = hf.get("rope_scaling") or {}
    kind = rs.get("rope_type", rs.get("type", "default")) if rs else "default"
    scaling = {} if kind == "default" else {"type": kind, "factor": float(rs.get("factor", 1.0))}
    return theta, scaling


def _common(hf: dict, model_type: str, rms_eps_default: float = 1e-6) -> dict:
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", model_type == "mixtral")
    if uses_window and window and int(window) < int(_get(hf, "max_position_embeddings", default=0)):
        raise UnsupportedArchitecture(
            f"sliding-window attention (window {window}) is not supported; fate attends to the whole context")
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


def _qwen2_moe(hf: dict) -> ModelConfig:
    n_layers = int(hf["num_hidden_layers"])
    step = int(_get(hf, "decoder_sparse_step", default=1))
    mlp_only = set(_get(hf, "mlp_only_layers", default=[]) or [])
    n_exp = int(_get(hf, "num_experts", default=0))
    moe = [(i not in mlp_only) and n_exp > 0 and (i + 1) % step == 0 for i in range(n_layers)]
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
    n_layers = int(hf["num_hidden_layers"])
    step = int(_get(hf, "decoder_sparse_step", default=1))
    mlp_only = set(_get(hf, "mlp_only_layers", default=[]) or [])
    n_exp = int(_get(hf, "num_experts", "num_local_experts", default=0))  # transformers 5 saves the latter
    moe = [(i not in mlp_only) and n_exp > 0 and (i + 1) % step == 0 for i in range(n_layers)]
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
    return ModelConfig(
        **_common(hf, "mixtral", rms_eps_default=1e-5),
        n_experts=int(hf["num_local_experts"]),
        top_k=int(hf["num_experts_per_tok"]),
        expert_ffn=int(hf["intermediate_size"]),
        moe_layers=[True] * n_layers,
        norm_topk_prob=True,
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


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    to_config: Callable[[dict], ModelConfig]
    moe_prefix: str  # HF module holding router + experts, under model.layers.N.
    router: str  # router weight, relative to moe_prefix
    expert_proj: tuple[str, str, str]  # (gate, up, down) names under {moe_prefix}.experts.E.
    shared_prefix: str = ""  # shared expert MLP, under model.layers.N.
    shared_gate: str = ""  # shared expert sigmoid gate weight, under model.layers.N.


ARCHS: dict[str, ArchSpec] = {
    "qwen2_moe": ArchSpec("qwen2_moe", _qwen2_moe, "mlp", "gate", ("gate_proj", "up_proj", "down_proj"),
                          shared_prefix="mlp.shared_expert", shared_gate="mlp.shared_expert_gate.weight"),
    "qwen3_moe": ArchSpec("qwen3_moe", _qwen3_moe, "mlp", "gate", ("gate_proj", "up_proj", "down_proj")),
    "mixtral": ArchSpec("mixtral", _mixtral, "block_sparse_moe", "gate", ("w1", "w3", "w2")),
    "olmoe": ArchSpec("olmoe", _olmoe, "mlp", "gate", ("gate_proj", "up_proj", "down_proj")),
    "deepseek": ArchSpec("deepseek", _deepseek, "mlp", "gate", ("gate_proj", "up_proj", "down_proj"),
                         shared_prefix="mlp.shared_experts"),
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
        out[f(C.T_ATTN_Q)] = (p + "self_attn.q_proj.weight", (q_dim, H))
        out[f(C.T_ATTN_K)] = (p + "self_attn.k_proj.weight", (kv_dim, H))
        out[f(C.T_ATTN_V)] = (p + "self_attn.v_proj.weight", (kv_dim, H))
        out[f(C.T_ATTN_OUT)] = (p + "self_attn.o_proj.weight", (H, q_dim))
        if cfg.qkv_bias:
            out[f(C.T_ATTN_Q_BIAS)] = (p + "self_attn.q_proj.bias", (q_dim,))
            out[f(C.T_ATTN_K_BIAS)] = (p + "self_attn.k_proj.bias", (kv_dim,))
            out[f(C.T_ATTN_V_BIAS)] = (p + "self_attn.v_proj.bias", (kv_dim,))
        if cfg.qk_norm == "head":
            out[f(C.T_ATTN_Q_NORM)] = (p + "self_attn.q_norm.weight", (D,))
            out[f(C.T_ATTN_K_NORM)] = (p + "self_attn.k_norm.weight", (D,))
        elif cfg.qk_norm == "full":
            out[f(C.T_ATTN_Q_NORM)] = (p + "self_attn.q_norm.weight", (q_dim,))
            out[f(C.T_ATTN_K_NORM)] = (p + "self_attn.k_norm.weight", (kv_dim,))
        if cfg.moe_layers[i]:
            out[f(C.T_FFN_GATE_INP)] = (p + f"{spec.moe_prefix}.{spec.router}.weight", (cfg.n_experts, H))
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
    """transformers-5 in-memory layout some exporters save: gate_up_proj [E, 2F, H], down_proj [E, H, F]."""
    base = f"model.layers.{layer}.{spec.moe_prefix}.experts."
    return base + "gate_up_proj", base + "down_proj"
