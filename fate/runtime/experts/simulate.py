"""The trace simulator: a routing trace (:mod:`.trace`) replayed through the engine's own policy objects —
the same :class:`.offload.Offloader`, :class:`.residency.ExpertCache`, eviction policies and
:class:`.prefetch.Predictor` — with a timing model instead of the model's math:

* every decoder layer computes for ``layer_seconds`` (the timing profile's decode layer), of which each
  routed expert is ``expert_seconds``, computed when its bytes are there (hits first);
* one serial link: a copy takes ``copy_seconds[precision]`` (the profile's memcpy or the link's
  bytes / rate, whichever is slower), demand loads go before queued prefetches, nothing is interrupted;
  as in the engine, a short demand load (:func:`.transfer.copies_inline`) holds the layer while it copies,
  a longer one crosses the link while the layer computes its cached experts;
* the host costs nothing: what the engine measures beyond the simulated time is its own overhead, so
  measured / simulated is the engine's efficiency.

Only decode steps are simulated (one token each, the routing of the trace's tokens in order, after a
warm-up of the cache over the prompt's routing).  Besides the policies, :func:`simulate` gives two bounds:
``resident`` (no copies at all) and ``perfect`` (fate's policy told each next layer's experts exactly).
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

import torch

from fate.runtime.experts.offload import Offloader
from fate.runtime.experts.prefetch import Prediction, Predictor
from fate.runtime.experts.residency import ExpertCache
from fate.runtime.experts.stats import ExpertStats
from fate.runtime.experts.trace import RoutingTrace
from fate.runtime.experts.transfer import copies_inline
from fate.runtime.options import EngineOptions


@dataclass
class SimTiming:
    layer_seconds: float  # one decoder layer of a decode step, experts included
    expert_seconds: float  # one routed expert on one token
    copy_seconds: dict[str, float]  # one expert copy over the link, per precision


class SimLink:
    """The mover of a simulated run: a virtual clock, one serial link, the TransferEngine's interface."""

    DEMAND = 0.0

    def __init__(self, cache: ExpertCache, timing: SimTiming):
        self.cache, self.timing = cache, timing
        self.t = 0.0
        self._free = 0.0  # when the copy on the link (if any) ends
        self._running: tuple | None = None  # (end, layer, slot, gen)
        self._heap: list = []  # (priority, seq, layer, slot, gen, submitted)
        self._seq = itertools.count()
        self.link_seconds = 0.0

    def now(self) -> float:
        return self.t

    def copy_seconds(self, precision: str) -> float:
        return self.timing.copy_seconds[precision]

    def free_at(self, demand_only: bool = False) -> float:
        self._advance(self.t)
        queued = sum(self.copy_seconds(self.cache.precision_at[j[2]][j[3]]) for j in self._heap
                     if self.cache.gen[j[2]][j[3]] == j[4] and (j[0] == self.DEMAND or not demand_only))
        return max(self.t, self._free) + queued

    def _land(self) -> None:
        _, layer, slot, gen = self._running
        self.cache.landed(layer, slot, gen)
        self._running = None

    def _start_next(self) -> bool:
        while self._heap:
            _, _, layer, slot, gen, submitted = heapq.heappop(self._heap)
            if self.cache.gen[layer][slot] != gen:
                continue  # cancelled, or the slot changed hands
            start = max(self._free, submitted)
            dur = self.copy_seconds(self.cache.precision_at[layer][slot])
            self._free = start + dur
            self.link_seconds += dur
            self._running = (self._free, layer, slot, gen)
            return True
        return False

    def _advance(self, to: float) -> None:
        """Run the link up to time ``to``: land what ends by then, start queued copies as it frees."""
        while True:
            if self._running is not None:
                if self._running[0] > to:
                    return
                self._land()
            if not self._heap or max(self._free, self._heap[0][5]) > to:
                return
            if not self._start_next():
                return

    def _copy_now(self, layer: int, slot: int) -> None:
        """A demand load on the waiting layer's own timeline: after the copy on the link, before the queue."""
        self._advance(self.t)
        start = max(self.t, self._free if self._running is not None else self.t)
        dur = self.copy_seconds(self.cache.precision_at[layer][slot])
        self._free = start + dur
        self.link_seconds += dur
        if self._running is not None:  # the copy on the link lands first
            self.t = self._running[0]
            self._land()
        self.t = self._free
        self.cache.landed(layer, slot, self.cache.gen[layer][slot])

    def demand(self, layer: int, slot: int, *, inline: bool) -> None:
        if inline and copies_inline(self.copy_seconds(self.cache.precision_at[layer][slot])):
            self._copy_now(layer, slot)  # as the TransferEngine: a short copy on the waiting layer's thread
        else:
            heapq.heappush(self._heap, (self.DEMAND, next(self._seq), layer, slot, self.cache.gen[layer][slot], self.t))

    def prefetch(self, layer: int, slot: int, priority: float) -> None:
        heapq.heappush(self._heap, (priority, next(self._seq), layer, slot, self.cache.gen[layer][slot], self.t))

    def _queued(self, layer: int, slot: int) -> bool:
        self._advance(self.t)
        gen = self.cache.gen[layer][slot]
        return any(j[2] == layer and j[3] == slot and j[4] == gen for j in self._heap)

    def promote(self, layer: int, slot: int, *, inline: bool) -> None:
        if not self._queued(layer, slot):
            return
        gen = self.cache.gen[layer][slot]
        self._heap = [j for j in self._heap if not (j[2] == layer and j[3] == slot and j[4] == gen)]
        heapq.heapify(self._heap)
        self.demand(layer, slot, inline=inline)

    def cancel(self, layer: int, slot: int) -> bool:
        if not self._queued(layer, slot):
            return False
        gen = self.cache.gen[layer][slot]
        self._heap = [j for j in self._heap if not (j[2] == layer and j[3] == slot and j[4] == gen)]
        heapq.heapify(self._heap)
        return True

    def wait(self, layer: int, slot: int) -> float:
        t0 = self.t
        pending = self.cache.pending[layer]
        while pending[slot]:
            if self._running is None and not self._start_next():
                raise RuntimeError(f"simulated layer {layer} waits for slot {slot}, but nothing is queued")
            self.t = max(self.t, self._running[0])
            self._land()
        return self.t - t0

    def poll(self, layer: int) -> None:
        self._advance(self.t)

    def native_queue(self, precision: str, queued: list[list[int]]) -> None:
        return None  # the simulated link's queue is Python: the Offloader queues its decisions itself

    def compute(self, seconds: float) -> None:
        self.t += seconds
        self._advance(self.t)


class _TracePredictor:
    """A Predictor reading the trace's recorded logits instead of computing them."""

    def __init__(self, predictor: Predictor, trace: RoutingTrace, ahead: tuple[int, ...]):
        self.predictor, self.trace = predictor, trace
        E = trace.n_experts
        self._cols: dict[int, torch.Tensor] = {}
        for i, full in trace.logits.items():
            have = [i + a for a in ahead if i + a < trace.n_layers and trace.moe_layers[i + a]]
            want = predictor.targets(i)
            if want:
                idx = [have.index(j) for j in want]
                self._cols[i] = torch.cat([full[:, c * E:(c + 1) * E] for c in idx], dim=1)
        self.t = 0

    def predict(self, layer: int, limit):
        cols = self._cols.get(layer)
        return [] if cols is None else self.predictor.rank(layer, cols[self.t:self.t + 1], limit)

    def predict_prefill(self, layer: int, n: int, limit):
        cols = self._cols.get(layer)
        return [] if cols is None else self.predictor.rank(layer, cols[:n], limit)


class _Perfect:
    """The bound: the true experts of the next ``ahead`` layers, named with certainty."""

    def __init__(self, trace: RoutingTrace, ahead: tuple[int, ...] = (1,)):
        self.trace, self.t, self.ahead = trace, 0, ahead

    def targets(self, layer: int) -> list[int]:
        L, moe = self.trace.n_layers, self.trace.moe_layers
        return [layer + a for a in self.ahead if layer + a < L and moe[layer + a]]

    def predict(self, layer: int, limit):
        return [Prediction(j, j - layer, self.trace.ids[self.t, j].tolist(), [1.0] * self.trace.top_k)
                for j in self.targets(layer)]


@dataclass
class SimResult:
    policy: str
    tokens: int
    seconds_per_token: float
    experts: dict  # the ExpertStats block of the schema for the simulated decode steps
    link_busy: float  # share of the time the link was copying

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.seconds_per_token if self.seconds_per_token > 0 else 0.0


def simulate(trace: RoutingTrace, timing: SimTiming, offloader_factory, *, warmup: int = 0,
             policy: str = "") -> SimResult:
    """Replay ``trace`` through what ``offloader_factory()`` builds: ``(Offloader, SimLink, predictor or
    None)``, the predictor with ``predict(layer, limit)`` and a settable step ``t`` (see :func:`factory`).
    The first ``warmup`` tokens are replayed as one prefill step, as the engine runs a prompt (untimed: it
    only leaves the cache as the engine's prefill would); the rest as one-token decode steps, timed."""
    L, k = trace.n_layers, trace.top_k
    off, link, predictor = offloader_factory()
    stats = off.stats
    t_pre = max(0.0, timing.layer_seconds - k * timing.expert_seconds)
    if warmup > 0:
        _prefill(trace, warmup, off, link, predictor)
    stats.reset()
    start_t, link_start = link.t, link.link_seconds
    for t in range(warmup, trace.tokens):
        if predictor is not None:
            predictor.t = t
            off.stats.phase = "decode"
            if off.wants_prediction(-1, True):
                off.prefetch(-1, predictor.predict(-1, off._limit), True)
        for i in range(L):
            if not trace.moe_layers[i]:
                link.compute(timing.layer_seconds)
                if predictor is not None and off.wants_prediction(i, True):
                    off.prefetch(i, predictor.predict(i, off._limit), True)
                continue
            link.compute(t_pre)
            ranked = trace.ids[t, i].tolist()
            predict = (lambda i=i: predictor.predict(i, off._limit)) if predictor is not None else None
            off.run_layer(i, ranked, None, 1, predict, lambda e, s, p: link.compute(timing.expert_seconds))
    steps = trace.tokens - warmup
    total = link.t - start_t
    busy = (link.link_seconds - link_start) / total if total > 0 else 0.0
    return SimResult(policy, steps, total / steps if steps else 0.0, stats.to_dict(), min(1.0, busy))


def _prefill(trace: RoutingTrace, n: int, off: Offloader, link: SimLink, predictor) -> None:
    """Tokens ``0 .. n-1`` as one prefill step: each layer's experts by token count, the prefill prediction
    from all n tokens' gate inputs (the engine's order: its demand loads, then the next layer's)."""
    E = trace.n_experts
    ahead = predictor is not None and hasattr(predictor, "predict_prefill") and off.wants_prediction(-1, tokens=n)
    if ahead:
        off.stats.phase = "prefill"
        off.prefetch(-1, predictor.predict_prefill(-1, n, off._limit), False)
    for i in range(trace.n_layers):
        if not trace.moe_layers[i]:
            if ahead and off.wants_prediction(i, tokens=n):  # as the engine's observer asks (Offloader.predicts_at)
                off.prefetch(i, predictor.predict_prefill(i, n, off._limit), False)
            continue
        counts = torch.bincount(trace.ids[:n, i].flatten(), minlength=E).tolist()
        ranked = sorted((e for e in range(E) if counts[e]), key=lambda e: -counts[e])
        predict = (lambda i=i: predictor.predict_prefill(i, n, off._limit)) if ahead else None
        off.run_layer(i, ranked, dict(enumerate(counts)), n, predict, lambda e, s, p: None)
        link.compute(0.0)


def factory(trace: RoutingTrace, timing: SimTiming, cfg, slots_per_layer, policy: str, *, evict: str = "auto",
            predictor: Predictor | None = None, extra: int = 0, max_new: int | None = None,
            decode_precision: str = "q4", reuse=None):
    """The offloader factory :func:`simulate` takes, for one of fate's policies (or ``perfect``: fate's policy
    told the truth); ``evict`` as ``--evict``, resolved as the engine resolves it (:meth:`EngineOptions.eviction`);
    ``reuse`` the bundle's reuse curves, by which fate (not the bound) predicts where it pays, as in the engine."""
    engine_policy = "fate" if policy.startswith("perfect") else policy
    caching = EngineOptions(policy=engine_policy, evict=evict).eviction()

    def make():
        stats = ExpertStats(trace.n_layers)
        cache = ExpertCache(slots_per_layer, trace.n_experts, policy=caching, on_evict=stats.evicted)
        link = SimLink(cache, timing)
        pred = None
        if policy in ("fate", "paper"):
            pred = _TracePredictor(predictor, trace, (1, 2))
        elif policy == "perfect":
            pred = _Perfect(trace)
        elif policy == "perfect2":
            pred = _Perfect(trace, (1, 2))
        rule = "window" if policy == "paper" else "value"
        off = Offloader(cfg, cache, link, stats, keep=policy != "ondemand", decode_precision=decode_precision,
                        predictor=pred, rule=rule, extra=extra, max_new=max_new if policy == "paper" else None,
                        layer_seconds=timing.layer_seconds, expert_seconds=timing.expert_seconds,
                        reuse=reuse if policy == "fate" else None)
        return off, link, pred
    return make


def timing_for(profile, link, store, precision: str, layer_seconds: float | None = None) -> SimTiming:
    """The simulated timing of a run over ``link`` (a resolved LinkSpec): the profile's layer and expert
    compute (``layer_seconds`` overrides the layer), each copy the slower of the profile's memcpy and the
    link's bytes / rate."""
    layer_s = profile.layer_decode_seconds if layer_seconds is None else layer_seconds
    copy = {}
    for p in store.precisions:
        t = profile.expert_copy_seconds.get(p, 0.0)
        if link.kind == "bandwidth":
            t = max(t, store.blob_bytes(p) / link.bytes_per_s)
        copy[p] = t
    expert_s = min(profile.expert_decode_seconds, layer_s / max(1, store.cfg.top_k))
    return SimTiming(layer_s, expert_s, copy)


def simulate_policy(trace: RoutingTrace, timing: SimTiming, cfg, plan_slots, policy: str, *, chances,
                    routers, evict: str = "auto", extra: int = 0, max_new: int | None = None,
                    decode_precision: str = "q4", warmup: int = 0, reuse=None) -> SimResult:
    """One policy of the engine (``fate``, ``paper``, ``lru``, ``ondemand``) or the bound ``perfect`` (fate's
    policy told the next two layers' experts exactly) on ``trace``, with ``plan_slots`` slots per layer."""
    from fate.runtime.experts.prefetch import AHEAD

    pred = None
    if policy in ("fate", "paper"):
        pred = Predictor(cfg, routers, chances, decode_precision=decode_precision, low_precision=None,
                         int2_share=0.0, ahead=AHEAD if policy == "fate" else (1,))
    name = "perfect2" if policy == "perfect" else policy
    make = factory(trace, timing, cfg, plan_slots, name, evict=evict, predictor=pred, extra=extra, max_new=max_new,
                   decode_precision=decode_precision, reuse=reuse)
    return simulate(trace, timing, make, warmup=warmup, policy=policy)
