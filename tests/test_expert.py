"""The one expert primitive (fate.quant.expert): every way it computes an expert gives fate.quant's bits.

Blobs are packed from random weights with fate.quant.pack_expert (hqq for q4/q2); the reference is
fate.quant.unpack_expert (bit-identical to hqq's dequantization, see test_quant.py) and
fate.quant.expert.swiglu over its weights.
"""

from __future__ import annotations

import pytest
import torch

from fate.quant import QuantSpec, expert_blob_layout, pack_expert, unpack_expert
from fate.quant import kernels as K
from fate.quant.expert import ExpertCompute, ExpertView, WidenedExpert, native_q4, row_blocks, swiglu

H, F = 128, 192  # gate/up [F, H], down [H, F]: groups of 64 (q4) and 32 (q2) divide both
PRECISIONS = ("f16", "q4", "q2")


def _weights(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s, generator=g) * 0.05 for s in ((F, H), (F, H), (H, F)))


@pytest.fixture(autouse=True)
def _torch_one_thread():
    """torch on one thread, as the engine runs it (fate's pool owns the threads): with more, a BLAS may split a
    product's sums differently by its shape, and a concatenated gate_up product would not round as the gate
    and up products apart do."""
    was = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(was)


@pytest.fixture(scope="module")
def blobs():
    """precision → (blob, layout); the blob is a fresh uint8 tensor, as the map or a slot would hold it."""
    w = _weights()
    out = {}
    for p in PRECISIONS:
        spec = QuantSpec.default(p)
        layout = expert_blob_layout(H, F, spec)
        raw = pack_expert(*w, spec)
        blob = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if not isinstance(raw, torch.Tensor) else raw
        assert blob.numel() >= layout.size
        out[p] = (blob.contiguous(), layout)
    return out


def _x(T: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(T, H, generator=torch.Generator().manual_seed(seed))


NATIVE = [False, pytest.param(True, marks=pytest.mark.skipif(not K.available(), reason="native kernel unavailable"))]


def _kernels(native: bool) -> str:
    """--kernels for the old on/off switch: fp32 is the reference INT4 product (float32 activations),
    torch the torch path only."""
    return "fp32" if native else "torch"


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("p", PRECISIONS)
def test_dense_and_weights_are_unpack_expert_bit_for_bit(blobs, p, native):
    blob, layout = blobs[p]
    gate, up, down = unpack_expert(blob, layout)
    c = ExpertCompute(layout, torch.float32, "cpu", kernels=_kernels(native))
    assert c.native == (native and p != "q2")  # fp32: the reference q4 product and f16 in registers; q2 torch
    view = c.view(blob)
    g2, u2, d2 = c.dense(view)
    assert torch.equal(g2, gate) and torch.equal(u2, up) and torch.equal(d2, down)
    gu, dn = c.weights(view)
    assert gu.shape == (2 * F, H) and dn.shape == (H, F)
    assert torch.equal(gu, torch.cat([gate, up])) and torch.equal(dn, down)
    # dense() gives fresh tensors: a later call into the scratch does not change them
    c.weights(c.view(torch.zeros_like(blob)))
    assert torch.equal(g2, gate)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", PRECISIONS)
def test_dense_in_narrow_dtypes_rounds_like_unpack_expert(blobs, p, dtype):
    blob, layout = blobs[p]
    want = unpack_expert(blob, layout, dtype=dtype)
    got = ExpertCompute(layout, dtype, "cpu").dense(ExpertView(blob, layout))
    for w, g in zip(want, got):
        assert g.dtype == dtype and torch.equal(g, w)


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("p", ("q4", "q2"))
def test_widened_expert_dequantizes_to_the_same_bits(blobs, p, native):
    blob, layout = blobs[p]
    view = ExpertView(blob, layout)
    wide = view.widen()
    assert isinstance(wide, WidenedExpert) and wide.codes.dtype == torch.uint8
    n, g = 3 * H * F, layout.spec.group_size
    assert wide.codes.shape == (n // g, g) and wide.scale.shape == (n // g, 1)
    assert int(wide.codes.max()) < 2 ** layout.spec.bits
    assert wide.nbytes == n + 2 * 4 * (n // g)
    c = ExpertCompute(layout, torch.float32, "cpu", kernels=_kernels(native))
    for got, want in zip(c.dense(wide), unpack_expert(blob, layout)):
        assert torch.equal(got, want)
    # any group-aligned range of the flat expert
    out = torch.empty(4 * g)
    wide.dequantize_into(out, out, start=8 * g, end=12 * g)
    assert torch.equal(out, torch.cat([w.reshape(-1) for w in unpack_expert(blob, layout)])[8 * g:12 * g])


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("p", PRECISIONS)
def test_swiglu_on_several_tokens_equals_swiglu_over_unpack_expert(blobs, p, native):
    blob, layout = blobs[p]
    want_w = unpack_expert(blob, layout)
    c = ExpertCompute(layout, torch.float32, "cpu", kernels=_kernels(native))
    sources = [c.view(blob)] + ([c.view(blob).widen()] if layout.spec.is_quantized else [])
    for T in (2, 5):
        x = _x(T)
        want = swiglu(x, *want_w)
        for src in sources:
            if c.batched_native and isinstance(src, ExpertView):  # f16 batches tiled in registers: rounding
                torch.testing.assert_close(c.swiglu(src, x), want, rtol=1e-4, atol=1e-6)
                continue
            assert torch.equal(c.swiglu(src, x), want), (type(src).__name__, T)
            out = torch.empty(T, H)
            assert c.swiglu(src, x, out) is out and torch.equal(out, want)
    # swiglu is what the name says
    x = _x(3)
    gate, up, down = want_w
    assert torch.allclose(swiglu(x, gate, up, down), (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T,
                          atol=1e-5)


@pytest.mark.parametrize("p", PRECISIONS)
def test_one_token_false_on_one_row_takes_the_exact_path(blobs, p):
    """An expert that got one token of a prefill is computed as its batch is: where batches take the torch
    path (the fp32 reference kernel serves one-token q4 only), dequantized weights and a matmul, never the
    one-token native product (which rounds differently)."""
    blob, layout = blobs[p]
    x = _x(1, seed=7)
    want = swiglu(x, *unpack_expert(blob, layout))
    c = ExpertCompute(layout, torch.float32, "cpu", kernels="fp32" if p != "f16" else "torch", chunk_bytes=4096)
    assert torch.equal(c.swiglu(c.view(blob), x, one_token=False), want)
    if p != "f16":
        assert torch.equal(c.swiglu(c.view(blob).widen(), x, one_token=False), want)


@pytest.mark.skipif(not K.available(), reason="native kernel unavailable")
def test_one_token_q4_uses_the_native_product(blobs):
    blob, layout = blobs["q4"]
    c = ExpertCompute(layout, torch.float32, "cpu", kernels="fp32")
    view = c.view(blob)
    x = _x(1, seed=3)
    got = c.swiglu(view, x)
    assert torch.equal(got, K.q4_swiglu(x, *view.parts))  # the kernel's product, not the dequantized one
    want = swiglu(x, *unpack_expert(blob, layout))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # the same function up to rounding
    assert torch.equal(c.swiglu(view, x, one_token=True), got)
    out = torch.empty(1, H)
    assert c.swiglu(view, x, out) is out and torch.equal(out, got)


@pytest.mark.parametrize("p", PRECISIONS)
def test_row_blocks_give_the_same_bits(blobs, p):
    """chunk_bytes smaller than the expert: one-token calls widen and multiply gate_up and down in row
    blocks (f16 views and widened experts; a packed quantized view dequantizes whole)."""
    blob, layout = blobs[p]
    whole = ExpertCompute(layout, torch.float32, "cpu", kernels="torch")
    blocked = ExpertCompute(layout, torch.float32, "cpu", kernels="torch", chunk_bytes=16 * H * 4)
    assert whole.gu_blocks is None and blocked.gu_blocks is not None and len(blocked.gu_blocks) > 2
    assert len(blocked.down_blocks) > 2
    src = blocked.view(blob) if p == "f16" else blocked.view(blob).widen()
    x = _x(1, seed=11)
    want = whole.swiglu(src, x)
    assert torch.equal(want, swiglu(x, *unpack_expert(blob, layout)))
    got = blocked.swiglu(src, x)
    assert torch.equal(got, want)
    out = torch.empty(1, H)
    assert blocked.swiglu(src, x, out) is out and torch.equal(out, want)
    if p != "f16":  # a packed view is dequantized whole even when blocked
        assert torch.equal(blocked.swiglu(blocked.view(blob), x), want)
    # blocks are not used for GPU devices or batches
    assert ExpertCompute(layout, torch.float32, "meta", chunk_bytes=64).gu_blocks is None


def test_row_blocks_cover_every_row_in_multiples_of_16():
    for rows, cols, budget in ((384, 128, 16 * 128 * 4), (100, 64, 10_000), (8, 64, 1), (384, 128, 1 << 30)):
        blocks = row_blocks(rows, cols, budget)
        assert blocks[0][0] == 0 and blocks[-1][1] == rows
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
        assert all((r1 - r0) % 16 == 0 for r0, r1 in blocks[:-1])
        assert all((r1 - r0) * cols * 4 <= max(budget, 16 * cols * 4) for r0, r1 in blocks)
    assert row_blocks(8, 64, 1) == [(0, 8)]


def test_expert_view_is_a_view_of_the_blob(blobs):
    for p in PRECISIONS:
        blob, layout = blobs[p]
        v = ExpertView(blob, layout)
        assert v.is_view, p
        assert len(v.parts) == 3 and all(len(part) == (3 if p != "f16" else 1) for part in v.parts)
        if p == "f16":
            assert v.flat16 is not None and v.flat16.numel() == 3 * H * F
    # a blob at an odd byte offset: its float16 parts (q4/q2 scales, f16 weights) cannot be views, so they
    # are copied, and the expert computes the same
    for p in PRECISIONS:
        blob, layout = blobs[p]
        odd = torch.empty(blob.numel() + 1, dtype=torch.uint8)[1:]
        odd.copy_(blob)
        v = ExpertView(odd, layout)
        assert not v.is_view, p
        c = ExpertCompute(layout, torch.float32, "cpu", kernels="torch")
        for got, want in zip(c.dense(v), unpack_expert(blob, layout)):
            assert torch.equal(got, want), p
        x = _x(2)
        assert torch.equal(c.swiglu(v, x), swiglu(x, *unpack_expert(blob, layout))), p


def test_native_q4_is_the_one_test_of_the_kernel():
    q4, q2, f16 = QuantSpec.default("q4"), QuantSpec.default("q2"), QuantSpec.default("f16")
    assert native_q4(q4, "cpu", torch.float32) == K.available()
    assert not native_q4(q4, "cpu", torch.float16) and not native_q4(q4, "meta", torch.float32)
    assert not native_q4(q2, "cpu", torch.float32) and not native_q4(f16, "cpu", torch.float32)
    assert not native_q4(QuantSpec.default("q4", group_size=128), "cpu", torch.float32)


def test_partial_ranges_only_where_they_are_exact(blobs):
    blob, layout = blobs["q4"]
    v = ExpertView(blob, layout)
    buf = torch.empty(64)
    with pytest.raises(ValueError, match="dequantizes whole"):
        v.dequantize_into(buf, buf, False, 0, 64)
    blob, layout = blobs["f16"]
    v = ExpertView(blob, layout)
    v.dequantize_into(buf, buf, False, 64, 128)
    assert torch.equal(buf, unpack_expert(blob, layout)[0].reshape(-1)[64:128])
