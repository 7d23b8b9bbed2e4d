"""Offloading, assembled: the memory plan, the timing profile, the link, the cache, the transfer queue,
the predictor and the executor, built once in that order from the engine's options."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fate.formats import constants as C
from fate.sysinfo import default_threads
from fate.runtime.experts import profile as P
from fate.runtime.experts.budget import BudgetPlan, plan_budget
from fate.runtime.experts.link import LinkSpec, Throttle, parse_link, resolve_ratio
from fate.runtime.experts.offload import OffloadedExperts, Offloader
from fate.runtime.experts.prefetch import AHEAD, Predictor, prediction_maps, rank_chances
from fate.runtime.experts.residency import ExpertCache
from fate.runtime.experts.stats import ExpertStats
from fate.runtime.experts.transfer import TransferEngine


def timing_profile(bundle, cfg, weights, store, device, dtype, precision: str, force: bool = False,
                   kernels: str = "int8", threads: int | None = None) -> P.TimingProfile:
    """The cached timing profile of this bundle on this machine for a run of ``threads`` (-t), measured
    first when there is none (or when ``force``)."""
    key = P.profile_key(bundle.path, device, dtype, precision, kernels, threads)
    prof = None if force else P.load_cached(key)
    if prof is None:
        prof = P.measure(cfg, weights, store, device, dtype, precision, kernels=kernels)
        P.save_cached(key, prof)
    return prof


def copies_per_layer(link: LinkSpec, timing_fn, slot_bytes: int) -> float:
    """How many expert copies the link moves in one layer's decode compute: ``1/R`` for ``ratio:R``, from the
    timing profile for a bandwidth (``timing_fn()`` measures or loads it), many for a memcpy (no link)."""
    if link.kind == "ratio":
        return 1.0 / link.ratio
    if link.kind == "bandwidth":
        return timing_fn().layer_decode_seconds * link.bytes_per_s / slot_bytes
    return 8.0  # a memcpy of an expert takes a small part of a layer


def reuse_curves(bundle) -> torch.Tensor | None:
    """The bundle's reuse curves (``fate.calib.reuse``, a copy out of the mapped file), or None without them:
    what the ``reuse`` allocation plans by and fate's value rule predicts by."""
    return bundle.tensor(C.T_CALIB_REUSE).clone() if bundle.has(C.T_CALIB_REUSE) else None


def plan(cfg, store, bundle, opts, precision: str, weights_bytes: int, kv_bytes: int, dtype, context: int,
         link_copies: float = 1.0) -> BudgetPlan:
    """The memory plan for ``opts.mem`` (``ondemand``: top_k slots per layer, never kept); ``link_copies``:
    :func:`copies_per_layer`, for the ``reuse`` allocation."""
    recall = bundle.tensor(C.T_CALIB_RECALL).clone() if bundle.has(C.T_CALIB_RECALL) else None
    reuse = reuse_curves(bundle)
    alloc = opts.cache_alloc if opts.policy != "lru" else "even"  # mixtral-offloading: equal LRU caches
    slot_bytes = store.blob_bytes(precision)
    act = torch.finfo(dtype).bits // 8
    # activations of a full-context prefill and one dequantized expert (scratch), estimated generously
    buffer_bytes = (4 * context * max(cfg.hidden_size, cfg.n_experts * cfg.top_k) * act
                    + 3 * cfg.hidden_size * cfg.expert_ffn * act)
    p = plan_budget(cfg, mem=opts.mem, non_expert_bytes=weights_bytes, kv_bytes=kv_bytes, buffer_bytes=buffer_bytes,
                    slot_bytes=slot_bytes, alloc=alloc, recall=recall, reuse=reuse, link_copies=link_copies)
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
        return {"policy": policy, "evict": self.cache.policy_name, "link": self.link.to_dict(), **self.stats.to_dict()}

    def close(self) -> None:
        self.transfer.close()


def build(cfg, bundle, store, weights, opts, plan_: BudgetPlan, precision: str, device, dtype) -> Offloading:
    policy = opts.policy
    threads = opts.threads or default_threads()  # the run's compute threads (fate's kernels or torch's)
    link = parse_link(opts.link)
    predicts = policy in ("fate", "paper")
    timing = None
    if predicts or link.kind == "ratio" or opts.profile:
        timing = timing_profile(bundle, cfg, weights, store, device, dtype, precision, force=opts.profile,
                                kernels=opts.kernels, threads=threads)
    slot_bytes = store.blob_bytes(precision)
    if link.kind == "ratio":
        link = resolve_ratio(link, timing.layer_decode_seconds, slot_bytes)
    throttle = Throttle(link) if link.kind == "bandwidth" else None
    low = "q2" if (predicts and "q2" in store.precisions and precision != "q2") else None
    if low is not None and store.blob_bytes("q2") > slot_bytes:
        low = None
    stats = ExpertStats(cfg.n_layers)
    cache = ExpertCache(plan_.slots_per_layer, cfg.n_experts, policy=opts.eviction(), on_evict=stats.evicted)
    copy_s = dict(timing.expert_copy_seconds) if timing is not None else None
    transfer = TransferEngine(store, cache, slot_bytes, device, throttle, stats, copy_seconds=copy_s,
                              compute_threads=threads)
    predictor, extra, max_new = None, 0, None
    if predicts:
        rate = link.bytes_per_s if throttle else None
        extra = opts.prefetch_extra if opts.prefetch_extra is not None else timing.extra_candidates(
            cfg.top_k, cfg.n_experts, precision, rate)
        if policy == "fate":  # candidates are weighed by their chances: name a few more than the window holds
            extra = max(extra, cfg.top_k) if opts.prefetch_extra is None else extra
        else:
            max_new = None if opts.prefetch_extra is not None else timing.copies_in_window(precision, rate)
        routers = {i: weights.get(C.T_FFN_GATE_INP.format(i=i)) for i in cfg.moe_layer_ids}
        maps = prediction_maps(bundle, cfg) if opts.predictor == "fitted" else None
        predictor = Predictor(cfg, routers, rank_chances(bundle, cfg), decode_precision=precision,
                              low_precision=low, int2_share=opts.int2_share,
                              ahead=AHEAD if policy == "fate" else (1,), maps=maps)
    offloader = Offloader(cfg, cache, transfer, stats, keep=policy != "ondemand", decode_precision=precision,
                          low_precision=low, int2_share=opts.int2_share, predictor=predictor,
                          rule="value" if policy == "fate" else "window", extra=extra, max_new=max_new,
                          layer_seconds=timing.layer_decode_seconds if timing is not None else 0.0,
                          expert_seconds=timing.expert_decode_seconds if timing is not None else 0.0,
                          reuse=reuse_curves(bundle))
    executor = OffloadedExperts(offloader, store, transfer, dtype=dtype, device=device, kernels=opts.kernels)
    return Offloading(plan_, link, timing, cache, transfer, stats, executor, extra if predicts else None)
