"""The one model implementation: every supported MoE architecture, driven by ModelConfig's flags.

Weights come from a :class:`WeightSource` (non-expert tensors by bundle name, already in the compute
dtype on the device) and routed experts run through an :class:`ExpertExecutor`, so the same forward
serves the converter's calibration (plain tensors, one layer at a time), the tests (a Hugging Face
checkpoint read directly) and the runtime (experts streamed through a device cache).  The model keeps
no weight of its own: it asks the source on every use and holds only derived constants (RoPE tables).

Numerics follow transformers' forward of each architecture step by step — which dtype each
reduction runs in, where a cast happens, in which order terms are added — so that in float32 the
logits agree with transformers to rounding and in bfloat16 the same values are rounded at the same
places.  Per architecture:

* RMSNorm: variance in float32, normalized value cast back to the input dtype, *then* times the weight.
* RoPE: rotate-half convention; inverse frequencies ``1 / theta ** (arange(0, D, 2) / D)`` in float32,
  divided by the factor for linear scaling; cos/sin computed in float32 and cast to the compute dtype.
* Qwen2-MoE: q/k/v biases; shared expert scaled by ``sigmoid(x @ w_gate)``.
* Qwen3-MoE: RMSNorm of q and k per head (after the reshape to heads, before RoPE).
* OLMoE: RMSNorm of q and k over the whole projection (before the reshape), then clip to ±clip_qkv.
* Routers: logits in the compute dtype, softmax in float32, top-k, optional renormalization, weights
  cast back to the compute dtype — except Mixtral, whose transformers router keeps them in float32 so
  the expert output is scaled in float32 and rounded once.
* DeepSeekMoE (v1): Llama attention, leading dense layers, shared experts added without a gate.
* gpt-oss: q/k/v/o biases; RMSNorm times its weight in float32, then cast; YaRN RoPE (cos and sin times
  its attention factor); transformers' eager attention — scores times the scale, an additive 0/min mask,
  one sink logit per head appended, the row maximum subtracted, softmax in the compute dtype, the sink
  dropped; sliding-window layers alternating with full ones; router logits with a bias, top-k of the
  logits, softmax over those k in the compute dtype; experts with biases and the clamped SwiGLU
  (fate.quant.layout.ExpertAct).
* DeepSeek-V2/V3 (multi-head latent attention): q through an optional low-rank path with its RMSNorm
  (epsilon 1e-6, not rms_norm_eps), the kv latent RMSNorm'd and cached with the rope key, keys and
  values expanded from the cache every step; RoPE on the rope part only (V2: complex multiplication in
  float32; V3: even/odd pairs); the softmax scale times YaRN's mscale squared.  Routers in float32: V2
  softmax with group-limited greedy top-k (unsorted, as transformers) times routed_scaling_factor; V3
  sigmoid scores, choice by score + e_score_correction_bias within the best groups (sum of each group's
  two best), weights gathered from the plain scores, renormalised (+1e-20), times the scaling factor;
  both keep the weights in float32.
* GLM-4.5: V3's router, partial RoPE (rotate-half on the first dimensions of each head), optional
  per-head q/k RMSNorm, q/k/v biases.
* ERNIE-4.5: RoPE on even/odd pairs in float32; router in float32 softmax, choice by probability + the
  correction bias, weights renormalised by ``max(sum, moe_norm_min)`` and cast to the compute dtype.
* Attention: ``scaled_dot_product_attention`` on 4-D tensors with ``enable_gqa``, as transformers' sdpa
  path calls it; routed experts combined as transformers' default ``grouped_mm`` experts path does
  (see :class:`fate.model.experts.ExpertRows`).  On CPU, bfloat16 logits come out bit-identical to transformers'.

Calling convention for layer-by-layer drivers (calibration, the offloading engine): ``h = embed(ids)``,
``pos = positions(start, T)``, then ``h = block(i, h, pos, kv)`` for each layer, then ``final(h)``;
:meth:`forward` is exactly that loop.  The KV cache advances per layer as keys are appended.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from fate.formats import constants as C
from fate.model.config import ModelConfig
from fate.model.experts import ExpertExecutor
from fate.model.kv import KVCache
from fate.model.rope import Rotary

Tensor = torch.Tensor


class WeightSource(Protocol):
    def get(self, name: str) -> Tensor | None:
        """Non-expert tensor by bundle name (``constants.T_*``), in the compute dtype on the device;
        None when the bundle has no such tensor."""

    def linear(self, x: Tensor, name: str, bias: str | None = None) -> Tensor:
        """``F.linear(x, get(name), get(bias))``.  The model runs every projection through it, so a source
        may keep a matrix in a narrower stored dtype and widen it per call
        (:class:`fate.runtime.weights.ResidentWeights`)."""


def _observes(observer, layer: int, tokens: int) -> bool:
    """Whether ``observer`` wants layer ``layer``'s gate input in a forward of ``tokens`` tokens (its optional
    ``observes``, see :class:`MoEObserver`)."""
    wants = getattr(observer, "observes", None)
    return wants is None or wants(layer, tokens)


def plain_linear(source: WeightSource, x: Tensor, name: str, bias: str | None = None) -> Tensor:
    """:meth:`WeightSource.linear` for a source whose ``get`` gives every matrix in the compute dtype."""
    w = source.get(name)
    if w is None:
        raise KeyError(f"the model's weights have no tensor {name!r}")
    return F.linear(x, w, None if bias is None else source.get(bias))


class MoEObserver(Protocol):
    def on_gate_input(self, layer: int, g: Tensor) -> None:
        """Called with layer ``layer``'s gate input (post-attention norm output) before its FFN runs, and
        once per forward with ``layer = -1`` and :meth:`MoEModel.predictor_input` before layer 0 runs
        (what layer 0's experts are predicted from).

        An observer may also have ``observes(layer, tokens) -> bool``: whether it wants that gate input in a
        forward of ``tokens`` tokens.  Where it says no, the model neither calls ``on_gate_input`` nor
        computes the predictor input (a norm, for nothing); without the method every gate input is shown."""


class DictWeights:
    """A WeightSource over a plain ``{bundle name: tensor}`` mapping (casts and moves once, lazily)."""

    def __init__(self, tensors: dict[str, Tensor], *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        self._raw = tensors
        self._ready: dict[str, Tensor] = {}
        self.dtype = dtype
        self.device = torch.device(device)

    def get(self, name: str) -> Tensor | None:
        t = self._ready.get(name)
        if t is None:
            raw = self._raw.get(name)
            if raw is None:
                return None
            t = self._ready[name] = raw.to(device=self.device, dtype=self.dtype)
        return t

    def linear(self, x: Tensor, name: str, bias: str | None = None) -> Tensor:
        return plain_linear(self, x, name, bias)


def rms_norm(x: Tensor, weight: Tensor, eps: float, f32_weight: bool = False) -> Tensor:
    """transformers' RMSNorm: float32 variance, cast back to the input dtype, then times the weight; with
    ``f32_weight`` (gpt-oss) times the weight in float32, then cast."""
    dtype = x.dtype
    if dtype is torch.float32 and weight.dtype is torch.float32:  # the same operations in one call (µs less a norm)
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if f32_weight:
        return (weight.float() * xf).to(dtype)
    return weight * xf.to(dtype)


def _sdpa_has_gqa() -> bool:
    try:
        q = torch.zeros(1, 2, 1, 4)
        kv = torch.zeros(1, 1, 1, 4)
        F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
        return True
    except (TypeError, RuntimeError):
        return False


_SDPA_GQA = _sdpa_has_gqa()


class _LayerNames:
    """Bundle tensor names of one layer, formatted once (no string work per token)."""

    __slots__ = ("attn_norm", "q", "k", "v", "q_bias", "k_bias", "v_bias", "o", "o_bias", "q_norm", "k_norm",
                 "sinks", "q_a", "q_a_norm", "q_b", "kv_a", "kv_a_norm", "kv_b", "ffn_norm", "router", "router_bias",
                 "score_bias", "gate", "up", "down", "gate_sh", "up_sh", "down_sh", "gate_inp_sh")

    def __init__(self, i: int):
        f = lambda t: t.format(i=i)  # noqa: E731
        self.attn_norm, self.ffn_norm = f(C.T_ATTN_NORM), f(C.T_FFN_NORM)
        self.q, self.k, self.v, self.o = f(C.T_ATTN_Q), f(C.T_ATTN_K), f(C.T_ATTN_V), f(C.T_ATTN_OUT)
        self.q_bias, self.k_bias, self.v_bias = f(C.T_ATTN_Q_BIAS), f(C.T_ATTN_K_BIAS), f(C.T_ATTN_V_BIAS)
        self.o_bias, self.sinks = f(C.T_ATTN_OUT_BIAS), f(C.T_ATTN_SINKS)
        self.q_norm, self.k_norm = f(C.T_ATTN_Q_NORM), f(C.T_ATTN_K_NORM)
        self.q_a, self.q_a_norm, self.q_b = f(C.T_ATTN_Q_A), f(C.T_ATTN_Q_A_NORM), f(C.T_ATTN_Q_B)
        self.kv_a, self.kv_a_norm, self.kv_b = f(C.T_ATTN_KV_A_MQA), f(C.T_ATTN_KV_A_NORM), f(C.T_ATTN_KV_B)
        self.router, self.router_bias, self.score_bias = f(C.T_FFN_GATE_INP), f(C.T_FFN_GATE_INP_BIAS), f(C.T_FFN_EXP_PROBS_B)
        self.gate, self.up, self.down = f(C.T_FFN_GATE), f(C.T_FFN_UP), f(C.T_FFN_DOWN)
        self.gate_sh, self.up_sh, self.down_sh = f(C.T_FFN_GATE_SHEXP), f(C.T_FFN_UP_SHEXP), f(C.T_FFN_DOWN_SHEXP)
        self.gate_inp_sh = f(C.T_FFN_GATE_INP_SHEXP)


class MoEModel:
    """Forward pass of one sequence (tensors ``[T, H]``) for any architecture ModelConfig describes.

    ``max_ctx`` sizes the RoPE tables (default ``cfg.max_position``); :meth:`forward` grows them when a
    sequence runs past it.
    """

    def __init__(self, cfg: ModelConfig, weights: WeightSource, experts: ExpertExecutor, *,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 observer: MoEObserver | None = None, max_ctx: int | None = None):
        self.cfg = cfg
        self.weights = weights
        self.experts = experts
        self.dtype = dtype
        self.device = torch.device(device)
        self.observer = observer
        self.n_layers = cfg.n_layers
        self._names = [_LayerNames(i) for i in range(cfg.n_layers)]
        self._eps = cfg.rms_eps
        self._f32_norm = cfg.norm_f32_weight
        self._nh, self._nkv, self._hd, self._vd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.value_dim
        self._rep = cfg.n_heads // cfg.n_kv_heads
        self._scale = cfg.softmax_scale
        self._clip = float(cfg.clip_qkv or 0.0)
        self._mla = cfg.attention == "mla"
        # Mixtral's transformers router returns float32 top-k weights (no cast back): see module doc.
        self._router_cast = cfg.model_type != "mixtral"
        self._rope_len = 0
        self.rotary: Rotary | None = None
        self._build_rope(max(1, max_ctx if max_ctx is not None else cfg.max_position))

    # -- constants ---------------------------------------------------------------------------------
    def _build_rope(self, n: int) -> None:
        if self.rotary is None:
            self.rotary = Rotary(self.cfg, self.dtype, self.device, n)
        else:
            self.rotary.build(n)
        self._positions = torch.arange(n, device=self.device)
        self._rope_len = n

    def ensure_context(self, n: int) -> None:
        """Make the RoPE tables cover positions ``0 .. n-1``."""
        if n > self._rope_len:
            self._build_rope(max(n, 2 * self._rope_len))

    def _w(self, name: str) -> Tensor:
        t = self.weights.get(name)
        if t is None:
            raise KeyError(f"the model's weights have no tensor {name!r}")
        return t

    def _lin(self, x: Tensor, name: str, bias: str | None = None) -> Tensor:
        """``F.linear(x, weight, bias)`` by bundle names, through the weight source."""
        return self.weights.linear(x, name, bias)

    def _norm(self, x: Tensor, name: str) -> Tensor:
        return rms_norm(x, self._w(name), self._eps, self._f32_norm)

    def _mlp(self, x: Tensor, gate: str, up: str, down: str) -> Tensor:
        """:func:`fate.quant.expert.swiglu` by bundle names (one projection at a time, same operations)."""
        return self._lin(F.silu(self._lin(x, gate)) * self._lin(x, up), down)

    # -- pieces ------------------------------------------------------------------------------------
    def embed(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self._w(C.T_TOKEN_EMBD))

    def attention(self, layer: int, h: Tensor, positions: Tensor, kv: KVCache | None) -> Tensor:
        """``h + attn(attn_norm(h))``; with ``kv`` the new keys/values are appended to the cache and the
        tokens attend to everything cached before them (within the layer's window), else plain causal
        attention over these T."""
        x = self._norm(h, self._names[layer].attn_norm)
        if self._mla:
            return h + self._latent_attention(layer, x, positions, kv)
        return h + self._gqa_attention(layer, x, positions, kv)

    def _gqa_attention(self, layer: int, x: Tensor, positions: Tensor, kv: KVCache | None) -> Tensor:
        n, cfg = self._names[layer], self.cfg
        T = x.shape[0]
        if cfg.qkv_bias:
            q, k, v = self._lin(x, n.q, n.q_bias), self._lin(x, n.k, n.k_bias), self._lin(x, n.v, n.v_bias)
        else:
            q, k, v = self._lin(x, n.q), self._lin(x, n.k), self._lin(x, n.v)
        if cfg.qk_norm == "full":
            q = rms_norm(q, self._w(n.q_norm), self._eps)
            k = rms_norm(k, self._w(n.k_norm), self._eps)
        if self._clip > 0:
            c = self._clip
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        q = q.view(T, self._nh, self._hd)
        k = k.view(T, self._nkv, self._hd)
        v = v.view(T, self._nkv, self._vd)
        if cfg.qk_norm == "head":
            q = rms_norm(q, self._w(n.q_norm), self._eps)
            k = rms_norm(k, self._w(n.k_norm), self._eps)
        tabs = self.rotary.tables(positions)
        q = self.rotary.rotate(q, tabs)
        k = self.rotary.rotate(k, tabs)
        K, V, kpos, fresh = self._cached(layer, k, v, positions, kv)
        # attention on 4-D [1, heads, T, D]: the 3-D form takes another CPU kernel that rounds differently
        # in bfloat16
        qh = q.transpose(0, 1).unsqueeze(0)
        o = self._attend(layer, qh, K.unsqueeze(0), V.unsqueeze(0), positions, kpos, fresh)
        o = o[0].transpose(0, 1).reshape(T, self._nh * self._vd)
        return self._lin(o, n.o, n.o_bias if cfg.attn_out_bias else None)

    def _latent_attention(self, layer: int, x: Tensor, positions: Tensor, kv: KVCache | None) -> Tensor:
        """DeepSeek's multi-head latent attention: the cache holds the normalised kv latent and the rope
        key; every step expands them into per-head keys and values (``kv_b``), as transformers does."""
        n, cfg = self._names[layer], self.cfg
        T, H, rd = x.shape[0], self._nh, cfg.rotary_dim
        nope, vd, r = self._hd - rd, self._vd, cfg.kv_lora_rank
        if cfg.q_lora_rank:
            q = self._lin(rms_norm(self._lin(x, n.q_a), self._w(n.q_a_norm), cfg.latent_norm_eps), n.q_b)
        else:
            q = self._lin(x, n.q)
        q_nope, q_rot = torch.split(q.view(T, H, self._hd).transpose(0, 1), [nope, rd], dim=-1)  # [H, T, .]
        latent, k_rot = torch.split(self._lin(x, n.kv_a), [r, rd], dim=-1)
        latent = rms_norm(latent, self._w(n.kv_a_norm), cfg.latent_norm_eps)
        q_rot = self.rotary.rotate(q_rot, self.rotary.tables(positions, heads_first=True))
        k_rot = self.rotary.rotate(k_rot.view(T, 1, rd), self.rotary.tables(positions))
        L, R, kpos, fresh = self._cached(layer, latent.view(T, 1, r), k_rot, positions, kv)  # [1, S, r], [1, S, rd]
        S = L.shape[1]
        kvb = self._lin(L[0], n.kv_b).view(S, H, nope + vd).transpose(0, 1)  # [H, S, nope + vd]
        k_nope, value = torch.split(kvb, [nope, vd], dim=-1)
        key = kvb.new_empty(H, S, self._hd)
        key[..., :nope].copy_(k_nope)
        key[..., nope:].copy_(R.expand(H, -1, -1))
        query = torch.cat((q_nope, q_rot), dim=-1)
        o = self._attend(layer, query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0), positions, kpos, fresh)
        return self._lin(o[0].transpose(0, 1).reshape(T, H * vd), n.o)

    def _cached(self, layer: int, k: Tensor, v: Tensor, positions: Tensor, kv: KVCache | None):
        """(keys [heads, S, .], values, key positions [S], whether the keys are exactly these tokens)."""
        if kv is None:
            return k.transpose(0, 1), v.transpose(0, 1), positions, True
        fresh = kv.layer_length(layer) == 0
        K, V = kv.append(layer, k, v)
        seen = kv.layer_length(layer)
        return K, V, self._positions[seen - K.shape[1]:seen], fresh

    def _attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, kpos: Tensor,
                fresh: bool) -> Tensor:
        """Attention of queries ``q`` [1, heads, T, D] at ``positions`` over keys/values [1, kv heads, S, .]
        at ``kpos``: causal, within the layer's sliding window."""
        T, S = q.shape[2], k.shape[2]
        window = self.cfg.window(layer)
        sinks = self.cfg.attn_sinks
        mask, causal = None, False
        if T == 1 and (not window or S <= window):
            pass  # one query sees every key it is given: no mask
        elif fresh and (not window or T <= window) and not sinks:
            causal = True
        else:
            mask = kpos.unsqueeze(0) <= positions.unsqueeze(1)  # key j visible to query i
            if window:
                mask &= (positions.unsqueeze(1) - kpos.unsqueeze(0)) < window
        if sinks:
            return self._eager_with_sinks(layer, q, k, v, mask)
        return self._sdpa(q, k, v, mask, causal)

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        if self._rep > 1:
            if _SDPA_GQA:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                      scale=self._scale, enable_gqa=True)
            k = k.repeat_interleave(self._rep, dim=1)
            v = v.repeat_interleave(self._rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self._scale)

    def _eager_with_sinks(self, layer: int, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """gpt-oss's attention (transformers' eager path): scores, an additive mask, one learned sink logit
        per head appended to every row, the row maximum subtracted, softmax in the compute dtype, the sink
        column dropped."""
        if self._rep > 1:
            k = k.repeat_interleave(self._rep, dim=1)
            v = v.repeat_interleave(self._rep, dim=1)
        w = torch.matmul(q, k.transpose(2, 3)) * self._scale
        if mask is not None:
            w = w + torch.zeros(mask.shape, dtype=w.dtype, device=w.device).masked_fill_(~mask, torch.finfo(w.dtype).min)
        sinks = self._w(self._names[layer].sinks).reshape(1, -1, 1, 1).expand(1, -1, q.shape[2], -1)
        logits = torch.cat([w, sinks], dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True).values
        probs = torch.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1]
        return torch.matmul(probs.to(v.dtype), v)

    def gate_input(self, layer: int, h: Tensor) -> Tensor:
        """The post-attention norm output: the FFN's input and the router's."""
        return self._norm(h, self._names[layer].ffn_norm)

    def predictor_input(self, h: Tensor) -> Tensor:
        """What layer 0's experts are predicted from: the token embedding ``h`` through layer 0's
        post-attention norm — the gate input layer 0 would have if its attention added nothing.  In a
        trained model the residual stream is mostly the embedding there (the demo model: cosine 0.90
        with the real gate input, 78% of layer 0's experts among the top k predicted)."""
        return self.gate_input(0, h)

    # -- routing -----------------------------------------------------------------------------------
    def _groups_mask(self, group_scores: Tensor) -> Tensor:
        """[T, E] true for the experts of the ``topk_group`` best groups (transformers' construction)."""
        cfg = self.cfg
        group_idx = torch.topk(group_scores, k=cfg.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        per = cfg.n_experts // cfg.n_group
        return group_mask.unsqueeze(-1).expand(-1, cfg.n_group, per).reshape(-1, cfg.n_experts).bool()

    def _choose(self, layer: int, g: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """(router logits, the scores the top-k is taken of — transformers' tensor, value for value —, the
        scores the weights are gathered from, the experts of the chosen groups (None: no groups))."""
        n, cfg = self._names[layer], self.cfg
        kind = cfg.router
        if kind in ("softmax", "softmax_topk"):
            logits = self._lin(g, n.router, n.router_bias if cfg.router_bias else None)
            if kind == "softmax_topk":
                return logits, logits, None, None
            return logits, torch.softmax(logits, dim=-1, dtype=torch.float32), None, None
        # the DeepSeek-V2/V3, GLM and ERNIE routers compute in float32 whatever the model's dtype
        logits = F.linear(g.float(), self._w(n.router).float())
        G, per = cfg.n_group, cfg.n_experts // cfg.n_group
        if kind == "softmax_group":
            probs = logits.softmax(dim=-1, dtype=torch.float32)
            if G == 1:
                return logits, probs, None, None
            keep = self._groups_mask(probs.view(-1, G, per).max(dim=-1).values)  # groups by their best expert
            return logits, probs.masked_fill(~keep, 0.0), probs, keep
        if kind == "sigmoid_group":
            scores = logits.sigmoid()
            choice = scores + self._w(n.score_bias)
            if G == 1:
                return logits, choice, scores, None
            keep = self._groups_mask(choice.view(-1, G, per).topk(2, dim=-1)[0].sum(dim=-1))  # by their two best
            return logits, choice.masked_fill(~keep, float("-inf")), scores, keep
        probs = F.softmax(logits, dim=1, dtype=torch.float)  # softmax_biased
        return logits, probs + self._w(n.score_bias).reshape(-1), probs, None

    def selection_scores(self, layer: int, g: Tensor) -> Tensor:
        """Layer ``layer``'s router applied to ``g`` [T, H]: [T, E] float32 scores whose top-k are exactly
        the experts :meth:`route` selects, by the family's own rule — softmax probabilities; gpt-oss's
        biased logits; DeepSeek-V3/GLM sigmoid scores plus the correction bias; DeepSeek-V2 probabilities;
        ERNIE probabilities plus the correction bias.  With expert groups, the experts outside the chosen
        groups rank after every expert inside them, in the order of their own scores (shifted down by the
        score range: scores closer than float32's resolution near 1 may tie), so the candidates past the
        top k (the predictor's over-fetch) stay meaningful.  Pure: nothing is cached or changed."""
        cfg = self.cfg
        logits, choice, aux, keep = self._choose(layer, g)
        if keep is None:
            return choice.float()
        raw = aux + self._w(self._names[layer].score_bias) if cfg.router == "sigmoid_group" else aux
        return torch.where(keep, raw, raw - (raw.max() - raw.min() + 1)).float()

    def route(self, layer: int, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(router logits [T, E] float32, top-k expert ids [T, k], top-k weights [T, k])."""
        cfg = self.cfg
        kind, k = cfg.router, cfg.top_k
        logits, choice, aux, _ = self._choose(layer, g)
        if kind == "softmax":
            weights, ids = torch.topk(choice, k, dim=-1)
            if cfg.norm_topk_prob:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            if self._router_cast:
                weights = weights.to(logits.dtype)
        elif kind == "softmax_topk":
            top, ids = torch.topk(choice, k, dim=-1)
            weights = torch.softmax(top, dim=1, dtype=top.dtype)
        elif kind == "softmax_group":
            weights, ids = torch.topk(choice, k=k, dim=-1, sorted=False)
            weights = weights * cfg.routed_scaling
        elif kind == "sigmoid_group":
            ids = torch.topk(choice, k=k, dim=-1, sorted=False)[1]
            weights = aux.gather(1, ids)
            if cfg.norm_topk_prob:
                weights /= weights.sum(dim=-1, keepdim=True) + 1e-20
            weights = weights * cfg.routed_scaling
        else:  # softmax_biased
            ids = torch.topk(choice, k, dim=-1)[1]
            weights = torch.gather(aux, dim=-1, index=ids)
            weights = (weights / torch.clamp(weights.sum(dim=-1, keepdim=True), min=cfg.norm_min)).to(g.dtype)
        return logits.float(), ids, weights

    def ffn(self, layer: int, g: Tensor) -> Tensor:
        """Dense MLP, or routed experts (via the executor) plus the shared expert and its gate."""
        n = self._names[layer]
        if not self.cfg.moe_layers[layer]:
            return self._mlp(g, n.gate, n.up, n.down)
        _, ids, weights = self.route(layer, g)
        out = self.experts.moe(layer, g, ids, weights)
        if self.cfg.shared_ffn:
            shared = self._mlp(g, n.gate_sh, n.up_sh, n.down_sh)
            if self.cfg.shared_gate:
                shared = torch.sigmoid(F.linear(g, self._w(n.gate_inp_sh))) * shared
            out = out + shared
        return out

    def block(self, layer: int, h: Tensor, positions: Tensor, kv: KVCache | None) -> Tensor:
        """One decoder layer: attention, gate input (shown to the observer), FFN, residual."""
        h = self.attention(layer, h, positions, kv)
        g = self.gate_input(layer, h)
        obs = self.observer
        if obs is not None and _observes(obs, layer, g.shape[0]):
            obs.on_gate_input(layer, g)
        return h + self.ffn(layer, g)

    def final(self, h: Tensor) -> Tensor:
        """Output norm and LM head (the token embedding when tied); float32 logits."""
        x = self._norm(h, C.T_OUTPUT_NORM)
        return self._lin(x, C.T_TOKEN_EMBD if self.cfg.tie_embeddings else C.T_OUTPUT).float()

    def new_cache(self, max_ctx: int) -> KVCache:
        """A KV cache for ``max_ctx`` tokens in this model's dtype, on its device."""
        self.ensure_context(max_ctx)
        return KVCache.for_model(self.cfg, max_ctx, dtype=self.dtype, device=self.device)

    def positions(self, start: int, n: int) -> Tensor:
        self.ensure_context(start + n)
        return self._positions[start:start + n]

    @torch.no_grad()
    def forward(self, ids: Tensor, kv: KVCache | None = None, *, last_only: bool = False) -> Tensor:
        """Logits ``[T, V]`` (``[1, V]`` with ``last_only``) for token ids ``[T]``; with ``kv`` the tokens
        continue the cached sequence (positions start at ``kv.length``) and are appended to it."""
        if ids.dim() != 1:
            raise ValueError(f"expected token ids of shape [T], got {tuple(ids.shape)}")
        T = ids.shape[0]
        if T == 0:
            raise ValueError("no tokens to run")
        start = 0
        if kv is not None:
            if kv.dtype != self.dtype or kv.device != self.device or kv.n_layers != self.n_layers:
                raise ValueError(f"{kv!r} does not fit this model ({self.n_layers} layers, {self.dtype}, "
                                 f"{self.device}); make it with model.new_cache()")
            start = kv.length
            kv.check_room(T)
        pos = self.positions(start, T)
        h = self.embed(ids.to(self.device))
        obs = self.observer
        if obs is not None and _observes(obs, -1, T):  # "layer -1": layer 0's experts can be named before its attention
            obs.on_gate_input(-1, self.predictor_input(h))
        for i in range(self.n_layers):
            h = self.block(i, h, pos, kv)
        if last_only:
            h = h[-1:]
        return self.final(h)

    __call__ = forward
