"""KV cache: preallocated keys and values for one sequence.

Each layer owns two tensors ``[heads, rows, dim]`` allocated once, so a decode step writes one row per
head and attention reads a view ``[:, :n]`` — no concatenation, no reallocation, and the memory is known
up front (the budget planner reserves it with :meth:`KVCache.bytes_needed`).  Heads come first so that
the view handed to attention is already in the ``[heads, seq, dim]`` layout
``scaled_dot_product_attention`` expects.

What a layer caches is described by a :class:`LayerKV` (``for_model`` derives them from the config):

* grouped-query attention: keys and values, ``[n_kv_heads, rows, head_dim]`` each;
* multi-head latent attention (DeepSeek-V2/V3): the compressed latent ``[1, rows, kv_lora_rank]`` as
  "keys" and the decoupled rope key ``[1, rows, rope_dim]`` as "values" — the per-head keys and values are
  expanded from them at every step, as transformers does;
* a sliding-window layer (gpt-oss) holds at most ``window`` rows: the ``window - 1`` most recent tokens
  (all a next token can see besides itself) plus the one being decoded.  Its rows stay in order, oldest
  first, so attention reduces over them in the order transformers' cache gives them; once the window is
  full, the next step first shifts the rows down by the tokens that fell out (``window`` rows copied per
  decode step).  A chunk of several tokens that does not fit is attended to from a temporary copy of
  the rows and the chunk, and only the last ``window - 1`` rows are kept.

Lengths are tracked per layer: :meth:`append` advances its own layer, so a caller that drives the
model block by block needs no separate "commit" step, and :attr:`length` (what every layer has seen)
is where the next token's position starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fate.errors import ContextFullError


@dataclass(frozen=True)
class LayerKV:
    """What one layer caches: ``k`` and ``v`` as (heads, dim), and its sliding ``window`` (0: none)."""

    k: tuple[int, int]
    v: tuple[int, int]
    window: int = 0

    def rows(self, max_ctx: int) -> int:
        """Rows this layer holds for a context of ``max_ctx`` tokens."""
        return min(max_ctx, self.window) if self.window else max_ctx

    def row_elements(self) -> int:
        return self.k[0] * self.k[1] + self.v[0] * self.v[1]


def layer_shapes(cfg) -> list[LayerKV]:
    """The per-layer cache shapes of ``cfg`` (a fate.model.config.ModelConfig)."""
    if cfg.attention == "mla":
        return [LayerKV((1, cfg.kv_lora_rank), (1, cfg.rotary_dim)) for _ in range(cfg.n_layers)]
    return [LayerKV((cfg.n_kv_heads, cfg.head_dim), (cfg.n_kv_heads, cfg.value_dim), cfg.window(i))
            for i in range(cfg.n_layers)]


class KVCache:
    def __init__(self, layers: list[LayerKV], max_ctx: int, *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        if not layers or max_ctx <= 0 or min(min(s.k + s.v) for s in layers) <= 0 or \
                any(s.window < 0 for s in layers):
            raise ValueError(f"KV cache dimensions must be positive (layers={len(layers)}, context={max_ctx})")
        self.layers = list(layers)
        self.n_layers = len(layers)
        self.max_ctx = max_ctx
        self.dtype = dtype
        self.device = torch.device(device)
        self.k = [torch.zeros((s.k[0], s.rows(max_ctx), s.k[1]), dtype=dtype, device=self.device) for s in layers]
        self.v = [torch.zeros((s.v[0], s.rows(max_ctx), s.v[1]), dtype=dtype, device=self.device) for s in layers]
        self._lens = [0] * self.n_layers  # tokens each layer has seen
        self._held = [0] * self.n_layers  # rows each layer holds (the most recent tokens)

    @classmethod
    def for_model(cls, cfg, max_ctx: int, *, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> "KVCache":
        """A cache shaped for ``cfg`` (a fate.model.config.ModelConfig)."""
        return cls(layer_shapes(cfg), max_ctx, dtype=dtype, device=device)

    @staticmethod
    def bytes_needed(cfg, max_ctx: int, dtype: torch.dtype = torch.float32) -> int:
        """Bytes a cache of ``max_ctx`` tokens for ``cfg`` occupies (every layer's rows, keys and values)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return sum(s.rows(max_ctx) * s.row_elements() for s in layer_shapes(cfg)) * itemsize

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @property
    def length(self) -> int:
        """Tokens seen by every layer: the position of the next token."""
        return min(self._lens)

    def layer_length(self, layer: int) -> int:
        """Tokens layer ``layer`` has seen."""
        return self._lens[layer]

    @property
    def free(self) -> int:
        return self.max_ctx - self.length

    def check_room(self, n: int) -> None:
        """Raise ContextFullError unless ``n`` more tokens fit (checked before any layer runs)."""
        used = max(self._lens)
        if used + n > self.max_ctx:
            raise ContextFullError(
                f"KV cache full: {used} of {self.max_ctx} tokens of context used, cannot add {n} more "
                f"(use a larger context size)")

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``, ``v`` ``[T, heads, dim]`` after this layer's tokens; return every key and value the
        new tokens attend to, ``[heads, n, dim]``, oldest first: all tokens so far, or for a sliding-window
        layer the ``window - 1`` before the new ones and the new ones.  The returned tokens are the last
        ``n`` of the :meth:`layer_length` seen (their positions follow from that)."""
        start, T = self._lens[layer], k.shape[0]
        if start + T > self.max_ctx:
            raise ContextFullError(
                f"KV cache full: {start} of {self.max_ctx} tokens of context used, cannot add {T} more "
                f"(use a larger context size)")
        kl, vl = self.k[layer], self.v[layer]
        window = self.layers[layer].window
        held = self._held[layer]
        if window and held > window - 1:  # the oldest rows fell out of the window at the last step
            drop = held - (window - 1)
            kl[:, :window - 1].copy_(kl[:, drop:held].clone())
            vl[:, :window - 1].copy_(vl[:, drop:held].clone())
            held = window - 1
        end = held + T
        self._lens[layer] = start + T
        if end <= kl.shape[1]:
            kl[:, held:end].copy_(k.transpose(0, 1))
            vl[:, held:end].copy_(v.transpose(0, 1))
            self._held[layer] = end
            return kl[:, :end], vl[:, :end]
        # a chunk longer than the rows left (sliding layers only): attend from a temporary copy, keep the tail
        K = torch.cat((kl[:, :held], k.transpose(0, 1)), dim=1)
        V = torch.cat((vl[:, :held], v.transpose(0, 1)), dim=1)
        keep = min(window - 1, end)
        kl[:, :keep].copy_(K[:, end - keep:])
        vl[:, :keep].copy_(V[:, end - keep:])
        self._held[layer] = keep
        return K, V

    def truncate(self, n: int) -> None:
        """Forget every token from position ``n`` on (e.g. to roll back a rejected continuation).  A
        sliding-window layer can only roll back as far as the tokens it still holds reach."""
        if n < 0:
            raise ValueError(f"cannot truncate a KV cache to {n} tokens")
        for i, s in enumerate(self.layers):  # checked for every layer before any changes
            first = self._lens[i] - self._held[i]  # position of the oldest row held
            if s.window and 0 < n < self._lens[i] and first > max(0, n - (s.window - 1)):
                raise ValueError(f"cannot roll layer {i} back to {n} tokens: its sliding window of {s.window} "
                                 f"no longer holds tokens before position {first}")
        for i in range(self.n_layers):
            if n < self._lens[i]:
                first = self._lens[i] - self._held[i]
                self._lens[i], self._held[i] = n, max(0, n - first)

    def reset(self) -> None:
        self._lens = [0] * self.n_layers
        self._held = [0] * self.n_layers

    def __repr__(self) -> str:
        s = self.layers[0]
        return (f"KVCache(layers={self.n_layers}, k={s.k}, v={s.v}, length={self.length}/{self.max_ctx}, "
                f"dtype={self.dtype}, device={self.device})")
