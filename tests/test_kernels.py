"""fate.quant.kernels: the native INT4 one-token product equals fate.quant's dequantization + F.linear to
float32 rounding, and the resident executor uses it where it runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fate
from fate.quant import kernels as K
from fate.sysinfo import cpu_flags
from fate import quant as Q
from fate.model.experts import DenseExperts
from fate.runtime.experts.resident import ResidentExperts

needs_kernel = pytest.mark.skipif(not K.available(), reason=f"native kernel unavailable: {K.unavailable_reason()}")


def _random_q4(n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g)
    scale = (torch.rand(n, k // 64, generator=g) * 0.02 + 0.001).half()
    zero = (torch.rand(n, k // 64, generator=g) * 15).half()
    return Q.pack_codes(codes, 4), scale, zero


def _widths():
    flags = cpu_flags()
    return [w for w, need in ((False, "avx2"), (True, "avx512f")) if need in flags]


@needs_kernel
@pytest.mark.parametrize("n,k", [(1, 64), (7, 128), (48, 64), (256, 512), (1000, 192)])
def test_q4_matvec_equals_dequantize_then_linear(n, k):
    packed, scale, zero = _random_q4(n, k, seed=n + k)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(k))
    want = F.linear(x, Q.dequantize_weight((packed, scale, zero), (n, k), Q.QuantSpec.default("q4")))
    for wide in _widths():  # AVX2 and, where the CPU has it, AVX-512 rows
        got = K.q4_matvec(x, packed, scale, zero, wide=wide)
        assert got.shape == (1, n) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@needs_kernel
def test_q4_matvec_rejects_bad_shapes():
    packed, scale, zero = _random_q4(8, 128, seed=1)
    with pytest.raises(RuntimeError, match="multiple of 64|match x"):
        K.q4_matvec(torch.randn(1, 100), packed, scale, zero)
    with pytest.raises(RuntimeError, match="scale/zero"):
        K.q4_matvec(torch.randn(1, 128), packed, scale[:, :1].contiguous(), zero)


@needs_kernel
@pytest.mark.parametrize("mapped", [True, False])
def test_resident_experts_native_decode(converted, mapped):
    m = fate.load(converted["qwen3_moe"][1], experts="q4", device="cpu")
    assert m.experts.native  # fate.load's CPU default runs q4 decode through the kernel
    res = ResidentExperts(m.store, "q4", m.dtype, m.device, 0, mapped=mapped, native=True)
    ref = DenseExperts(lambda layer, e: m.store.dense(layer, e, "q4"), m.config.act)
    cfg = m.config
    g = torch.Generator().manual_seed(5)
    for layer in cfg.moe_layer_ids:
        for _ in range(4):
            x = torch.randn(1, cfg.hidden_size, generator=g)
            ids = torch.randperm(cfg.n_experts, generator=g)[:cfg.top_k][None]
            w = torch.rand(1, cfg.top_k, generator=g)
            want = ref.moe(layer, x, ids, w)
            torch.testing.assert_close(res.moe(layer, x, ids, w), want, rtol=1e-5,
                                       atol=1e-5 * float(want.abs().max()))
        # batched calls dequantize the packed codes with fate.quant: the torch path's bits exactly
        x = torch.randn(5, cfg.hidden_size, generator=g)
        ids = torch.stack([torch.randperm(cfg.n_experts, generator=g)[:cfg.top_k] for _ in range(5)])
        w = torch.rand(5, cfg.top_k, generator=g)
        assert torch.equal(res.moe(layer, x, ids, w), ref.moe(layer, x, ids, w))
        for a, b in zip(res.get_expert(layer, 1), m.store.dense(layer, 1, "q4")):
            assert torch.equal(a, b)
    # q4 stays packed: nothing widened beside the map (mapped), the packed bytes alone (--no-mmap)
    n_blobs = len(cfg.moe_layer_ids) * cfg.n_experts
    assert res.resident_bytes == (0 if mapped else n_blobs * m.store.blob_bytes("q4"))
    m.close()


def test_fate_native_0_turns_it_off():
    code = "from fate.quant import kernels as K; print(K.available(), K.unavailable_reason())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "FATE_NATIVE": "0"}).stdout
    assert out.strip() == "False FATE_NATIVE=0"


@needs_kernel
@pytest.mark.parametrize("n,k", [(1, 64), (7, 128), (300, 512)])
def test_q4_dequant_is_fate_quant_bit_for_bit(n, k):
    packed, scale, zero = _random_q4(n, k, seed=3 * n + k)
    want = Q.dequantize_weight((packed, scale, zero), (n, k), Q.QuantSpec.default("q4"))
    got = K.q4_dequant(packed, scale, zero, torch.empty(n, k))
    assert torch.equal(got, want)
