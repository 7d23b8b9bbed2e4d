"""The offloading executor and the cross-layer prefetcher: experts stream from the bundle into
per-layer device slot pools (fate.runtime.cache) through the TransferEngine.

Per MoE layer and forward step (``OffloadedExperts.moe``):
1. the experts the router chose are ranked by how many tokens want them (prefill) — in prefill the
   least popular ones, whose token→expert assignments add up to at most ``int2_share``, use INT2;
2. resident-and-ready experts are hits; named-but-unfinished prefetches are waited for (late);
   everything else is loaded on demand at once, most popular first, so compute starts early and
   hides later copies; when the slots run out, later loads start as soon as computed experts free
   theirs;
3. each expert is computed on all its tokens as soon as its bytes are ready.

``Prefetcher`` is the model's observer: at layer i's gate input it applies layer i+1's router to a CPU
copy (the Fate paper's cross-layer prediction) and queues transfers for the top k + m candidates
(decode) or the predicted experts by predicted token count (prefill), never evicting an expert that
is in use, in flight or itself predicted.
"""

from __future__ import annotations

import torch

from fate import kernels as K
from fate import quant as Q
from fate.runtime.model import ExpertRows, swiglu_mlp
from fate.runtime.stats import ExpertStats
from fate.runtime.transfer import TransferEngine

RANK = {"q2": 0, "q4": 1, "f16": 2}  # a cached copy of higher rank serves a request for a lower one


def hybrid_precisions(ranked: list[int], counts: list[int], share: float, high: str, low: str | None) -> dict[int, str]:
    """The least popular experts whose assignments add up to ≤ ``share`` of all get ``low``."""
    out = {e: high for e in ranked}
    if low is None or share <= 0:
        return out
    total = sum(counts[e] for e in ranked)
    acc = 0
    for e in reversed(ranked):  # least popular first
        acc += counts[e]
        if acc > share * total:
            break
        out[e] = low
    return out


class Prefetcher:
    def __init__(self, cfg, routers: dict[int, torch.Tensor], cache, transfer: TransferEngine, *,
                 extra: int, decode_precision: str, low_precision: str | None, int2_share: float,
                 max_new: int | None = None):
        self.cfg, self.cache, self.transfer = cfg, cache, transfer
        self.max_new = max_new  # decode: new copies per prediction (those the link can move in the window)
        self.routers = {i: w.detach().to("cpu", torch.float32) for i, w in routers.items()}
        self.extra, self.decode_precision = extra, decode_precision
        self.low_precision, self.int2_share = low_precision, int2_share
        self.predicted: dict[int, set[int]] = {}
        self._pending: list[tuple] = []  # copies named at layer i's gate, queued once layer i's own are

    def flush(self) -> None:
        """Queue the copies of the last prediction.  The executor calls this right after queueing its
        layer's demand loads: a copy cannot be interrupted once the link has started it, so a next-layer
        prefetch queued first would make this layer's misses wait a whole copy for it."""
        pending, self._pending = self._pending, []
        for job in pending:
            entry = job[4]
            if not entry.released:
                self.transfer.submit(*job)

    def on_gate_input(self, layer: int, g: torch.Tensor) -> None:
        nxt = layer + 1
        router = self.routers.get(nxt)
        if router is None:
            return
        x = g.detach().to("cpu", torch.float32)
        logits = x @ router.T
        k, E = self.cfg.top_k, self.cfg.n_experts
        lc = self.cache.layer(nxt)
        if x.shape[0] == 1:  # name no more candidates than the layer can hold
            ranked = logits[0].argsort(descending=True, stable=True)[: min(E, k + self.extra, lc.n_slots)].tolist()
            precisions = {e: self.decode_precision for e in ranked}
        else:
            counts = torch.bincount(logits.topk(k, dim=-1).indices.flatten(), minlength=E)
            order = counts.argsort(descending=True, stable=True).tolist()
            ranked = [e for e in order if counts[e] > 0][: lc.n_slots]
            precisions = hybrid_precisions(ranked, counts.tolist(), self.int2_share, self.decode_precision,
                                           self.low_precision)
        self.predicted[nxt] = pins = set(ranked)  # the cache itself never evicts an entry still in flight
        budget = self.max_new if x.shape[0] == 1 and self.max_new is not None else len(ranked)
        for rank, e in enumerate(ranked):
            if budget <= 0:
                break
            got = lc.lookup_or_reserve(e, precisions[e], prefetched=True, pinned=pins)
            if got is None:
                break  # every slot holds an expert in use, in flight or predicted
            entry, _, fresh = got
            if fresh:  # else resident or arriving already; a lower-precision copy is upgraded on use
                self._pending.append((nxt, e, precisions[e], entry.slot, entry, 1.0 + rank))
                budget -= 1
        if layer < 0 or not self.cfg.moe_layers[layer]:  # no demand loads of its own to wait for
            self.flush()


class OffloadedExperts:
    """ExpertExecutor over an ExpertCache fed by a TransferEngine."""

    def __init__(self, cfg, store, cache, transfer: TransferEngine, stats: ExpertStats, *, dtype, device,
                 decode_precision: str = "q4", low_precision: str | None = None, int2_share: float = 0.3,
                 keep: bool = True, prefetcher: Prefetcher | None = None):
        self.cfg, self.store, self.cache, self.transfer, self.stats = cfg, store, cache, transfer, stats
        self.dtype, self.device = dtype, device
        self.decode_precision, self.low_precision, self.int2_share = decode_precision, low_precision, int2_share
        self.keep, self.prefetcher = keep, prefetcher
        H, Fd = cfg.hidden_size, cfg.expert_ffn
        # one expert's dense weights, rewritten by every computed expert: fresh multi-MB tensors per
        # call cost more than the dequantization itself (page faults on CPU)
        gu = torch.empty((2 * Fd, H), dtype=dtype, device=device)
        self._scratch = (gu[:Fd], gu[Fd:], torch.empty((H, Fd), dtype=dtype, device=device))
        # one-token q4 products straight from the packed slot (fate.kernels), where it runs
        self._parts: dict[tuple[int, int, str], list] = {}
        self._native = (torch.device(device).type == "cpu" and dtype == torch.float32
                        and any(store.specs[p].bits == 4 and store.specs[p].group_size == K.GROUP
                                for p in store.precisions) and K.available())

    def _slot_parts(self, layer: int, slot_id: int, precision: str, slot: torch.Tensor, layout):
        """(packed, scale, zero) views of gate, up and down in a slot: the same views whatever expert the
        slot holds, so made once per (layer, slot, precision) — nine views cost more than the products."""
        key = (layer, slot_id, precision)
        parts = self._parts.get(key)
        if parts is None:
            parts = [(m.packed.view(slot), m.scale.view(slot), m.zero.view(slot)) for m in layout.matrices]
            base = slot.untyped_storage().data_ptr()
            if all(t.untyped_storage().data_ptr() == base for p in parts for t in p):  # views, not copies
                self._parts[key] = parts
        return parts

    def _reserve_waiting(self, lc, e, precision, pins, phase, layer):
        """Reserve a slot for ``e``; while every slot is pinned or in flight, wait for a copy to land."""
        while True:
            got = lc.reserve(e, precision, prefetched=False, pinned=pins)
            if got is not None:
                return got
            in_flight = [x for x in lc.entries() if not x.ready.is_set()]
            if not in_flight:
                raise RuntimeError(f"layer {layer}: no expert slot can be freed (cache of {lc.n_slots} slots)")
            self.stats.stalled(phase, layer, self.transfer.wait(in_flight[0]))

    def moe(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        T, k = topk_ids.shape
        E = self.cfg.n_experts
        phase = "decode" if T == 1 else "prefill"
        rows = ExpertRows(x, topk_ids, topk_weights, E)
        counts = rows.counts
        ranked = sorted((e for e in range(E) if counts[e]), key=lambda e: -counts[e])
        if phase == "prefill":
            want = hybrid_precisions(ranked, counts, self.int2_share, self.decode_precision, self.low_precision)
        else:
            want = {e: self.decode_precision for e in ranked}
        predicted = self.prefetcher.predicted.pop(layer, None) if self.prefetcher is not None else None

        lc = self.cache.layer(layer)
        if predicted is not None:  # prefetches for this layer that it does not need and that have not
            for entry in lc.entries():  # arrived are cancelled: the link is better spent on demand loads
                if entry.prefetched and not entry.ready.is_set() and entry.expert not in want:
                    lc.drop(entry.expert)
        pins = set(ranked)  # pinned until computed (in-flight entries are never evicted either)
        entries, waiting = {}, []
        hits = late = misses = 0
        for e in ranked:
            entry = lc.lookup(e)
            if entry is not None and RANK[entry.precision] >= RANK[want[e]]:
                if entry.ready.is_set():
                    hits += 1
                else:
                    late += 1
                    self.transfer.promote(entry)  # needed now: ahead of every prefetch still queued
                entries[e] = entry
                continue
            misses += 1
            if entry is not None:  # a cached INT2 copy, INT4 wanted: upgrade in place
                self.stats.stalled(phase, layer, self.transfer.wait(entry))
                entry = lc.replace_precision(e, want[e])
                self.transfer.submit(layer, e, want[e], entry.slot, entry, TransferEngine.DEMAND)
                entries[e] = entry
                continue
            got = lc.reserve(e, want[e], prefetched=False, pinned=pins)
            if got is None:
                waiting.append(e)  # no free slot until computed experts (or in-flight copies) release theirs
                continue
            entries[e], _ = got
            self.transfer.submit(layer, e, want[e], entries[e].slot, entries[e], TransferEngine.DEMAND)

        if self.prefetcher is not None:
            self.prefetcher.flush()  # the next layer's prefetches queue behind this layer's demand loads
        # hits first (their bytes are here), then the rest in the order their loads were queued
        compute_order = sorted(entries, key=lambda e: (not entries[e].ready.is_set(), ranked.index(e))) + waiting
        i = 0
        while i < len(compute_order):
            e = compute_order[i]
            entry = entries.get(e)
            if entry is None:  # a waiting expert: a slot is free now, or will be once a copy lands
                got = self._reserve_waiting(lc, e, want[e], pins, phase, layer)
                entry, _ = got
                entries[e] = entry
                self.transfer.submit(layer, e, want[e], entry.slot, entry, TransferEngine.DEMAND)
            self.stats.stalled(phase, layer, self.transfer.wait(entry))
            lc.touch(e)
            layout = self.store.layouts[entry.precision]
            slot = self.transfer.slot(layer, entry.slot, layout.size)
            xs = x.index_select(0, rows.token_index(rows.span(e)))
            spec = layout.spec
            if self._native and spec.bits == 4 and spec.group_size == K.GROUP:
                parts = self._slot_parts(layer, entry.slot, entry.precision, slot, layout)
                if T == 1:
                    rows.put(e, K.q4_swiglu(xs, *parts))
                else:  # fate.quant's dequantization, bit for bit, in one native pass
                    gate, up, down = (K.q4_dequant(*p, out=o) for p, o in zip(parts, self._scratch))
                    rows.put(e, swiglu_mlp(xs, gate, up, down))
            else:
                gate, up, down = Q.unpack_expert(slot, layout, dtype=self.dtype, out=self._scratch)
                rows.put(e, swiglu_mlp(xs, gate, up, down))
            self.transfer.read_done(layer, entry.slot)
            pins.discard(e)
            nxt = next((w for w in waiting if w not in entries), None)
            if nxt is not None:  # this expert's slot may be reused: start the next waiting load now
                got = lc.reserve(nxt, want[nxt], prefetched=False, pinned=pins)
                if got is not None:
                    entries[nxt], _ = got
                    self.transfer.submit(layer, nxt, want[nxt], entries[nxt].slot, entries[nxt],
                                         TransferEngine.DEMAND)
            i += 1
        if not self.keep:  # Load-on-Demand keeps nothing beyond this layer's need
            for e in ranked:
                lc.drop(e)

        named = len(predicted) if predicted is not None else 0
        self.stats.add(phase, layer, needed=len(ranked), hits=hits, late_prefetches=late, misses=misses,
                       predicted_needed=len(ranked) if predicted is not None else 0, named=named,
                       named_needed=len(predicted & set(ranked)) if predicted is not None else 0)
        return rows.combine()
