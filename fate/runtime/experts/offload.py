"""Offloading: the policy that decides what moves when (:class:`Offloader`), and the executor that runs it
on the model (:class:`OffloadedExperts`).  The trace simulator (:mod:`.simulate`) runs the same policy
object on a recorded routing trace, with a simulated link and compute, so its figures are this code's.

Per MoE layer and forward step (:meth:`Offloader.run_layer`):

1. the experts the router chose are ranked by how many tokens want them — in prefill the least popular
   ones, whose token→expert assignments add up to at most ``int2_share``, use INT2;
2. resident-and-ready experts are hits; named-but-unfinished prefetches are late (promoted ahead of
   every other prefetch, or copied at once when still queued); everything else is a miss, loaded on demand
   at once — in a one-token step a short copy on the calling thread (a copy of a few µs is cheaper than a
   hand-off), a longer one by the copy thread — most popular first; when the slots run out, later loads
   start as soon as computed experts free theirs;
3. only then are the next layers predicted and their copies queued (a copy on the link cannot be
   interrupted, so nothing queued earlier may make this layer's misses wait) — while a one-token step's
   own loads cross on the copy thread (:func:`.transfer.copies_inline`), the value rule's clock is when
   they will have landed less the hits computed meanwhile, so the prediction's host work overlaps them and
   the link goes straight on from them to the prefetches;
4. each expert is computed as soon as its bytes are ready, hits first — in prefill, while misses wait for
   a slot, the hits with the fewest tokens first: each frees its slot for the next load soonest, so the
   link starts early in the layer (2-5 % faster prefill at 25-50 % `ratio:1`, docs/BENCHMARKS.md).

In a one-token step under the value rule or plain caching, everything before the computing of step 4 is
one native call per layer (:mod:`.native_step`, over the cache's own lists); :meth:`Offloader._classify` is
its Python reference, and serves every other step.

**Prefetching by expected value (decode).**  The prediction names candidates for layers i+1 and i+2, each
with its calibrated chance ``p`` of being needed (:mod:`.prefetch`).  The link must be idle again by the
time layer i+1 starts (one layer's compute from now), or its demand loads would wait: a candidate is
fetched when what it saves, ``p`` × the copy it spares (less what arrives too late), is worth more than
what it costs — the delay it would add to layer i+1's demand loads, and the chance that the expert it
evicts (the least likely one the prediction sees there, ties by the cache's own order) is needed instead.
The delay counts once, weighed by the chance that layer i+1 has a miss at all (at most 1, at most its
expected misses): its demand loads cross the link one after another, so the first one's delay is every
one's.
The link is used whenever that balance is positive, whatever the layer; nothing needs a fixed window.
Where the next two layers are held well enough by caching alone (their reuse curves, measured on the
calibration text, at their slot counts: too few misses a token to repay a prediction), a decode step does
not predict at all (:meth:`Offloader._prediction_layers`).
Prefetches a layer turns out not to need are cancelled while still queued.

**Prefill** keeps the paper's rule: the next layer's predicted experts, most tokens first, INT2 for the
least popular, queued behind this layer's demand loads so they land during this layer's compute — INT2 only
where the link limits the layer (its copies would outlast half its compute, :meth:`Offloader._prefill_low`).
Under the value rule a prefill predicts at all only where the next layer's loads could limit it (the most
they could take by the same test, :meth:`Offloader._prefill_pays`): with a warm cache its demand loads
cross while its cached experts compute, and the prediction would cost more than it saves.
The INT2 copies a prefill leaves in the cache are rewritten at the decode precision by the decode steps that
follow, one a step while the link is idle (:meth:`Offloader._upgrade_when_idle`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from fate.errors import EngineError
from fate.model.experts import ExpertRows
from fate.quant.expert import ExpertCompute, ExpertView
from fate.runtime.experts import copier as native
from fate.runtime.experts.budget import reuse_table
from fate.runtime.experts.hybrid import PREFILL_LINK_SHARE, RANK, hybrid_precisions, link_limits_prefill
from fate.runtime.experts.prefetch import Prediction, Predictor
from fate.runtime.experts.residency import ExpertCache
from fate.runtime.experts.stats import ExpertStats

RULES = ("value", "window")  # fate's expected-value prefetch; the paper's top-(k + m) within one window

# What the policy's own work costs the model's thread (measured on the 2-core VM of docs/BENCHMARKS.md):
# queueing one prefetch (its blob view and the copy thread's queue) and one prediction (two routers on the
# gate input, a ranking).  A copy cheaper than that is not worth prefetching, and where every copy is
# cheaper than a prediction, fate's value rule does not predict at all (a memcpy without an emulated link).
HOST_PREFETCH_SECONDS = 10e-6
HOST_PREDICT_SECONDS = 30e-6
UPGRADE_PRIORITY = 1e3  # an INT2 copy's rewrite at the decode precision: behind every other copy


def value_plan(layer: int, k: int, now: float, link_free: float, t_layer: float, t_copy: float, host: float,
               preds: Sequence[Prediction], cache: ExpertCache) -> list[tuple[int, int, int, float]]:
    """The value rule's prefetch decisions at ``layer``'s gate input (the module's docstring) for the
    predictions ``preds`` and the state of ``cache`` (read only): ``now`` is the rule's clock — layer i+1
    starts one layer's compute after it (the link's clock, or later while this layer's own loads cross) —,
    ``link_free`` when the link will be idle, ``t_layer`` one layer's compute, ``t_copy`` one copy and
    ``host`` what queueing one costs the model's thread.  Returns ``(layer, expert, victim, chance)`` per
    copy to queue, in order; ``victim`` -1: a free slot, else the expert whose slot it takes.  The reference of the native
    version (:mod:`.native_policy`), which runs where it is built."""
    cands = []
    next_misses = 0.0  # expected demand loads of layer i+1 as things stand: k less what the cache holds
    for i, pred in enumerate(preds):
        slot_of = cache.slot_of[pred.layer]
        held = 0.0
        for e, p in zip(pred.experts, pred.chances):
            if slot_of[e] >= 0:
                held += p
            elif p > 0.0:
                cands.append((p, i, e))
        if pred.ahead == 1:
            next_misses = max(0.0, k - held)
    out: list[tuple[int, int, int, float]] = []
    if not cands:
        return out
    cands.sort(key=lambda c: -c[0])  # the likeliest first, whatever the layer (stable: then by rank)
    t_next = now + t_layer  # layer i+1's demand loads: one layer's compute from now
    free: dict[int, int] = {}
    victims: dict[int, list[tuple[float, int]]] = {}  # per prediction: its settled experts, the least likely first
    for p, i, e in cands:
        j = preds[i].layer
        finish = link_free + t_copy
        t_need = t_next + (j - layer - 1) * t_layer
        overrun = max(0.0, finish - t_next) - max(0.0, link_free - t_next)  # delay to layer i+1's loads
        if overrun > 0.0 and t_next + t_copy <= t_need:
            continue  # started at the next layer it still lands in time, with a fresher prediction
        saved = p * (t_copy - max(0.0, finish - t_need))
        cost = min(1.0, max(0.0, next_misses - (p if j == layer + 1 else 0.0))) * overrun + host
        if saved <= cost:
            continue
        if i not in free:
            free[i] = cache.free_slots(j)
        victim = -1
        if free[i] == 0:
            order = victims.get(i)
            if order is None:  # sorted() is stable: ties keep the cache's own eviction order
                chance = dict(zip(preds[i].experts, preds[i].chances))
                slot_of, pending = cache.slot_of[j], cache.pending[j]
                settled = [x for x in cache.resident(j) if slot_of[x] >= 0 and not pending[slot_of[x]]]
                order = victims[i] = sorted(((chance.get(x, 0.0), x) for x in settled), key=lambda v: v[0])
            if not order or saved <= cost + order[0][0] * t_copy:
                continue  # nothing to evict, or what it evicts is worth as much
            victim = order.pop(0)[1]
        else:
            free[i] -= 1
        out.append((j, e, victim, p))
        link_free = finish
        if j == layer + 1:
            next_misses = max(0.0, next_misses - p)
    return out


class Offloader:
    """The offloading policy of one run over ``cache`` and a mover (the TransferEngine, or the simulator's
    link): ``keep=False`` is Load-on-Demand; no ``predictor`` is LRU/ARC caching alone; with one, ``rule``
    "value" is fate's expected-value prefetch and "window" the paper's (top k + ``extra`` candidates of the
    next layer, at most ``max_new`` new copies per prediction).  ``layer_seconds`` is one layer's decode
    compute (the timing profile): the time the link has before the next layer needs it; ``expert_seconds``
    one routed expert's on one token (the part of a layer its hits take while its misses cross).  ``reuse``:
    the bundle's reuse curves (``fate.calib.reuse``), by which the value rule predicts only at the layers
    where it can pay (:meth:`_prediction_layers`)."""

    def __init__(self, cfg, cache: ExpertCache, mover, stats: ExpertStats, *, keep: bool = True,
                 decode_precision: str = "q4", low_precision: str | None = None, int2_share: float = 0.3,
                 predictor: Predictor | None = None, rule: str = "value", extra: int = 0,
                 max_new: int | None = None, layer_seconds: float = 0.0, expert_seconds: float = 0.0,
                 reuse=None):
        if rule not in RULES:
            raise ValueError(f"prefetch rule {rule!r}: choose one of {', '.join(RULES)}")
        self.cfg, self.cache, self.mover, self.stats = cfg, cache, mover, stats
        self.keep, self.decode_precision = keep, decode_precision
        self.low_precision, self.int2_share = low_precision, int2_share
        # INT2 in prefill where a layer's copies outlast this share of its compute (0: wherever it copies)
        self.int2_link_share = PREFILL_LINK_SHARE
        self.predictor, self.rule, self.extra, self.max_new = predictor, rule, extra, max_new
        self.layer_seconds = layer_seconds
        self.expert_seconds = min(expert_seconds, layer_seconds / max(1, cfg.top_k))  # one expert, one token
        self.host_prefetch_seconds, self.host_predict_seconds = HOST_PREFETCH_SECONDS, HOST_PREDICT_SECONDS
        # the value rule predicts only where a copy can cost more than predicting it does
        # a free copy (no copy time known) still weighs one expert's chance against another's
        self._t_copy = max(mover.copy_seconds(decode_precision), 1e-9)
        self._predicts = predictor is not None and (rule == "window" or self._t_copy > 2 * self.host_predict_seconds)
        self._predicts_at = self._prediction_layers(reuse)  # [layer + 1]: whether decode predicts at its gate input
        self._named: dict[int, set[int]] = {}  # layer -> experts its one-layer-ahead prediction named
        self._queued: list[list[int]] = [[] for _ in range(cfg.n_layers)]  # slots holding a queued prefetch
        k = cfg.top_k
        self._value_plan = False  # the native value rule, or the reference: resolved on first use
        self._planners: dict[int, object] = {}  # layer -> its native prediction + value rule (or None)
        self._queuer = False  # what queues the planners' decisions natively (the mover's), or None: resolved on first use
        self._step = False  # the native decode step (:meth:`_native_step`), or None: resolved on first use
        self._limit = {j: min(cfg.n_experts, n, k + extra) for j, n in enumerate(cache.n_slots) if n > 0}
        self._low_slots: dict[int, list[int]] = {}  # layer -> slots a prefill left holding INT2 copies

    # -- prediction and prefetching ---------------------------------------------------------------
    def _prediction_layers(self, reuse) -> list[bool]:
        """Per gate input (index ``layer + 1``: the embedding's first), whether a decode step predicts there
        (prefill always does).  Under the value rule with the bundle's reuse curves, only where it can pay:
        where layer i+1 or i+2 is expected to miss (its LRU curve at its slot count: ``top_k × (1 − held
        share)`` loads a token) more copy time than twice a prediction's host work.  A well-held layer (a
        large cache, a fast link) is served by caching alone: its rare misses cannot repay a prediction each
        token, and the prefetches would evict experts the next tokens reuse."""
        cfg, n = self.cfg, self.cfg.n_layers
        out = [self._predicts and i < n for i in range(n + 1)]
        t = reuse_table(cfg, reuse) if self.rule == "value" and self._predicts else None
        if t is None:
            return out
        slots = self.cache.n_slots

        def pays(j: int) -> bool:
            if j >= n or not cfg.moe_layers[j] or slots[j] <= 0:
                return False
            held = float(t[0, j, min(slots[j], cfg.n_experts)])
            return cfg.top_k * max(0.0, 1.0 - held) * self._t_copy > 2 * self.host_predict_seconds

        return [out[i] and (pays(i) or pays(i + 1)) for i in range(n + 1)]  # gate input i - 1 serves i, i + 1

    def predicts_at(self, layer: int, decode: bool, tokens: int = 1) -> bool:
        """Whether a step (a one-token one: ``decode``; else of ``tokens`` tokens) predicts at ``layer``'s gate
        input at all, whatever the link's state: where not, the executor passes no prediction on (not even the
        gate input).  A prefill under the value rule predicts only where the next layer's loads could limit it
        (:meth:`_prefill_pays`); the paper's rule predicts at every one."""
        if decode:
            return self._predicts_at[layer + 1]
        if not (self._predicts and layer + 1 < self.cfg.n_layers):
            return False
        return self.rule != "value" or self._prefill_pays(layer + 1, tokens)

    def _prefill_pays(self, j: int, tokens: int) -> bool:
        """Whether a ``tokens``-token prefill's prefetch into MoE layer ``j`` can save anything: only where the
        most its loads could take — the experts the layer does not hold at the decode precision, at most the
        ``tokens × top_k`` its tokens route to — would outlast half of its compute, the INT2 rule's
        test (:func:`.hybrid.link_limits_prefill`).  Elsewhere its demand loads cross while its cached experts
        compute, and the prediction (a router product and a ranking over every token: 70 µs a layer on
        the trained offload model, 128 tokens) costs more than the stall it could save (docs/BENCHMARKS.md)."""
        cfg = self.cfg
        if not cfg.moe_layers[j]:
            return False  # the prefill's prediction names the next layer's experts only
        loads = min(tokens * cfg.top_k, self._loads(j, range(cfg.n_experts)))
        return link_limits_prefill(loads, self._t_copy, tokens, cfg.top_k, self.expert_seconds)

    def _loads(self, layer: int, experts) -> int:
        """How many of ``experts`` ``layer`` does not hold at the decode precision (a copy each, if needed)."""
        slot_of, precision_at, high = self.cache.slot_of[layer], self.cache.precision_at[layer], RANK[self.decode_precision]
        return sum(1 for e in experts if slot_of[e] < 0 or RANK[precision_at[slot_of[e]]] < high)

    def wants_prediction(self, layer: int, decode: bool = False, clock: float | None = None, tokens: int = 1) -> bool:
        """Whether a prediction at ``layer``'s gate input can lead anywhere.  In decode with the value rule, not
        while the link is busy past the next layer's start and copies take no longer than a layer: then every
        candidate would either land too late or still land in time from the next layer (the rule fetches
        neither), so the prediction is not even computed.  ``clock``: the value rule's clock, one layer's
        compute before the next layer starts (None: now; later while this layer's own loads cross the link);
        ``tokens``: a prefill step's (:meth:`predicts_at`)."""
        return self._prediction_clocks(layer, decode, clock, tokens) is not None

    def _prediction_clocks(self, layer: int, decode: bool, clock: float | None, tokens: int = 1) -> tuple:
        """Where :meth:`wants_prediction` says yes, the clocks the value rule reads — ``(its clock, when the link
        is free)``, read once and handed on to it (each reading is a call into the copier) — or ``()`` where no
        value rule runs (prefill, the window rule); else None."""
        if not self.predicts_at(layer, decode, tokens):
            return None
        if not (decode and self.rule == "value"):
            return ()
        now, free = self._clock(clock), self.mover.free_at()
        if self._t_copy <= self.layer_seconds and free >= now + self.layer_seconds:
            return None
        return now, free

    def _clock(self, clock: float | None) -> float:
        return self.mover.now() if clock is None else clock

    def prefetch(self, layer: int, preds: Sequence[Prediction], decode: bool, clock: float | None = None,
                 clocks: tuple | None = None) -> None:
        """Act on the predictions made at ``layer``'s gate input (``layer`` -1: the embedding's); ``clock`` as
        for :meth:`wants_prediction` (``clocks``: the rule's clock and the link's, read already)."""
        if not preds:
            return
        for pred in preds:
            if pred.ahead == 1:
                self._named[pred.layer] = set(pred.experts)
        if not decode:
            pred = preds[0]
            if pred.precisions and self._prefill_low(pred.layer, pred.experts, pred.tokens) is None:
                pred = Prediction(pred.layer, pred.ahead, pred.experts, pred.chances)  # all at the decode precision
            self._prefetch_ranked(pred, None)
        elif self.rule == "window":
            for pred in preds:
                if pred.ahead == 1:
                    self._prefetch_ranked(pred, self.max_new)
        else:
            self._prefetch_by_value(layer, preds, clocks or (self._clock(clock), self.mover.free_at()))

    def _prefetch_ranked(self, pred: Prediction, budget: int | None) -> None:
        """The paper's rule: the candidates in rank order, into free slots or the cache's own victims (never
        one in use, in flight or itself predicted), at most ``budget`` new copies."""
        cache, j = self.cache, pred.layer
        pins = set(pred.experts)
        left = len(pred.experts) if budget is None else budget
        for rank, e in enumerate(pred.experts):
            if left <= 0:
                break
            if cache.slot_of[j][e] >= 0:
                continue  # resident or arriving already; a lower-precision copy is upgraded on use
            p = pred.precisions[e] if pred.precisions else self.decode_precision
            s = cache.reserve(j, e, p, prefetched=True, pinned=pins)
            if s < 0:
                break  # every slot holds an expert in use, in flight or predicted
            self.mover.prefetch(j, s, 1.0 + rank)
            self._queued[j].append(s)
            left -= 1

    def _prefetch_by_value(self, layer: int, preds: Sequence[Prediction], clocks: tuple[float, float]) -> None:
        if self._value_plan is False:
            self._value_plan = native.value_plan() or value_plan
        self._queue_planned(self._value_plan(layer, self.cfg.top_k, *clocks, self.layer_seconds, self._t_copy,
                                             self.host_prefetch_seconds, preds, self.cache))

    def _queue_planned(self, decisions) -> None:
        """Reserve the slots and queue the copies the value rule decided (:func:`value_plan`): the reference
        of the native ``Queuer`` (:meth:`.transfer.TransferEngine.native_queue`), which the layer's planner
        runs in its own call where the mover has one."""
        cache, mover = self.cache, self.mover
        for j, e, victim, p in decisions:
            s = cache.reserve(j, e, self.decode_precision, prefetched=True, victim=None if victim < 0 else victim)
            mover.prefetch(j, s, 2.0 - p)  # the likelier first, all behind any demand load
            self._queued[j].append(s)

    def _planner(self, layer: int, predict: "GatePredict"):
        """The layer's native prediction and value rule (:meth:`.prefetch.Predictor.value_planner`, queueing its
        own decisions where the mover can), made on first use; None where that path does not apply."""
        planner = self._planners.get(layer, False)
        if planner is False:
            planner = self._planners[layer] = predict.predictor.value_planner(
                layer, predict.limit, self.cfg.top_k, self.layer_seconds, self._t_copy, self.host_prefetch_seconds,
                self.cache, self._native_queue())
        return planner

    def _native_queue(self):
        """The mover's native queue (:meth:`.transfer.TransferEngine.native_queue`), or None: made once."""
        if self._queuer is False:
            self._queuer = self.mover.native_queue(self.decode_precision, self._queued)
        return self._queuer

    def _predict_and_prefetch(self, layer: int, predict, decode: bool, clocks: tuple) -> None:
        """Predict at ``layer``'s gate input and act on it (``clocks``: the rule's clock and the link's, as
        :meth:`_prediction_clocks` read them); in decode with the value rule, where ``predict`` is a
        :class:`GatePredict` over a CPU float32 gate input, as one native call per step (the layer's planner,
        :meth:`_planner`)."""
        if decode and self.rule == "value" and type(predict) is GatePredict:
            planner = self._planner(layer, predict)
            if planner is not None:
                got = planner(predict.g, *clocks)  # None: not a contiguous float32 CPU gate input
                if got is not None:
                    named, decisions = got
                    if named is not None:
                        self._named[layer + 1] = set(named)
                    if decisions and self._queuer is None:  # else the planner has queued them already
                        self._queue_planned(decisions)
                    return
        self.prefetch(layer, predict(), decode, clocks=clocks)

    def _native_step(self):
        """The native decode step (:mod:`.native_step`) over the mover's native queue, or None where the
        Python step serves: the paper's window rule, a mover without a native queue (the simulator's, the
        Python copy worker), no extension."""
        if self.predictor is not None and self.rule != "value":
            return None
        queuer = self._native_queue()
        make = native.decode_step() if queuer is not None else None
        if make is None:
            return None
        return make(queuer, self.mover.inline_demand(self.decode_precision), self.expert_seconds,
                    self.layer_seconds, self._t_copy, self._predicts_at[1:], self.cfg.n_layers)

    def _cancel_unneeded(self, layer: int, want: dict[int, str]) -> None:
        """Prefetches for ``layer`` that it turned out not to need and that are still queued are cancelled:
        the link is better spent on demand loads."""
        queued = self._queued[layer]
        if not queued:
            return
        cache, mover = self.cache, self.mover
        for s in queued:
            e = cache.expert_at[layer][s]
            if e >= 0 and e not in want and cache.pending[layer][s] and cache.prefetched[layer][s]:
                if mover.cancel(layer, s):
                    cache.drop(layer, e)
        queued.clear()

    # -- one layer --------------------------------------------------------------------------------
    def run_layer(self, layer: int, ranked: list[int], counts: dict[int, int], T: int,
                  predict: Callable[[], Sequence[Prediction]] | None,
                  compute: Callable[[int, int, str], None]) -> None:
        """Serve one MoE layer: ``ranked`` experts (most tokens first; ``counts[e]`` tokens each) of a ``T``-token
        step; ``predict()`` gives this gate input's predictions (called once the demand loads are queued);
        ``compute(expert, slot, precision)`` runs one expert from its slot, once its copy has landed (the slot
        is not reused before ``compute`` returns)."""
        decode = T == 1
        stats, cache, mover = self.stats, self.cache, self.mover
        t_start = mover.now()
        busy = 0.0  # computing experts and waiting for copies: what is not the policy's own work
        stats.phase = "decode" if decode else "prefill"
        named = self._named.pop(layer, None)
        got = None
        if decode and (predict is None or type(predict) is GatePredict):
            if self._step is False:
                self._step = self._native_step()
            if self._step is not None:  # the same steps in one native call (None: INT2 copies in play)
                planner = self._planner(layer, predict) if predict is not None else None  # only where it predicts
                got = self._step(layer, ranked, planner, None if predict is None else predict.g)
        if got is not None:
            order, waiting, hits, late, misses, stall, clocks, named_next = got
            if named_next is not None:
                self._named[layer + 1] = set(named_next)
            if clocks is not None:  # a prediction the planner could not make
                self.prefetch(layer, predict(), decode, clocks=clocks)
            touched = not waiting  # the native step told the policy of the uses
            want = self._want(layer, ranked, counts, decode, T) if waiting else None
        else:
            want = self._want(layer, ranked, counts, decode, T)
            order, waiting, hits, late, misses, stall = self._classify(layer, ranked, want, counts, T, predict)
            touched = False
        pending, precision_at = cache.pending[layer], cache.precision_at[layer]
        if waiting:
            busy, stall = self._compute_waiting(layer, order, waiting, want, decode, compute, busy, stall)
        else:  # every expert has its slot (the usual step): wait where its copy is still crossing, compute
            hit, now, wait = cache.policies[layer].hit, mover.now, mover.wait
            for e, s in order:
                if pending[s]:  # (a call less per hit: wait() of a landed copy is 0)
                    stall += wait(layer, s)
                if not touched:
                    hit(e)  # the cache's touch()
                t = now()
                compute(e, s, precision_at[s])
                busy += now() - t
        if not self.keep:  # Load-on-Demand keeps nothing beyond this layer's need
            for e in ranked:
                cache.drop(layer, e)
        if not decode and self.low_precision is not None:  # the INT2 copies this prefill leaves in the layer
            low, expert_at = self.low_precision, cache.expert_at[layer]
            left = [x for x, p in enumerate(precision_at) if p == low and expert_at[x] >= 0]
            if left:
                self._low_slots[layer] = left
            else:
                self._low_slots.pop(layer, None)
        elif self._low_slots:
            self._upgrade_when_idle(layer)
        host = max(0.0, mover.now() - t_start - busy - stall)
        if named is None:
            stats.count(layer, len(ranked), hits, late, misses, 0, 0, 0, stall, host)
        else:
            stats.count(layer, len(ranked), hits, late, misses, len(ranked), len(named), len(named.intersection(ranked)),
                        stall, host)

    def _upgrade_when_idle(self, layer: int) -> None:
        """After a decode step of ``layer``, while the link is idle: one INT2 copy a prefill left in the cache
        is rewritten in place at the decode precision, the next layers' first — behind every other copy, and
        only when nothing else is on the link, so no demand load or prefetch waits for more than the one copy
        on it.  Left alone, each such copy is a miss when decode wants the expert (INT4), and the cache holds
        the prefill's least popular experts exactly there (loaded last, they are what its slots keep)."""
        mover = self.mover
        if mover.free_at() > mover.now():
            return
        cache, low, n = self.cache, self.low_precision, self.cfg.n_layers
        for d in range(1, n + 1):
            j = (layer + d) % n
            slots = self._low_slots.get(j)
            if slots is None:
                continue
            expert_at, precision_at, pending = cache.expert_at[j], cache.precision_at[j], cache.pending[j]
            slots[:] = [x for x in slots if expert_at[x] >= 0 and precision_at[x] == low]  # evicted or upgraded since
            x = next((x for x in slots if not pending[x]), None)  # (one still landing: later)
            if x is not None:
                slots.remove(x)
                cache.change_precision(j, expert_at[x], self.decode_precision)
                mover.prefetch(j, x, UPGRADE_PRIORITY)
            if not slots:
                del self._low_slots[j]
            if x is not None:
                return

    def _want(self, layer: int, ranked: list[int], counts, decode: bool, tokens: int = 1) -> dict[int, str]:
        """The precision each expert is computed in: decode's, or in a ``tokens``-token prefill step the INT2
        rule's where the link limits this layer's prefill (:meth:`_prefill_low`)."""
        if decode:
            return dict.fromkeys(ranked, self.decode_precision)
        share = hybrid_precisions(ranked, counts, self.int2_share, self.decode_precision, self.low_precision)
        if self._prefill_low(layer, ranked, tokens) is not None:
            return share
        # the link does not limit this layer: its loads go at the decode precision, but an INT2 copy held
        # already (this step's prefetch, decided on the prediction) serves an expert the share rule allows
        slot_of, precision_at, high = self.cache.slot_of[layer], self.cache.precision_at[layer], self.decode_precision
        return {e: share[e] if slot_of[e] >= 0 and precision_at[slot_of[e]] == share[e] else high for e in ranked}

    def _prefill_low(self, layer: int, experts, tokens: int) -> str | None:
        """The low precision for a ``tokens``-token prefill step's copies of ``experts`` into ``layer``, or None
        where they go at the decode precision: INT2 only where the copies the layer still needs (those not
        held at the decode precision) would outlast its compute (:func:`.hybrid.link_limits_prefill`)."""
        if self.low_precision is None or self.int2_share <= 0:
            return None
        loads, share = self._loads(layer, experts), self.int2_link_share
        if not link_limits_prefill(loads, self._t_copy, tokens, self.cfg.top_k, self.expert_seconds, share):
            return None
        return self.low_precision

    def _compute_waiting(self, layer: int, order, waiting: list[int], want: dict[int, str], decode: bool, compute,
                         busy: float, stall: float) -> tuple[float, float]:
        """The experts computed where some are still ``waiting`` for a slot: each computed expert frees its
        slot for the next waiting load at once.  Returns (busy, stall) with this layer's added."""
        cache, mover = self.cache, self.mover
        slot_of, pending, precision_at = cache.slot_of[layer], cache.pending[layer], cache.precision_at[layer]
        pins = set(want)  # pinned until computed (in-flight copies are never evicted either)
        for e, s in order + [(w, -1) for w in waiting]:
            if s < 0:
                s = slot_of[e]
                if s < 0:  # a waiting expert: a slot is free now, or will be once a copy lands
                    s = self._reserve_waiting(layer, e, want[e], pins)
                    t = mover.now()
                    mover.demand(layer, s, inline=decode)
                    stall += mover.now() - t
            if pending[s]:  # (a call less per hit: wait() of a landed copy is 0)
                stall += mover.wait(layer, s)
            cache.touch(layer, e)
            t = mover.now()
            compute(e, s, precision_at[s])
            busy += mover.now() - t
            pins.discard(e)
            nxt = next((w for w in waiting if slot_of[w] < 0 and w in pins), None) if waiting else None
            if nxt is not None:  # this expert's slot may be reused: start the next waiting load now
                s2 = cache.reserve(layer, nxt, want[nxt], prefetched=False, pinned=pins)
                if s2 >= 0:
                    t = mover.now()
                    mover.demand(layer, s2, inline=decode)
                    stall += mover.now() - t
        return busy, stall

    def _classify(self, layer: int, ranked: list[int], want: dict[int, str], counts, tokens: int, predict) -> tuple:
        """The part of :meth:`run_layer` before the experts are computed — the landed copies settled, unneeded
        prefetches cancelled, hits, late prefetches and misses told apart and the loads queued, then the
        prediction — the reference of the native decode step (:mod:`.native_step`), for a step of ``tokens``
        tokens.  Returns (the experts with their slots in compute order, the experts still without a slot,
        hits, late, misses, stall)."""
        decode = tokens == 1
        cache, mover = self.cache, self.mover
        pins = set(ranked)  # this step's experts are pinned (in-flight copies are never evicted either)
        mover.poll(layer)  # copies that landed since: their slots are ready
        self._cancel_unneeded(layer, want)
        slot_of, pending, precision_at = cache.slot_of[layer], cache.pending[layer], cache.precision_at[layer]
        ready, later, waiting = [], [], []
        hits = late = misses = 0
        stall = 0.0
        for e in ranked:
            s = slot_of[e]
            if s >= 0 and RANK[precision_at[s]] >= RANK[want[e]]:
                if not pending[s]:
                    hits += 1
                    ready.append((e, s))
                else:
                    late += 1
                    t = mover.now()
                    mover.promote(layer, s, inline=decode)  # needed now: ahead of every queued prefetch
                    stall += mover.now() - t
                    later.append((e, s))
                continue
            misses += 1
            if s >= 0:  # a cached INT2 copy, INT4 wanted: upgrade in place
                stall += mover.wait(layer, s)
                s = cache.change_precision(layer, e, want[e])
            else:
                s = cache.reserve(layer, e, want[e], prefetched=False, pinned=pins)
                if s < 0:
                    waiting.append(e)  # no free slot until computed experts (or in-flight copies) release theirs
                    continue
            t = mover.now()
            mover.demand(layer, s, inline=decode)
            stall += mover.now() - t
            later.append((e, s))
        if waiting and counts is not None:  # prefill short of slots: free one for the next load soonest
            ready.sort(key=lambda es: counts[es[0]])
        clock = None  # the value rule's: layer i+1 starts one layer's compute after it
        if decode and any(pending[s] for _, s in later):
            # this layer's own loads cross the link while its hits compute: layer i+1 starts a layer less
            # those hits after they have landed, if that is later
            clock = max(mover.now(), mover.free_at(demand_only=True) - len(ready) * self.expert_seconds)
        clocks = None if predict is None else self._prediction_clocks(layer, decode, clock, tokens)
        if clocks is not None:
            self._predict_and_prefetch(layer, predict, decode, clocks)  # their copies queue behind these loads
        return ready + later, waiting, hits, late, misses, stall

    def _reserve_waiting(self, layer: int, e: int, precision: str, pins) -> int:
        """A slot for ``e``; while every slot is pinned or in flight, wait for a copy to land."""
        cache = self.cache
        while True:
            s = cache.reserve(layer, e, precision, prefetched=False, pinned=pins)
            if s >= 0:
                return s
            in_flight = [x for x in range(cache.n_slots[layer]) if cache.pending[layer][x]]
            if not in_flight:
                raise EngineError(f"layer {layer}: no expert slot can be freed (cache of {cache.n_slots[layer]} slots)")
            self.stats.stalled(layer, self.mover.wait(layer, in_flight[0]))


class GatePredict:
    """The predictions at one gate input, made when called: what the engine passes :meth:`Offloader.run_layer`
    as ``predict`` (the trace simulator passes a plain callable over recorded scores)."""

    __slots__ = ("predictor", "layer", "g", "limit")

    def __init__(self, predictor: Predictor, layer: int, g: torch.Tensor, limit: dict[int, int]):
        self.predictor, self.layer, self.g, self.limit = predictor, layer, g, limit

    def __call__(self) -> list[Prediction]:
        return self.predictor.predict(self.layer, self.g, self.limit)


class OffloadedExperts:
    """ExpertExecutor (and MoEObserver) running an :class:`Offloader` on the model: experts computed by the
    one primitive (:class:`fate.quant.expert.ExpertCompute`) straight from their slots."""

    def __init__(self, offloader: Offloader, store, transfer, *, dtype, device, kernels: str = "int8"):
        self.offloader, self.store, self.transfer = offloader, store, transfer
        self.cfg = offloader.cfg
        self.dtype, self.device = dtype, torch.device(device)
        self.predictor = offloader.predictor
        self.low_precision, self.int2_share = offloader.low_precision, offloader.int2_share
        # one compute (scratch + native decision) per precision a slot can hold
        self._compute = {p: ExpertCompute(store.layouts[p], dtype, self.device, kernels=kernels) for p in store.precisions}
        self.native = any(c.native for c in self._compute.values())  # fate's kernels compute (the engine's threads)
        # the views of a slot are the same whatever expert it holds: made once per (layer, slot, precision)
        self._views: dict[tuple[int, int, str], ExpertView] = {}

    def _view(self, layer: int, slot_id: int, precision: str) -> ExpertView:
        key = (layer, slot_id, precision)
        view = self._views.get(key)
        if view is None:
            layout = self.store.layouts[precision]
            view = ExpertView(self.transfer.slot(layer, slot_id, layout.size), layout)
            if view.is_view:  # a copied (misaligned) part would go stale: make it again next time
                self._views[key] = view
        return view

    def _predict(self, layer: int, g: torch.Tensor) -> "GatePredict":
        return GatePredict(self.predictor, layer, g, self.offloader._limit)

    def observes(self, layer: int, tokens: int) -> bool:
        """The gate inputs :meth:`on_gate_input` acts on (the model passes no other): the embedding's and a
        dense layer's, where a step of ``tokens`` tokens predicts there (:meth:`Offloader.predicts_at`) — a MoE
        layer predicts the next ones from :meth:`moe`, once its own demand loads are queued."""
        return (layer < 0 or not self.cfg.moe_layers[layer]) and self.offloader.predicts_at(layer, tokens == 1, tokens)

    def on_gate_input(self, layer: int, g: torch.Tensor) -> None:
        off = self.offloader
        if layer >= 0 and self.cfg.moe_layers[layer]:
            return  # a MoE layer predicts the next ones from moe(), once its own demand loads are queued
        decode = g.shape[0] == 1
        clocks = off._prediction_clocks(layer, decode, None, g.shape[0])
        if clocks is None:
            return
        off.stats.phase = "decode" if decode else "prefill"
        t = off.mover.now()
        off._predict_and_prefetch(layer, self._predict(layer, g), decode, clocks)  # in decode: the layer's planner
        off.stats.hosted(max(layer, 0), off.mover.now() - t)

    def moe(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        T = topk_ids.shape[0]
        rows = ExpertRows(x, topk_ids, topk_weights, self.cfg.n_experts)
        if T == 1:
            ranked, counts = rows.experts, None
        else:
            counts = {e: rows.count(e) for e in rows.experts}
            ranked = sorted(rows.experts, key=lambda e: -counts[e])
        one = T == 1
        transfer = self.transfer

        def compute(e: int, s: int, precision: str) -> None:
            rows.put(e, self._compute[precision].swiglu(self._view(layer, s, precision), rows.tokens(e), one_token=one))

        if transfer.tracks_reads:  # a device runs kernels after the host moves on: order the slot's copies and reads
            run = compute

            def compute(e: int, s: int, precision: str) -> None:
                transfer.before_read(layer, s)
                run(e, s, precision)
                transfer.read_done(layer, s)

        off = self.offloader
        predict = self._predict(layer, x) if self.predictor is not None and off.predicts_at(layer, one, T) else None
        off.run_layer(layer, ranked, counts, T, predict, compute)
        return rows.combine()
