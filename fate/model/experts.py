"""The MoE executor protocol and the one grouping/combine every executor shares.

An :class:`ExpertExecutor` computes a layer's routed experts for the tokens the router sent them:
:class:`DenseExperts` from plain tensors (calibration, tests), the runtime's resident and offloading
executors from bundle blobs.  They differ in where an expert's weights come from, never in how tokens
are grouped by expert and how the k outputs of a token are combined: that is :class:`ExpertRows`, which
follows transformers' default experts path bit for bit.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from fate.quant.expert import swiglu
from fate.quant.layout import SWIGLU, ExpertAct

Tensor = torch.Tensor


class ExpertExecutor(Protocol):
    def moe(self, layer: int, x: Tensor, topk_ids: Tensor, topk_weights: Tensor) -> Tensor:
        """``x`` [T, H] gate input; return sum over k of ``topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t])``
        as [T, H] in ``x``'s dtype."""



class ExpertRows:
    """The tokens of one MoE call grouped by expert — what every ExpertExecutor needs to run each expert
    once on all of its tokens and combine the k outputs per token as transformers does: each expert output
    times its routing weight in the promoted dtype of the two, the k terms of a token summed in their top-k
    order with one reduction, one cast to ``x``'s dtype at the end (:meth:`combine`).

    ``experts`` lists the experts that received tokens (one token: in its top-k order; else by id),
    ``count(e)`` how many, ``tokens(e)`` their rows of ``x``; an executor computes each and hands the
    output to :meth:`put`.  One token (decode) takes a cheaper path with the same arithmetic."""

    def __init__(self, x: Tensor, topk_ids: Tensor, topk_weights: Tensor, n_experts: int = 0):
        self.T, self.k = topk_ids.shape
        self.out_dtype = x.dtype
        self.dtype = torch.promote_types(x.dtype, topk_weights.dtype)  # the terms'
        if self.T == 1:  # the k outputs are kept as they come and weighted together in combine()
            self.experts = topk_ids.tolist()[0]
            self._slot = {e: j for j, e in enumerate(self.experts)}
            self._counts = dict.fromkeys(self.experts, 1)
            self._ys: list = [None] * self.k
            self.ws = topk_weights
            self.xs = x
            return
        self.terms = torch.empty((self.T * self.k, x.shape[1]), dtype=self.dtype, device=x.device)
        flat = topk_ids.reshape(-1)
        self.order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
        counts = torch.bincount(flat, minlength=n_experts).tolist()
        self.experts = [e for e, n in enumerate(counts) if n]
        self._counts = {e: counts[e] for e in self.experts}
        self._span, acc = {}, 0
        for e, n in enumerate(counts):
            if n:
                self._span[e] = slice(acc, acc + n)
            acc += n
        self.ws = topk_weights.reshape(-1).index_select(0, self.order).unsqueeze(1)
        self.xs = F.embedding(torch.div(self.order, self.k, rounding_mode="floor"), x)  # row gather

    def count(self, e: int) -> int:
        """Tokens routed to expert ``e`` (0 when none)."""
        return self._counts.get(e, 0)

    def tokens(self, e: int) -> Tensor:
        """The rows of ``x`` routed to expert ``e``, in the order :meth:`put` expects its output."""
        return self.xs if self.T == 1 else self.xs[self._span[e]]

    def put(self, e: int, y: Tensor) -> None:
        """Expert ``e``'s output on its tokens (rows as :meth:`tokens` gave them), for the weighted terms."""
        if self.T == 1:
            self._ys[self._slot[e]] = y
        else:
            sp = self._span[e]
            self.terms[self.order[sp]] = y * self.ws[sp]

    def combine(self) -> Tensor:
        """The ``[T, H]`` output: each token's k weighted terms summed in their top-k order."""
        if self.T == 1:  # the same products and sum as below, in three operations instead of 4k + 3
            terms = torch.stack(self._ys, 1) * self.ws.unsqueeze(2)
            if terms.dtype != self.dtype:
                terms = terms.to(self.dtype)
            out = terms.sum(1)
            return out if out.dtype == self.out_dtype else out.to(self.out_dtype)
        return self.terms.view(self.T, self.k, -1).sum(1).to(self.out_dtype)


class DenseExperts:
    """The plain ExpertExecutor: experts as ordinary tensors from ``get_expert(layer, e) -> (gate [F, H],
    up [F, H], down [H, F])``, or ``(gate, up, down, gate_up_bias [2F], down_bias [H])`` for experts with
    biases (calibration over a checkpoint's own weights, and the tests' reference); ``act`` is the experts'
    activation (SwiGLU unless the model says otherwise: ``ModelConfig.act``).

    Only experts that received tokens run, each once on all of its tokens, combined by :class:`ExpertRows`
    as transformers' default experts path (``grouped_mm``) does."""

    def __init__(self, get_expert: Callable[[int, int], tuple[Tensor, ...]], act: ExpertAct = SWIGLU):
        self.get_expert = get_expert
        self.act = act

    def moe(self, layer: int, x: Tensor, topk_ids: Tensor, topk_weights: Tensor) -> Tensor:
        rows = ExpertRows(x, topk_ids, topk_weights)
        for e in rows.experts:
            w = self.get_expert(layer, e)
            bias = (w[3], w[4]) if len(w) == 5 else None
            rows.put(e, swiglu(rows.tokens(e), w[0], w[1], w[2], bias, self.act))
        return rows.combine()
