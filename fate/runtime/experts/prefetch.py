"""Cross-layer prediction: which experts the next layer will want, and how strongly.

The Fate paper's observation: the gate input of layer i (its post-attention norm output) is close to
layer i+1's, so layer i+1's router applied to layer i's gate input names layer i+1's experts one layer
early, with no training.  Layer 0's are named from the token embedding (:meth:`MoEModel.predictor_input`).

This module only predicts.  It reserves no slot and moves no byte: the offloading executor
(:mod:`.offload`) decides what of a prediction to fetch, the cache (:mod:`.residency`) where it goes, the
transfer queue (:mod:`.transfer`) when it moves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fate.runtime.experts.hybrid import hybrid_precisions


@dataclass
class Prediction:
    """Candidates for one layer, best first, each with its score and the precision it should travel in.
    Decode: the router's logits on the earlier gate input; prefill: predicted tokens per expert."""

    layer: int
    experts: list[int]
    scores: list[float]
    precisions: dict[int, str]
    decode: bool


class Predictor:
    """Layer i+1's router on layer i's gate input: top ``k + extra`` candidates for one token (decode), or
    every expert the predicted routing sends tokens to, most tokens first, with the INT2 rule applied
    (prefill)."""

    def __init__(self, cfg, routers: dict[int, torch.Tensor], *, extra: int, decode_precision: str,
                 low_precision: str | None, int2_share: float):
        self.cfg = cfg
        self.routers = {i: w.detach().to("cpu", torch.float32) for i, w in routers.items()}
        self.extra, self.decode_precision = extra, decode_precision
        self.low_precision, self.int2_share = low_precision, int2_share

    def predict(self, layer: int, g: torch.Tensor, limit: int) -> Prediction | None:
        """The prediction for layer ``layer + 1`` from layer ``layer``'s gate input ``g`` [T, H] (``layer`` -1:
        the embedding's), at most ``limit`` candidates; None when that layer has no router."""
        nxt = layer + 1
        router = self.routers.get(nxt)
        if router is None:
            return None
        x = g.detach().to("cpu", torch.float32)
        logits = x @ router.T
        k, E = self.cfg.top_k, self.cfg.n_experts
        if x.shape[0] == 1:
            scores, order = logits[0].sort(descending=True, stable=True)
            n = min(E, k + self.extra, limit)
            ranked = order[:n].tolist()
            return Prediction(nxt, ranked, scores[:n].tolist(), dict.fromkeys(ranked, self.decode_precision), True)
        counts = torch.bincount(logits.topk(k, dim=-1).indices.flatten(), minlength=E)
        order = counts.argsort(descending=True, stable=True).tolist()
        ranked = [e for e in order if counts[e] > 0][:limit]
        counts = counts.tolist()
        precisions = hybrid_precisions(ranked, counts, self.int2_share, self.decode_precision, self.low_precision)
        return Prediction(nxt, ranked, [float(counts[e]) for e in ranked], precisions, False)
