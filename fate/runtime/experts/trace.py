"""Routing traces: for every token and MoE layer, the experts the router chose and what the cross-layer
predictions said beforehand — everything an offloading policy sees, without the model's math.

A trace is recorded by running the model once over a token sequence with every expert resident
(:func:`record_trace`): each token's routing in one pass over the sequence is its routing in a token-by-token
decode (causal attention), so a trace of a prompt and its generated continuation replays that generation's
decode steps exactly; calibration text gives traces of any length.  :mod:`.simulate` replays traces through
the engine's own policy objects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fate.formats import constants as C
from fate.runtime.experts.prefetch import AHEAD


@dataclass
class RoutingTrace:
    """``ids[t, l]``: the top-k experts of token t in layer l (-1 in dense layers); ``logits[l]``: for the
    prediction made at layer l's gate input (index ``l + 1``: -1 is the embedding), the stacked routers'
    logits of the layers ahead (their selection scores where the router does not rank by logits),
    ``[T, len(targets) * E]`` float32 — what :meth:`Predictor.rank` ranks."""

    n_layers: int
    n_experts: int
    top_k: int
    moe_layers: list[bool]
    ids: torch.Tensor  # int64 [T, L, k]
    logits: dict[int, torch.Tensor]  # gate-input layer (-1 .. L-2) -> [T, n_targets * E]

    @property
    def tokens(self) -> int:
        return int(self.ids.shape[0])

    def step(self, t: int) -> "RoutingTrace":
        """The one-token trace of token ``t``."""
        return RoutingTrace(self.n_layers, self.n_experts, self.top_k, self.moe_layers, self.ids[t:t + 1],
                            {k: v[t:t + 1] for k, v in self.logits.items()})


class _Recorder:
    """An executor wrapper and observer recording top-k ids and gate inputs of one forward pass."""

    def __init__(self, inner):
        self.inner = inner
        self.ids: dict[int, torch.Tensor] = {}
        self.gates: dict[int, torch.Tensor] = {}
        self.raw: dict[int, torch.Tensor] = {}  # as the model gave them (its dtype and device)

    def on_gate_input(self, layer: int, g: torch.Tensor) -> None:
        self.gates[layer] = g.detach().to("cpu", torch.float32).clone()
        self.raw[layer] = g.detach().clone()

    def moe(self, layer, x, topk_ids, topk_weights):
        self.ids[layer] = topk_ids.detach().to("cpu").clone()
        return self.inner.moe(layer, x, topk_ids, topk_weights)


def record_trace(model, token_ids, ahead: tuple[int, ...] = AHEAD, maps=None) -> RoutingTrace:
    """Run ``model`` (a :class:`fate.model.transformer.MoEModel` with every expert resident) once over
    ``token_ids`` and return their routing trace; the predictions' scores are those of the fitted ``maps``
    (:func:`.prefetch.prediction_maps`) where given, else of the routers, as the engine's predictor ranks."""
    cfg = model.cfg
    rec = _Recorder(model.experts)
    saved = model.experts, model.observer
    model.experts, model.observer = rec, rec
    try:
        with torch.inference_mode():
            model.forward(torch.as_tensor(list(token_ids), dtype=torch.long, device=model.device), None)
    finally:
        model.experts, model.observer = saved
    T, L, k, E = len(token_ids), cfg.n_layers, cfg.top_k, cfg.n_experts
    ids = torch.full((T, L, k), -1, dtype=torch.long)
    for layer, t in rec.ids.items():
        ids[:, layer] = t
    routers = {i: model.weights.get(C.T_FFN_GATE_INP.format(i=i)) for i in cfg.moe_layer_ids}
    logits = {}
    for i in range(-1, L - 1):
        targets = [i + a for a in ahead if i + a < L and (i + a) in routers]
        if not targets or i not in rec.gates:
            continue
        if maps or cfg.router_ranks_by_logits:
            w = torch.cat([(maps or {}).get((i, j), routers[j]).detach().to("cpu", torch.float32) for j in targets])
            logits[i] = rec.gates[i] @ w.T
        else:  # what the engine's predictor ranks for this router (Predictor.select)
            with torch.inference_mode():
                logits[i] = torch.cat([model.selection_scores(j, rec.raw[i]).to("cpu", torch.float32)
                                       for j in targets], dim=1)
    return RoutingTrace(L, E, k, list(cfg.moe_layers), ids, logits)
