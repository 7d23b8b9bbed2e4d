"""Resident execution: every routed expert held in memory, computed as fast as this device allows.

:class:`ResidentExperts` is an ExpertExecutor (see :mod:`fate.model.experts`) giving bit for bit what
:class:`~fate.model.experts.DenseExperts` over ``ExpertStore.dense`` gives — same weights in the compute
dtype, same matmuls, same combination order — with less work per call.  Each expert is computed by the
one primitive, :class:`fate.quant.expert.ExpertCompute`; this module decides in which form each expert
is held.  :class:`fate.runtime.weights.ResidentWeights` is the matching WeightSource for the non-expert
matrices.

Why it is faster (CPU, float32 compute)
---------------------------------------
A one-token (decode) projection reads each weight once for two flops: it runs at memory bandwidth, so
the bytes read per token set the speed.  float32 weights are twice the bytes of the f16 the bundle
stores, and four times one-byte codes.  So weights stay **resident in their stored precision**: with the
native kernels (``kernels`` ``int8``/``fp32``, x86 with AVX2) they are read as stored by
:mod:`fate.quant.kernels`; on the torch path they are widened per call into a small scratch buffer that stays
in cache, which the matmul then reads:

* q4/q2 experts with the kernels (``int8``): kept packed as stored, every call (one token or a prefill's
  tokens, tiled like a GEMM) multiplies the codes with 8-bit activations; ``fp32``: q4 one-token products
  with float32 activations, batched calls dequantized in one native pass;
* f16 experts with the kernels: widened in registers; on the torch path ``scratch.copy_(w16)`` (exact) then
  the matmuls;
* q4/q2 experts on the torch path: codes widened once at load to one byte per weight (scales and zeros as float32), then
  per call ``copy_``, ``sub_(zero)``, ``mul_(scale)`` — the ``(q - zero) * scale`` in float32 of
  :mod:`fate.quant`, hence the same bits (4-bit codes kept packed would save 0.5 byte per weight but
  cost an unpacking pass per call: 144 us instead of 98 us per [512, 512] matrix, see below);
* matrices larger than ``chunk_bytes`` (as float32) are widened and multiplied in row blocks, so the
  scratch stays in cache; each output element is one row's dot product, so splitting rows changes no
  bit (tests/test_resident.py checks this with tiny blocks).

Measured on a 2-core Zen 4 VM shared with other jobs, 1 thread (``python benchmarks/runtime.py
--kernels``): one-token matmul by a [512, 512] matrix read from memory, float32 weights 104 us; f16
widened into scratch + matmul 63 us; q4 / q2 one-byte codes dequantized into scratch + matmul 98 / 101
us; packed codes through fate.quant's dequantization 144 / 176 us; a torch.compile'd q4 dequantization
206 us.  torch's fused int4 CPU kernel (``_weight_int4pack_mm_for_cpu``) takes 452 us with float32
activations and 17 us with bfloat16 ones, but neither gives DenseExperts' bits (bfloat16 activations
change the function), so it is not used.  Whole model (``python benchmarks/runtime.py``, 8 layers, 4 of
16 experts per token): decode 61 tok/s with DenseExperts over f16 and float32 non-expert weights, 67
with ResidentExperts, 86 with ResidentWeights as well (transformers: 41).  Batching a token's k experts
into one ``bmm`` was slower in the model (its 12 MB of scratch falls out of cache) although faster
alone, so experts run one after the other through one scratch buffer.

The scratch buffers are shared by all calls: one executor (and one ResidentWeights) per thread.

Dense cache
-----------
``dense_cache_bytes`` keeps up to that many bytes of experts dequantized in the compute dtype (most
popular first by the bundle's calibration counts; filled once at construction; ``None``: all, ``0``:
none).  They serve calls with at least ``dense_min_tokens`` tokens: on CPU only batched calls (prefill),
since a one-token call is faster from the stored precision; on other devices every call.  On the CPU
above the dense cache did not speed prefill up either (a prefill matmul is compute-bound: widening an
expert costs ~10% of its matmuls, about what reading float32 weights from memory costs instead;
benchmarks/runtime.py, ``f16+dense``), so 0 is the recommended CPU setting; it is there for devices
where the trade differs (untested on CUDA so far).
"""

from __future__ import annotations

import torch

from fate.formats import constants as C
from fate.model.experts import ExpertRows
from fate.quant.expert import DEFAULT_CHUNK_BYTES, ExpertCompute, ExpertView, WidenedExpert, row_blocks
from fate.runtime.experts.store import ExpertStore

Tensor = torch.Tensor

__all__ = ["ResidentExperts", "DEFAULT_CHUNK_BYTES", "row_blocks"]


class ResidentExperts:
    """ExpertExecutor over a whole :class:`ExpertStore` held in memory at one precision.

    Forms, chosen once: ``mapped`` (CPU) reads each expert from the bundle's map on its first use and
    keeps it — f16 and natively computed q4/q2 as views of the map (only the page cache holds them), torch-path
    q4/q2 widened to one byte per code; otherwise every expert is read now: native q4/q2 copied packed, f16
    copied, torch-path q4/q2 widened (on a GPU, into device memory).

    ``dense_cache_bytes``: bound on the dense (compute-dtype) copies of experts (``None``: every
    expert, ``0``: none); ``dense_bytes`` / ``dense_entries`` report what it holds and
    ``resident_bytes`` the stored-precision copies.  ``chunk_bytes``: row-block size of one-token calls.
    ``kernels``: how experts are computed (:data:`fate.quant.expert.KERNELS`; the default ``torch`` gives
    DenseExperts' bits, the engine passes ``fate-run --kernels``).
    """

    def __init__(self, store: ExpertStore, precision: str, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", dense_cache_bytes: int | None = None, *,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, mapped: bool = False, kernels: str = "torch"):
        if dense_cache_bytes is not None and dense_cache_bytes < 0:
            raise ValueError(f"dense_cache_bytes must be ≥ 0 or None, got {dense_cache_bytes}")
        if mapped and torch.device(device).type != "cpu":
            raise ValueError("mapped experts are read in place from the bundle's memory map: CPU only")
        self.mapped = mapped
        self.store = store
        self.precision = store.check_precision(precision)
        self.layout = store.layouts[precision]
        self.spec = self.layout.spec
        self.cfg = cfg = store.cfg
        self.dtype = dtype
        self.device = torch.device(device)
        cpu = self.device.type == "cpu"
        self.compute = ExpertCompute(self.layout, dtype, self.device, kernels=kernels,
                                     chunk_bytes=int(chunk_bytes) if cpu else None)
        self.native = self.compute.native
        self.chunk_bytes = int(chunk_bytes) if cpu else 1 << 62
        # one-token calls read dense copies only where memory bandwidth is not what limits them
        self.dense_min_tokens = 2 if cpu else 1
        self.resident_bytes = 0
        self._got: dict[tuple[int, int], ExpertView | WidenedExpert] = {}
        if not mapped:
            for layer in cfg.moe_layer_ids:
                self._load_layer(layer)
        self.dense_cache_bytes = dense_cache_bytes
        self._dense: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        self.dense_bytes = 0
        self._fill_dense_cache()

    @property
    def _gu_blocks(self):
        return self.compute.gu_blocks

    # -- forms -------------------------------------------------------------------------------------
    def _form(self, blob: Tensor) -> ExpertView | WidenedExpert:
        view = ExpertView(blob, self.layout)
        if self.native or not self.spec.is_quantized:
            return view  # read as stored: the kernels take packed codes, f16 widens in one copy
        return view.widen()  # unpacking 4/2-bit codes on every call would cost ~1.5x per matrix

    def _load_layer(self, layer: int) -> None:
        forms = []
        for e in range(self.cfg.n_experts):
            blob = self.store.blob(layer, e, self.precision)  # crc32-checked on first read
            if self.native or not self.spec.is_quantized or self.device.type != "cpu":
                blob = blob.to(self.device, copy=True)  # a copy: never a view of a map that close() unmaps
            forms.append(self._form(blob))
        for e, f in enumerate(forms):
            self._got[layer, e] = f
            self.resident_bytes += f.nbytes if isinstance(f, WidenedExpert) else self.layout.size

    def source(self, layer: int, e: int) -> ExpertView | WidenedExpert:
        """Expert ``e`` of ``layer`` in its held form (read from the map on first use when mapped)."""
        src = self._got.get((layer, e))
        if src is None:
            src = self._got[layer, e] = self._form(self.store.blob(layer, e, self.precision))
            if isinstance(src, WidenedExpert):
                self.resident_bytes += src.nbytes
        return src

    def _popularity_order(self) -> list[tuple[int, int]]:
        """(layer, expert) pairs, most routed-to first by the bundle's calibration counts (ties and
        bundles without calibration: shallow layers first, then expert id)."""
        pairs = [(layer, e) for layer in self.cfg.moe_layer_ids for e in range(self.cfg.n_experts)]
        bundle = self.store.bundle
        if bundle.has(C.T_CALIB_POPULARITY):
            pop = bundle.tensor(C.T_CALIB_POPULARITY)
            if pop.dim() == 2 and pop.shape[0] >= self.cfg.n_layers and pop.shape[1] == self.cfg.n_experts:
                pairs.sort(key=lambda p: -int(pop[p[0], p[1]]))
        return pairs

    def _fill_dense_cache(self) -> None:
        entry = self.dense_entry_bytes
        limit = self.dense_cache_bytes
        if limit is not None and limit < entry:
            return
        for layer, e in self._popularity_order():
            if limit is not None and self.dense_bytes + entry > limit:
                break
            w = torch.empty(self.compute.n, dtype=self.dtype, device=self.device)
            self._dense[layer, e] = self.compute.weights(self.source(layer, e), w)
            self.dense_bytes += entry

    @property
    def dense_entry_bytes(self) -> int:
        """Bytes of one expert in the compute dtype (the dense cache's unit)."""
        return self.compute.n * torch.empty((), dtype=self.dtype).element_size()

    @property
    def dense_entries(self) -> int:
        return len(self._dense)

    def get_expert(self, layer: int, e: int) -> tuple[Tensor, Tensor, Tensor]:
        """(gate [F, H], up [F, H], down [H, F]) in the compute dtype: views of the dense copy when
        there is one, else fresh tensors."""
        d = self._dense.get((layer, e))
        if d is None:
            return self.compute.dense(self.source(layer, e))
        gu, down = d
        return gu[:self.compute.F], gu[self.compute.F:], down

    # -- the executor ------------------------------------------------------------------------------
    def moe(self, layer: int, x: Tensor, topk_ids: Tensor, topk_weights: Tensor) -> Tensor:
        rows = ExpertRows(x, topk_ids, topk_weights)
        dense = self._dense if x.shape[0] >= self.dense_min_tokens else {}
        compute = self.compute
        for e in rows.experts:
            w = dense.get((layer, e))
            xs = rows.tokens(e)
            src = self.source(layer, e)
            rows.put(e, compute.swiglu(src, xs, one_token=rows.T == 1) if w is None
                     else compute.apply(xs, *w, bias=compute.bias(src)))
        return rows.combine()
