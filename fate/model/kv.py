"""KV cache: preallocated keys and values for one sequence.

Each layer owns two tensors ``[n_kv_heads, max_ctx, head_dim]`` allocated once, so a decode step
writes one row per head and attention reads a view ``[:, :length]`` — no concatenation, no
reallocation, and the memory is known up front (the budget planner reserves it with
:meth:`KVCache.bytes_needed`).  Heads come first so that the view handed to attention is already in
the ``[heads, seq, dim]`` layout ``scaled_dot_product_attention`` expects.

Lengths are tracked per layer: :meth:`append` advances its own layer, so a caller that drives the
model block by block needs no separate "commit" step, and :attr:`length` (what every layer holds)
is where the next token's position starts.
"""

from __future__ import annotations

import torch

from fate.errors import ContextFullError


class KVCache:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_ctx: int, *,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        if min(n_layers, n_kv_heads, head_dim, max_ctx) <= 0:
            raise ValueError(f"KV cache dimensions must be positive (layers={n_layers}, kv heads={n_kv_heads}, "
                             f"head dim={head_dim}, context={max_ctx})")
        self.n_layers = n_layers
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.max_ctx = max_ctx
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (n_kv_heads, max_ctx, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(n_layers)]
        self._lens = [0] * n_layers

    @classmethod
    def for_model(cls, cfg, max_ctx: int, *, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> "KVCache":
        """A cache shaped for ``cfg`` (a fate.model.config.ModelConfig)."""
        return cls(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, max_ctx, dtype=dtype, device=device)

    @staticmethod
    def bytes_needed(cfg, max_ctx: int, dtype: torch.dtype = torch.float32) -> int:
        """Bytes a cache of ``max_ctx`` tokens for ``cfg`` occupies (keys and values, all layers)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.n_layers * cfg.n_kv_heads * max_ctx * cfg.head_dim * itemsize

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @property
    def length(self) -> int:
        """Tokens held by every layer: the position of the next token."""
        return min(self._lens)

    def layer_length(self, layer: int) -> int:
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
        """Store ``k``, ``v`` ``[T, n_kv_heads, head_dim]`` after this layer's tokens; return views of
        all keys and values so far, ``[n_kv_heads, length, head_dim]``."""
        start = self._lens[layer]
        end = start + k.shape[0]
        if end > self.max_ctx:
            raise ContextFullError(
                f"KV cache full: {start} of {self.max_ctx} tokens of context used, cannot add {k.shape[0]} more "
                f"(use a larger context size)")
        kl, vl = self.k[layer], self.v[layer]
        kl[:, start:end].copy_(k.transpose(0, 1))
        vl[:, start:end].copy_(v.transpose(0, 1))
        self._lens[layer] = end
        return kl[:, :end], vl[:, :end]

    def truncate(self, n: int) -> None:
        """Forget every token from position ``n`` on (e.g. to roll back a rejected continuation)."""
        if n < 0:
            raise ValueError(f"cannot truncate a KV cache to {n} tokens")
        self._lens = [min(x, n) for x in self._lens]

    def reset(self) -> None:
        self._lens = [0] * self.n_layers

    def __repr__(self) -> str:
        return (f"KVCache(layers={self.n_layers}, kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, "
                f"length={self.length}/{self.max_ctx}, dtype={self.dtype}, device={self.device})")
