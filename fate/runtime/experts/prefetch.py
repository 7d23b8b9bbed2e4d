"""Cross-layer prediction: which experts the next layers will want, and how likely each one is.

The Fate paper's observation: the gate input of layer i (its post-attention norm output) is close to
layer i+1's, so layer i+1's router applied to layer i's gate input names layer i+1's experts one layer
early, with no training.  fate looks two layers ahead as well (layer i+2's router on the same input), and
names layer 0's experts from the token embedding (:meth:`MoEModel.predictor_input`).  Where the bundle
has them, the routers give way to linear maps fitted on the calibration text (``fate.calib.predict``:
from the gate input a layers earlier to layer i's router logits, :func:`fate.convert.calibrate.fit_map`),
which name more of the needed experts at every rank (:func:`prediction_maps`; ``--predictor router``
keeps the paper's routers).

A candidate's *chance* of being needed comes from its rank in the prediction, calibrated per layer and
per distance on the calibration text (``fate.calib.rank_hit``: the share of tokens for which the expert
ranked r by the prediction was among the k the router chose).  The policy (:mod:`.offload`) weighs that
chance against what a copy costs.

This module predicts: one matrix product for both layers ahead (their routers stacked) and one ranking,
on a CPU copy of the gate input — for one token a single native call (product and partial sort,
:func:`.copier.rank_topn`), numpy where it is not built; it reserves no slot and moves no byte.  For
fate's decode step, :meth:`Predictor.value_planner` also runs the value rule on the prediction in the same
native call (it reads the cache and returns the decisions; the policy acts on them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fate.formats import constants as C
from fate.runtime.experts import copier as native
from fate.runtime.experts.hybrid import hybrid_precisions

AHEAD = (1, 2)  # layers ahead the predictor names experts for


@dataclass(slots=True)
class Prediction:
    """Candidates for one layer, best first: decode — the experts ranked by the router's score on an
    earlier gate input (``ahead`` layers earlier), each with its calibrated chance of being needed;
    prefill — every expert the predicted routing sends tokens to, most tokens first, with the precision
    it should travel in (the INT2 rule)."""

    layer: int
    ahead: int
    experts: list[int]
    chances: list[float]
    precisions: dict[int, str] | None = None  # prefill only
    tokens: int = 0  # prefill only: the tokens of the step it predicts for


def rank_chances(bundle, cfg) -> torch.Tensor:
    """``[len(AHEAD), n_layers, n_experts]`` float64: the chance that the expert a prediction from ``ahead``
    layers earlier ranks r is needed — the bundle's ``fate.calib.rank_hit``, or for bundles without it an
    estimate from the recall columns (the chance of each rank band spread evenly over its ranks)."""
    L, E, k = cfg.n_layers, max(cfg.n_experts, 1), max(cfg.top_k, 1)
    if bundle is not None and bundle.has(C.T_CALIB_RANK_HIT):
        t = bundle.tensor(C.T_CALIB_RANK_HIT).to(torch.float64)
        if tuple(t.shape) == (len(AHEAD), L, E):
            return torch.nan_to_num(t, nan=0.0).clamp(0.0, 1.0)
    out = torch.zeros(len(AHEAD), L, E, dtype=torch.float64)
    recall = bundle.tensor(C.T_CALIB_RECALL).to(torch.float64) if bundle is not None and bundle.has(C.T_CALIB_RECALL) else None
    for i in range(L):
        if recall is None or not torch.isfinite(recall[i]).all():
            out[0, i, :k] = 0.5  # nothing measured: the top k are even odds
        else:
            prev_n, prev_c = 0, 0.0
            for j, m in enumerate(C.RECALL_EXTRA):
                n = min(E, k + m)
                covered = float(recall[i, j]) * k  # needed experts among the first n ranks, per token
                if n > prev_n:
                    out[0, i, prev_n:n] = max(0.0, covered - prev_c) / (n - prev_n)
                prev_n, prev_c = n, max(prev_c, covered)
    out[1] = out[0] * 0.75  # two layers ahead: less sure (no measurement in such a bundle)
    return out.clamp(0.0, 1.0)


def prediction_maps(bundle, cfg, ahead: tuple[int, ...] = AHEAD) -> dict[tuple[int, int], torch.Tensor] | None:
    """The bundle's fitted prediction maps as ``{(source layer, target layer): [E, H] float32}`` (source -1:
    the token embedding's predictor input), for every target a distance in ``ahead`` away whose map is
    finite; None for bundles without them (converted before 2026-12-01, or with ``--no-calib``)."""
    if bundle is None or not bundle.has(C.T_CALIB_PREDICT):
        return None
    t = bundle.tensor(C.T_CALIB_PREDICT)
    if t.dim() != 4 or tuple(t.shape[:3]) != (len(AHEAD), cfg.n_layers, cfg.n_experts):
        return None
    maps = {}
    for a in ahead:
        for j in cfg.moe_layer_ids:
            w = t[a - 1, j].to(torch.float32)
            if j - a >= -1 and bool(torch.isfinite(w).all()):
                maps[(j - a, j)] = w
    return maps


class Predictor:
    """Layer i+1's and i+2's routers on layer i's gate input, or their fitted maps (``maps``, as
    :func:`prediction_maps` gives them: each (source, target) pair found there replaces the target's router).

    Decode (one token): the top ``limit`` experts of each layer ahead by router score, with their chances
    (:func:`rank_chances`).  Prefill: layer i+1 only, every expert the predicted routing sends tokens to,
    most tokens first, the least popular as INT2 (:func:`.hybrid.hybrid_precisions`)."""

    def __init__(self, cfg, routers: dict[int, torch.Tensor], chances: torch.Tensor, *, decode_precision: str,
                 low_precision: str | None, int2_share: float, ahead: tuple[int, ...] = AHEAD, select=None,
                 maps: dict[tuple[int, int], torch.Tensor] | None = None):
        self.cfg = cfg
        # routers whose order is not their logits' (a bias, a sigmoid plus correction, expert groups) rank by
        # the model's own selection scores: ``select(j, g)`` -> [T, E] (MoEModel.selection_scores)
        self.select = select  # (it does not apply to fitted maps: they are ranked by their products)
        self.maps = maps or None
        self.chances = chances.tolist()  # [ahead][layer][rank]: plain floats on the hot path
        self.decode_precision, self.low_precision, self.int2_share = decode_precision, low_precision, int2_share
        E = cfg.n_experts
        self._targets: dict[int, list[int]] = {}
        self._stack: dict[int, torch.Tensor] = {}
        self._stack_np: dict[int, np.ndarray] = {}  # the same, for one token: numpy's overhead per call is µs less
        for i in range(-1, cfg.n_layers - 1):
            targets = [i + a for a in ahead if i + a < cfg.n_layers and (i + a) in routers]
            if targets:
                self._targets[i] = targets
                # one product names every layer ahead: their routers stacked, [len(targets) * E, H]
                self._stack[i] = torch.cat([self.weight(i, j, routers) for j in targets])
                self._stack_np[i] = self._stack[i].numpy()
        self._addr = {i: w.data_ptr() for i, w in self._stack.items()}
        self.E, self.H = E, (next(iter(self._stack.values())).shape[1] if self._stack else 0)
        self._rank_native = False  # resolved on the first one-token prediction (the extension builds once)
        self._sizes: dict[int, tuple] = {}  # layer -> (limit, n, made): see _sizes_for
        self._fused = False  # the native prediction + value rule (value_planner's class), resolved on first use

    @property
    def _selects(self) -> bool:
        """Whether predictions rank by the model's selection scores (routers that need them, no fitted maps)."""
        return self.select is not None and self.maps is None

    def weight(self, source: int, target: int, routers: dict[int, torch.Tensor]) -> torch.Tensor:
        """``[E, H]`` float32: what scores ``target``'s experts from ``source``'s gate input."""
        w = self.maps.get((source, target)) if self.maps else None
        return (routers[target] if w is None else w).detach().to("cpu", torch.float32).contiguous()

    def targets(self, layer: int) -> list[int]:
        """The layers a prediction at ``layer``'s gate input names experts for."""
        return self._targets.get(layer, [])

    def predict(self, layer: int, g: torch.Tensor, limit: dict[int, int]) -> list[Prediction]:
        """Predictions for the layers ahead of ``layer`` from its gate input ``g`` [T, H] (``layer`` -1: the
        embedding's); ``limit[j]``: at most that many candidates for layer j (its slots)."""
        targets = self._targets.get(layer)
        if not targets:
            return []
        if self._selects:
            scores = torch.cat([self.select(j, g).detach().to("cpu", torch.float32) for j in targets], dim=1)
            return self.rank(layer, scores, limit)
        x = g if g.dtype is torch.float32 and g.is_cpu else g.detach().to("cpu", torch.float32)
        if x.shape[0] == 1:  # the decode hot path: one product, one ranking per layer ahead
            if self._rank_native is False:
                self._rank_native = native.rank_topn()
            if self._rank_native is not None:
                n, made = self._sizes_for(layer, targets, limit)
                if n <= 0:
                    return []
                if not x.is_contiguous():
                    x = x.contiguous()
                order = self._rank_native(self._addr[layer], x.data_ptr(), len(targets), self.E, self.H, n)
                return self._from_order(made, order)
            scores = self._stack_np[layer] @ x.numpy()[0]
            return self._rank_one(layer, targets, scores, limit)
        if targets[0] != layer + 1:
            return []  # a prefill predicts the next layer only (rank's rule): nothing to compute
        return self.rank(layer, x @ self._stack[layer][:self.E].T, limit)  # its router's rows alone

    def value_planner(self, layer: int, limit: dict[int, int], k: int, t_layer: float, t_copy: float, host: float,
                      cache, queuer=None):
        """fate's decode hot path for ``layer``'s gate input: a native callable ``planner(x, now, link_free)``
        (``x``: the gate input [1, H]) that predicts and runs the value rule in one call, giving ``(experts named
        for the next layer or None, decisions)`` as :meth:`predict` then
        :func:`fate.runtime.experts.offload.value_plan` with these constants and ``cache`` would — or None
        where ``x`` is not a contiguous float32 CPU tensor.  With a ``queuer``
        (:meth:`.transfer.TransferEngine.native_queue`) it also reserves the slots and queues the copies it
        decided, in the same call (its ``queues`` is then True).  None where that path does not apply (nothing
        ahead, selection scores, the extension not built, no candidates): then predict, then decide."""
        targets = self._targets.get(layer)
        if not targets or self._selects:
            return None
        if self._fused is False:
            self._fused = native.value_planner()
        if self._fused is None:
            return None
        n, made = self._sizes_for(layer, targets, limit)
        if n <= 0:
            return None
        return self._fused(self._stack[layer], self.E, self.H, n, made, layer, k, t_layer, t_copy, host, cache, queuer)

    def _sizes_for(self, layer: int, targets: list[int], limit: dict[int, int]):
        """What a one-token prediction at ``layer`` under ``limit`` ranks (``n``) and keeps per layer ahead
        (``made``: ``(layer, ahead, m, chances of ranks < m)``), worked out once per limit: the hot path only
        slices."""
        cached = self._sizes.get(layer)
        if cached is not None and cached[0] is limit:
            return cached[1], cached[2]
        n = min(self.E, max(limit.get(j, 0) for j in targets))
        made = []
        for j in targets:
            m = min(n, limit.get(j, 0))
            made.append((j, j - layer, m, self.chances[j - layer - 1][j][:m]))
        self._sizes[layer] = (limit, n, made)
        return n, made

    @staticmethod
    def _from_order(made: list[tuple], order: list[list[int]]) -> list[Prediction]:
        """The predictions from each layer ahead's ranked experts (``order``, as many as ``_sizes_for`` said)."""
        return [Prediction(j, a, ranked[:m], chances) for (j, a, m, chances), ranked in zip(made, order) if m > 0]

    def _rank_one(self, layer: int, targets: list[int], scores: np.ndarray, limit: dict[int, int]) -> list[Prediction]:
        n, made = self._sizes_for(layer, targets, limit)
        if n <= 0:
            return []
        order = np.argsort(-scores.reshape(len(targets), self.E), axis=1, kind="stable")[:, :n].tolist()
        return self._from_order(made, order)

    def rank(self, layer: int, logits: torch.Tensor, limit: dict[int, int]) -> list[Prediction]:
        """Predictions from the layers ahead's scores ``[T, len(targets(layer)) * E]`` (the stacked routers'
        logits, or their selection scores: what :meth:`predict` computes; the trace simulator passes recorded
        ones)."""
        targets = self._targets.get(layer)
        if not targets:
            return []
        E, k = self.E, self.cfg.top_k
        if logits.shape[0] == 1:
            return self._rank_one(layer, targets, logits[0].detach().to("cpu", torch.float32).numpy(), limit)
        j = targets[0]
        if j != layer + 1:
            return []
        counts_t = torch.bincount(logits[:, :E].topk(k, dim=-1).indices.flatten(), minlength=E)
        order, counts = counts_t.argsort(descending=True, stable=True).tolist(), counts_t.tolist()
        ranked = [e for e in order if counts[e] > 0][:limit.get(j, 0)]
        precisions = hybrid_precisions(ranked, counts, self.int2_share, self.decode_precision, self.low_precision)
        total = max(1, sum(counts[e] for e in ranked))
        return [Prediction(j, 1, ranked, [counts[e] / total for e in ranked], precisions, int(logits.shape[0]))]
