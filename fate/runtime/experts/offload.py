"""The offloading executor: experts stream from the bundle into per-layer device slot pools
(:mod:`.residency`) through the transfer queue (:mod:`.transfer`) and are computed by the one expert
primitive (:class:`fate.quant.expert.ExpertCompute`) straight from their slots.

Per MoE layer and forward step (:meth:`OffloadedExperts.moe`):
1. the experts the router chose are ranked by how many tokens want them (prefill) — in prefill the
   least popular ones, whose token→expert assignments add up to at most ``int2_share``, use INT2;
2. resident-and-ready experts are hits; named-but-unfinished prefetches are waited for (late, and promoted
   ahead of every other prefetch); everything else is loaded on demand at once, most popular first, so
   compute starts early and hides later copies; when the slots run out, later loads start as soon as
   computed experts free theirs;
3. only then is the next layer predicted (:class:`.prefetch.Predictor`) and its copies queued: a copy on
   the link cannot be interrupted, so a prefetch queued earlier would make this layer's misses wait;
4. each expert is computed on all its tokens as soon as its bytes are ready.

The executor is also the model's observer: after a dense layer (and before layer 0, from the embedding),
which queue no demand loads of their own, the next layer is predicted at once.
"""

from __future__ import annotations

import torch

from fate.errors import EngineError
from fate.model.experts import ExpertRows
from fate.quant.expert import ExpertCompute, ExpertView
from fate.runtime.experts.hybrid import RANK, hybrid_precisions
from fate.runtime.experts.prefetch import Prediction, Predictor
from fate.runtime.experts.residency import ExpertCache
from fate.runtime.experts.stats import ExpertStats
from fate.runtime.experts.transfer import TransferEngine


class OffloadedExperts:
    """ExpertExecutor (and MoEObserver) over an ExpertCache fed by a TransferEngine.

    ``keep=False`` is Load-on-Demand: nothing stays beyond the layer that needed it.  ``predictor``
    (None: no prefetching) names the next layer's experts; ``max_new`` bounds the copies one decode
    prediction queues (those the link moves in one layer's window; None: every candidate)."""

    def __init__(self, cfg, store, cache: ExpertCache, transfer: TransferEngine, stats: ExpertStats, *, dtype,
                 device, decode_precision: str = "q4", low_precision: str | None = None, int2_share: float = 0.3,
                 keep: bool = True, predictor: Predictor | None = None, max_new: int | None = None,
                 kernels: str = "int8"):
        self.cfg, self.store, self.cache, self.transfer, self.stats = cfg, store, cache, transfer, stats
        self.dtype, self.device = dtype, torch.device(device)
        self.decode_precision, self.low_precision, self.int2_share = decode_precision, low_precision, int2_share
        self.keep, self.predictor, self.max_new = keep, predictor, max_new
        # one compute (scratch + native decision) per precision a slot can hold
        self._compute = {p: ExpertCompute(store.layouts[p], dtype, self.device, kernels=kernels) for p in store.precisions}
        # the views of a slot are the same whatever expert it holds: made once per (layer, slot, precision)
        self._views: dict[tuple[int, int, str], ExpertView] = {}
        self._predicted: dict[int, set[int]] = {}  # layer -> experts its prediction named

    # -- prediction and prefetching ---------------------------------------------------------------
    def on_gate_input(self, layer: int, g: torch.Tensor) -> None:
        if layer >= 0 and self.cfg.moe_layers[layer]:
            return  # a MoE layer predicts the next one from moe(), once its own demand loads are queued
        self.stats.phase = "decode" if g.shape[0] == 1 else "prefill"
        self._prefetch(layer, g)

    def _prefetch(self, layer: int, g: torch.Tensor) -> None:
        if self.predictor is None or layer + 1 >= self.cfg.n_layers or not self.cfg.moe_layers[layer + 1]:
            return
        lc = self.cache.layer(layer + 1)
        pred: Prediction | None = self.predictor.predict(layer, g, lc.n_slots)  # no more than the layer holds
        if pred is None:
            return
        pins = set(pred.experts)  # the cache itself never evicts an entry still in flight
        self._predicted[pred.layer] = pins
        budget = self.max_new if pred.decode and self.max_new is not None else len(pred.experts)
        for rank, e in enumerate(pred.experts):
            if budget <= 0:
                break
            got = lc.lookup_or_reserve(e, pred.precisions[e], prefetched=True, pinned=pins)
            if got is None:
                break  # every slot holds an expert in use, in flight or predicted
            entry, _, fresh = got
            if fresh:  # else resident or arriving already; a lower-precision copy is upgraded on use
                self.transfer.submit(pred.layer, e, pred.precisions[e], entry.slot, entry, 1.0 + rank)
                budget -= 1

    # -- computing --------------------------------------------------------------------------------
    def _view(self, layer: int, slot_id: int, precision: str) -> ExpertView:
        key = (layer, slot_id, precision)
        view = self._views.get(key)
        if view is None:
            layout = self.store.layouts[precision]
            view = ExpertView(self.transfer.slot(layer, slot_id, layout.size), layout)
            if view.is_view:  # a copied (misaligned) part would go stale: make it again next time
                self._views[key] = view
        return view

    def _reserve_waiting(self, lc, e, precision, pins, layer):
        """Reserve a slot for ``e``; while every slot is pinned or in flight, wait for a copy to land."""
        while True:
            got = lc.reserve(e, precision, prefetched=False, pinned=pins)
            if got is not None:
                return got
            in_flight = [x for x in lc.entries() if not x.ready.is_set()]
            if not in_flight:
                raise EngineError(f"layer {layer}: no expert slot can be freed (cache of {lc.n_slots} slots)")
            self.stats.stalled(layer, self.transfer.wait(in_flight[0]))

    def _demand(self, layer: int, e: int, precision: str, entry) -> None:
        self.transfer.submit(layer, e, precision, entry.slot, entry, TransferEngine.DEMAND)

    def moe(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        T = topk_ids.shape[0]
        self.stats.phase = "decode" if T == 1 else "prefill"
        rows = ExpertRows(x, topk_ids, topk_weights, self.cfg.n_experts)
        ranked = sorted(rows.experts, key=lambda e: -rows.count(e))
        if T > 1:
            want = hybrid_precisions(ranked, {e: rows.count(e) for e in ranked}, self.int2_share,
                                     self.decode_precision, self.low_precision)
        else:
            want = dict.fromkeys(ranked, self.decode_precision)
        predicted = self._predicted.pop(layer, None)

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
                self.stats.stalled(layer, self.transfer.wait(entry))
                entry = lc.replace_precision(e, want[e])
                self._demand(layer, e, want[e], entry)
                entries[e] = entry
                continue
            got = lc.reserve(e, want[e], prefetched=False, pinned=pins)
            if got is None:
                waiting.append(e)  # no free slot until computed experts (or in-flight copies) release theirs
                continue
            entries[e], _ = got
            self._demand(layer, e, want[e], entries[e])

        self._prefetch(layer, x)  # the next layer's copies queue behind this layer's demand loads
        # hits first (their bytes are here), then the rest in the order their loads were queued
        compute_order = sorted(entries, key=lambda e: (not entries[e].ready.is_set(), ranked.index(e))) + waiting
        for e in compute_order:
            entry = entries.get(e)
            if entry is None:  # a waiting expert: a slot is free now, or will be once a copy lands
                entry, _ = self._reserve_waiting(lc, e, want[e], pins, layer)
                entries[e] = entry
                self._demand(layer, e, want[e], entry)
            self.stats.stalled(layer, self.transfer.wait(entry))
            lc.touch(e)
            rows.put(e, self._compute[entry.precision].swiglu(self._view(layer, entry.slot, entry.precision),
                                                              rows.tokens(e), one_token=T == 1))
            self.transfer.read_done(layer, entry.slot)
            pins.discard(e)
            nxt = next((w for w in waiting if w not in entries), None)
            if nxt is not None:  # this expert's slot may be reused: start the next waiting load now
                got = lc.reserve(nxt, want[nxt], prefetched=False, pinned=pins)
                if got is not None:
                    entries[nxt], _ = got
                    self._demand(layer, nxt, want[nxt], entries[nxt])
        if not self.keep:  # Load-on-Demand keeps nothing beyond this layer's need
            for e in ranked:
                lc.drop(e)

        self.stats.add(layer, needed=len(ranked), hits=hits, late_prefetches=late, misses=misses,
                       predicted_needed=len(ranked) if predicted is not None else 0,
                       named=len(predicted) if predicted is not None else 0,
                       named_needed=len(predicted & set(ranked)) if predicted is not None else 0)
        return rows.combine()
