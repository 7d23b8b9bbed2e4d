"""Tests for fate.quant: hqq quantization, our bit packing, the expert blob layout and unpacking."""

import mmap
import warnings

import numpy as np
import pytest
import torch

import fate.quant.layout as layout
from fate.quant import (
    ALIGNMENT,
    QuantSpec,
    blob_views,
    dequantize_weight,
    expert_blob_layout,
    hqq_reference_dequant,
    pack_codes,
    pack_expert,
    quantize_weight,
    unpack_codes,
    unpack_expert,
)

H, F = 64, 128  # small expert: gate/up [F, H], down [H, F]


def _expert(seed: int = 0, h: int = H, f: int = F):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g) * 0.02 for shape in ((f, h), (f, h), (h, f)))


@pytest.fixture(scope="module")
def expert():
    return _expert()


@pytest.fixture(scope="module")
def blobs(expert):
    return {name: pack_expert(*expert, QuantSpec.default(name)) for name in ("q4", "q2", "f16")}


def test_spec_defaults_and_validation():
    assert QuantSpec.default("q4") == QuantSpec("q4", 4, 64)
    assert QuantSpec.default("q2") == QuantSpec("q2", 2, 32)
    assert QuantSpec.default("f16") == QuantSpec("f16", 16, 0)
    assert QuantSpec.default("q4", group_size=128).group_size == 128
    assert QuantSpec.from_dict(QuantSpec.default("q2").to_dict()) == QuantSpec.default("q2")
    with pytest.raises(ValueError):
        QuantSpec("q4", 2, 64)  # bits disagree with name
    with pytest.raises(ValueError):
        QuantSpec("q2", 2, 30)  # group of 30 2-bit codes is not whole bytes
    with pytest.raises(ValueError):
        QuantSpec.default("q3")


@pytest.mark.parametrize("name", ["q4", "q2"])
def test_roundtrip_matches_hqq_dequantize(expert, blobs, name):
    """unpack(pack(w)) is bit-identical to hqq's Quantizer.dequantize once hqq's float32 scale/zero are
    rounded to float16 (what the blob stores): both compute (q - zero) * scale in float32 with the
    same codes.  Against hqq's unrounded float32 meta it differs only by that fp16 rounding."""
    spec = QuantSpec.default(name)
    layout = expert_blob_layout(H, F, spec)
    blob = blobs[name]
    assert blob.dtype == np.uint8 and blob.shape == (layout.size,)
    got = unpack_expert(torch.from_numpy(blob), layout)
    for w, r in zip(expert, got):
        assert r.dtype == torch.float32 and r.shape == w.shape
        assert torch.equal(r, hqq_reference_dequant(w, spec))
        ref32 = hqq_reference_dequant(w, spec, fp16_meta=False)
        # fp16 keeps 11 significant bits: (q - z) * s moves by at most a few 2^-11 of a group's range
        assert (r - ref32).abs().max() <= 2.0**-8 * w.abs().max()


def test_quantize_weight_matches_blob(expert, blobs):
    spec = QuantSpec.default("q4")
    qw = quantize_weight(expert[0], spec)
    assert qw.packed.dtype == torch.uint8 and qw.packed.shape == (F, H // 2)
    assert qw.scale.dtype == torch.float16 and qw.scale.shape == (F, H // 64)
    views = blob_views(blobs["q4"], expert_blob_layout(H, F, spec))
    assert torch.equal(views["gate.packed"], qw.packed)
    assert torch.equal(views["gate.scale"], qw.scale)
    assert torch.equal(views["gate.zero"], qw.zero)
    assert torch.equal(dequantize_weight(qw), dequantize_weight((qw.packed, qw.scale, qw.zero), qw.shape, spec))


def test_f16_roundtrip_exact(expert, blobs):
    layout = expert_blob_layout(H, F, QuantSpec.default("f16"))
    assert blobs["f16"].shape == (layout.size,)
    blob = torch.from_numpy(blobs["f16"])
    for w, r in zip(expert, unpack_expert(blob, layout, dtype=torch.float16)):
        assert r.dtype == torch.float16 and torch.equal(r, w.half())
    for w, r in zip(expert, unpack_expert(blob, layout)):
        assert r.dtype == torch.float32 and torch.equal(r, w.half().float())
    for w, r in zip(expert, unpack_expert(blob, layout, dtype=torch.bfloat16)):
        assert r.dtype == torch.bfloat16 and torch.equal(r, w.half().bfloat16())


def test_layout_q4_sizes_and_alignment():
    layout = expert_blob_layout(H, F, QuantSpec.default("q4"))
    gate = layout.gate
    assert gate.shape == (128, 64)
    # [128, 64] at 4 bits: 4096 bytes of codes, then 128 groups * 2 bytes of scale, then of zero
    assert (gate.packed.offset, gate.packed.nbytes, gate.packed.shape, gate.packed.dtype) == (0, 4096, (128, 32), "uint8")
    assert (gate.scale.offset, gate.scale.nbytes, gate.scale.shape, gate.scale.dtype) == (4096, 256, (128, 1), "float16")
    assert (gate.zero.offset, gate.zero.nbytes) == (4352, 256)
    assert layout.up.packed.offset == 4608
    assert layout.down.shape == (64, 128) and layout.down.scale.shape == (64, 2)
    assert layout.size == 3 * (4096 + 256 + 256) == 13824
    assert layout.stride() == 13824


@pytest.mark.parametrize("name", ["q4", "q2", "f16"])
@pytest.mark.parametrize("hidden,ffn", [(64, 128), (2048, 1408), (192, 320)])
def test_layout_parts_aligned_and_packed(name, hidden, ffn):
    spec = QuantSpec.default(name)
    layout = expert_blob_layout(hidden, ffn, spec)
    parts = layout.parts
    assert len(parts) == (9 if spec.is_quantized else 3)
    prev_end = 0
    for p in parts:
        assert p.offset % ALIGNMENT == 0
        assert prev_end <= p.offset < prev_end + ALIGNMENT  # no gap beyond alignment padding
        assert p.nbytes == int(np.prod(p.shape)) * np.dtype(p.numpy_dtype).itemsize
        prev_end = p.end
    assert layout.size == parts[-1].end
    expected = 0
    for o, i in ((ffn, hidden), (ffn, hidden), (hidden, ffn)):
        if spec.is_quantized:
            expected += o * i * spec.bits // 8 + 2 * (o * (i // spec.group_size) * 2)
        else:
            expected += o * i * 2
    assert layout.size - expected < len(parts) * ALIGNMENT


def test_group_size_must_divide_input_dim():
    spec = QuantSpec.default("q4")
    with pytest.raises(ValueError, match=r"in=96.*e\.g\. 32"):
        quantize_weight(torch.randn(16, 96), spec)
    with pytest.raises(ValueError, match=r"down .*in=100"):
        expert_blob_layout(64, 100, spec)
    with pytest.raises(ValueError, match="in=96"):
        pack_expert(torch.randn(128, 96), torch.randn(128, 96), torch.randn(96, 128), spec)
    with pytest.raises(ValueError, match=r"in=72.*e\.g\. 24"):  # not a power of two, but divides
        quantize_weight(torch.randn(4, 72), QuantSpec.default("q2"))
    with pytest.raises(ValueError, match="f16"):  # nothing byte aligned divides 7: suggest f16
        quantize_weight(torch.randn(4, 7), QuantSpec.default("q2"))
    # f16 has no groups
    assert quantize_weight(torch.randn(4, 7), QuantSpec.default("f16")).packed.shape == (4, 7)


def test_pack_expert_checks_shapes():
    g, u, d = _expert()
    with pytest.raises(ValueError, match="down"):
        pack_expert(g, u, d.t(), QuantSpec.default("q4"))


def test_q4_more_accurate_than_q2(expert, blobs):
    errs = {}
    for name in ("q4", "q2"):
        got = unpack_expert(blobs[name], expert_blob_layout(H, F, QuantSpec.default(name)))
        errs[name] = max(float((r - w).norm() / w.norm()) for w, r in zip(expert, got))
    assert errs["q4"] < 0.15
    assert errs["q2"] < 0.6
    assert errs["q4"] < errs["q2"]


def test_bit_packing_byte_layout():
    q4 = torch.tensor([[1, 2, 3, 4, 15, 0]], dtype=torch.uint8)
    assert pack_codes(q4, 4).tolist() == [[0x21, 0x43, 0x0F]]
    q2 = torch.tensor([[1, 2, 3, 0, 3, 3, 3, 3]], dtype=torch.uint8)
    assert pack_codes(q2, 2).tolist() == [[1 | 2 << 2 | 3 << 4, 0xFF]]
    g = torch.Generator().manual_seed(1)
    for bits in (4, 2):
        q = torch.randint(0, 2**bits, (5, 64), dtype=torch.uint8, generator=g)
        p = pack_codes(q, bits)
        assert p.shape == (5, 64 * bits // 8)
        assert torch.equal(unpack_codes(p, bits), q)


def test_portable_unpack_path(monkeypatch):
    g = torch.Generator().manual_seed(2)
    for bits in (4, 2):
        q = torch.randint(0, 2**bits, (3, 32), dtype=torch.uint8, generator=g)
        p = pack_codes(q, bits)
        monkeypatch.setattr(layout, "_LITTLE_ENDIAN", False)
        slow = unpack_codes(p, bits)
        monkeypatch.setattr(layout, "_LITTLE_ENDIAN", True)
        assert torch.equal(slow, q) and torch.equal(unpack_codes(p, bits), q)


def test_out_buffers_and_dtypes(blobs):
    layout = expert_blob_layout(H, F, QuantSpec.default("q4"))
    ref = unpack_expert(blobs["q4"], layout)
    out = tuple(torch.full(m.shape, float("nan")) for m in layout.matrices)
    got = unpack_expert(blobs["q4"], layout, out=out)
    assert all(a is b for a, b in zip(got, out))
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    bf = unpack_expert(blobs["q4"], layout, dtype=torch.bfloat16)
    assert all(b.dtype == torch.bfloat16 and torch.equal(b, r.bfloat16()) for b, r in zip(bf, ref))
    out16 = tuple(torch.empty(m.shape, dtype=torch.bfloat16) for m in layout.matrices)
    got16 = unpack_expert(blobs["q4"], layout, dtype=torch.bfloat16, out=out16)
    assert all(a is b and torch.equal(a, r) for a, b, r in zip(got16, out16, bf))
    with pytest.raises(ValueError, match="out must"):
        unpack_expert(blobs["q4"], layout, out=(out[0], out[0], out[0]))


def test_realistic_shape_dequant_matches_formula():
    """A Qwen1.5-MoE sized matrix (no hqq, so it is quick): dequant equals the documented formula."""
    out_f, in_f = 1408, 2048
    for name in ("q4", "q2"):
        spec = QuantSpec.default(name)
        g = torch.Generator().manual_seed(3)
        q = torch.randint(0, 2**spec.bits, (out_f, in_f), dtype=torch.uint8, generator=g)
        n_groups = in_f // spec.group_size
        scale = (torch.rand(out_f, n_groups, generator=g) * 0.01).half()
        zero = (torch.rand(out_f, n_groups, generator=g) * (2**spec.bits - 1)).half()
        w = dequantize_weight((pack_codes(q, spec.bits), scale, zero), (out_f, in_f), spec)
        cols = torch.arange(in_f) // spec.group_size
        expected = (q.float() - zero.float()[:, cols]) * scale.float()[:, cols]
        assert torch.equal(w, expected)


@pytest.mark.parametrize("name", ["q4", "q2", "f16"])
def test_unpack_from_readonly_mmap(tmp_path, blobs, name):
    """Blobs read from a read-only memory map: parts are zero-copy views into the mapping, results
    match the in-memory unpack, and the file is not modified.  A blob at an odd file offset still
    works (float16 parts are then copied)."""
    layout = expert_blob_layout(H, F, QuantSpec.default(name))
    blob = blobs[name]
    stride = layout.stride()
    path = tmp_path / "experts.bin"
    data = np.zeros(64 + 2 * stride + 1, dtype=np.uint8)
    data[64 : 64 + layout.size] = blob  # aligned blob
    data[65 + stride : 65 + stride + layout.size] = blob  # blob at an odd offset
    path.write_bytes(data.tobytes())
    ref = unpack_expert(torch.from_numpy(blob), layout)

    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # non-writable buffer: we never write
            whole = torch.frombuffer(mm, dtype=torch.uint8)
        base = whole.data_ptr()
        assert base == np.frombuffer(mm, dtype=np.uint8).ctypes.data  # tensor is the mapping itself
        for start in (64, 65 + stride):
            view = whole[start : start + layout.size]
            parts = blob_views(view, layout)
            if start == 64:
                for t in parts.values():
                    assert base + start <= t.data_ptr() < base + start + layout.size
            else:
                assert all(base <= parts[k].data_ptr() < base + data.size for k in parts if k.endswith("packed") and name != "f16")
            got = unpack_expert(view, layout)
            for a, b in zip(got, ref):
                assert torch.equal(a, b)
                assert not (base <= a.data_ptr() < base + data.size)
        del whole, view, parts, got
        mm.close()

    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    got = unpack_expert(mapped[64 : 64 + layout.size], layout)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    del mapped
    assert path.read_bytes() == data.tobytes()


def test_non_finite_meta_rejected():
    w = torch.randn(4, 64) * 0.02
    w[1, 3] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        quantize_weight(w, QuantSpec.default("q4"), what="up")
    with pytest.raises(ValueError, match="not finite"):
        quantize_weight(w * 1e7, QuantSpec.default("f16"))


@pytest.mark.parametrize("name", ["q4", "q2", "f16"])
def test_unpack_stays_on_blob_device(blobs, name):
    """Dequantization runs where the blob is (the runtime may move blobs to an accelerator); the
    meta device checks this without one."""
    layout = expert_blob_layout(H, F, QuantSpec.default(name))
    blob = torch.from_numpy(blobs[name]).to("meta")
    for dtype in (torch.float32, torch.bfloat16):
        for m, t in zip(layout.matrices, unpack_expert(blob, layout, dtype=dtype)):
            assert t.device.type == "meta" and t.dtype == dtype and tuple(t.shape) == m.shape
    with pytest.raises(ValueError, match="on meta"):
        unpack_expert(blob, layout, out=tuple(torch.empty(m.shape) for m in layout.matrices))
