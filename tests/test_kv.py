"""fate.model.kv.KVCache: per-layer append and views, the context limit as a one-line ContextFullError,
truncate/reset, and bytes_needed equal to what a cache really holds."""

from __future__ import annotations

import pytest
import torch

from fate.errors import ContextFullError, RequestError
from fate.model.config import ModelConfig
from fate.model.kv import KVCache, LayerKV

L, NKV, D, CTX = 2, 2, 4, 6


def _kv(ctx: int = CTX, layers: int = L, heads: int = NKV, dim: int = D) -> KVCache:
    """Full-attention layers of (heads, dim) keys and values."""
    return KVCache([LayerKV((heads, dim), (heads, dim))] * layers, ctx)


def kv_rows(T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, NKV, D, generator=g), torch.randn(T, NKV, D, generator=g)


def test_append_returns_views_of_everything_so_far_per_layer():
    kv = _kv()
    k0, v0 = kv_rows(3, 0)
    K, V = kv.append(0, k0, v0)
    assert K.shape == (NKV, 3, D) and torch.equal(K, k0.transpose(0, 1)) and torch.equal(V, v0.transpose(0, 1))
    assert kv.layer_length(0) == 3 and kv.layer_length(1) == 0
    assert kv.length == 0 and kv.free == CTX  # length is what every layer holds
    k1, v1 = kv_rows(3, 1)
    kv.append(1, k1, v1)
    assert kv.length == 3 and kv.free == CTX - 3
    k2, v2 = kv_rows(2, 2)
    K, V = kv.append(0, k2, v2)
    assert K.shape == (NKV, 5, D)
    assert torch.equal(K, torch.cat([k0, k2]).transpose(0, 1)) and torch.equal(V, torch.cat([v0, v2]).transpose(0, 1))
    # the views are of the preallocated storage, not copies
    assert K.data_ptr() == kv.k[0].data_ptr() and V.data_ptr() == kv.v[0].data_ptr()
    # layer 1 kept its own rows
    assert torch.equal(kv.k[1][:, :3], k1.transpose(0, 1)) and kv.layer_length(1) == 3


def _one_line_context_error(info, *needles):
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("KV cache full")
    for n in needles:
        assert n in msg, msg
    assert isinstance(info.value, RequestError)


def test_check_room_and_append_raise_context_full_error():
    kv = _kv()
    kv.check_room(CTX)  # an empty cache holds CTX tokens
    k, v = kv_rows(4, 3)
    kv.append(0, k, v)
    # checked against the layer that holds the most: another 3 do not fit although length is still 0
    with pytest.raises(ContextFullError) as info:
        kv.check_room(3)
    _one_line_context_error(info, "4 of 6", "cannot add 3", "larger context")
    kv.check_room(2)
    with pytest.raises(ContextFullError) as info:
        kv.append(0, *kv_rows(3, 4))
    _one_line_context_error(info, "4 of 6", "cannot add 3")
    assert kv.layer_length(0) == 4 and torch.equal(kv.k[0][:, :4], k.transpose(0, 1))  # nothing was written
    with pytest.raises(ContextFullError):
        _kv(2).append(1, *kv_rows(3, 5))


def test_truncate_and_reset():
    kv = _kv()
    ks = [kv_rows(4, 10 + i) for i in range(L)]
    for i, (k, v) in enumerate(ks):
        kv.append(i, k, v)
    kv.truncate(6)  # past the end: nothing to forget
    assert kv.length == 4
    kv.truncate(2)
    assert kv.length == 2 and [kv.layer_length(i) for i in range(L)] == [2, 2]
    k_new, v_new = kv_rows(1, 20)
    K, _ = kv.append(0, k_new, v_new)
    assert K.shape == (NKV, 3, D)
    assert torch.equal(K[:, :2], ks[0][0][:2].transpose(0, 1)) and torch.equal(K[:, 2], k_new[0])
    with pytest.raises(ValueError):
        kv.truncate(-1)
    kv.reset()
    assert kv.length == 0 and all(kv.layer_length(i) == 0 for i in range(L)) and kv.free == CTX
    kv.check_room(CTX)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bytes_needed_is_what_the_cache_holds(dtype):
    cfg = ModelConfig(model_type="mixtral", vocab_size=384, hidden_size=64, n_layers=3, n_heads=4, n_kv_heads=2,
                      head_dim=32, rms_eps=1e-6, rope_theta=1e4, max_position=512, n_experts=8, top_k=2,
                      expert_ffn=64, moe_layers=[True] * 3)
    kv = KVCache.for_model(cfg, 100, dtype=dtype)
    item = torch.empty((), dtype=dtype).element_size()
    assert KVCache.bytes_needed(cfg, 100, dtype) == kv.nbytes == 2 * 3 * 2 * 100 * 32 * item
    assert kv.k[0].shape == (2, 100, 32) and kv.k[0].dtype == dtype and kv.max_ctx == 100
    assert "length=0/100" in repr(kv)


@pytest.mark.parametrize("dims", [(0, 2, 4, 6), (2, 0, 4, 6), (2, 2, 0, 6), (2, 2, 4, 0), (2, 2, 4, -1)])
def test_dimensions_must_be_positive(dims):
    layers, heads, dim, ctx = dims
    with pytest.raises(ValueError, match="must be positive"):
        _kv(ctx, layers, heads, dim)
