"""Non-expert weights (embedding, norms, attention, routers, dense and shared MLPs, LM head) as the model
reads them: checked against their crc32 at load, then held on the device.

:class:`ResidentWeights` keeps the projection matrices as stored (float16/bfloat16, or 8-bit codes with a
float16 scale per 32 from ``fate-convert --dtype q8``) when the model computes in float32 on the CPU, and
multiplies them as :class:`fate.quant.expert.ExpertCompute` multiplies experts, under the same kernel choice
(``KERNELS``): one-token f16 products by the native kernel with the weights widened in registers, q8 products
on 8-bit activations (any number of tokens), or — ``torch`` — widened per call into cached scratch and
multiplied by torch (a one-token projection runs at memory bandwidth, so reading half the bytes beats holding
float32; bit for bit BundleWeights' results).  :class:`BundleWeights` holds everything in the compute dtype
(other devices and dtypes; q8 projections dequantized once).
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F

from fate.errors import BundleError, ChecksumError
from fate.formats import constants as C
from fate.formats.bundle import Bundle
from fate.model.transformer import plain_linear
from fate.quant import kernels as K
from fate.quant.expert import KERNELS, row_blocks
from fate.quant.q8 import dequantize_q8

Tensor = torch.Tensor


def verified_non_expert_tensors(bundle: Bundle, verify: bool = True) -> dict[str, torch.Tensor]:
    """Every non-expert tensor of the bundle as stored (views of the map), each checked against its
    crc32 first unless ``verify`` is off: one pass over bytes that are read at load anyway."""
    crcs = {}
    if verify:
        names = bundle.get(C.K_NON_EXPERT_CRC_NAMES)
        if not bundle.has(C.T_NON_EXPERT_CRC) or not isinstance(names, list):
            raise BundleError(f"{bundle.path}: the checksums of the non-expert tensors are missing "
                              "(re-convert it, or run with --no-verify)")
        values = bundle.tensor(C.T_NON_EXPERT_CRC)
        if values.shape != (len(names),):
            raise BundleError(f"{bundle.path}: {C.T_NON_EXPERT_CRC} does not match {C.K_NON_EXPERT_CRC_NAMES}")
        crcs = dict(zip(names, values.tolist()))
    out = {}
    for name in bundle.tensors:
        if not C.is_model_tensor(name):
            continue
        if verify:
            if name not in crcs:
                raise BundleError(f"{bundle.path}: tensor {name} has no checksum")
            if zlib.crc32(memoryview(bundle.raw(name).numpy())) != crcs[name]:
                raise ChecksumError(f"{bundle.path}: checksum mismatch in tensor {name}; the file is corrupt: "
                                    "re-download or re-convert it")
        out[name] = bundle.tensor(name)
    return out


def _q8_pairs(tensors: dict[str, Tensor]) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, Tensor]]:
    """({projection name: (codes, scale)} for the q8 matrices, every other tensor by name)."""
    q8 = {n: (t, tensors[C.q8_scale_name(n)]) for n, t in tensors.items()
          if t.dtype == torch.int8 and C.is_projection(n) and C.q8_scale_name(n) in tensors}
    scales = {C.q8_scale_name(n) for n in q8}
    return q8, {n: t for n, t in tensors.items() if n not in q8 and n not in scales}


class BundleWeights:
    """Every non-expert tensor of the bundle, copied once to the device in the compute dtype."""

    def __init__(self, bundle: Bundle, dtype: torch.dtype, device: torch.device, verify: bool = True):
        q8, rest = _q8_pairs(verified_non_expert_tensors(bundle, verify))
        # never a view of the map: close() unmaps it
        self.tensors = {name: t.to(device=device, dtype=dtype, copy=True) for name, t in rest.items()}
        for name, (codes, scale) in q8.items():
            self.tensors[name] = dequantize_q8(codes, scale).to(device=device, dtype=dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def get(self, name: str):
        return self.tensors.get(name)

    def linear(self, x: Tensor, name: str, bias: str | None = None) -> Tensor:
        return plain_linear(self, x, name, bias)


_NARROW = (torch.float16, torch.bfloat16)


class ResidentWeights:
    """A WeightSource that keeps the projection matrices (attention q/k/v/output, dense and shared-expert
    MLPs, the LM head: :func:`fate.formats.constants.is_projection`) as stored when the model computes in
    float32 on the CPU — float16/bfloat16, or q8 codes and scales — and computes them in its ``linear``
    (which :class:`~fate.model.transformer.MoEModel` uses) under ``kernels`` (:data:`KERNELS`):

    * ``int8`` / ``fp32``: float16 products by the native kernel (weights widened in registers, float32
      activations; ~1e-7 from F.linear's sums; batched calls tiled like a GEMM, twice torch's widen + matmul
      on the CPU measured); q8 products on 8-bit activations under ``int8``;
    * otherwise (``torch``, bfloat16, q8 under ``fp32``): widened per call — one-token
      calls in row blocks of at most ``chunk_bytes`` (float32) through cached scratch, batched calls
      (compute-bound) the whole matrix into a second scratch buffer (grown to the largest matrix used so) —
      and multiplied by torch: for f16, BundleWeights' bits.

    Every other tensor (norms, biases, routers, the embedding), and everything when the compute dtype
    is not float32 or the device not a CPU, is held in the compute dtype as the engine's BundleWeights
    holds it, so ``get`` returns the same tensors.
    """

    def __init__(self, tensors: dict[str, Tensor], dtype: torch.dtype, device: str | torch.device = "cpu", *,
                 chunk_bytes: int = 2 << 20, kernels: str = "torch"):
        if kernels not in KERNELS:
            raise ValueError(f"kernels {kernels!r}: choose one of {', '.join(KERNELS)}")
        self.dtype = dtype
        self.device = torch.device(device)
        self.kernels = kernels
        self.tensors: dict[str, Tensor] = {}
        self._narrow: dict[str, Tensor] = {}  # f16/bf16 projections as stored
        self._q8: dict[str, tuple[Tensor, Tensor]] = {}  # q8 projections: codes, scale as stored
        self._q8_scale32: dict[str, Tensor] = {}  # their scales as float32 [N, K / g, 1] (the torch path, lazily)
        widen = dtype == torch.float32 and self.device.type == "cpu"
        q8, rest = _q8_pairs(tensors)
        for name, t in rest.items():
            if widen and t.dtype in _NARROW and t.dim() == 2 and C.is_projection(name):
                self._narrow[name] = t.to(device=self.device, copy=True).contiguous()
            else:
                self.tensors[name] = t.to(device=self.device, dtype=dtype, copy=True)  # never a view of a map
        for name, (codes, scale) in q8.items():
            if widen:
                codes, scale = codes.to(self.device, copy=True).contiguous(), scale.to(self.device, copy=True)
                self._q8[name] = (codes, scale.contiguous())
            else:
                self.tensors[name] = dequantize_q8(codes, scale).to(device=self.device, dtype=dtype)
        native = kernels != "torch" and widen and K.available()
        # the native kernel per stored matrix (None: the torch path)
        self._kind: dict[str, int] = {}
        for name, w in self._narrow.items():
            if native and w.dtype == torch.float16 and K.fits(K.F16, w.shape[1]):
                self._kind[name] = K.F16
        for name, (codes, _) in self._q8.items():
            if native and kernels == "int8" and K.fits(K.Q8_I8, codes.shape[1]):
                self._kind[name] = K.Q8_I8
        self.chunk_bytes = int(chunk_bytes)
        shapes = {n: tuple(w.shape) for n, w in self._narrow.items()} | {n: tuple(c.shape) for n, (c, _) in self._q8.items()}
        blocks = {name: row_blocks(r, c, self.chunk_bytes) for name, (r, c) in shapes.items()}
        most = max(((r1 - r0) * shapes[n][1] for n, bl in blocks.items() for r0, r1 in bl), default=0)
        self._scratch = torch.empty(most, dtype=torch.float32, device=self.device)
        # one-token torch-path calls: per matrix its row blocks as (r0, r1, scratch view)
        self._plans: dict[str, list[tuple[int, int, Tensor]]] = {
            name: [(r0, r1, self._scratch[:(r1 - r0) * shapes[name][1]].view(r1 - r0, -1)) for r0, r1 in bl]
            for name, bl in blocks.items()}
        # batched calls widen a whole matrix (splitting a many-token matmul by rows can change bits)
        self._batch_scratch = torch.empty(0, dtype=torch.float32, device=self.device)

    @classmethod
    def from_bundle(cls, bundle, dtype: torch.dtype, device: str | torch.device = "cpu", **kw) -> "ResidentWeights":
        """Every non-expert tensor of ``bundle`` (those the engine's BundleWeights holds), as stored."""
        return cls({n: bundle.tensor(n) for n in bundle.tensors if C.is_model_tensor(n)}, dtype, device, **kw)

    @property
    def nbytes(self) -> int:
        """Bytes held: stored-precision matrices, compute-dtype tensors and the scratch buffers."""
        stored = [t for d in (self.tensors, self._narrow, self._q8_scale32) for t in d.values()]
        stored += [t for pair in self._q8.values() for t in pair]
        return sum(t.numel() * t.element_size() for t in stored) \
            + 4 * (self._scratch.numel() + self._batch_scratch.numel())

    @property
    def narrow_names(self) -> list[str]:
        """Names of the matrices kept in their stored precision (float16/bfloat16 or q8)."""
        return list(self._narrow) + list(self._q8)

    @property
    def native_names(self) -> list[str]:
        """Names of the matrices the native kernels compute."""
        return list(self._kind)

    def get(self, name: str) -> Tensor | None:
        t = self.tensors.get(name)
        if t is None and name in self._narrow:
            return self._narrow[name].to(self.dtype)  # a fresh widened copy; the model uses linear()
        if t is None and name in self._q8:
            return dequantize_q8(*self._q8[name]).to(self.dtype)
        return t

    def _widen_into(self, name: str, buf: Tensor, r0: int, r1: int) -> Tensor:
        """Rows r0:r1 of stored matrix ``name`` as float32 into ``buf`` [r1 - r0, K] (exact)."""
        w = self._narrow.get(name)
        if w is not None:
            return buf.copy_(w[r0:r1])
        codes, scale = self._q8[name]
        s32 = self._q8_scale32.get(name)
        if s32 is None:  # the torch path's float32 scales, made on its first use (the kernels read the f16 ones)
            with torch.inference_mode(False):
                s32 = self._q8_scale32[name] = scale.float().view(codes.shape[0], -1, 1)
        b3 = buf.view(r1 - r0, -1, C.Q8_GROUP)
        b3.copy_(codes[r0:r1].view(b3.shape))
        return b3.mul_(s32[r0:r1]).view(buf.shape)

    def linear(self, x: Tensor, name: str, bias: str | None = None) -> Tensor:
        b = None if bias is None else self.tensors.get(bias)
        plan = self._plans.get(name)
        if plan is None:
            t = self.tensors.get(name)
            if t is None:
                raise KeyError(f"the model's weights have no tensor {name!r}")
            return F.linear(x, t, b)
        kind = self._kind.get(name)
        if kind is not None:
            y = K.mm(x.contiguous(), (self._q8[name] if kind == K.Q8_I8 else (self._narrow[name],),), kind)
            return y if b is None else y.add_(b)
        if x.shape[0] != 1:
            rows, cols = plan[-1][1], plan[0][2].shape[1]
            if self._batch_scratch.numel() < rows * cols:
                with torch.inference_mode(False):  # a normal tensor, usable in and out of inference mode
                    self._batch_scratch = torch.empty(rows * cols, dtype=torch.float32, device=self.device)
            buf = self._widen_into(name, self._batch_scratch[:rows * cols].view(rows, cols), 0, rows)
            return F.linear(x, buf, b)
        if len(plan) == 1:
            r0, r1, buf = plan[0]
            return F.linear(x, self._widen_into(name, buf, r0, r1), b)
        out = torch.empty((1, plan[-1][1]), dtype=x.dtype, device=x.device)
        for r0, r1, buf in plan:
            self._widen_into(name, buf, r0, r1)
            if b is None:
                torch.mm(x, buf.t(), out=out[:, r0:r1])
            else:
                torch.addmm(b[r0:r1], x, buf.t(), out=out[:, r0:r1])
        return out
