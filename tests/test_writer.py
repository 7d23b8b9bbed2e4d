"""fate.formats.writer.BundleWriter: tensors at aligned offsets in both containers, bytes landing where
fate.formats.bundle.Bundle reads them, and the converter's own files reproduced from their plan."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fate
from fate.errors import ChecksumError
from fate.formats import constants as C
from fate.formats.bundle import Bundle
from fate.formats.writer import BundleWriter, TensorPlan
from tests.tiny_models import make_checkpoint

FORMATS = ("gguf", "safetensors")
META = {C.K_GENERAL_ARCH: "olmoe", C.MAGIC_KEY: C.FORMAT_VERSION, "fate.test.note": "written by test_writer",
        "fate.test.ints": [1, 2, 3]}
# odd sizes, so that every tensor but the first needs padding before it
PLANS = [TensorPlan("a.f32", "F32", (3,)), TensorPlan("b.i8", "I8", (4, 10)), TensorPlan("c.f16", "F16", (7, 3)),
         TensorPlan("d.bf16", "BF16", (5,)), TensorPlan("e.i64", "I64", (1,)), TensorPlan("f.i8", "I8", (1,))]


def _make(path, fmt, alignment=64, plans=PLANS) -> BundleWriter:
    return BundleWriter(path, fmt, META, plans, alignment)


@pytest.mark.parametrize("alignment", [8, 64, 256])
@pytest.mark.parametrize("fmt", FORMATS)
def test_tensors_start_at_aligned_offsets_without_overlap(tmp_path, fmt, alignment):
    path = tmp_path / f"t.{fmt}"
    w = _make(path, fmt, alignment)
    w.close()
    assert path.stat().st_size == w.size  # the size is fixed when the header is written
    spans = sorted((w.offsets[p.name], w.offsets[p.name] + p.nbytes) for p in PLANS)
    assert all(start % alignment == 0 for start, _ in spans)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    assert spans[-1][1] <= w.size
    b = Bundle(path)
    for p in PLANS:  # the reader finds each tensor where the writer put it, with its dtype and shape
        e = b.tensors[p.name]
        assert (e.offset, e.dtype, e.shape, e.nbytes) == (w.offsets[p.name], p.dtype, p.shape, p.nbytes)
    assert len(b.tensors) == len(PLANS)  # safetensors' padding tensors are not the bundle's
    assert b.metadata["fate.test.note"] == META["fate.test.note"] and b.metadata["fate.test.ints"] == [1, 2, 3]


@pytest.mark.parametrize("fmt", FORMATS)
def test_bytes_written_at_an_offset_land_where_bundle_reads_them(tmp_path, fmt):
    path = tmp_path / f"t.{fmt}"
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(-128, 128, (4, 10), generator=g, dtype=torch.int8)
    f32 = np.array([1.5, -2.25, 3e-8], dtype=np.float32)
    f16 = torch.randn(7, 3, generator=g).half()
    bf16 = torch.randn(5, generator=g).bfloat16()
    w = _make(path, fmt)
    for r in (3, 0, 2, 1):  # any order, a row at a time, as the converter writes expert blobs
        w.write("b.i8", rows[r].numpy().tobytes(), byte_offset=r * 10)
    w.write("a.f32", f32)
    w.write("c.f16", f16)
    w.write("d.bf16", bf16)  # torch bfloat16 is written as its raw 16-bit words
    w.write("e.i64", torch.tensor([-(2**40)], dtype=torch.int64))
    w.write("f.i8", b"\x7f")
    w.close()
    b = Bundle(path)
    assert torch.equal(b.tensor("b.i8"), rows)
    assert np.array_equal(b.tensor("a.f32").numpy(), f32)
    assert torch.equal(b.tensor("c.f16"), f16) and torch.equal(b.tensor("d.bf16"), bf16)
    assert b.tensor("e.i64").tolist() == [-(2**40)] and b.tensor("f.i8").tolist() == [127]
    raw = path.read_bytes()
    off = w.offsets["b.i8"]
    assert raw[off + 20:off + 30] == rows[2].numpy().tobytes()  # and it is where the offsets say in the file


@pytest.mark.parametrize("fmt", FORMATS)
def test_writes_outside_a_tensor_raise(tmp_path, fmt):
    w = _make(tmp_path / f"t.{fmt}", fmt)
    with pytest.raises(ValueError, match="overflows tensor b.i8 .40 bytes"):
        w.write("b.i8", bytes(41))
    with pytest.raises(ValueError, match="overflows"):
        w.write("b.i8", bytes(10), byte_offset=31)
    with pytest.raises(ValueError, match="overflows"):
        w.write("b.i8", bytes(1), byte_offset=-1)
    with pytest.raises(ValueError, match="overflows tensor a.f32"):
        w.write("a.f32", np.zeros(4, dtype=np.float32))
    w.write("b.i8", bytes(10), byte_offset=30)  # the last row exactly fits
    with pytest.raises(KeyError):
        w.write("nope", b"\0")
    w.close()


def test_bad_plans_and_formats_are_refused(tmp_path):
    for alignment in (0, 4, 48, 100):
        with pytest.raises(ValueError, match="power of two"):
            _make(tmp_path / "x.gguf", "gguf", alignment)
    with pytest.raises(ValueError, match="duplicate"):
        _make(tmp_path / "x.gguf", "gguf", plans=PLANS + [TensorPlan("a.f32", "F32", (1,))])
    with pytest.raises(ValueError, match="unknown bundle format"):
        _make(tmp_path / "x.bin", "npz")
    assert TensorPlan("x", "I64", (3, 5)).nbytes == 120 and TensorPlan("x", "BF16", ()).nbytes == 2


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """fmt → a converted tiny DeepSeekMoE bundle (q4 experts, calibration; written without transformers)."""
    d = tmp_path_factory.mktemp("writer")
    make_checkpoint("deepseek", d / "ckpt", n_layers=2)
    out = {}
    for fmt in FORMATS:
        out[fmt] = d / f"model.{fmt}"
        fate.convert(d / "ckpt", out[fmt], experts="q4", calib_tokens=64, progress=False)
    return out


def _replan(b: Bundle):
    return [TensorPlan(t.name, t.dtype, t.shape) for t in b.tensors.values()]


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_converters_file_is_reproduced_from_its_plan(bundles, tmp_path, fmt):
    """Metadata and tensor table read back from a converted bundle, written again tensor by tensor in
    reverse order: the same file, byte for byte (the writer is the converter's whole layout)."""
    b = Bundle(bundles[fmt])
    path = tmp_path / f"again.{fmt}"
    w = BundleWriter(path, fmt, dict(b.metadata), _replan(b), b.metadata[C.K_EXPERT_ALIGNMENT])
    for name in reversed(list(b.tensors)):
        w.write(name, b.raw(name).numpy())
    w.close()
    assert path.read_bytes() == bundles[fmt].read_bytes()


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_aborted_write_leaves_a_file_the_runtime_refuses(bundles, tmp_path, fmt):
    b = Bundle(bundles[fmt])
    expert = C.T_EXPERTS.format(i=1, p="q4")
    stride = b.tensors[expert].shape[1]
    # everything written but one expert's blob: the load succeeds, the first read of that expert does not
    path = tmp_path / f"partial.{fmt}"
    w = BundleWriter(path, fmt, dict(b.metadata), _replan(b), b.metadata[C.K_EXPERT_ALIGNMENT])
    for name in b.tensors:
        data = b.raw(name).numpy()
        if name == expert:
            w.write(name, data[:3 * stride])
            w.write(name, data[4 * stride:], byte_offset=4 * stride)
        else:
            w.write(name, data)
    w.abort()
    m = fate.load(path)
    assert torch.equal(m.store.blob(1, 2, "q4"), Bundle(bundles[fmt]).expert_blob(1, "q4", 2))
    with pytest.raises(ChecksumError, match="expert 3 of layer 1"):
        m.store.blob(1, 3, "q4")
    m.close()
    # aborted before the non-expert tensors were written: refused at load
    path = tmp_path / f"empty.{fmt}"
    w = BundleWriter(path, fmt, dict(b.metadata), _replan(b), b.metadata[C.K_EXPERT_ALIGNMENT])
    w.abort()
    with pytest.raises(ChecksumError, match="checksum mismatch in tensor"):
        fate.load(path)
