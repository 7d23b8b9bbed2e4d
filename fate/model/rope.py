"""Rotary position embeddings: inverse frequencies (default, linear, YaRN) and the four ways the supported
families rotate q and k, each computed with transformers' operations in transformers' dtypes.

Inverse frequencies are ``1 / theta ** (arange(0, D, 2) / D)`` in float32 over the rotated dimensions D
(``cfg.rotary_dim``: all of a head, a part of it (GLM-4.5), or MLA's decoupled rope key), divided by the
factor for linear scaling; YaRN blends interpolated and extrapolated frequencies over a linear ramp and
scales cos and sin by its attention factor (transformers' ``_compute_yarn_parameters``).  cos and sin
are computed in float32, times the attention factor, then:

* ``half`` (Llama rotate-half; gpt-oss's chunked halves are the same arithmetic): cast to the compute
  dtype; ``x * cos + roll(x) * sin`` with rotate-half's sign folded into sin (negation is exact);
* ``interleave`` (DeepSeek-V3 ``rope_interleave``): even/odd pairs, output in halves,
  ``cat(x1 * c - x2 * s, x2 * c + x1 * s)`` in the compute dtype;
* ``complex`` (DeepSeek-V2): pairs as complex64 times ``polar(1, freqs) * factor``, in float32, cast back;
* ``pairs_f32`` (ERNIE-4.5): pairs rotated in float32 with cos/sin kept in float32, cast back.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def inv_freq(cfg) -> Tensor:
    """Inverse frequencies [rotary_dim / 2], float32, exactly as transformers computes them."""
    D = cfg.rotary_dim
    base = cfg.rope_theta
    rs = cfg.rope_scaling or {}
    kind = rs.get("type", "default")
    if kind in ("default", "linear"):
        inv = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.int64).to(torch.float32) / D))
        return inv / float(rs["factor"]) if kind == "linear" else inv
    if kind != "yarn":
        raise ValueError(f"rope scaling {kind!r} is not supported")
    factor = float(rs["factor"])
    orig = int(rs["original_max_position_embeddings"])
    beta_fast, beta_slow = float(rs["beta_fast"]), float(rs["beta_slow"])

    def correction_dim(rotations: float) -> float:
        return (D * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, D - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(D // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, D, 2).to(dtype=torch.float) / D)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    return interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor


def attention_factor(cfg) -> float:
    """What cos and sin are multiplied by (YaRN's attention factor; 1 otherwise)."""
    rs = cfg.rope_scaling or {}
    return float(rs["attention_factor"]) if rs.get("type") == "yarn" else 1.0


class Rotary:
    """RoPE tables for positions ``0 .. n-1`` and the rotation of ``cfg.rope_style``.

    :meth:`tables` picks the rows of some positions (done once per forward), :meth:`rotate` rotates q or k
    ``[T, heads, D]`` — or ``[heads, T, D]`` with ``heads_first`` — over the first ``cfg.rotary_dim``
    dimensions of each head, passing the rest through (partial RoPE)."""

    def __init__(self, cfg, dtype: torch.dtype, device: torch.device, n: int):
        self.style = cfg.rope_style
        self.dim = cfg.rotary_dim
        self.dtype, self.device = dtype, device
        self.inv = inv_freq(cfg)
        self.factor = attention_factor(cfg)
        self.length = 0
        self.build(n)

    def build(self, n: int) -> None:
        freqs = torch.arange(n, dtype=torch.int64).float()[:, None] * self.inv[None, :]
        half = self.dim // 2
        if self.style == "complex":
            fc = torch.polar(torch.ones_like(freqs), freqs)
            if self.factor != 1.0:
                fc = fc * self.factor
            self._tabs = (fc.to(self.device).unsqueeze(1),)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos(), emb.sin()
            if self.factor != 1.0:
                cos, sin = cos * self.factor, sin * self.factor
            if self.style == "half":
                sin[:, :half].neg_()  # rotate_half's sign (exact)
                cos, sin = cos.to(self.dtype), sin.to(self.dtype)
            elif self.style == "interleave":
                cos, sin = cos[:, :half].to(self.dtype), sin[:, :half].to(self.dtype)
            else:  # pairs_f32: float32, each angle repeated for its pair
                cos = cos[:, :half].repeat_interleave(2, dim=-1)
                sin = sin[:, :half].repeat_interleave(2, dim=-1)
            self._tabs = (cos.to(self.device).unsqueeze(1), sin.to(self.device).unsqueeze(1))
        self.length = n

    def tables(self, positions: Tensor, heads_first: bool = False) -> tuple[Tensor, ...]:
        """The table rows of ``positions``, shaped to broadcast over ``[T, heads, D]`` (or
        ``[heads, T, D]``)."""
        tabs = tuple(t.index_select(0, positions) for t in self._tabs)
        return tuple(t.transpose(0, 1) for t in tabs) if heads_first else tabs

    def rotate(self, x: Tensor, tabs: tuple[Tensor, ...]) -> Tensor:
        if x.shape[-1] == self.dim:
            return self._rotate(x, tabs)
        return torch.cat((self._rotate(x[..., :self.dim], tabs), x[..., self.dim:]), dim=-1)

    def _rotate(self, x: Tensor, tabs: tuple[Tensor, ...]) -> Tensor:
        style = self.style
        if style == "half":
            cos, sin = tabs
            return x * cos + torch.roll(x, self.dim // 2, dims=-1) * sin
        if style == "interleave":
            cos, sin = tabs
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        if style == "complex":
            (fc,) = tabs
            xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
            return torch.view_as_real(xc * fc).flatten(-2).type_as(x)
        cos, sin = tabs  # pairs_f32
        rot = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
        return ((x.float() * cos) + (rot.float() * sin)).to(x.dtype)
