"""``--dtype q8``: a non-expert projection matrix stored as 8-bit codes with one float16 scale per 32 weights
of a row (symmetric, round to nearest: like llama.cpp's Q8_0, with codes and scales in two tensors so that
both containers hold them; names in :mod:`fate.formats.constants`).

``w[r, c] = code[r, c] * scale[r, c // 32]``, the scale being ``max |w|`` over the 32 weights divided by 127
and rounded to float16, the code ``round(w / scale)`` in [-127, 127].  A weight moves by at most half a
step, ``max |w| / 254`` of its block (plus the scale's float16 rounding, 2^-11 relative): about 0.1 % of a
typical weight's size, where q4 moves them by ~5 %.  The runtime multiplies the codes with 8-bit
activations (:mod:`fate.quant.kernels` ``Q8_I8``) or widens them to float32 (``dequantize_q8``).
"""

from __future__ import annotations

import torch

from fate.formats.constants import Q8_GROUP

__all__ = ["Q8_GROUP", "quantize_q8", "dequantize_q8"]


def quantize_q8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes int8 [N, K], scale float16 [N, K / Q8_GROUP])`` of the matrix ``w`` [N, K] (K a multiple of
    Q8_GROUP).  Raises ValueError when a block's scale does not fit float16 (|w| above ~8e6)."""
    n, k = w.shape
    if k % Q8_GROUP:
        raise ValueError(f"q8 needs rows that are a multiple of {Q8_GROUP} long, not {k}")
    wb = w.float().reshape(n, k // Q8_GROUP, Q8_GROUP)
    scale = (wb.abs().amax(-1, keepdim=True) / 127).half()
    if not torch.isfinite(scale).all():
        raise ValueError("weights too large for q8 (a scale overflows float16)")
    s = scale.float()
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    codes = torch.round(wb * inv).clamp_(-127, 127).to(torch.int8)
    return codes.view(n, k), scale.view(n, k // Q8_GROUP)


def dequantize_q8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The q8 matrix as float32: ``code * scale`` (exact: an 8-bit integer times a float16 value)."""
    n, k = codes.shape
    return (codes.view(n, k // Q8_GROUP, Q8_GROUP).float() * scale.reshape(n, k // Q8_GROUP, 1).float()).view(n, k)
