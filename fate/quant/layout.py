"""The byte format of one routed expert, and the code that reads it.

The converter writes it (:func:`fate.quant.hqq.pack_expert`) and the runtime reads it (``unpack_expert``,
the native kernels, :class:`fate.quant.expert.ExpertView`); the byte format below is defined here and
nowhere else.

Precisions
----------
``q4``  HQQ 4-bit, asymmetric, one (scale, zero) pair per group of ``group_size`` (default 64)
        consecutive weights of a row.
``q2``  HQQ 2-bit, same scheme, default group size 32.
``f16`` plain IEEE float16 weights.

Quantization is done by the ``hqq`` library (``hqq.core.quantize.Quantizer.quantize`` with
``optimize=True, axis=1``: half-quadratic optimisation of the zero point, groups along the input
dimension).  Dequantization is ``w = (q - zero) * scale`` computed in float32, exactly what
``Quantizer.dequantize`` does (hqq's ``meta["scale"]`` is already the reciprocal of the quantization
multiplier, so no division is needed).  Scale and zero come back from hqq as float32 and are stored
as float16; the codes were chosen by hqq against the float32 values, so an unpacked weight equals
hqq's own float32 round trip up to that float16 rounding, and equals ``Quantizer.dequantize`` fed
with the float16-rounded scale/zero bit for bit (``hqq_reference_dequant``).

Notes on hqq 0.2.x (checked against the installed source): ``Quantizer.quantize`` defaults to
``device="cuda"`` (we pass "cpu"); it only asserts that the element count is a multiple of the group
size, so with ``axis=1`` groups would silently straddle rows (we require ``in % group_size == 0``);
with ``bitpack=False`` the codes come back as float32 of shape [out * in / g, g]; the inverse scale
is clamped to 2e4 (groups with a range below 1e-4 get scale 1); ``Quantizer.dequantize`` casts the
codes to float16 unless ``meta["compute_dtype"]`` is set (float32 scale/zero still promote the
arithmetic to float32); hqq's own bit packing (first half of the rows in the high nibbles) is not
used here.

Byte format of one expert blob (all multi-byte values little-endian)
---------------------------------------------------------------------
An expert has three matrices in Hugging Face ``[out, in]`` layout, H = hidden size, F = expert FFN
size: ``gate`` [F, H], ``up`` [F, H], ``down`` [H, F].  They are stored in that order.  Every part
listed below starts at an offset (from the start of the blob) that is a multiple of 64; the bytes
between the end of one part and the start of the next are zero.  The blob's size is the end of its
last part (no trailing padding; a container may pad blobs to a stride).

Quantized blob (``q4``/``q2``, ``bits`` b, group size g, for each matrix [out, in] in turn)::

    packed   uint8   [out, in * b / 8]   quantized codes q (0 .. 2^b - 1), row-major
    scale    float16 [out, in / g]       scale of group j of row r at index r * (in / g) + j
    zero     float16 [out, in / g]       zero point, same indexing

Group j of row r covers the input columns ``j*g .. j*g + g - 1`` of that row; weight
``w[r, c] = (q[r, c] - zero[r, c // g]) * scale[r, c // g]`` (evaluated in float32).  ``in`` must be
a multiple of g, and g * b a multiple of 8, so every row and every group starts on a byte boundary.

Bit packing of the codes, row by row (c = input column, byte index counted from the row start):

* 4-bit: two codes per byte.  Code c = 2j is in the low nibble (bits 0..3) and code c = 2j + 1 in
  the high nibble (bits 4..7) of byte j:  ``byte[j] = q[2j] | (q[2j+1] << 4)``.
* 2-bit: four codes per byte.  Code c = 4j + k (k = 0..3) is in bits 2k..2k+1 of byte j:
  ``byte[j] = q[4j] | (q[4j+1] << 2) | (q[4j+2] << 4) | (q[4j+3] << 6)``.

Because the packing runs along rows and groups are byte aligned, it is equally "along each group".

Float16 blob (``f16``): ``gate``, ``up``, ``down`` as float16 row-major ``[out, in]``, each part at a
64-byte aligned offset.

Group sizes: gate and up (input dimension H) use the precision's group size g; down (input dimension F)
uses its own, ``g_down`` (the same unless g does not divide F, see ``fallback_group_size``).

Biases (experts with biases only, gpt-oss), after the three matrices, each at a 64-byte aligned offset::

    gate_up_bias  float32 [2F]   gate's F biases, then up's F
    down_bias     float32 [H]

float32 holds a bfloat16 or float16 checkpoint's biases exactly; a blob without biases is unchanged.

Example: q4, g = 64, a [128, 64] matrix takes 128 * 32 = 4096 bytes of codes, then 128 groups * 2 bytes
of scale at offset 4096 (256 bytes), then 256 bytes of zero at offset 4352.

Dequantization speed
--------------------
Measured with ``benchmarks/dequant.py`` (which prints the full table and ratios) on a 2-core AMD EPYC
(Zen 4, AVX-512) VM shared with other jobs, so best-of-N times; Qwen1.5-MoE expert H=2048, F=1408.
Per [1408, 2048] matrix, 2 threads:

* unpacking the codes: widening each byte into a 16-bit word, ``t | (t << 4)`` masked with 0x0F0F
  and reinterpreted as bytes, 0.14 ms; ``torch.stack((b & 15, b >> 4), -1)`` 0.54 ms (x3.9), two
  strided ``out=`` writes 0.85 ms (x6), a broadcast shift 1.4 ms (x10).  2-bit: widening to int32
  (``t | t<<6 | t<<12 | t<<18`` masked with 0x03030303) 0.30 ms vs 0.59 ms for ``torch.stack``;
* codes -> float32 weights: ``w.copy_(q); w.sub_(zero); w.mul_(scale)`` (same-dtype in-place ops
  broadcast over the group) 0.25 ms; mixed uint8/float ops (``torch.sub(q, zero, out=w)``) 0.35-0.54
  ms, ``(q - zero) * scale`` into fresh tensors 0.42-0.6 ms, ``addcmul`` 0.95 ms, bfloat16 computed
  directly 0.72 ms, float32 then cast to bfloat16 0.39 ms (so other dtypes go through float32).

Whole expert (three matrices, blob -> dense), with ``out=`` buffers reused / with fresh tensors:
q4 float32 1.8-2.1 / 2.1-9 ms (1 thread: 4.5 / 11.7 ms), q4 bfloat16 2.0-2.2 ms, q2 float32
3.0 / 3.3-13 ms, f16 float32 0.6-1.3 ms, f16 -> bfloat16 1.0 ms (via float32: torch's direct
float16 -> bfloat16 cast is 5x slower); fresh-tensor times swing with page faults.  For scale, the expert's three one-token matmuls take 1.85 ms with float32
weights and 0.76 ms with bfloat16 weights (they no longer fit the 32 MiB L3).  Fixed Python
overhead of ``unpack_expert`` is about 0.1 ms per expert.  So: reuse ``out=`` buffers, and consider
bfloat16 weights (dequant slightly slower, matmul 2x faster).  Little-endian hosts use the fast
unpack path; others fall back to a portable (slower) one.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = [
    "ALIGNMENT",
    "PRECISIONS",
    "QuantSpec",
    "ExpertAct",
    "SWIGLU",
    "QuantizedWeight",
    "TensorPart",
    "MatrixLayout",
    "BlobLayout",
    "align_up",
    "check_group_size",
    "fallback_group_size",
    "suggest_group_size",
    "pack_codes",
    "unpack_codes",
    "dequantize_weight",
    "expert_blob_layout",
    "blob_views",
    "unpack_expert",
    "unpack_bias",
]

ALIGNMENT = 64
"""Every part inside an expert blob starts at a multiple of this many bytes."""

PRECISIONS = ("q4", "q2", "f16")
"""The precision names a bundle can store, in no particular order."""

_DEFAULTS = {"q4": (4, 64), "q2": (2, 32), "f16": (16, 0)}
_LITTLE_ENDIAN = sys.byteorder == "little"

_TORCH_DTYPES = {"uint8": torch.uint8, "float16": torch.float16, "float32": torch.float32}
_NUMPY_DTYPES = {"uint8": np.dtype("u1"), "float16": np.dtype("<f2"), "float32": np.dtype("<f4")}


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    """Round ``n`` up to the next multiple of ``alignment``."""
    return (n + alignment - 1) // alignment * alignment


# --------------------------------------------------------------------------------------------------
# Precision description
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantSpec:
    """How one precision stores a weight: name ("q4", "q2", "f16"), bits (4, 2, 16), group size
    (weights per scale/zero pair along the input dimension; 0 for f16)."""

    name: str
    bits: int
    group_size: int

    def __post_init__(self) -> None:
        if self.name not in _DEFAULTS:
            raise ValueError(f"unknown precision {self.name!r}; expected one of {', '.join(PRECISIONS)}")
        bits = _DEFAULTS[self.name][0]
        if self.bits != bits:
            raise ValueError(f"precision {self.name} has {bits} bits, not {self.bits}")
        if self.is_quantized:
            if self.group_size <= 0 or (self.group_size * self.bits) % 8:
                raise ValueError(
                    f"{self.name} group_size must be a positive multiple of {8 // self.bits} "
                    f"(whole bytes per group), got {self.group_size}"
                )
        elif self.group_size != 0:
            raise ValueError(f"f16 has no groups: group_size must be 0, got {self.group_size}")

    @classmethod
    def default(cls, name: str, group_size: Optional[int] = None) -> "QuantSpec":
        """The spec for precision ``name`` with its default group size (q4: 64, q2: 32, f16: 0),
        or with ``group_size`` when given."""
        if name not in _DEFAULTS:
            raise ValueError(f"unknown precision {name!r}; expected one of {', '.join(PRECISIONS)}")
        bits, g = _DEFAULTS[name]
        return cls(name, bits, g if group_size is None else int(group_size))

    @property
    def is_quantized(self) -> bool:
        """True for q4/q2 (codes + scale + zero), False for f16."""
        return self.bits < 16

    def to_dict(self) -> dict:
        """Plain dict form, for metadata."""
        return {"name": self.name, "bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        """Inverse of ``to_dict``."""
        return cls(str(d["name"]), int(d["bits"]), int(d["group_size"]))


def _suggest_group_size(dim: int, spec: QuantSpec) -> Optional[int]:
    """A group size <= spec.group_size that divides ``dim`` and keeps groups byte aligned: a power
    of two of at least half the current size if one fits, else the largest such divisor, else None."""
    step = 8 // spec.bits
    candidates = [g for g in range(spec.group_size - spec.group_size % step, 0, -step) if dim % g == 0]
    powers = [g for g in candidates if g & (g - 1) == 0 and 2 * g >= spec.group_size]
    return (powers or candidates or [None])[0]


def check_group_size(in_features: int, spec: QuantSpec, what: str = "weight") -> None:
    """Raise ``ValueError`` (one line) unless ``spec``'s group size divides ``in_features``, the
    input dimension (columns) of ``what``.  No-op for f16."""
    if not spec.is_quantized or in_features % spec.group_size == 0:
        return
    g = _suggest_group_size(in_features, spec)
    hint = f"use a group size that divides {in_features}, e.g. {g}" if g else "store it as f16"
    raise ValueError(
        f"{spec.name} group_size {spec.group_size} does not divide the input dimension of {what} "
        f"(in={in_features}); {hint}"
    )


def fallback_group_size(dim: int, requested: int) -> Optional[int]:
    """The group size to use for a matrix whose input dimension is ``dim`` when ``requested`` was asked
    for: ``requested`` itself when it divides ``dim``, else the largest power of two of at least 8 that
    divides ``dim`` and does not exceed ``requested`` (whole bytes per group at 4 and 2 bits), else None."""
    if requested > 0 and dim % requested == 0:
        return requested
    g = 1
    while g * 2 <= requested:
        g *= 2
    while g >= 8:
        if dim % g == 0:
            return g
        g //= 2
    return None


def suggest_group_size(dim: int, spec: QuantSpec) -> Optional[int]:
    """A byte-aligned group size that divides ``dim`` (for an error message), or None."""
    return _suggest_group_size(dim, spec) if spec.is_quantized else None


# --------------------------------------------------------------------------------------------------
# The expert's activation
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertAct:
    """What an expert computes between its gate/up products and its down product.

    ``silu`` (SwiGLU, every family but gpt-oss): ``silu(gate) * up``.
    ``clamped`` (gpt-oss): ``gate`` clamped above at ``limit``, ``up`` to ``[-limit, limit]``, then
    ``(up + 1) * (gate * sigmoid(gate * alpha))`` — the order of operations of transformers' GptOssExperts,
    so every rounding happens where it does there."""

    kind: str = "silu"
    alpha: float = 1.702
    limit: float = 7.0

    def __post_init__(self) -> None:
        if self.kind not in ("silu", "clamped"):
            raise ValueError(f"unknown expert activation {self.kind!r}; expected silu or clamped")

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.kind == "silu":
            return torch.nn.functional.silu(gate) * up
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


SWIGLU = ExpertAct()
"""The activation of every family but gpt-oss."""


# --------------------------------------------------------------------------------------------------
# Bit packing
# --------------------------------------------------------------------------------------------------


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``q`` ([rows, n], values < 2**bits) into uint8 [rows, n * bits / 8]
    following the module docstring (4-bit: low nibble first; 2-bit: bits 2k..2k+1 hold code 4j+k)."""
    if bits not in (2, 4):
        raise ValueError(f"bit packing supports 2 or 4 bits, not {bits}")
    per = 8 // bits
    rows, n = q.shape
    if n % per:
        raise ValueError(f"row length {n} is not a multiple of {per} codes per byte")
    q = q.to(torch.uint8).reshape(rows, n // per, per)
    out = q[..., 0].clone()
    for k in range(1, per):
        out |= q[..., k] << (bits * k)
    return out


def unpack_codes(packed: torch.Tensor, bits: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Inverse of ``pack_codes``: uint8 [rows, m] -> uint8 codes [rows, m * 8 / bits].

    Fast path (little-endian hosts): widen each byte into a 16-bit (4-bit codes) or 32-bit (2-bit
    codes) word whose bytes are the codes in order, then reinterpret the words as bytes.
    ``packed`` is only read (it may live in read-only mapped memory).  If ``out`` is given the codes
    are also copied into it (uint8, shape [rows, m * 8 / bits])."""
    if bits not in (2, 4):
        raise ValueError(f"bit unpacking supports 2 or 4 bits, not {bits}")
    rows, m = packed.shape
    codes = _widen_codes(packed, bits).view(rows, m * 8 // bits)
    if out is not None:
        out.copy_(codes)
        return out
    return codes


def _widen_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of uint8 ``packed`` (any shape, only read) as a uint8 tensor with 8 / bits times as
    many elements, in order (reshape it as needed).  Little-endian fast path: each byte becomes a
    16-bit (4-bit codes) or 32-bit (2-bit codes) word whose bytes are its codes."""
    if _LITTLE_ENDIAN:
        if bits == 4:
            t = packed.to(torch.int16)
            u = t << 4
            u |= t
            u &= 0x0F0F
        else:
            t = packed.to(torch.int32)
            u = t << 6
            u |= t
            u |= t << 12
            u |= t << 18
            u &= 0x03030303
        return u.view(torch.uint8)
    mask = (1 << bits) - 1  # portable (slower) path
    return torch.stack([(packed >> (bits * k)) & mask for k in range(8 // bits)], -1)


# --------------------------------------------------------------------------------------------------
# One matrix
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizedWeight:
    """One quantized matrix of logical shape ``shape`` = (out, in).

    q4/q2: ``packed`` uint8 [out, in*bits/8] (bit-packed codes), ``scale`` and ``zero`` float16
    [out, in/group_size].  f16: ``packed`` is the float16 weight [out, in]; scale/zero are None."""

    packed: torch.Tensor
    scale: Optional[torch.Tensor]
    zero: Optional[torch.Tensor]
    shape: Tuple[int, int]
    spec: QuantSpec


def dequantize_weight(
    qw: Union[QuantizedWeight, Sequence[Optional[torch.Tensor]]],
    shape: Optional[Tuple[int, int]] = None,
    spec: Optional[QuantSpec] = None,
    dtype: torch.dtype = torch.float32,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Dense [out, in] weight from a ``QuantizedWeight`` or a ``(packed, scale, zero)`` triple (then
    ``shape`` and ``spec`` are required; for f16 the triple is ``(weight_f16, None, None)``).

    q4/q2: ``(q - zero) * scale`` in float32, cast to ``dtype`` if different.  Inputs are only read
    (they may be views of read-only mapped memory; ``packed`` may be given as [out, in*bits/8] or
    flat).  ``out`` (contiguous, [out, in], ``dtype``) receives the result and is returned; without
    it a new tensor is allocated.  Reusing ``out`` buffers is markedly faster on CPU."""
    if isinstance(qw, QuantizedWeight):
        packed, scale, zero = qw.packed, qw.scale, qw.zero
        shape, spec = qw.shape, qw.spec
    else:
        if shape is None or spec is None:
            raise ValueError("dequantize_weight needs shape and spec when given a (packed, scale, zero) tuple")
        packed, scale, zero = qw
    out_f, in_f = (int(d) for d in shape)
    _check_out(out, (out_f, in_f), dtype, packed.device)
    check_group_size(in_f, spec)
    return _dequantize(packed, scale, zero, out_f, in_f, spec, dtype, out)


def _check_out(
    out: Optional[torch.Tensor], shape: Tuple[int, int], dtype: torch.dtype, device: torch.device
) -> None:
    """Raise ``ValueError`` unless ``out`` is None or a contiguous ``dtype`` tensor of ``shape`` on
    ``device`` (the device of the packed data)."""
    if out is None:
        return
    if tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous() or out.device != device:
        raise ValueError(
            f"out must be a contiguous {dtype} tensor of shape {shape} on {device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )


def _dequantize(packed, scale, zero, out_f: int, in_f: int, spec: QuantSpec, dtype, out):
    """``dequantize_weight`` without argument checks (the per-expert hot path).  ``packed`` (uint8,
    any shape with the right element count, or float16 for f16), ``scale``/``zero`` (float16, any
    shape with out_f * in_f / g elements) are only read."""
    if not spec.is_quantized:
        w16 = (packed.view(torch.float16) if packed.dtype == torch.uint8 else packed).view(out_f, in_f)
        if dtype not in (torch.float16, torch.float32):
            w16 = w16.float()  # torch's direct float16 -> bfloat16 cast is ~5x slower than via float32
        if out is not None:
            out.copy_(w16)
            return out
        return w16.to(dtype=dtype, copy=True)

    g = spec.group_size
    n_groups = in_f // g
    codes = _widen_codes(packed, spec.bits).view(out_f, n_groups, g)
    if dtype == torch.float32 and out is not None:
        w = out
    else:
        w = torch.empty((out_f, in_f), dtype=torch.float32, device=packed.device)
    w3 = w.view(out_f, n_groups, g)
    # Same-dtype in-place float ops are ~3x faster than mixed uint8/float ops (see module docstring),
    # and (q - zero) * scale in float32 is bit-identical to hqq's Quantizer.dequantize.
    w3.copy_(codes)
    w3.sub_(zero.view(out_f, n_groups, 1).float())
    w3.mul_(scale.view(out_f, n_groups, 1).float())
    if dtype == torch.float32:
        return w
    if out is not None:
        out.copy_(w)
        return out
    return w.to(dtype)


# --------------------------------------------------------------------------------------------------
# Expert blob layout
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorPart:
    """One array inside an expert blob: byte ``offset`` from the blob start, ``nbytes``, logical
    ``shape`` and element ``dtype`` ("uint8", "float16" or "float32")."""

    offset: int
    nbytes: int
    shape: Tuple[int, ...]
    dtype: str

    @property
    def end(self) -> int:
        """Offset one past the last byte."""
        return self.offset + self.nbytes

    @property
    def torch_dtype(self) -> torch.dtype:
        """The element dtype as a torch dtype."""
        return _TORCH_DTYPES[self.dtype]

    @property
    def numpy_dtype(self) -> np.dtype:
        """The element dtype as a little-endian numpy dtype."""
        return _NUMPY_DTYPES[self.dtype]

    def view(self, blob: torch.Tensor, flat: bool = False) -> torch.Tensor:
        """This part of flat uint8 ``blob`` as a tensor of ``dtype`` and ``shape`` (1-D if ``flat``);
        a zero-copy view when the blob's byte offset allows it (always for uint8), else a copy.
        Never writes to ``blob``."""
        raw = blob[self.offset : self.end]
        if self.dtype != "uint8":
            try:
                raw = raw.view(self.torch_dtype)
            except RuntimeError:  # storage offset not a multiple of the element size
                raw = raw.clone().view(self.torch_dtype)
        return raw if flat else raw.view(self.shape)


@dataclass(frozen=True)
class MatrixLayout:
    """Where one matrix (``name`` "gate"/"up"/"down", logical ``shape`` (out, in)) lives in a blob.

    q4/q2: ``packed`` (uint8 codes), ``scale`` and ``zero`` (float16).  f16: ``packed`` is the float16
    weight itself and ``scale``/``zero`` are None.  ``spec``: the precision as this matrix is stored (its
    group size may be smaller than the blob's nominal one when that does not divide its input dimension)."""

    name: str
    shape: Tuple[int, int]
    packed: TensorPart
    scale: Optional[TensorPart]
    zero: Optional[TensorPart]
    spec: Optional[QuantSpec] = None

    @property
    def parts(self) -> Tuple[TensorPart, ...]:
        """The matrix's parts in storage order."""
        return tuple(p for p in (self.packed, self.scale, self.zero) if p is not None)


@dataclass(frozen=True)
class BlobLayout:
    """Byte layout of one expert blob for (hidden, ffn, spec); ``size`` is the unpadded byte count
    (end of the last part).  ``spec`` is gate's and up's precision (input dimension: hidden); down's may
    have a smaller group size (``down.spec``).  ``bias``: the float32 (gate_up [2F], down [H]) bias parts
    of experts with biases (gpt-oss), after the matrices; ``act``: the activation the expert computes."""

    spec: QuantSpec
    hidden: int
    ffn: int
    size: int
    gate: MatrixLayout
    up: MatrixLayout
    down: MatrixLayout
    bias: Optional[Tuple[TensorPart, TensorPart]] = None
    act: ExpertAct = SWIGLU

    @property
    def matrices(self) -> Tuple[MatrixLayout, MatrixLayout, MatrixLayout]:
        """(gate, up, down)."""
        return (self.gate, self.up, self.down)

    @property
    def parts(self) -> Tuple[TensorPart, ...]:
        """Every part of the blob in storage order."""
        return tuple(p for m in self.matrices for p in m.parts) + (self.bias or ())

    @property
    def down_group_size(self) -> int:
        """Group size of the down matrix (input dimension: ffn)."""
        return self.down.spec.group_size

    @property
    def uniform(self) -> bool:
        """Whether all three matrices share one group size."""
        return self.down.spec == self.spec

    @property
    def plain(self) -> bool:
        """A SwiGLU expert without biases in one group size: what the native kernels compute."""
        return self.uniform and self.bias is None and self.act == SWIGLU

    @property
    def matrices_contiguous(self) -> bool:
        """Whether gate, up and down (f16) lie back to back from offset 0 (one flat float16 view)."""
        n = self.hidden * self.ffn * 2
        return (not self.spec.is_quantized
                and [m.packed.offset for m in self.matrices] == [0, n, 2 * n])

    def stride(self, alignment: int = ALIGNMENT) -> int:
        """``size`` rounded up to ``alignment``: a natural distance between consecutive blobs."""
        return align_up(self.size, alignment)


def expert_blob_layout(hidden: int, ffn: int, spec: QuantSpec, *, down_group_size: Optional[int] = None,
                       bias: bool = False, act: ExpertAct = SWIGLU) -> BlobLayout:
    """Compute the blob layout of an expert with gate/up [ffn, hidden] and down [hidden, ffn].

    ``down_group_size``: down's group size when it differs from ``spec``'s (None: the same).  ``bias``:
    the blob also holds float32 biases, gate_up [2 * ffn] (gate's, then up's) and down [hidden], each at an
    aligned offset after the matrices (a blob without biases is byte for byte what it always was).
    Raises ``ValueError`` if a group size does not divide the dimension it has to (hidden for gate/up,
    ffn for down)."""
    hidden, ffn = int(hidden), int(ffn)
    if hidden <= 0 or ffn <= 0:
        raise ValueError(f"hidden and ffn must be positive, got {hidden}, {ffn}")
    down_spec = spec
    if down_group_size is not None and spec.is_quantized and down_group_size != spec.group_size:
        down_spec = QuantSpec(spec.name, spec.bits, int(down_group_size))
    check_group_size(hidden, spec, "gate/up (hidden size)")
    check_group_size(ffn, down_spec, "down (expert ffn size)")
    offset = 0
    mats = []
    for name, (o, i) in (("gate", (ffn, hidden)), ("up", (ffn, hidden)), ("down", (hidden, ffn))):
        mspec = down_spec if name == "down" else spec
        if spec.is_quantized:
            width = i * spec.bits // 8
            n_groups = i // mspec.group_size
            parts = []
            for shape, dtype, nbytes in (
                ((o, width), "uint8", o * width),
                ((o, n_groups), "float16", o * n_groups * 2),
                ((o, n_groups), "float16", o * n_groups * 2),
            ):
                offset = align_up(offset)
                parts.append(TensorPart(offset, nbytes, shape, dtype))
                offset += nbytes
            mats.append(MatrixLayout(name, (o, i), *parts, spec=mspec))
        else:
            offset = align_up(offset)
            part = TensorPart(offset, o * i * 2, (o, i), "float16")
            offset += part.nbytes
            mats.append(MatrixLayout(name, (o, i), part, None, None, spec=mspec))
    biases = None
    if bias:
        parts = []
        for n in (2 * ffn, hidden):
            offset = align_up(offset)
            parts.append(TensorPart(offset, 4 * n, (n,), "float32"))
            offset += 4 * n
        biases = (parts[0], parts[1])
    return BlobLayout(spec, hidden, ffn, offset, *mats, bias=biases, act=act)


# --------------------------------------------------------------------------------------------------
# Whole expert
# --------------------------------------------------------------------------------------------------


def _as_uint8_tensor(blob) -> torch.Tensor:
    """Accept a uint8 torch tensor or numpy array (incl. read-only memmaps) without copying."""
    if isinstance(blob, np.ndarray):
        if blob.dtype != np.uint8:
            raise ValueError(f"blob must be uint8, got {blob.dtype}")
        with warnings.catch_warnings():  # read-only arrays warn: we never write to them
            warnings.simplefilter("ignore", UserWarning)
            blob = torch.from_numpy(blob.reshape(-1))
    if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8:
        raise ValueError("blob must be a uint8 torch tensor or numpy array")
    return blob.reshape(-1)


def blob_views(blob, layout: BlobLayout) -> dict:
    """The parts of ``blob`` as tensors, keyed "gate.packed", "gate.scale", ..., "down.zero" (f16:
    "gate.packed" etc. are the float16 weights).  Zero-copy views where alignment allows."""
    b = _as_uint8_tensor(blob)
    if b.numel() < layout.size:
        raise ValueError(f"blob has {b.numel()} bytes, layout needs {layout.size}")
    views = {}
    for m in layout.matrices:
        for field in ("packed", "scale", "zero"):
            part = getattr(m, field)
            if part is not None:
                views[f"{m.name}.{field}"] = part.view(b)
    if layout.bias is not None:
        views["gate_up.bias"], views["down.bias"] = (p.view(b) for p in layout.bias)
    return views


def unpack_expert(
    blob,
    layout: BlobLayout,
    dtype: torch.dtype = torch.float32,
    out: Optional[Sequence[torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense (gate [F, H], up [F, H], down [H, F]) weights of ``dtype`` from one expert blob.

    ``blob`` is a uint8 tensor (or numpy array) of at least ``layout.size`` bytes, typically a view
    of a memory-mapped bundle; it is only read.  The weights are computed on the blob's device (a
    blob moved to a GPU is dequantized there).  ``out``, if given, is three contiguous tensors of
    those shapes and ``dtype`` that receive the weights (reuse them across calls: allocating fresh
    multi-MB tensors per expert costs more than the dequantization).  Results never alias ``blob``."""
    b = _as_uint8_tensor(blob)
    if b.numel() < layout.size:
        raise ValueError(f"blob has {b.numel()} bytes, layout needs {layout.size}")
    if out is not None:
        if len(out) != 3:
            raise ValueError("out must hold three tensors (gate, up, down)")
        for o, m in zip(out, layout.matrices):
            _check_out(o, m.shape, dtype, b.device)
    result = []
    for k, m in enumerate(layout.matrices):
        o = None if out is None else out[k]
        spec = m.spec
        if spec.is_quantized:
            packed = b[m.packed.offset : m.packed.end]  # flat views: fewer ops on the hot path
            scale, zero = m.scale.view(b, flat=True), m.zero.view(b, flat=True)
        else:
            packed, scale, zero = m.packed.view(b, flat=True), None, None
        result.append(_dequantize(packed, scale, zero, m.shape[0], m.shape[1], spec, dtype, o))
    return tuple(result)


def unpack_bias(blob, layout: BlobLayout, dtype: torch.dtype = torch.float32
                ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The expert's (gate_up [2F], down [H]) biases as fresh ``dtype`` tensors, or None when the layout
    has none."""
    if layout.bias is None:
        return None
    b = _as_uint8_tensor(blob)
    if b.numel() < layout.size:
        raise ValueError(f"blob has {b.numel()} bytes, layout needs {layout.size}")
    return tuple(p.view(b).to(dtype=dtype, copy=True) for p in layout.bias)  # type: ignore[return-value]
