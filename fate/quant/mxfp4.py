"""MXFP4, the encoding gpt-oss publishes its experts in: read at conversion, never stored.

A weight matrix [out, in] is split along ``in`` into blocks of 32 values.  Each block is 16 bytes of
4-bit E2M1 codes — value ``2j`` in the low nibble of byte ``j``, value ``2j + 1`` in the high nibble —
and one shared uint8 exponent ``s`` (E8M0, bias 127): ``w = fp4(code) * 2 ** (s - 127)``.  The checkpoint
stores ``*_blocks`` [..., out, in / 32, 16] and ``*_scales`` [..., out, in / 32].  Every such value is
exact in float32 (and in bfloat16, where transformers dequantizes it), so dequantizing in float32 gives
transformers' weights bit for bit; fate then quantizes them with HQQ like any other expert.
"""

from __future__ import annotations

import torch

__all__ = ["FP4_VALUES", "dequantize_mxfp4"]

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
"""The E2M1 value of each 4-bit code."""


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 weights [..., out, in] from ``blocks`` uint8 [..., out, in / 32, 16] and ``scales`` uint8
    [..., out, in / 32]."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales are uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).long()  # [..., G, 16, 2]: low nibble first
    values = lut[codes].flatten(-2)  # [..., G, 32]
    values = torch.ldexp(values, (scales.to(torch.int32) - 127).unsqueeze(-1))
    return values.flatten(-2)
