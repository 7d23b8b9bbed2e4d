"""Routing statistics measured on calibration text, by running the model itself layer by layer.

Per MoE layer: how many tokens each expert received (popularity).  Per MoE layer i: the mean cosine
similarity between layer i's gate input and the input of its prediction, and the recall of the
prediction with k, k+1, k+2 and k+4 candidates: the share of the experts layer i really chose that were
among the predicted ones.  The input is layer i-1's gate input (the paper's cross-layer prediction), and
for layer 0 the token embedding through layer 0's post-attention norm (:meth:`MoEModel.predictor_input`,
what the runtime's prefetcher uses).

The prediction is fitted here (:func:`fit_map`): per layer i and distance a (1, 2), the linear map from the
gate input a layers earlier to layer i's router logits, by least squares on the calibration tokens pulled
towards layer i's own router (the paper's prediction: layer i's router applied to the earlier input).
How hard it is pulled is chosen per map by two-fold cross-validation over the calibration sequences, the
router itself among the candidates, so with few tokens for the hidden size the map stays the router and
with many it becomes the fit.  On the trained 8-layer model of docs/BENCHMARKS.md the fit names 92.6 % of
the needed experts among 4 candidates one layer ahead where the router names 86.8 % (fitted on one half
of the calibration text, counted on the other).  The statistics (recall, rank_hit, reuse) are the fitted
prediction's, each token ranked by the map fitted on the other fold: what a text the fit never saw gets.

Memory stays bounded: only one layer's non-expert weights and one expert are materialised at a time,
plus the hidden states of the calibration tokens (tokens × hidden × 4 bytes) and the two folds' Gram matrices
of the two latest gate inputs (hidden² × 8 bytes each: 411 MB at DeepSeek-V3's 7168).  The fits cost, per
MoE layer, two Gram products (tokens × hidden²) and 18 Cholesky solves (hidden³ / 3 each: about 2 TFLOP a
layer at 7168, about 50 GFLOP at Qwen3-30B's 2048).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fate.formats import constants as C
from fate.formats.hf import HFCheckpoint
from fate.model import arch as A
from fate.model.config import ModelConfig
from fate.model.experts import DenseExperts
from fate.model.transformer import MoEModel, plain_linear


@dataclass
class CalibStats:
    popularity: torch.Tensor  # int64 [L, E]
    cosine: torch.Tensor  # float32 [L], NaN where undefined
    recall: torch.Tensor  # float32 [L, len(RECALL_EXTRA)], NaN where undefined
    tokens: int
    rank_hit: torch.Tensor | None = None  # float32 [2, L, E] (fate.calib.rank_hit), NaN where undefined
    reuse: torch.Tensor | None = None  # float32 [2, L, E + 1] (fate.calib.reuse), NaN for dense layers
    predict: torch.Tensor | None = None  # [2, L, E, H] (fate.calib.predict, stored F16), NaN where undefined


# the pulls towards the router fit_map chooses among (relative to the Gram matrix's mean diagonal), besides
# the router itself
RIDGES = (1e-3, 1e-2, 1e-1, 1.0)


class FitSource:
    """A gate input that predicts later layers: its tokens ``x`` [T, H] in two folds (``fold`` bool [T]) and
    each fold's Gram matrix (float64), computed once for the maps of every layer it predicts."""

    def __init__(self, x: torch.Tensor, fold: torch.Tensor):
        self.x = x
        self.masks = (~fold, fold)
        self.grams = [(x[m].T @ x[m]).double() for m in self.masks]  # float32 products: the fits' largest cost


def folds_of(lengths: list[int]) -> torch.Tensor:
    """bool [sum(lengths)]: every other calibration sequence in the second fold (one sequence: its second half)."""
    if len(lengths) == 1:
        n = lengths[0]
        return torch.arange(n) >= n // 2
    return torch.cat([torch.full((n,), j % 2 == 1) for j, n in enumerate(lengths)])


def _pulled(gram: torch.Tensor, xy: torch.Tensor, wt: torch.Tensor, ridge: float) -> torch.Tensor:
    """``[E, H]``: argmin ||x P^T - y||^2 + lam ||P - W||^2 from x^T x, x^T y and W^T (lam = ``ridge`` x the
    Gram's mean diagonal)."""
    lam = ridge * float(gram.diagonal().mean().clamp_min(1e-30))
    a = gram.clone()
    a.diagonal().add_(lam)  # symmetric positive definite: a Cholesky solve, half an LU's cost
    return torch.cholesky_solve(xy + lam * wt, torch.linalg.cholesky(a)).T.to(torch.float32)


def _hits(scores: torch.Tensor, topk: torch.Tensor, n: int) -> int:
    cand = scores.topk(n, dim=-1).indices
    return int((topk.unsqueeze(-1) == cand.unsqueeze(1)).any(-1).sum())


def fit_map(src: FitSource, y: torch.Tensor, router: torch.Tensor,
            topk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The prediction map from ``src`` to a layer with router logits ``y`` [T, E], router weight ``router``
    [E, H] and routing ``topk`` [T, k]: ``(P, scores)``.  P [E, H] float32 (float16 values, as the bundle
    stores it) minimises ||x P^T - y||^2 + lam ||P - router||^2 over all tokens, for the candidate in
    :data:`RIDGES` (or the router itself) whose maps fitted on one fold name the most of the other fold's
    needed experts among the top k and the top 2k; ``scores`` [T, E] are each token's scores under that
    candidate fitted on the other fold."""
    E, k = router.shape[0], topk.shape[1]
    wt = router.T.double()
    xys = [src.x[m].T.double() @ y[m].double() for m in src.masks]

    def held_out(maps):  # the needed experts each fold's tokens get from the map fitted on the other fold
        return sum(_hits(src.x[m] @ p.T, topk[m], n) for p, m in zip(maps, src.masks) for n in (k, min(2 * k, E)))

    best, best_ridge, best_maps = held_out([router, router]), None, None
    for ridge in RIDGES:
        maps = [_pulled(src.grams[1 - f], xys[1 - f], wt, ridge) for f in (0, 1)]
        h = held_out(maps)
        if h > best:
            best, best_ridge, best_maps = h, ridge, maps
    if best_ridge is None:
        p, scores = router.to(torch.float32), src.x @ router.T
    else:
        p = _pulled(src.grams[0] + src.grams[1], xys[0] + xys[1], wt, best_ridge)
        scores = torch.empty(src.x.shape[0], E)
        for q, m in zip(best_maps, src.masks):
            scores[m] = src.x[m] @ q.T
    return p.to(torch.float16).to(torch.float32), scores


def rank_hits(order: torch.Tensor, topk: torch.Tensor) -> torch.Tensor:
    """``[E]``: for each rank r, the share of tokens whose expert ranked r by ``order`` [T, E] is among their
    ``topk`` [T, k]."""
    return (order.unsqueeze(-1) == topk.unsqueeze(1)).any(-1).double().mean(0)


def reuse_curves(topk: torch.Tensor, predicted: torch.Tensor | None, n_experts: int,
                 lengths: list[int]) -> torch.Tensor:
    """``[2, E + 1]``: [0, s] the share of needed experts an LRU cache of s slots holds when a token comes (its
    stack distance over the sequence's earlier tokens is below s); [1, s] the share held or among
    ``predicted`` [T, k'] (the cross-layer prediction's top k).  Sequences restart with an empty cache."""
    E = n_experts
    held = torch.zeros(E + 2, dtype=torch.float64)  # held[d]: needed experts at stack distance d (E+1: never seen)
    unnamed = torch.zeros(E + 2, dtype=torch.float64)  # the same, of those the prediction did not name
    rows = topk.tolist()
    named = predicted.tolist() if predicted is not None else None
    t = 0
    for n in lengths:
        stack: list[int] = []  # most recent first
        for _ in range(n):
            need = rows[t]
            for e in need:
                d = stack.index(e) if e in stack else E + 1
                held[d] += 1
                if named is None or e not in named[t]:
                    unnamed[d] += 1
            stack = list(dict.fromkeys(need)) + [e for e in stack if e not in need]
            t += 1
    total = max(1.0, float(held.sum()))
    below = lambda c: torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(c, 0)[:E]])  # noqa: E731
    out = torch.empty(2, E + 1, dtype=torch.float64)
    out[0] = below(held) / total  # a cache of s slots holds what sits at distance < s
    out[1] = (total - unnamed.sum() + below(unnamed)) / total
    return out


class _LayerWeights:
    """WeightSource over the checkpoint that keeps only the tensors of the current layer in memory."""

    def __init__(self, ckpt: HFCheckpoint, mapping: dict[str, tuple[str, tuple[int, ...]]]):
        self.ckpt, self.mapping, self.cache = ckpt, mapping, {}

    def get(self, name: str):
        t = self.cache.get(name)
        if t is None:
            if name not in self.mapping:
                return None
            hf_name, shape = self.mapping[name]
            t = self.ckpt.get(hf_name, shape).to(torch.float32)
            self.cache[name] = t
        return t

    def linear(self, x, name: str, bias: str | None = None):
        return plain_linear(self, x, name, bias)

    def drop(self) -> None:
        self.cache = {}


def calibrate(ckpt: HFCheckpoint, spec: A.ArchSpec, cfg: ModelConfig, token_ids: list[int], seq_len: int,
              get_expert, progress=None) -> CalibStats:
    """``get_expert(layer, e) -> (gate, up, down)`` float32 tensors of the original weights (and the two
    biases for experts with biases)."""
    weights = _LayerWeights(ckpt, A.non_expert_tensors(spec, cfg))
    model = MoEModel(cfg, weights, DenseExperts(get_expert, cfg.act), dtype=torch.float32, device="cpu")
    L, E, k = cfg.n_layers, max(cfg.n_experts, 1), cfg.top_k
    extras = C.RECALL_EXTRA
    popularity = torch.zeros(L, E, dtype=torch.int64)
    cosine = torch.full((L,), float("nan"))
    recall = torch.full((L, len(extras)), float("nan"))
    rank_hit = torch.full((2, L, E), float("nan"))
    reuse = torch.full((2, L, E + 1), float("nan"))

    seqs = [torch.tensor(token_ids[s:s + seq_len], dtype=torch.long) for s in range(0, len(token_ids), seq_len)]
    lengths = [len(ids) for ids in seqs]
    with torch.inference_mode():
        # the embedding rows of the calibration tokens only: the whole table in float32 would be the
        # largest allocation of the conversion (Qwen's 151936 x 2048 table is 1.2 GB)
        emb_name, emb_shape = A.non_expert_tensors(spec, cfg)[C.T_TOKEN_EMBD]
        table = ckpt.get(emb_name, emb_shape)
        h = table[torch.tensor(token_ids, dtype=torch.long)].to(torch.float32)
        del table
        fold = folds_of(lengths)
        # the gate inputs one and two layers back with their folds' Gram matrices: layer 0 is predicted from the
        # token embedding (layer 1, two back, too)
        prev, prev2 = FitSource(model.predictor_input(h), fold), None
        predict = torch.full((2, L, E, prev.x.shape[1]), float("nan"))
        for i in range(L):
            # attention runs per sequence (causal within it); everything after it is per token, so the
            # FFN runs once over all tokens and each expert is read from the checkpoint once per layer
            h = torch.cat([model.attention(i, part, torch.arange(len(part)), None)
                           for part in torch.split(h, lengths)])
            g = model.gate_input(i, h)
            if cfg.moe_layers[i]:
                _, topk, _ = model.route(i, g)
                popularity[i] = torch.bincount(topk.flatten(), minlength=E)
                router = weights.get(C.T_FFN_GATE_INP.format(i=i))
                logits = g @ router.T  # what the fitted maps predict
                # ranked by the fitted prediction's (held-out) scores
                predict[0, i], scores = fit_map(prev, logits, router, topk)
                order = scores.argsort(dim=-1, descending=True, stable=True)
                for j, m in enumerate(extras):
                    cand = order[:, : min(k + m, E)]
                    hit = (topk.unsqueeze(-1) == cand.unsqueeze(1)).any(-1).sum(-1)
                    recall[i, j] = hit.double().mean().item() / k
                cosine[i] = F.cosine_similarity(prev.x.double(), g.double(), dim=-1).mean().item()
                rank_hit[0, i] = rank_hits(order, topk)
                if prev2 is not None:
                    predict[1, i], scores2 = fit_map(prev2, logits, router, topk)
                    rank_hit[1, i] = rank_hits(scores2.argsort(dim=-1, descending=True, stable=True), topk)
                reuse[:, i] = reuse_curves(topk, order[:, :k], E, lengths)
            h = h + model.ffn(i, g)
            prev2, prev = prev, FitSource(g, fold) if i + 1 < L else None
            weights.drop()
            if progress is not None:
                progress.update(1)
    return CalibStats(popularity, cosine, recall, len(token_ids), rank_hit, reuse, predict)
