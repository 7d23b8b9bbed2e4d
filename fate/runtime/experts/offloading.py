"""Offloading, assembled: the memory plan, the timing profile, the link, the cache, the transfer queue,
the predictor and the executor, built once in that order from the engine's options."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fate.formats import constants as C
from fate.runtime.experts import profile as P
from fate.runtime.experts.budget import BudgetPlan, plan_budget
from fate.runtime.experts.link import LinkSpec, Throttle, parse_link, resolve_ratio
from fate.runtime.experts.offload import OffloadedExperts
from fate.runtime.experts.prefetch import Predictor
from fate.runtime.experts.residency import ExpertCache
from fate.runtime.experts.stats import ExpertStats
from fate.runtime.experts.transfer import TransferEngine


def timing_profile(bundle, cfg, weights, store, device, dtype, precision: str, force: bool = False) -> P.TimingProfile:
    """The cached timing profile of this bundle on this machine, measured first when there is none (or
    when ``force``)."""
    key = P.profile_key(bundle.path, device, dtype, precision)
    prof = None if force else P.load_cached(key)
    if prof is None:
        prof = P.measure(cfg, weights, store, device, dtype, precision)
        P.save_cached(key, prof)
    return prof


def plan(cfg, store, bundle, opts, precision: str, weights_bytes: int, kv_bytes: int, dtype, context: int) -> BudgetPlan:
    """The memory plan for ``opts.mem`` (``ondemand``: top_k slots per layer, never kept)."""
    recall = bundle.tensor(C.T_CALIB_RECALL).clone() if bundle.has(C.T_CALIB_RECALL) else None
    alloc = opts.cache_alloc if opts.policy != "lru" else "even"  # mixtral-offloading: equal LRU caches
    slot_bytes = store.blob_bytes(precision)
    act = torch.finfo(dtype).bits // 8
    # activations of a full-context prefill and one dequantized expert (scratch), estimated generously
    buffer_bytes = (4 * context * max(cfg.hidden_size, cfg.n_experts * cfg.top_k) * act
                    + 3 * cfg.hidden_size * cfg.expert_ffn * act)
    p = plan_budget(cfg, mem=opts.mem, non_expert_bytes=weights_bytes, kv_bytes=kv_bytes, buffer_bytes=buffer_bytes,
                    slot_bytes=slot_bytes, alloc=alloc, recall=recall)
    if opts.policy == "ondemand":  # Load-on-Demand: only the current layer's need, never kept
        p.slots_per_layer = [cfg.top_k if m else 0 for m in cfg.moe_layers]
        p.fully_resident = False
        p.alloc = "ondemand"
    return p


@dataclass
class Offloading:
    """The parts of an offloaded run (what ``FateModel.offloading`` is when experts are offloaded)."""

    plan: BudgetPlan
    link: LinkSpec
    timing: P.TimingProfile | None
    cache: ExpertCache
    transfer: TransferEngine
    stats: ExpertStats
    executor: OffloadedExperts
    prefetch_extra: int | None

    @property
    def predicts(self) -> bool:
        return self.executor.predictor is not None

    def report(self, policy: str) -> dict:
        """The ``experts`` block of the stats schema for what ran since the last ``stats.reset()``."""
        return {"policy": policy, "link": self.link.to_dict(), **self.stats.to_dict()}

    def close(self) -> None:
        self.transfer.close()


def build(cfg, bundle, store, weights, opts, plan_: BudgetPlan, precision: str, device, dtype) -> Offloading:
    policy = opts.policy
    link = parse_link(opts.link)
    timing = None
    if policy == "fate" or link.kind == "ratio" or opts.profile:
        timing = timing_profile(bundle, cfg, weights, store, device, dtype, precision, force=opts.profile)
    slot_bytes = store.blob_bytes(precision)
    if link.kind == "ratio":
        link = resolve_ratio(link, timing.layer_decode_seconds, slot_bytes)
    throttle = Throttle(link) if link.kind == "bandwidth" else None
    low = "q2" if (policy == "fate" and "q2" in store.precisions and precision != "q2") else None
    if low is not None and store.blob_bytes("q2") > slot_bytes:
        low = None
    stats = ExpertStats(cfg.n_layers)
    evict = "lru" if policy == "lru" else opts.evict
    cache = ExpertCache(plan_.slots_per_layer, policy=evict, on_evict=stats.evicted)
    transfer = TransferEngine(store, plan_.slots_per_layer, slot_bytes, device, throttle, stats)
    predictor, extra, max_new = None, None, None
    if policy == "fate":
        rate = link.bytes_per_s if throttle else None
        extra = opts.prefetch_extra if opts.prefetch_extra is not None else timing.extra_candidates(
            cfg.top_k, cfg.n_experts, precision, rate)
        max_new = None if opts.prefetch_extra is not None else timing.copies_in_window(precision, rate)
        routers = {i: weights.get(C.T_FFN_GATE_INP.format(i=i)) for i in cfg.moe_layer_ids}
        predictor = Predictor(cfg, routers, extra=extra, decode_precision=precision, low_precision=low,
                              int2_share=opts.int2_share)
    executor = OffloadedExperts(cfg, store, cache, transfer, stats, dtype=dtype, device=device,
                                decode_precision=precision, low_precision=low, int2_share=opts.int2_share,
                                keep=policy != "ondemand", predictor=predictor, max_new=max_new,
                                kernels=opts.kernels)
    off = Offloading(plan_, link, timing, cache, transfer, stats, executor, extra)
    return off
