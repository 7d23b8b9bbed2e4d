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

QK_NORM_KINDS = ("none", "head", "full")
MODEL_TYPES = ("qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek")


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
    rope_scaling: dict = field(default_factory=dict)  # {} or {"type": "linear", "factor": f}

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i, m in enumerate(self.moe_layers) if m]

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
        if not isinstance(kind, str) or kind not in ("default", "linear"):
            raise ConfigError(f"model config: rope scaling {kind!r} is not supported (supported: none, linear)")
        if kind == "linear":
            factor = self.rope_scaling.get("factor")
            if not (_is_finite(factor) and factor > 0):
                raise ConfigError(f"model config: linear rope scaling factor {factor!r} is not a positive number")
        return self

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
