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

Tensor = torch.Tensor


class WeightSource(Protocol):
    def get(self, name: str) -> Tensor | None:
        """Non-expert tensor by bundle name (``constants.T_*``), in the compute dtype on the device;
        None when the bundle has no such tensor."""

    def linear(self, x: Tensor, name: str, bias: str | None = None) -> Tensor:
        """``F.linear(x, get(name), get(bias))``.  The model runs every projection through it, so a source
        may keep a matrix in a narrower stored dtype and widen it per call
        (:class:`fate.runtime.weights.ResidentWeights`)."""


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
        (what layer 0's experts are predicted from)."""


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


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """transformers' RMSNorm: float32 variance, cast back to the input dtype, then times the weight."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> Tensor:
    """Inverse frequencies exactly as transformers computes them (float32), incl. linear scaling."""
    D = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).to(torch.float32) / D))
    kind = (cfg.rope_scaling or {}).get("type", "default")
    if kind == "linear":
        inv = inv / float(cfg.rope_scaling["factor"])
    elif kind != "default":
        raise ValueError(f"rope scaling {kind!r} is not supported")
    return inv


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

    __slots__ = ("attn_norm", "q", "k", "v", "q_bias", "k_bias", "v_bias", "o", "q_norm", "k_norm",
                 "ffn_norm", "router", "gate", "up", "down", "gate_sh", "up_sh", "down_sh", "gate_inp_sh")

    def __init__(self, i: int):
        f = lambda t: t.format(i=i)  # noqa: E731
        self.attn_norm, self.ffn_norm = f(C.T_ATTN_NORM), f(C.T_FFN_NORM)
        self.q, self.k, self.v, self.o = f(C.T_ATTN_Q), f(C.T_ATTN_K), f(C.T_ATTN_V), f(C.T_ATTN_OUT)
        self.q_bias, self.k_bias, self.v_bias = f(C.T_ATTN_Q_BIAS), f(C.T_ATTN_K_BIAS), f(C.T_ATTN_V_BIAS)
        self.q_norm, self.k_norm = f(C.T_ATTN_Q_NORM), f(C.T_ATTN_K_NORM)
        self.router = f(C.T_FFN_GATE_INP)
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
        self._nh, self._nkv, self._hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self._rep = cfg.n_heads // cfg.n_kv_heads
        self._scale = cfg.head_dim ** -0.5
        self._clip = float(cfg.clip_qkv or 0.0)
        # Mixtral's transformers router returns float32 top-k weights (no cast back): see module doc.
        self._router_cast = cfg.model_type != "mixtral"
        self._inv_freq = rope_inv_freq(cfg)
        self._rope_len = 0
        self._build_rope(max(1, max_ctx if max_ctx is not None else cfg.max_position))

    # -- constants ---------------------------------------------------------------------------------
    def _build_rope(self, n: int) -> None:
        """cos/sin tables [n, 1, D] in the compute dtype; sin carries rotate_half's sign on its first half
        (negating is exact, so ``x*cos + roll(x)*sin_signed`` equals ``x*cos + rotate_half(x)*sin``)."""
        freqs = torch.arange(n, dtype=torch.int64).float()[:, None] * self._inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        half = self._hd // 2
        sin[:, :half].neg_()
        self._cos = cos.to(device=self.device, dtype=self.dtype).unsqueeze(1)
        self._sin = sin.to(device=self.device, dtype=self.dtype).unsqueeze(1)
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

    def _mlp(self, x: Tensor, gate: str, up: str, down: str) -> Tensor:
        """:func:`fate.quant.expert.swiglu` by bundle names (one projection at a time, same operations)."""
        return self._lin(F.silu(self._lin(x, gate)) * self._lin(x, up), down)

    # -- pieces ------------------------------------------------------------------------------------
    def embed(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self._w(C.T_TOKEN_EMBD))

    def _rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return x * cos + torch.roll(x, self._hd // 2, dims=-1) * sin

    def attention(self, layer: int, h: Tensor, positions: Tensor, kv: KVCache | None) -> Tensor:
        """``h + attn(attn_norm(h))``; with ``kv`` the new keys/values are appended to the cache and the
        tokens attend to everything cached before them, else plain causal attention over these T."""
        n, cfg = self._names[layer], self.cfg
        T = h.shape[0]
        x = rms_norm(h, self._w(n.attn_norm), self._eps)
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
        v = v.view(T, self._nkv, self._hd)
        if cfg.qk_norm == "head":
            q = rms_norm(q, self._w(n.q_norm), self._eps)
            k = rms_norm(k, self._w(n.k_norm), self._eps)
        cos = self._cos.index_select(0, positions)
        sin = self._sin.index_select(0, positions)
        q = self._rope(q, cos, sin)
        k = self._rope(k, cos, sin)

        # scaled_dot_product_attention on 4-D [1, heads, T, D]: the 3-D form takes another CPU kernel
        # that rounds differently in bfloat16.
        causal_from_zero = True
        if kv is not None:
            causal_from_zero = kv.layer_length(layer) == 0
            K, V = kv.append(layer, k, v)  # [n_kv, S, D] views
        else:
            K, V = k.transpose(0, 1), v.transpose(0, 1)
        K, V = K.unsqueeze(0), V.unsqueeze(0)
        qh = q.transpose(0, 1).unsqueeze(0)  # [1, n_heads, T, D]
        if T == 1:  # one query sees every cached key: no mask
            o = self._sdpa(qh, K, V, None, False)
        elif causal_from_zero:
            o = self._sdpa(qh, K, V, None, True)
        else:
            S = K.shape[2]
            mask = self._positions[:S].unsqueeze(0) <= positions.unsqueeze(1)  # key j visible to query i
            o = self._sdpa(qh, K, V, mask, False)
        o = o[0].transpose(0, 1).reshape(T, self._nh * self._hd)
        return h + self._lin(o, n.o)

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        if self._rep > 1:
            if _SDPA_GQA:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                      scale=self._scale, enable_gqa=True)
            k = k.repeat_interleave(self._rep, dim=1)
            v = v.repeat_interleave(self._rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self._scale)

    def gate_input(self, layer: int, h: Tensor) -> Tensor:
        """The post-attention norm output: the FFN's input and the router's."""
        return rms_norm(h, self._w(self._names[layer].ffn_norm), self._eps)

    def predictor_input(self, h: Tensor) -> Tensor:
        """What layer 0's experts are predicted from: the token embedding ``h`` through layer 0's
        post-attention norm — the gate input layer 0 would have if its attention added nothing.  In a
        trained model the residual stream is mostly the embedding there (the demo model: cosine 0.90
        with the real gate input, 78% of layer 0's experts among the top k predicted)."""
        return self.gate_input(0, h)

    def route(self, layer: int, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(router logits [T, E] float32, top-k expert ids [T, k], top-k weights [T, k])."""
        logits = F.linear(g, self._w(self._names[layer].router))
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.cfg.top_k, dim=-1)
        if self.cfg.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self._router_cast:
            weights = weights.to(logits.dtype)
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
        if self.observer is not None:
            self.observer.on_gate_input(layer, g)
        return h + self.ffn(layer, g)

    def final(self, h: Tensor) -> Tensor:
        """Output norm and LM head (the token embedding when tied); float32 logits."""
        x = rms_norm(h, self._w(C.T_OUTPUT_NORM), self._eps)
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
        if self.observer is not None:  # "layer -1": layer 0's experts can be named before its attention
            self.observer.on_gate_input(-1, self.predictor_input(h))
        for i in range(self.n_layers):
            h = self.block(i, h, pos, kv)
        if last_only:
            h = h[-1:]
        return self.final(h)

    __call__ = forward
