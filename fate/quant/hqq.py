"""Quantizing expert weights with the ``hqq`` library: the converter's half of :mod:`fate.quant`.

The byte format these functions write is defined in :mod:`fate.quant.layout`, which the runtime reads
without needing hqq at all.  See that module's docstring for the precisions, the bit packing and the
notes on hqq 0.2.x.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from fate.quant.layout import (BlobLayout, QuantizedWeight, QuantSpec, check_group_size, expert_blob_layout,
                               pack_codes)

__all__ = ["quantize_weight", "pack_expert", "hqq_reference_dequant"]


def _hqq_quantizer():
    """hqq's ``Quantizer`` class, imported lazily (the runtime never needs hqq); importing hqq
    triggers an unrelated torch.jit DeprecationWarning, silenced here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from hqq.core.quantize import Quantizer  # hqq is heavy and only the converter needs it
    return Quantizer


def _hqq_quantize(w: torch.Tensor, spec: QuantSpec):
    """Run hqq's quantizer on float32 [out, in] ``w``; returns (hqq's codes as it returns them,
    codes as uint8 [out, in], hqq's meta dict)."""
    Quantizer = _hqq_quantizer()

    out_f, in_f = w.shape
    w32 = w.detach().to(device="cpu", dtype=torch.float32).contiguous()
    # axis=1 + group_size reshapes to [-1, group_size] row-major: groups are runs of ``group_size``
    # consecutive columns of one row (check_group_size ensures they never straddle rows).
    w_q, meta = Quantizer.quantize(
        w32,
        nbits=spec.bits,
        group_size=spec.group_size,
        optimize=True,
        axis=1,
        device="cpu",
        bitpack=False,
        compute_dtype=torch.float32,
    )
    codes = w_q.reshape(out_f, in_f).to(torch.uint8)
    return w_q, codes, meta


def quantize_weight(w: torch.Tensor, spec: QuantSpec, what: str = "weight") -> QuantizedWeight:
    """Quantize a float [out, in] matrix with hqq (q4/q2) or cast it to float16 (f16).

    Raises ``ValueError`` if the group size does not divide ``in``, or if a group's scale or zero
    point does not fit in float16 (``what`` names the matrix in the messages)."""
    if w.dim() != 2:
        raise ValueError(f"{what} must be a 2-D [out, in] matrix, got shape {tuple(w.shape)}")
    out_f, in_f = (int(d) for d in w.shape)
    if not spec.is_quantized:
        w16 = w.detach().to("cpu", torch.float16).contiguous()
        if not torch.isfinite(w16).all():
            raise ValueError(f"{what}: weights are not finite in float16 (NaN/inf, or |w| > 65504)")
        return QuantizedWeight(w16, None, None, (out_f, in_f), spec)
    check_group_size(in_f, spec, what)
    _, codes, meta = _hqq_quantize(w, spec)
    n_groups = in_f // spec.group_size
    scale = meta["scale"].reshape(out_f, n_groups).to(torch.float16).contiguous()
    zero = meta["zero"].reshape(out_f, n_groups).to(torch.float16).contiguous()
    if not (torch.isfinite(scale).all() and torch.isfinite(zero).all()):
        raise ValueError(
            f"{what}: a {spec.name} scale or zero point is not finite in float16 (NaN/inf weights, or a "
            f"group with a huge offset and a tiny range); store this matrix as f16"
        )
    return QuantizedWeight(pack_codes(codes, spec.bits), scale, zero, (out_f, in_f), spec)


def pack_expert(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, spec: QuantSpec | BlobLayout,
                bias: tuple[torch.Tensor, torch.Tensor] | None = None) -> np.ndarray:
    """Quantize (hqq) or cast (f16) one expert's gate [F, H], up [F, H], down [H, F] weights and lay
    them out as a blob: a numpy uint8 array of the layout's ``size`` bytes, gaps zero-filled.

    ``spec``: a QuantSpec (the plain layout ``expert_blob_layout(H, F, spec)``) or the BlobLayout itself
    (a different group size for down, biases).  ``bias``: (gate_up [2F], down [H]) when the layout has
    biases; they are stored as float32."""
    if gate.dim() != 2:
        raise ValueError(f"gate must be 2-D [ffn, hidden], got shape {tuple(gate.shape)}")
    ffn, hidden = (int(d) for d in gate.shape)
    for name, t, want in (("up", up, (ffn, hidden)), ("down", down, (hidden, ffn))):
        if tuple(t.shape) != want:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {want} (gate is {(ffn, hidden)})")
    layout = spec if isinstance(spec, BlobLayout) else expert_blob_layout(hidden, ffn, spec)
    if (layout.hidden, layout.ffn) != (hidden, ffn):
        raise ValueError(f"the layout is for hidden {layout.hidden}, ffn {layout.ffn}; the expert is {hidden}, {ffn}")
    if (bias is None) != (layout.bias is None):
        raise ValueError("biases must be given exactly when the layout has them")
    blob = np.zeros(layout.size, dtype=np.uint8)
    for m, w in zip(layout.matrices, (gate, up, down)):
        qw = quantize_weight(w, m.spec, what=m.name)
        arrays = (qw.packed, qw.scale, qw.zero) if m.spec.is_quantized else (qw.packed,)
        for part, arr in zip(m.parts, arrays):
            a = arr.contiguous().numpy().astype(part.numpy_dtype, copy=False)
            blob[part.offset : part.end] = a.reshape(-1).view(np.uint8)
    if bias is not None:
        for part, b in zip(layout.bias, bias):
            if tuple(b.shape) != part.shape:
                raise ValueError(f"a bias has shape {tuple(b.shape)}, expected {part.shape}")
            blob[part.offset : part.end] = b.detach().to(torch.float32).contiguous().numpy().view(np.uint8)
    return blob


# --------------------------------------------------------------------------------------------------
# Reference (tests)
# --------------------------------------------------------------------------------------------------


def hqq_reference_dequant(w: torch.Tensor, spec: QuantSpec, fp16_meta: bool = True) -> torch.Tensor:
    """What hqq itself gives back for ``w`` under ``spec``: ``Quantizer.quantize`` (same arguments as
    ``quantize_weight``) followed by ``Quantizer.dequantize``, float32 [out, in].

    With ``fp16_meta`` (default) the scale and zero are rounded to float16 first, as the blob stores
    them, so ``unpack_expert(pack_expert(...))`` must match this bit for bit; with
    ``fp16_meta=False`` it is hqq's unmodified float32 round trip.  f16 returns ``w.half().float()``."""
    Quantizer = _hqq_quantizer()

    if not spec.is_quantized:
        return w.detach().to(torch.float16).to(torch.float32)
    check_group_size(int(w.shape[1]), spec)
    w_q, _, meta = _hqq_quantize(w, spec)
    meta = dict(meta)
    if fp16_meta:
        meta["scale"] = meta["scale"].to(torch.float16).to(torch.float32)
        meta["zero"] = meta["zero"].to(torch.float16).to(torch.float32)
    # hqq's dequantize defaults compute_dtype to float16 when meta lacks it; ask for float32.
    meta["compute_dtype"] = torch.float32
    return Quantizer.dequantize(w_q, meta).reshape(w.shape).to(torch.float32)
