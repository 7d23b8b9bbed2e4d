"""One routed expert, computed: the primitive every executor uses.

An expert is ``down(act(gate(x), up(x)))``, ``act`` SwiGLU's ``silu(gate) * up`` or gpt-oss's clamped variant
(:class:`fate.quant.layout.ExpertAct`, named by the layout), with biases added after each product where
the layout has them.  Where its weights come from differs — a view of the memory
map, a device cache slot, a copy in memory, one blob the timing profile holds — but how it is computed
is decided here, once:

* :func:`native_kind` is the one test of which native kernel (:mod:`fate.quant.kernels`) computes matrices
  of a stored precision on a device in a compute dtype under a kernel choice (``KERNELS``), :func:`native_q4`
  the old question whether the INT4 kernel serves at all;
* :class:`ExpertView` reads one blob through its layout (the views of its parts are made once);
  :class:`WidenedExpert` is the same expert with its codes widened to one byte each (what the resident
  CPU executor keeps for the torch path, where unpacking per call would cost ~1.5x);
* :class:`ExpertCompute` holds the scratch one expert is dequantized into and computes an expert on
  tokens: with the native kernels, straight from the packed codes — on any number of tokens with 8-bit
  activations (``int8``: a prefill's tokens are tiled against each row's codes like a GEMM), one token with
  float32 activations (``fp32``, the reference INT4 product); otherwise the weights dequantized into the
  scratch (fate.quant's ``(q - zero) * scale`` in float32, bit for bit) and multiplied, in row blocks for
  one token when the expert is larger than ``chunk_bytes`` (each output is one row's dot product, so blocks
  change no bit).

Kernel choices (``KERNELS``; ``fate-run --kernels``):

``int8`` (the default)
    q4 and q2 codes meet 8-bit activations in integer dot products (:mod:`fate.quant.kernels` documents the
    error bound: ~0.3 % of an output); f16 weights are multiplied by float32 activations in registers.
``fp32``
    the reference: q4 one-token products with float32 activations (the weights dequantized in registers as
    fate.quant does, ~1e-7 from the torch path), f16 as above; q2 and batched calls as ``torch``.
``torch``
    torch operations only: bit for bit what :class:`fate.model.experts.DenseExperts` over the dequantized
    weights gives (what the executors' exactness tests compare).

Gate and up are multiplied as one ``[2F, H]`` matrix (gate's rows, then up's, as the blob stores them).
Biases are added in place after the products (``mm`` then ``add_``, as transformers' experts do: a fused
``addmm`` would round once instead of twice).  The native kernels compute plain SwiGLU experts of one
group size only (:attr:`BlobLayout.plain`); every other expert takes the torch path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fate.quant import kernels as K
from fate.quant.layout import SWIGLU, BlobLayout, ExpertAct, QuantSpec, _dequantize, unpack_codes

Tensor = torch.Tensor

__all__ = ["swiglu", "native_q4", "native_kind", "KERNELS", "ExpertView", "WidenedExpert", "ExpertCompute",
           "DEFAULT_CHUNK_BYTES", "row_blocks"]

KERNELS = ("int8", "fp32", "torch")
"""How products are computed (module docstring): 8-bit activations, float32 activations, torch only."""

DEFAULT_CHUNK_BYTES = 4 << 20
"""Row-block size (float32 bytes) for one-token calls: a [512, 512]-expert (3 MiB) widens in one piece."""


def swiglu(x: Tensor, gate: Tensor, up: Tensor, down: Tensor, bias: tuple[Tensor, Tensor] | None = None,
           act: ExpertAct = SWIGLU) -> Tensor:
    """``down @ act(gate @ x, up @ x)`` — the MLP of every supported architecture (SwiGLU by default);
    ``bias`` (gate_up [2F], down [H]) added in place after each product."""
    g, u = F.linear(x, gate), F.linear(x, up)
    if bias is not None:
        f = gate.shape[0]
        g.add_(bias[0][:f])
        u.add_(bias[0][f:])
    if act is SWIGLU:
        y = F.linear(F.silu(g) * u, down)
    else:
        y = F.linear(act(g, u), down)
    if bias is not None:
        y.add_(bias[1])
    return y


def native_q4(spec: QuantSpec, device: str | torch.device, dtype: torch.dtype) -> bool:
    """Whether the native INT4 kernel computes experts of ``spec`` on ``device`` in ``dtype``: a CPU, float32
    compute, 4-bit codes in groups of the kernel's size, and a kernel that built on this machine."""
    return (torch.device(device).type == "cpu" and dtype == torch.float32 and spec.bits == 4
            and spec.group_size == K.GROUP and K.available())


def native_kind(spec: QuantSpec, device: str | torch.device, dtype: torch.dtype, kernels: str = "int8",
                k: int | None = None) -> int | None:
    """The :mod:`fate.quant.kernels` kind that computes matrices stored as ``spec`` (rows of ``k`` inputs, when
    known) on ``device`` in ``dtype`` under the choice ``kernels``; None where torch operations do (another
    device or dtype, ``kernels="torch"``, a group size the kernels do not take, no kernels on this machine)."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels {kernels!r}: choose one of {', '.join(KERNELS)}")
    if kernels == "torch" or torch.device(device).type != "cpu" or dtype != torch.float32:
        return None
    if spec.name == "q4" and spec.group_size == K.GROUP:
        kind = K.Q4_I8 if kernels == "int8" else K.q4_f32_kind()
    elif spec.name == "q2" and spec.group_size == K.Q2_GROUP and kernels == "int8":
        kind = K.Q2_I8
    elif spec.name == "f16":
        kind = K.F16
    else:
        return None
    if k is not None and not K.fits(kind, k):
        return None
    return kind if K.available() else None


def row_blocks(rows: int, cols: int, budget: int) -> list[tuple[int, int]]:
    """[(r0, r1)] covering ``rows`` in blocks of at most ``budget`` float32 bytes, a multiple of 16 rows
    (at least 16, or all rows when fewer)."""
    step = min(rows, budget // (4 * cols)) // 16 * 16
    step = rows if step <= 0 and rows <= 16 else max(16, step)
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


class ExpertView:
    """One expert blob read through its layout: ``parts`` holds, per matrix (gate, up, down), the
    ``(packed, scale, zero)`` views of a quantized blob or the ``(weight,)`` view of an f16 one.  The blob
    (uint8, at least ``layout.size`` bytes; a view of the map, a slot or a copy) is only read."""

    __slots__ = ("blob", "layout", "parts", "flat16", "bias")

    def __init__(self, blob: Tensor, layout: BlobLayout):
        self.blob, self.layout = blob, layout
        self.flat16 = None
        if layout.spec.is_quantized:
            self.parts = tuple((m.packed.view(blob), m.scale.view(blob), m.zero.view(blob)) for m in layout.matrices)
        else:
            self.parts = tuple((m.packed.view(blob),) for m in layout.matrices)
            # gate, up, down back to back: one flat view, where the blob's offset allows one (at an odd
            # byte the parts above are copies, and dequantize_into copies from them)
            if layout.matrices_contiguous and blob.storage_offset() % 2 == 0:
                self.flat16 = blob[:6 * layout.hidden * layout.ffn].view(torch.float16)
        # float32 (gate_up [2F], down [H]) views, or None
        self.bias = None if layout.bias is None else tuple(p.view(blob) for p in layout.bias)

    @property
    def is_view(self) -> bool:
        """Whether every part is a view of the blob (else one was copied: a misaligned float16 part)."""
        base = self.blob.untyped_storage().data_ptr()
        tensors = [t for p in self.parts for t in p] + list(self.bias or ())
        return all(t.untyped_storage().data_ptr() == base for t in tensors)

    def dequantize_into(self, out: Tensor, tmp32: Tensor, native: bool, start: int = 0, end: int | None = None) -> Tensor:
        """Weights ``start:end`` of the flat expert (gate, up, down back to back) into ``out`` (compute dtype,
        ``end - start`` elements); ``tmp32`` is the float32 intermediate (``out`` itself when none is needed).
        Partial ranges (``start``/``end`` multiples of the group size) only for f16 blobs."""
        spec, n = self.layout.spec, 3 * self.layout.hidden * self.layout.ffn
        end = n if end is None else end
        if spec.is_quantized:
            if (start, end) != (0, n):
                raise ValueError("a quantized blob dequantizes whole (widen it for row blocks)")
            fh = self.layout.hidden * self.layout.ffn
            for j, (m, part) in enumerate(zip(self.layout.matrices, self.parts)):
                dst = tmp32[j * fh:(j + 1) * fh]
                if native:
                    K.q4_dequant(*part, out=dst.view(m.shape))
                else:
                    packed, scale, zero = part
                    _dequantize(packed, scale, zero, m.shape[0], m.shape[1], m.spec, torch.float32, dst.view(m.shape))
        elif self.flat16 is not None:
            tmp32.copy_(self.flat16[start:end] if (start, end) != (0, n) else self.flat16)
        else:  # parts with gaps between them: whole matrices only
            if (start, end) != (0, n):
                raise ValueError("this f16 blob has gaps between its matrices: it dequantizes whole")
            fh = self.layout.hidden * self.layout.ffn
            for j, (w,) in enumerate(self.parts):
                tmp32[j * fh:(j + 1) * fh].copy_(w.reshape(-1))
        if tmp32 is not out:
            out.copy_(tmp32)
        return out

    def widen(self) -> "WidenedExpert":
        """The codes widened to one byte each, scales and zeros as float32 (quantized blobs only).  Groups
        of matrices with different group sizes are split to the finest common one (their scale and zero
        repeated), which changes no value."""
        spec, layout = self.layout.spec, self.layout
        fh = layout.hidden * layout.ffn
        g = math.gcd(*(m.spec.group_size for m in layout.matrices))
        n = 3 * fh
        codes = torch.empty(n, dtype=torch.uint8, device=self.blob.device)
        scale = torch.empty(n // g, dtype=torch.float32, device=self.blob.device)
        zero = torch.empty(n // g, dtype=torch.float32, device=self.blob.device)
        for j, (m, (packed, sc, ze)) in enumerate(zip(layout.matrices, self.parts)):
            unpack_codes(packed, spec.bits, out=codes[j * fh:(j + 1) * fh].view(m.shape))
            gs = slice(j * fh // g, (j + 1) * fh // g)
            rep = m.spec.group_size // g
            scale[gs].copy_(sc.reshape(-1) if rep == 1 else sc.reshape(-1).repeat_interleave(rep))
            zero[gs].copy_(ze.reshape(-1) if rep == 1 else ze.reshape(-1).repeat_interleave(rep))
        bias = None if self.bias is None else tuple(b.to(dtype=torch.float32, copy=True) for b in self.bias)
        return WidenedExpert(codes.view(n // g, g), zero.view(n // g, 1), scale.view(n // g, 1), bias)


class WidenedExpert:
    """A quantized expert with one byte per code: ``codes`` [n/g, g] uint8, ``zero`` and ``scale`` [n/g, 1]
    float32 (gate, up, down back to back).  Dequantizes by ``copy_``, ``sub_``, ``mul_``: fate.quant's
    ``(q - zero) * scale`` in float32, the same bits, for any group-aligned range.  ``bias``: the float32
    (gate_up, down) biases of an expert with biases, else None."""

    __slots__ = ("codes", "zero", "scale", "bias")

    def __init__(self, codes: Tensor, zero: Tensor, scale: Tensor, bias: tuple[Tensor, Tensor] | None = None):
        self.codes, self.zero, self.scale, self.bias = codes, zero, scale, bias

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.zero, self.scale) + (self.bias or ()))

    def dequantize_into(self, out: Tensor, tmp32: Tensor, native: bool = False, start: int = 0,
                        end: int | None = None) -> Tensor:
        codes, zero, scale = self.codes, self.zero, self.scale
        g = codes.shape[1]
        n = codes.numel()
        end = n if end is None else end
        if (start, end) != (0, n):
            a, b = start // g, end // g
            codes, zero, scale = codes[a:b], zero[a:b], scale[a:b]
        w = tmp32.view(codes.shape)
        w.copy_(codes)
        w.sub_(zero)
        w.mul_(scale)
        if tmp32 is not out:
            out.copy_(tmp32)
        return out


class ExpertCompute:
    """Computes experts of one layout on one device in one compute dtype, through one reused scratch.

    ``kernels``: one of ``KERNELS`` (module docstring); :attr:`kind` is the native kernel that serves (None:
    torch operations), :attr:`native` whether one does.  ``chunk_bytes``: one-token torch-path calls of experts
    larger than this (as float32) widen and multiply in row blocks (CPU only; ``None``: never).  One instance
    per thread: the scratch is shared by its calls (and made on first use: the native paths need none)."""

    def __init__(self, layout: BlobLayout, dtype: torch.dtype, device: str | torch.device, *,
                 kernels: str = "int8", chunk_bytes: int | None = None):
        self.layout, self.dtype, self.device = layout, dtype, torch.device(device)
        self.spec = layout.spec
        self.act = layout.act
        self.kernels = kernels
        H, Fd = layout.hidden, layout.ffn
        self.H, self.F = H, Fd
        self.n = 3 * H * Fd
        kinds = (native_kind(self.spec, self.device, dtype, kernels, H),
                 native_kind(self.spec, self.device, dtype, kernels, Fd))
        # gate/up and down on the same kernel; the kernels compute plain SwiGLU experts of one group size
        # (no biases, no clamped activation): anything else takes the torch path
        self.kind = kinds[0] if kinds[0] == kinds[1] and layout.plain else None
        self.native = self.kind is not None
        # batched calls: the 8-bit and f16 products tile a prefill's tokens over the stored weights like a GEMM;
        # the float32-activation INT4 product (the reference) serves one token, batches dequantize + matmul
        self.batched_native = self.kind in (K.Q4_I8, K.Q2_I8, K.F16)
        # whole-expert dequantization by the native one-pass copy of fate.quant's (bit for bit)
        self.native_dequant = kernels != "torch" and layout.uniform and native_q4(self.spec, self.device, dtype)
        # the float32 intermediate: dequantization (and f16 -> bfloat16, which torch does faster via
        # float32, as fate.quant does) computes in float32; f16 -> float16 and -> float32 write directly
        self.via32 = dtype != torch.float32 and not (not self.spec.is_quantized and dtype == torch.float16)
        self._one = None
        blocked = chunk_bytes is not None and self.device.type == "cpu" and 4 * self.n > chunk_bytes
        self.gu_blocks = row_blocks(2 * Fd, H, chunk_bytes) if blocked else None
        self.down_blocks = row_blocks(H, Fd, chunk_bytes) if blocked else None

    def _scratch(self) -> tuple[Tensor, Tensor]:
        if self._one is None:
            with torch.inference_mode(False):  # a normal tensor, usable in and out of inference mode
                one = torch.empty(self.n, dtype=self.dtype, device=self.device)
                one32 = torch.empty(self.n, dtype=torch.float32, device=self.device) if self.via32 else one
            self._one = (one, one32, *self.split(one))
        return self._one[:2]

    @property
    def one(self) -> Tensor:
        return self._scratch()[0]

    @property
    def one32(self) -> Tensor:
        return self._scratch()[1]

    def split(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """(gate_up [2F, H], down [H, F]) views of a flat expert."""
        fh = self.H * self.F
        return flat[:2 * fh].view(2 * self.F, self.H), flat[2 * fh:].view(self.H, self.F)

    def view(self, blob: Tensor) -> ExpertView:
        return ExpertView(blob, self.layout)

    def weights(self, src: ExpertView | WidenedExpert, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The expert's (gate_up, down) in the compute dtype: in the scratch (valid until the next call), or
        in ``out`` (a flat tensor of ``n`` elements) when given."""
        if out is None:
            one, one32 = self._scratch()
            src.dequantize_into(one, one32, self.native_dequant)
            return self._one[2], self._one[3]
        tmp = torch.empty(self.n, dtype=torch.float32, device=self.device) if self.via32 else out
        return self.split(src.dequantize_into(out, tmp, self.native_dequant))

    def dense(self, src: ExpertView | WidenedExpert) -> tuple[Tensor, Tensor, Tensor]:
        """Fresh (gate [F, H], up [F, H], down [H, F]) tensors of the expert in the compute dtype."""
        gu, down = self.weights(src, torch.empty(self.n, dtype=self.dtype, device=self.device))
        return gu[:self.F], gu[self.F:], down

    def swiglu(self, src: ExpertView | WidenedExpert, x: Tensor, out: Tensor | None = None, *,
               one_token: bool | None = None) -> Tensor:
        """The expert on tokens ``x`` [T, H]: [T, H] in ``x``'s dtype (into ``out`` [T, H] when given).

        ``one_token``: whether this is a one-token (decode) step — the one-token paths (native products, row
        blocks) serve only those, so an expert that got one token of a prefill is computed exactly as its
        other experts are (default: ``T == 1``)."""
        one = x.shape[0] == 1 if one_token is None else one_token
        if self.native and isinstance(src, ExpertView) and (one or self.batched_native):
            return self._native(src, x, out)
        if one:
            if self.gu_blocks is not None and not (isinstance(src, ExpertView) and self.spec.is_quantized):
                return self._in_blocks(src, x, out)
        gu, down = self.weights(src)
        return self.apply(x, gu, down, out, bias=self.bias(src))

    def bias(self, src: ExpertView | WidenedExpert) -> tuple[Tensor, Tensor] | None:
        """The expert's (gate_up [2F], down [H]) biases in the compute dtype, or None (no biases)."""
        b = src.bias
        if b is None or b[0].dtype == self.dtype:
            return b
        return b[0].to(self.dtype), b[1].to(self.dtype)

    def _native(self, src: ExpertView, x: Tensor, out: Tensor | None) -> Tensor:
        """gate and up in one native product (their rows side by side), SwiGLU, down: straight from the blob."""
        gate, up, down = src.parts
        a = K.mm(x.contiguous(), (gate, up), self.kind)
        h = F.silu(a[:, :self.F]) * a[:, self.F:]
        return K.mm(h, (down,), self.kind, out)

    def apply(self, x: Tensor, gu: Tensor, down: Tensor, out: Tensor | None = None, *,
              bias: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """The expert with weights already in the compute dtype (gate_up [2F, H], down [H, F]) and, for a
        layout with biases, its ``bias`` (gate_up [2F], down [H])."""
        a = F.linear(x, gu)
        if bias is not None:
            a.add_(bias[0])
        if self.act is SWIGLU:
            h = F.silu(a[:, :self.F]) * a[:, self.F:]
        else:
            h = self.act(a[:, :self.F], a[:, self.F:])
        y = F.linear(h, down) if out is None else torch.mm(h, down.t(), out=out)
        if bias is not None:
            y.add_(bias[1])
        return y

    def _in_blocks(self, src, x: Tensor, out: Tensor | None) -> Tensor:
        """One expert on one token with gate_up and down widened and multiplied in row blocks."""
        H, Fd = self.H, self.F
        fh = H * Fd
        a = torch.empty((1, 2 * Fd), dtype=x.dtype, device=x.device)
        for r0, r1 in self.gu_blocks:
            n = (r1 - r0) * H
            buf = src.dequantize_into(self.one[:n], self.one32[:n], False, r0 * H, r1 * H).view(r1 - r0, H)
            torch.mm(x, buf.t(), out=a[:, r0:r1])
        bias = self.bias(src)
        if bias is not None:
            a.add_(bias[0])
        h = F.silu(a[:, :Fd]) * a[:, Fd:] if self.act is SWIGLU else self.act(a[:, :Fd], a[:, Fd:])
        if out is None:
            out = torch.empty((1, H), dtype=x.dtype, device=x.device)
        for r0, r1 in self.down_blocks:
            n = (r1 - r0) * Fd
            buf = src.dequantize_into(self.one[:n], self.one32[:n], False, 2 * fh + r0 * Fd,
                                      2 * fh + r1 * Fd).view(r1 - r0, Fd)
            torch.mm(h, buf.t(), out=out[:, r0:r1])
        if bias is not None:
            out.add_(bias[1])
        return out
