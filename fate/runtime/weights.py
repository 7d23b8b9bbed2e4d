"""Non-expert weights (embedding, norms, attention, routers, dense and shared MLPs, LM head) as the model
reads them: checked against their crc32 at load, then held on the device.

:class:`ResidentWeights` keeps the projection matrices in their stored float16/bfloat16 when the model
computes in float32 on the CPU and widens them per call (a one-token projection runs at memory bandwidth,
so reading half the bytes and widening into cached scratch is faster, and exact); :class:`BundleWeights`
holds everything in the compute dtype (other devices and dtypes).
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F

from fate.errors import BundleError, ChecksumError
from fate.formats import constants as C
from fate.formats.bundle import Bundle
from fate.model.transformer import plain_linear
from fate.quant.expert import row_blocks

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


class BundleWeights:
    """Every non-expert tensor of the bundle, copied once to the device in the compute dtype."""

    def __init__(self, bundle: Bundle, dtype: torch.dtype, device: torch.device, verify: bool = True):
        self.tensors = {name: t.to(device=device, dtype=dtype, copy=True)  # never a view of the map: close() unmaps it
                        for name, t in verified_non_expert_tensors(bundle, verify).items()}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def get(self, name: str):
        return self.tensors.get(name)

    def linear(self, x: Tensor, name: str, bias: str | None = None) -> Tensor:
        return plain_linear(self, x, name, bias)



_PROJECTIONS = tuple(t.split("{i}.", 1)[1] for t in (
    C.T_ATTN_Q, C.T_ATTN_K, C.T_ATTN_V, C.T_ATTN_OUT, C.T_FFN_GATE, C.T_FFN_UP, C.T_FFN_DOWN,
    C.T_FFN_GATE_SHEXP, C.T_FFN_UP_SHEXP, C.T_FFN_DOWN_SHEXP))
_NARROW = (torch.float16, torch.bfloat16)


def _is_projection(name: str) -> bool:
    return name == C.T_OUTPUT or (name.startswith("blk.") and name.split(".", 2)[-1] in _PROJECTIONS)


class ResidentWeights:
    """A WeightSource that keeps the projection matrices (attention q/k/v/output, dense and shared-expert
    MLPs, the LM head) in their stored float16/bfloat16 when the model computes in float32 on the CPU,
    and widens them per call in its ``linear`` (which :class:`~fate.model.transformer.MoEModel` uses).

    Same reasoning as the experts (module docstring): a one-token projection runs at memory bandwidth,
    so reading half the bytes and widening into cached scratch is faster, and exact.  One-token calls
    widen row blocks of at most ``chunk_bytes`` (float32); batched calls, compute-bound, widen the whole
    matrix into a second scratch buffer (grown to the largest matrix used so).
    Every other tensor (norms, biases, routers, the embedding), and everything when the compute dtype
    is not float32 or the device not a CPU, is held in the compute dtype as the engine's BundleWeights
    holds it, so ``get`` returns the same tensors.
    """

    def __init__(self, tensors: dict[str, Tensor], dtype: torch.dtype, device: str | torch.device = "cpu", *,
                 chunk_bytes: int = 2 << 20):
        self.dtype = dtype
        self.device = torch.device(device)
        self.tensors: dict[str, Tensor] = {}
        self._narrow: dict[str, Tensor] = {}
        widen = dtype == torch.float32 and self.device.type == "cpu"
        for name, t in tensors.items():
            if widen and t.dtype in _NARROW and t.dim() == 2 and _is_projection(name):
                self._narrow[name] = t.to(device=self.device, copy=True).contiguous()
            else:
                self.tensors[name] = t.to(device=self.device, dtype=dtype, copy=True)  # never a view of a map
        self.chunk_bytes = int(chunk_bytes)
        blocks = {name: row_blocks(w.shape[0], w.shape[1], self.chunk_bytes) for name, w in self._narrow.items()}
        most = max(((r1 - r0) * self._narrow[n].shape[1] for n, bl in blocks.items() for r0, r1 in bl), default=0)
        self._scratch = torch.empty(most, dtype=torch.float32, device=self.device)
        # one-token calls: per matrix its row blocks as (r0, r1, stored rows, scratch view)
        self._plans: dict[str, list[tuple[int, int, Tensor, Tensor]]] = {
            name: [(r0, r1, self._narrow[name][r0:r1],
                    self._scratch[:(r1 - r0) * self._narrow[name].shape[1]].view(r1 - r0, -1)) for r0, r1 in bl]
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
        return sum(t.numel() * t.element_size() for d in (self.tensors, self._narrow) for t in d.values()) \
            + 4 * (self._scratch.numel() + self._batch_scratch.numel())

    @property
    def narrow_names(self) -> list[str]:
        """Names of the matrices kept in their stored precision."""
        return list(self._narrow)

    def get(self, name: str) -> Tensor | None:
        t = self.tensors.get(name)
        if t is None and name in self._narrow:
            return self._narrow[name].to(self.dtype)  # a fresh widened copy; the model uses linear()
        return t

    def linear(self, x: Tensor, name: str, bias: str | None = None) -> Tensor:
        b = None if bias is None else self.tensors.get(bias)
        plan = self._plans.get(name)
        if plan is None:
            t = self.tensors.get(name)
            if t is None:
                raise KeyError(f"the model's weights have no tensor {name!r}")
            return F.linear(x, t, b)
        if x.shape[0] != 1:
            w = self._narrow[name]
            if self._batch_scratch.numel() < w.numel():
                with torch.inference_mode(False):  # a normal tensor, usable in and out of inference mode
                    self._batch_scratch = torch.empty(w.numel(), dtype=torch.float32, device=self.device)
            buf = self._batch_scratch[:w.numel()].view(w.shape)
            buf.copy_(w)
            return F.linear(x, buf, b)
        if len(plan) == 1:
            _, _, w, buf = plan[0]
            buf.copy_(w)
            return F.linear(x, buf, b)
        out = torch.empty((1, self._narrow[name].shape[0]), dtype=x.dtype, device=x.device)
        for r0, r1, w, buf in plan:
            buf.copy_(w)
            if b is None:
                torch.mm(x, buf.t(), out=out[:, r0:r1])
            else:
                torch.addmm(b[r0:r1], x, buf.t(), out=out[:, r0:r1])
        return out
