"""Resident execution: every routed expert held in memory, computed as fast as this device allows.

:class:`ResidentExperts` is an ExpertExecutor (see :mod:`fate.runtime.model`) giving bit for bit what
:class:`~fate.runtime.model.DenseExperts` over ``ExpertStore.dense`` gives — same weights in the compute
dtype, same matmuls, same combination order — with less work per call.  :class:`ResidentWeights` is
the matching WeightSource for the non-expert matrices.

Why it is faster (CPU, float32 compute)
---------------------------------------
A one-token (decode) projection reads each weight once for two flops: it runs at memory bandwidth, so
the bytes read per token set the speed.  float32 weights are twice the bytes of the f16 the bundle
stores, and four times one-byte codes.  So weights stay **resident in their stored precision** and are
widened per call into a small scratch buffer that stays in cache, which the matmul then reads:

* f16 experts: ``scratch.copy_(w16)`` (exact) then the matmuls;
* q4/q2 experts: codes widened once at load to one byte per weight (scales and zeros as float32), then
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
import torch.nn.functional as F

from fate import kernels as K
from fate import quant as Q
from fate.formats import constants as C
from fate.runtime.model import ExpertRows
from fate.runtime.store import ExpertStore

Tensor = torch.Tensor

__all__ = ["ResidentExperts", "ResidentWeights", "DEFAULT_CHUNK_BYTES"]

DEFAULT_CHUNK_BYTES = 4 << 20
"""Row-block size (float32 bytes) for one-token calls: a [512, 512]-expert (3 MiB) widens in one piece."""


def _row_blocks(rows: int, cols: int, budget: int) -> list[tuple[int, int]]:
    """[(r0, r1)] covering ``rows`` in blocks of at most ``budget`` float32 bytes, a multiple of 16 rows
    (at least 16, or all rows when fewer)."""
    step = min(rows, budget // (4 * cols)) // 16 * 16
    step = rows if step <= 0 and rows <= 16 else max(16, step)
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


class ResidentExperts:
    """ExpertExecutor over a whole :class:`ExpertStore` held in memory at one precision.

    ``dense_cache_bytes``: bound on the dense (compute-dtype) copies of experts (``None``: every
    expert, ``0``: none); ``dense_bytes`` / ``dense_entries`` report what it holds and
    ``resident_bytes`` the stored-precision copies.  ``chunk_bytes``: row-block size of one-token calls.
    """

    def __init__(self, store: ExpertStore, precision: str, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", dense_cache_bytes: int | None = None, *,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, mapped: bool = False, native: bool = False):
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
        H, Fd = cfg.hidden_size, cfg.expert_ffn
        self._H, self._F = H, Fd
        self._fh = Fd * H
        self._n = 3 * Fd * H  # one expert: gate [F, H], up [F, H], down [H, F] back to back
        # the float32 intermediate: dequantization (and f16 -> bfloat16, which torch does faster via
        # float32, as fate.quant does) computes in float32; f16 -> float16 and -> float32 write directly
        self._via32 = dtype != torch.float32 and not (not self.spec.is_quantized and dtype == torch.float16)
        cpu = self.device.type == "cpu"
        # one-token calls read dense copies only where memory bandwidth is not what limits them
        self.dense_min_tokens = 2 if cpu else 1
        # one-token calls of q4 experts through fate.kernels (packed codes read as stored; results equal
        # the torch path's to ~1e-7 relative, not bit for bit): where asked for and where it runs
        self.native = bool(native and cpu and dtype == torch.float32 and self.spec.is_quantized
                           and self.spec.bits == 4 and self.spec.group_size == K.GROUP and K.available())
        budget = int(chunk_bytes) if cpu else 1 << 62
        self.chunk_bytes = budget
        if 4 * self._n <= budget:
            self._gu_blocks, self._down_blocks = None, None  # the whole expert widens in one piece
        else:
            self._gu_blocks = _row_blocks(2 * Fd, H, budget)
            self._down_blocks = _row_blocks(H, Fd, budget)

        self._src: dict[int, list[tuple[Tensor, ...]]] = {}  # layer -> per expert (w16,) or (codes, zero, scale)
        self.resident_bytes = 0
        if mapped:  # nothing read now: each expert is fetched from the map on first use
            self._src = {layer: _MappedLayer(self, layer) for layer in cfg.moe_layer_ids}
        elif self.native:  # q4 kept packed as stored: the kernel reads it, batched calls dequantize it
            for layer in cfg.moe_layer_ids:
                self._src[layer] = [_PackedExpert(store.blob(layer, e, precision).clone(), self.layout)
                                    for e in range(cfg.n_experts)]
                self.resident_bytes += cfg.n_experts * self.layout.size
        else:
            for layer in cfg.moe_layer_ids:
                self._load_layer(layer)

        kw = dict(device=self.device)
        self._one = torch.empty(self._n, dtype=dtype, **kw)  # scratch: one expert, compute dtype
        self._one32 = torch.empty(self._n, dtype=torch.float32, **kw) if self._via32 else self._one
        self._one_views = self._views(self._one)

        self.dense_cache_bytes = dense_cache_bytes
        self._dense: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        self.dense_bytes = 0
        self._fill_dense_cache()

    # -- construction ------------------------------------------------------------------------------
    def _decode(self, blob: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One quantized expert's (codes [n/g, g] uint8, zero [n/g, 1], scale [n/g, 1] float32)."""
        n, fh, g = self._n, self._fh, self.spec.group_size
        codes = torch.empty(n, dtype=torch.uint8)
        scale = torch.empty(n // g, dtype=torch.float32)
        zero = torch.empty(n // g, dtype=torch.float32)
        for j, m in enumerate(self.layout.matrices):
            Q.unpack_codes(m.packed.view(blob), self.spec.bits, out=codes[j * fh:(j + 1) * fh].view(m.shape))
            gs = slice(j * fh // g, (j + 1) * fh // g)
            scale[gs].copy_(m.scale.view(blob, flat=True))
            zero[gs].copy_(m.zero.view(blob, flat=True))
        return codes.view(n // g, g), zero.view(n // g, 1), scale.view(n // g, 1)

    def _load_layer(self, layer: int) -> None:
        per = []
        for e in range(self.cfg.n_experts):
            blob = self.store.blob(layer, e, self.precision)  # crc32-checked on first read
            per.append(self._decode(blob) if self.spec.is_quantized
                       else (blob[: self.layout.size].view(torch.float16),))
        parts = tuple(torch.stack([p[j] for p in per]).to(self.device) for j in range(len(per[0])))
        self.resident_bytes += sum(p.numel() * p.element_size() for p in parts)
        self._src[layer] = [tuple(p[e] for p in parts) for e in range(self.cfg.n_experts)]

    def _views(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """(gate_up [2F, H], down [H, F]) views of a flat expert."""
        fh, H, Fd = self._fh, self._H, self._F
        return flat[:2 * fh].view(2 * Fd, H), flat[2 * fh:].view(H, Fd)

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
        tmp32 = torch.empty(self._n, dtype=torch.float32, device=self.device) if self._via32 else None
        for layer, e in self._popularity_order():
            if limit is not None and self.dense_bytes + entry > limit:
                break
            w = torch.empty(self._n, dtype=self.dtype, device=self.device)
            self._widen(self._src[layer][e], 0, self._n, w, tmp32 if tmp32 is not None else w)
            self._dense[layer, e] = self._views(w)
            self.dense_bytes += entry

    @property
    def dense_entry_bytes(self) -> int:
        """Bytes of one expert in the compute dtype (the dense cache's unit)."""
        return self._n * torch.empty((), dtype=self.dtype).element_size()

    @property
    def dense_entries(self) -> int:
        return len(self._dense)

    # -- widening ----------------------------------------------------------------------------------
    def _widen(self, src: tuple[Tensor, ...], start: int, end: int, out: Tensor, tmp32: Tensor) -> Tensor:
        """Weights ``start:end`` of one expert's flat [n] (from its resident ``src``) into ``out``
        (compute dtype, ``end - start`` elements); ``tmp32`` is the float32 intermediate, ``out`` itself
        when none is needed.  ``start``/``end`` are multiples of the group size."""
        if isinstance(src, _PackedExpert):  # whole experts only (the native path needs no row blocks)
            fh = self._fh
            for j, part in enumerate(src.parts):  # gate, up, down back to back, as the blob has them
                K.q4_dequant(*part, out=tmp32[j * fh:(j + 1) * fh])
        elif len(src) == 1:
            tmp32.copy_(src[0] if end - start == self._n else src[0][start:end])
        else:
            codes, zero, scale = src
            g = codes.shape[1]
            if end - start != self._n:
                a, b = start // g, end // g
                codes, zero, scale = codes[a:b], zero[a:b], scale[a:b]
            w = tmp32.view(codes.shape)
            w.copy_(codes)
            w.sub_(zero)
            w.mul_(scale)
        if tmp32 is not out:
            out.copy_(tmp32)
        return out

    def get_expert(self, layer: int, e: int) -> tuple[Tensor, Tensor, Tensor]:
        """(gate [F, H], up [F, H], down [H, F]) in the compute dtype: views of the dense copy when
        there is one, else fresh tensors."""
        d = self._dense.get((layer, e))
        if d is None:
            w = torch.empty(self._n, dtype=self.dtype, device=self.device)
            tmp = torch.empty(self._n, dtype=torch.float32, device=self.device) if self._via32 else w
            d = self._views(self._widen(self._src[layer][e], 0, self._n, w, tmp))
        gu, down = d
        return gu[:self._F], gu[self._F:], down

    # -- the executor ------------------------------------------------------------------------------
    def moe(self, layer: int, x: Tensor, topk_ids: Tensor, topk_weights: Tensor) -> Tensor:
        T, k = topk_ids.shape
        if T == 1:
            return self._moe_one(layer, x, topk_ids, topk_weights)
        dense = self._dense if T >= self.dense_min_tokens else {}
        src = self._src[layer]
        Fd = self._F
        rows = ExpertRows(x, topk_ids, topk_weights)
        xs = F.embedding(rows.token_index(), x)  # row gather, faster than index_select
        for e, n in enumerate(rows.counts):
            if n:
                w = dense.get((layer, e))
                if w is None:
                    self._widen(src[e], 0, self._n, self._one, self._one32)
                    w = self._one_views
                gu, down = w
                a = F.linear(xs[rows.span(e)], gu)
                rows.put(e, F.linear(F.silu(a[:, :Fd]) * a[:, Fd:], down))
        return rows.combine()

    def _moe_one(self, layer: int, x: Tensor, topk_ids: Tensor, topk_weights: Tensor) -> Tensor:
        """One token: the k experts one after the other, each widened into the same scratch just before
        its matmuls (so the scratch is in cache when they read it)."""
        ids = topk_ids[0].tolist()
        k = len(ids)
        Fd = self._F
        src = self._src[layer]
        out = torch.empty((k, self._H), dtype=x.dtype, device=x.device)
        if self.native:
            for j, e in enumerate(ids):
                out[j:j + 1] = K.q4_swiglu(x, *src[e].parts)
            return (out * topk_weights.reshape(k, 1)).sum(0, keepdim=True).to(x.dtype)
        if self.dense_min_tokens > 1 and self._gu_blocks is None:  # the CPU path, kept lean
            one, one32, (gu, down) = self._one, self._one32, self._one_views
            for j, e in enumerate(ids):
                self._widen(src[e], 0, self._n, one, one32)
                a = F.linear(x, gu)
                torch.mm(F.silu(a[:, :Fd]) * a[:, Fd:], down.t(), out=out[j:j + 1])
            return (out * topk_weights.reshape(k, 1)).sum(0, keepdim=True).to(x.dtype)
        dense = self._dense if self.dense_min_tokens <= 1 else {}
        for j, e in enumerate(ids):
            w = dense.get((layer, e))
            if w is None and self._gu_blocks is not None:
                self._expert_in_blocks(src[e], x, out[j:j + 1])
                continue
            if w is None:
                self._widen(src[e], 0, self._n, self._one, self._one32)
                w = self._one_views
            gu, down = w
            a = F.linear(x, gu)
            torch.mm(F.silu(a[:, :Fd]) * a[:, Fd:], down.t(), out=out[j:j + 1])
        return (out * topk_weights.reshape(k, 1)).sum(0, keepdim=True).to(x.dtype)

    def _expert_in_blocks(self, src: tuple[Tensor, ...], x: Tensor, out: Tensor) -> None:
        """One expert on one token with gate_up and down widened and multiplied in row blocks."""
        H, Fd, fh = self._H, self._F, self._fh
        a = torch.empty((1, 2 * Fd), dtype=x.dtype, device=x.device)
        for r0, r1 in self._gu_blocks:
            n = (r1 - r0) * H
            buf = self._widen(src, r0 * H, r1 * H, self._one[:n], self._one32[:n]).view(r1 - r0, H)
            torch.mm(x, buf.t(), out=a[:, r0:r1])
        h = F.silu(a[:, :Fd]) * a[:, Fd:]
        for r0, r1 in self._down_blocks:
            n = (r1 - r0) * Fd
            buf = self._widen(src, 2 * fh + r0 * Fd, 2 * fh + r1 * Fd, self._one[:n], self._one32[:n]).view(r1 - r0, Fd)
            torch.mm(h, buf.t(), out=out[:, r0:r1])


class _PackedExpert:
    """A q4 expert as stored (a view of the map, or a copy): its blob, and the (packed codes, scale,
    zero) of gate, up and down as fate.kernels reads them."""

    __slots__ = ("blob", "parts")

    def __init__(self, blob: Tensor, layout):
        self.blob = blob
        self.parts = tuple((m.packed.view(blob), m.scale.view(blob), m.zero.view(blob)) for m in layout.matrices)


class _MappedLayer:
    """``src[e]`` of one layer for mapped experts, made on the expert's first use (its crc32 checked
    then) and kept: f16 — ``(w16,)``, a view of the map (gate, up and down lie back to back in the
    blob), so only the page cache holds it; q4 with the native kernel — a :class:`_PackedExpert` over
    the map, likewise; otherwise q4/q2 — the codes widened to one byte each with float32 zeros and
    scales, as :meth:`ResidentExperts._load_layer` makes them (unpacking codes on every call would cost
    ~1.5x per matrix), so memory grows by twice the packed bytes of the experts used, never more."""

    def __init__(self, owner: "ResidentExperts", layer: int):
        self.owner, self.layer = owner, layer
        self._got: dict[int, tuple[Tensor, ...]] = {}

    def __getitem__(self, e: int) -> tuple[Tensor, ...]:
        src = self._got.get(e)
        if src is None:
            o = self.owner
            blob = o.store.blob(self.layer, e, o.precision)
            if o.native:
                src = _PackedExpert(blob, o.layout)
            elif o.spec.is_quantized:
                src = o._decode(blob)
                o.resident_bytes += sum(p.numel() * p.element_size() for p in src)
            else:
                src = (blob[: o.layout.size].view(torch.float16),)
            self._got[e] = src
        return src


# --------------------------------------------------------------------------------------------------
# Non-expert weights
# --------------------------------------------------------------------------------------------------

_PROJECTIONS = tuple(t.split("{i}.", 1)[1] for t in (
    C.T_ATTN_Q, C.T_ATTN_K, C.T_ATTN_V, C.T_ATTN_OUT, C.T_FFN_GATE, C.T_FFN_UP, C.T_FFN_DOWN,
    C.T_FFN_GATE_SHEXP, C.T_FFN_UP_SHEXP, C.T_FFN_DOWN_SHEXP))
_NARROW = (torch.float16, torch.bfloat16)


def _is_projection(name: str) -> bool:
    return name == C.T_OUTPUT or (name.startswith("blk.") and name.split(".", 2)[-1] in _PROJECTIONS)


def _is_expert_tensor(name: str) -> bool:
    return (name.startswith("blk.") and ".fate_exps." in name) or name.startswith("fate.")


class ResidentWeights:
    """A WeightSource that keeps the projection matrices (attention q/k/v/output, dense and shared-expert
    MLPs, the LM head) in their stored float16/bfloat16 when the model computes in float32 on the CPU,
    and widens them per call in its ``linear`` (which :class:`~fate.runtime.model.MoEModel` uses).

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
        blocks = {name: _row_blocks(w.shape[0], w.shape[1], self.chunk_bytes) for name, w in self._narrow.items()}
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
        return cls({n: bundle.tensor(n) for n in bundle.tensors if not _is_expert_tensor(n)}, dtype, device, **kw)

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
