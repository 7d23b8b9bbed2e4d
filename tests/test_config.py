"""fate.model.config.ModelConfig: every bad field is a ConfigError naming it; JSON round trips."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fate.errors import ConfigError, UserError
from fate.model.config import ModelConfig


def good(**changes) -> ModelConfig:
    """A valid config using most of the fields (shared expert with gate, a dense layer, qk norm, rope scaling)."""
    cfg = ModelConfig(model_type="qwen2_moe", vocab_size=384, hidden_size=64, n_layers=3, n_heads=4, n_kv_heads=2,
                      head_dim=16, rms_eps=1e-6, rope_theta=10000.0, max_position=512, n_experts=8, top_k=2,
                      expert_ffn=64, moe_layers=[False, True, True], dense_ffn=128, norm_topk_prob=True,
                      shared_ffn=128, shared_gate=True, qkv_bias=True, qk_norm="head", clip_qkv=0.5,
                      tie_embeddings=False, rope_scaling={"type": "linear", "factor": 2.0})
    return dataclasses.replace(cfg, **changes)


def test_a_good_config_validates_and_round_trips():
    cfg = good()
    assert cfg.validate() is cfg
    assert cfg.moe_layer_ids == [1, 2]
    text = cfg.to_json()
    assert json.loads(text) == dataclasses.asdict(cfg) and list(json.loads(text)) == sorted(json.loads(text))
    back = ModelConfig.from_json(text)
    assert back == cfg and back.to_json() == text
    assert ModelConfig.from_json(text.encode()) == cfg  # bytes are JSON text too
    plain = good(moe_layers=[True] * 3, dense_ffn=0, shared_ffn=0, shared_gate=False, qk_norm="none", clip_qkv=0.0,
                 rope_scaling={}, model_type="mixtral", tie_embeddings=True)
    assert ModelConfig.from_json(plain.to_json()) == plain


BAD = [  # (field, bad value, text the message must contain)
    ("model_type", "llama", "model_type"),
    ("model_type", 3, "model_type"),
    ("vocab_size", 0, "vocab_size"),
    ("vocab_size", True, "vocab_size"),
    ("hidden_size", 64.0, "hidden_size"),
    ("n_layers", -3, "n_layers"),
    ("n_heads", (1 << 24) + 1, "n_heads"),
    ("n_kv_heads", "2", "n_kv_heads"),
    ("head_dim", None, "head_dim"),
    ("max_position", 0, "max_position"),
    ("n_experts", -1, "n_experts"),
    ("top_k", 1.5, "top_k"),
    ("expert_ffn", -64, "expert_ffn"),
    ("dense_ffn", "128", "dense_ffn"),
    ("shared_ffn", False, "shared_ffn"),
    ("norm_topk_prob", 1, "norm_topk_prob"),
    ("shared_gate", "yes", "shared_gate"),
    ("qkv_bias", None, "qkv_bias"),
    ("tie_embeddings", 0, "tie_embeddings"),
    ("n_kv_heads", 3, "kv heads"),  # 4 heads are not a multiple of 3 kv heads
    ("head_dim", 15, "head_dim"),  # odd: rotary embeddings need pairs
    ("moe_layers", [True, 1, True], "moe_layers"),
    ("moe_layers", "TTT", "moe_layers"),
    ("moe_layers", [True, True], "moe_layers"),  # 2 entries for 3 layers
    ("top_k", 9, "top_k"),  # more than the 8 experts
    ("top_k", 0, "top_k"),
    ("expert_ffn", 0, "expert_ffn"),
    ("dense_ffn", 0, "dense_ffn"),  # layer 0 is dense
    ("qk_norm", "rms", "qk_norm"),
    ("rms_eps", 0.0, "rms_eps"),
    ("rms_eps", float("nan"), "rms_eps"),
    ("rope_theta", float("inf"), "rope_theta"),
    ("rope_theta", True, "rope_theta"),
    ("clip_qkv", -1.0, "clip_qkv"),
    ("clip_qkv", float("nan"), "clip_qkv"),
    ("rope_scaling", [], "rope_scaling"),
    ("rope_scaling", {"type": "dynamic", "factor": 4.0}, "rope scaling 'dynamic'"),
    ("rope_scaling", {"type": "linear", "factor": 0}, "factor"),
    ("rope_scaling", {"type": "linear"}, "factor"),
    ("rope_scaling", {"type": "linear", "factor": "2"}, "factor"),
]


@pytest.mark.parametrize("field, value, needle", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_validate_rejects_each_bad_field_naming_it(field, value, needle):
    cfg = good(**{field: value})
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    msg = str(info.value)
    assert needle in msg and "\n" not in msg, msg
    assert isinstance(info.value, UserError)
    # and through from_json, which validates what it reads (a bundle's config is untrusted input)
    d = dataclasses.asdict(good())
    d[field] = value
    try:
        text = json.dumps(d)
    except (TypeError, ValueError):
        return
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_json(text)
    assert needle in str(info.value)


def test_from_json_rejects_what_is_not_a_config():
    text = good().to_json()
    d = json.loads(text)
    cases = [
        (b"\xff\xfe", "not valid JSON"),
        ("{", "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ("null", "not a JSON object"),
        (json.dumps({**d, "bogus": 1, "extra": 2}), "['bogus', 'extra']"),
        (json.dumps({k: v for k, v in d.items() if k != "vocab_size"}), "vocab_size"),
        ("[" * 100000, "not valid JSON"),
    ]
    for bad, needle in cases:
        with pytest.raises(ConfigError) as info:
            ModelConfig.from_json(bad)
        assert needle in str(info.value), (bad[:20], str(info.value))
    with pytest.raises(ConfigError, match="dict, not JSON text"):
        ModelConfig.from_json(d)
