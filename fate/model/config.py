"""The model's shape and flags: everything the one model implementation needs to run any supported
architecture.  The converter builds it from a Hugging Face ``config.json`` (fate.model.arch); the
bundle stores it as JSON (``fate.model_config``) and the runtime reads it back.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from fate.errors import ConfigError
from fate.quant.layout import ExpertAct, expert_blob_layout

QK_NORM_KINDS = ("none", "head", "full")
MODEL_TYPES = ("qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek", "gpt_oss", "deepseek_v2", "deepseek_v3",
               "glm4_moe", "ernie4_5_moe")
ATTENTION_KINDS = ("gqa", "mla")
# how q/k are rotated (fate.model.rope): "half" rotate-half (Llama); "interleave" even/odd pairs, output
# in halves (DeepSeek-V3 rope_interleave); "complex" pairs as complex numbers in float32 (DeepSeek-V2);
# "pairs_f32" even/odd pairs in float32, output interleaved (ERNIE-4.5)
ROPE_STYLES = ("half", "interleave", "complex", "pairs_f32")
ROPE_KINDS = ("default", "linear", "yarn")
# the routing rule (fate.model.transformer.MoEModel.route): "softmax" over all experts, top-k, optional
# renormalisation (Qwen, Mixtral, OLMoE, DeepSeekMoE); "softmax_topk" softmax over the top-k logits
# (gpt-oss); "softmax_group" float32 softmax, group-limited greedy top-k, times routed_scaling (DeepSeek-V2);
# "sigmoid_group" sigmoid scores, choice by score + correction bias within the best groups, optional
# renormalisation, times routed_scaling (DeepSeek-V3, GLM-4.5); "softmax_biased" float32 softmax, choice
# by probability + correction bias, renormalised (ERNIE-4.5)
ROUTERS = ("softmax", "softmax_topk", "softmax_group", "sigmoid_group", "softmax_biased")
EXPERT_ACTS = ("silu", "clamped")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class ModelConfig:
    model_type: str  # Hugging Face model_type: qwen2_moe, qwen3_moe, mixtral, olmoe, deepseek
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    max_position: int
    n_experts: int
    top_k: int
    expert_ffn: int  # intermediate size of one routed expert
    moe_layers: list[bool]  # per layer: routed experts (True) or a dense MLP (False)
    dense_ffn: int = 0  # intermediate size of dense-layer MLPs (0 when every layer is MoE)
    norm_topk_prob: bool = False  # renormalize the top-k routing weights to sum to 1
    shared_ffn: int = 0  # intermediate size of the shared expert MLP (0: none)
    shared_gate: bool = False  # shared expert output scaled by sigmoid(x @ w_gate) (Qwen2-MoE)
    qkv_bias: bool = False
    qk_norm: str = "none"  # "head": RMSNorm per head (Qwen3); "full": over the whole projection (OLMoE)
    clip_qkv: float = 0.0  # OLMoE: clamp q, k, v to [-c, c] when c > 0
    tie_embeddings: bool = False
    rope_scaling: dict = field(default_factory=dict)  # {} | {"type": "linear", "factor": f} | {"type": "yarn", ...}
    # --- attention --------------------------------------------------------------------------------
    attention: str = "gqa"  # "mla": DeepSeek's multi-head latent attention (the cache holds the latent)
    q_lora_rank: int = 0  # MLA: rank of the query's low-rank path (0: one q projection)
    kv_lora_rank: int = 0  # MLA: rank of the compressed key/value latent
    v_head_dim: int = 0  # value head size when it differs from head_dim (MLA); 0: head_dim
    rope_dim: int = 0  # rotated dimensions of each q/k head (partial RoPE; MLA: the decoupled rope key); 0: all
    rope_style: str = "half"
    attn_scale: float = 0.0  # softmax scale of q.k; 0: head_dim ** -0.5
    attn_out_bias: bool = False  # the output projection has a bias (gpt-oss)
    attn_sinks: bool = False  # one learned sink logit per head joins each softmax (gpt-oss)
    layer_windows: list = field(default_factory=list)  # per layer: sliding window (0: full attention); []: all full
    latent_norm_eps: float = 1e-6  # MLA: epsilon of the q and kv latent RMSNorms
    norm_f32_weight: bool = False  # RMSNorm multiplies by its weight in float32, then casts (gpt-oss)
    # --- routing ----------------------------------------------------------------------------------
    router: str = "softmax"
    router_bias: bool = False  # the router projection has a bias (gpt-oss)
    score_bias: bool = False  # a per-expert correction bias added to the scores for choosing only
    n_group: int = 1  # expert groups: the top-k is taken within the topk_group best groups
    topk_group: int = 1
    routed_scaling: float = 1.0  # routing weights multiplied by this
    norm_min: float = 0.0  # softmax_biased: renormalisation denominator clamped below at this
    # --- experts ----------------------------------------------------------------------------------
    expert_bias: bool = False  # gate/up and down projections of routed experts have biases (gpt-oss)
    expert_act: str = "silu"  # "clamped": gpt-oss's clamped SwiGLU with the (up + 1) term
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0

    @property
    def router_ranks_by_logits(self) -> bool:
        """Whether the router's top-k is its projection's top-k (a softmax of it, or the logits themselves):
        then a predictor ranks by one stacked product; otherwise by the model's selection scores."""
        return (self.router in ("softmax", "softmax_topk") and not self.router_bias) or (
            self.router == "softmax_group" and self.n_group == 1)

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i, m in enumerate(self.moe_layers) if m]

    @property
    def value_dim(self) -> int:
        """Size of one value head."""
        return self.v_head_dim or self.head_dim

    @property
    def rotary_dim(self) -> int:
        """Rotated dimensions of one q/k head."""
        return self.rope_dim or self.head_dim

    def window(self, layer: int) -> int:
        """Layer ``layer``'s sliding attention window (0: it attends to the whole context)."""
        return self.layer_windows[layer] if self.layer_windows else 0

    @property
    def softmax_scale(self) -> float:
        return self.attn_scale or self.head_dim ** -0.5

    @property
    def act(self):
        """The routed experts' activation (fate.quant.layout.ExpertAct)."""
        return ExpertAct(self.expert_act, float(self.swiglu_alpha), float(self.swiglu_limit))

    def expert_layout(self, spec, down_group_size: int | None = None):
        """The byte layout of one routed expert of this model stored as ``spec`` (fate.quant.layout)."""
        return expert_blob_layout(self.hidden_size, self.expert_ffn, spec, down_group_size=down_group_size,
                                  bias=self.expert_bias, act=self.act)

    def validate(self) -> "ModelConfig":
        """Check every field's type and range (a bundle's config is untrusted input): raises ConfigError."""
        if not isinstance(self.model_type, str) or self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type {self.model_type!r} is not supported; supported: {', '.join(MODEL_TYPES)}")
        ints = {
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size, "n_layers": self.n_layers,
            "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "max_position": self.max_position,
        }
        for name, v in ints.items():
            if not _is_int(v) or v <= 0 or v > 1 << 24:
                raise ConfigError(f"model config: {name}={v!r} is not a sane positive integer")
        counts = {"n_experts": self.n_experts, "top_k": self.top_k, "expert_ffn": self.expert_ffn,
                  "dense_ffn": self.dense_ffn, "shared_ffn": self.shared_ffn}
        for name, v in counts.items():
            if not _is_int(v) or v < 0 or v > 1 << 24:
                raise ConfigError(f"model config: {name}={v!r} is not a sane non-negative integer")
        flags = {"norm_topk_prob": self.norm_topk_prob, "shared_gate": self.shared_gate, "qkv_bias": self.qkv_bias,
                 "tie_embeddings": self.tie_embeddings}
        for name, v in flags.items():
            if not isinstance(v, bool):
                raise ConfigError(f"model config: {name}={v!r} is not true or false")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model config: {self.n_heads} heads is not a multiple of {self.n_kv_heads} kv heads")
        if self.head_dim % 2:
            raise ConfigError(f"model config: head_dim={self.head_dim} is odd (rotary embeddings need pairs)")
        if not isinstance(self.moe_layers, list) or not all(isinstance(m, bool) for m in self.moe_layers):
            raise ConfigError("model config: moe_layers is not a list of true/false, one per layer")
        if len(self.moe_layers) != self.n_layers:
            raise ConfigError(f"model config: moe_layers has {len(self.moe_layers)} entries for {self.n_layers} layers")
        if any(self.moe_layers):
            if not (0 < self.top_k <= self.n_experts <= 1 << 16):
                raise ConfigError(f"model config: top_k={self.top_k} and n_experts={self.n_experts} are inconsistent")
            if self.expert_ffn <= 0:
                raise ConfigError("model config: expert_ffn must be positive")
        if not all(self.moe_layers) and self.dense_ffn <= 0:
            raise ConfigError("model config: dense layers present but dense_ffn is not positive")
        if not isinstance(self.qk_norm, str) or self.qk_norm not in QK_NORM_KINDS:
            raise ConfigError(f"model config: qk_norm={self.qk_norm!r} is not one of {QK_NORM_KINDS}")
        if not (_is_finite(self.rms_eps) and self.rms_eps > 0 and _is_finite(self.rope_theta) and self.rope_theta > 0):
            raise ConfigError("model config: rms_eps and rope_theta must be positive")
        if not (_is_finite(self.clip_qkv) and self.clip_qkv >= 0):
            raise ConfigError(f"model config: clip_qkv={self.clip_qkv!r} is not a non-negative number")
        if not isinstance(self.rope_scaling, dict) or not all(isinstance(k, str) for k in self.rope_scaling):
            raise ConfigError(f"model config: rope_scaling={self.rope_scaling!r} is not an object")
        kind = self.rope_scaling.get("type", "default")
        if not isinstance(kind, str) or kind not in ROPE_KINDS:
            raise ConfigError(f"model config: rope scaling {kind!r} is not supported (supported: none, linear, yarn)")
        if kind in ("linear", "yarn"):
            factor = self.rope_scaling.get("factor")
            if not (_is_finite(factor) and factor > 0):
                raise ConfigError(f"model config: {kind} rope scaling factor {factor!r} is not a positive number")
        if kind == "yarn":
            rs = self.rope_scaling
            unknown = set(rs) - {"type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                                 "truncate", "attention_factor"}
            if unknown:
                raise ConfigError(f"model config: yarn rope scaling has unknown keys {sorted(unknown)}")
            orig = rs.get("original_max_position_embeddings")
            if not (_is_int(orig) and 0 < orig <= 1 << 24):
                raise ConfigError(f"model config: yarn original_max_position_embeddings={orig!r} is not a positive integer")
            for name in ("beta_fast", "beta_slow", "attention_factor"):
                v = rs.get(name)
                if not (_is_finite(v) and 0 < v < 1e6):
                    raise ConfigError(f"model config: yarn {name}={v!r} is not a positive number")
            if not isinstance(rs.get("truncate"), bool):
                raise ConfigError(f"model config: yarn truncate={rs.get('truncate')!r} is not true or false")
        self._validate_extensions()
        return self

    def _validate_extensions(self) -> None:
        """The fields of attention variants, routing rules and expert functions beyond plain SwiGLU MoE."""
        choices = {"attention": (self.attention, ATTENTION_KINDS), "rope_style": (self.rope_style, ROPE_STYLES),
                   "router": (self.router, ROUTERS), "expert_act": (self.expert_act, EXPERT_ACTS)}
        for name, (v, allowed) in choices.items():
            if not isinstance(v, str) or v not in allowed:
                raise ConfigError(f"model config: {name}={v!r} is not one of {allowed}")
        for name, v in {"q_lora_rank": self.q_lora_rank, "kv_lora_rank": self.kv_lora_rank,
                        "v_head_dim": self.v_head_dim, "rope_dim": self.rope_dim}.items():
            if not _is_int(v) or v < 0 or v > 1 << 24:
                raise ConfigError(f"model config: {name}={v!r} is not a sane non-negative integer")
        for name, v in {"attn_out_bias": self.attn_out_bias, "attn_sinks": self.attn_sinks,
                        "norm_f32_weight": self.norm_f32_weight, "router_bias": self.router_bias,
                        "score_bias": self.score_bias, "expert_bias": self.expert_bias}.items():
            if not isinstance(v, bool):
                raise ConfigError(f"model config: {name}={v!r} is not true or false")
        for name, v, lo in (("attn_scale", self.attn_scale, 0.0), ("norm_min", self.norm_min, 0.0)):
            if not (_is_finite(v) and lo <= v < 1e6):
                raise ConfigError(f"model config: {name}={v!r} is not a non-negative number")
        for name, v in (("latent_norm_eps", self.latent_norm_eps), ("routed_scaling", self.routed_scaling),
                        ("swiglu_alpha", self.swiglu_alpha), ("swiglu_limit", self.swiglu_limit)):
            if not (_is_finite(v) and 0 < v < 1e6):
                raise ConfigError(f"model config: {name}={v!r} is not a positive number")
        rd = self.rotary_dim
        if rd % 2 or rd > self.head_dim:
            raise ConfigError(f"model config: rope_dim={self.rope_dim} must be even and at most head_dim={self.head_dim}")
        if self.attention == "mla":
            if self.kv_lora_rank <= 0 or not 0 < self.rope_dim < self.head_dim:
                raise ConfigError("model config: multi-head latent attention needs kv_lora_rank > 0 and "
                                  "0 < rope_dim < head_dim")
            if self.n_kv_heads != self.n_heads:
                raise ConfigError("model config: multi-head latent attention has as many kv heads as heads")
            if self.qkv_bias or self.qk_norm != "none" or self.attn_sinks or self.clip_qkv:
                raise ConfigError("model config: multi-head latent attention has no qkv bias, q/k norm, sinks or clip")
        elif self.q_lora_rank or self.kv_lora_rank:
            raise ConfigError("model config: q_lora_rank and kv_lora_rank are for multi-head latent attention only")
        if self.rope_style == "complex" and self.attention != "mla":
            raise ConfigError("model config: rope_style complex is DeepSeek-V2's latent attention only")
        w = self.layer_windows
        if not isinstance(w, list) or (w and len(w) != self.n_layers) or \
                not all(_is_int(x) and 0 <= x <= 1 << 24 for x in w):
            raise ConfigError(f"model config: layer_windows must be [] or one non-negative window per layer "
                              f"({self.n_layers})")
        if any(w) and self.attention != "gqa":
            raise ConfigError("model config: sliding windows are for grouped-query attention only")
        E = self.n_experts
        for name, v in (("n_group", self.n_group), ("topk_group", self.topk_group)):
            if not _is_int(v) or v < 1 or v > 1 << 16:
                raise ConfigError(f"model config: {name}={v!r} is not a positive integer")
        if any(self.moe_layers):
            if E % self.n_group or self.topk_group > self.n_group:
                raise ConfigError(f"model config: {E} experts in {self.n_group} groups, {self.topk_group} of them "
                                  "chosen, is inconsistent")
            if self.top_k > self.topk_group * (E // self.n_group):
                raise ConfigError(f"model config: top_k={self.top_k} is more than the {self.topk_group} chosen "
                                  "groups hold")
            if self.router == "sigmoid_group" and E // self.n_group < 2:
                raise ConfigError("model config: sigmoid_group routing scores a group by its two best experts; "
                                  "groups need at least 2")
        if (self.n_group > 1 or self.topk_group > 1) and self.router not in ("softmax_group", "sigmoid_group"):
            raise ConfigError(f"model config: router {self.router!r} has no expert groups (n_group={self.n_group})")
        if self.score_bias and self.router not in ("sigmoid_group", "softmax_biased"):
            raise ConfigError(f"model config: score_bias is not used by router {self.router!r}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        if not isinstance(text, (str, bytes, bytearray)):
            raise ConfigError(f"model config is a {type(text).__name__}, not JSON text")
        try:
            data = json.loads(text)
        except (TypeError, ValueError, RecursionError) as e:
            raise ConfigError(f"model config is not valid JSON: {str(e)[:200]}") from None
        if not isinstance(data, dict):
            raise ConfigError("model config is not a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"model config has unknown fields: {sorted(unknown)}")
        try:
            cfg = cls(**data)
        except TypeError as e:
            raise ConfigError(f"model config is incomplete: {e}") from None
        return cfg.validate()
