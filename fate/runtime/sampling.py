"""Next-token sampling: repetition penalty, top-k, top-p, min-p, temperature.

Order (llama.cpp's default chain)::

    repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw

* repetition penalty (transformers semantics): for every distinct id in ``previous_ids``, a positive logit
  is divided by the penalty and a negative one multiplied by it (1.0 = off);
* top-k keeps the ``top_k`` largest logits, and every logit tied with the k-th (0 = off);
* top-p drops, from the least likely up, the tokens whose cumulative probability stays <= ``1 - top_p``;
  the most likely token always stays (1.0 = off);
* min-p drops tokens whose probability is below ``min_p`` x the top token's probability (0 = off);
* temperature divides the surviving logits, so it shapes the draw but not which tokens survive.

Each step follows transformers' ``RepetitionPenaltyLogitsProcessor``, ``TopKLogitsWarper``,
``TopPLogitsWarper``, ``MinPLogitsWarper`` and ``TemperatureLogitsWarper`` (min_tokens_to_keep=1) composed
in this order; the tests check that the resulting distributions agree to 1e-6.  The work is done on the
surviving candidates only (top-k via ``torch.topk``; without top-k, top-p looks at the 1024 most likely
tokens first and sorts the whole vocabulary only when they hold too little mass).

``temperature == 0`` is greedy: the argmax of the penalized logits
(lowest id on ties).

Sampling runs on the CPU in float32 with a per-sampler ``torch.Generator`` (one uniform number per draw,
inverse CDF in float64): the same seed gives the same sequence of draws whatever device produced the
logits; ``seed=None`` seeds from the OS.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Sampler", "SamplingParams"]


@dataclass
class SamplingParams:
    """Sampling settings.  ``validate()`` raises ``ValueError`` with a one-line message."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validate(self) -> "SamplingParams":
        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            return float(value)

        if number("temperature") < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise ValueError(f"top_k must be an integer, got {self.top_k!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < number("top_p") <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not 0.0 <= number("min_p") <= 1.0:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if number("repetition_penalty") <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Draws the next token id from a vector of logits.

    ``sampler(logits, previous_ids)``: ``logits`` is a 1-D tensor over the vocabulary (any float dtype, any
    device); ``previous_ids`` are the ids the repetition penalty applies to (prompt and generated so far --
    pass a tail slice to limit the window).  Returns an ``int``.
    """

    def __init__(self, params: SamplingParams | None = None) -> None:
        self.params = (params or SamplingParams()).validate()
        self.generator = torch.Generator(device="cpu")
        self._buffer: torch.Tensor | None = None
        self.reseed(self.params.seed)

    def reseed(self, seed: int | None) -> None:
        """Restart the random stream: from ``seed``, or from OS entropy when None."""
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed))

    # --- the processing chain --------------------------------------------------------------------------
    def penalized(self, logits: torch.Tensor, previous_ids: Sequence[int] = ()) -> torch.Tensor:
        """float32 CPU ``logits`` with the repetition penalty applied.  The input is never modified; the
        result may share memory with it or with a buffer the next call overwrites."""
        if logits.dim() != 1:
            raise ValueError(f"logits must be 1-D (vocab,), got shape {tuple(logits.shape)}")
        x = logits.detach().to(device="cpu", dtype=torch.float32)
        penalty = float(self.params.repetition_penalty)
        if penalty != 1.0 and len(previous_ids) > 0:
            ids = torch.as_tensor(list(previous_ids), dtype=torch.long)
            ids = torch.unique(ids[(ids >= 0) & (ids < x.numel())])
            if ids.numel():
                picked = x[ids]
                if self._buffer is None or self._buffer.shape != x.shape:
                    self._buffer = torch.empty_like(x)
                x = self._buffer.copy_(x)  # reused: no fresh vocab-sized allocation per token
                x[ids] = torch.where(picked < 0, picked * penalty, picked / penalty)
        return x

    def candidates(
        self, logits: torch.Tensor, previous_ids: Sequence[int] = ()
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The surviving token ids and their temperature-scaled logits.

        ``ids`` is None when every token survives (``vals`` is then the whole vocabulary).  The order of the
        survivors is unspecified but deterministic.  Not for greedy parameters (temperature 0 has no
        distribution).
        """
        p = self.params
        if p.greedy:
            raise ValueError("temperature 0 (greedy) has no sampling distribution")
        x = self.penalized(logits, previous_ids)
        vocab = x.numel()
        ids: torch.Tensor | None = None
        vals = x

        # top-k: keep everything >= the k-th largest value (ties with it included)
        if 0 < p.top_k < vocab:
            vals, ids = torch.topk(x, p.top_k + 1, sorted=True)
            if vals[-1] < vals[-2]:
                vals, ids = vals[:-1], ids[:-1]
            else:  # the next value ties the k-th: collect every tie
                ids = (x >= vals[-2]).nonzero().squeeze(1)
                vals, order = torch.sort(x[ids], descending=True, stable=True)
                ids = ids[order]

        # top-p: in ascending probability order, drop the prefix whose cumulative probability <= 1 - top_p
        if p.top_p < 1.0:
            ids, vals = self._top_p(ids, vals, p.top_p)

        # min-p: drop tokens less likely than min_p x the top token
        if p.min_p > 0.0:
            probs = torch.softmax(vals, dim=0)
            keep = probs >= p.min_p * probs.max()
            if ids is None:
                ids = keep.nonzero().squeeze(1)
                vals = vals[ids]
            else:
                ids, vals = ids[keep], vals[keep]

        return ids, vals / float(p.temperature)

    #: With the whole vocabulary in play, top-p first looks at this many most likely tokens and sorts the
    #: whole vocabulary only when they hold too little of the probability mass.
    TOP_P_PREFIX = 1024

    def _top_p(self, ids: torch.Tensor | None, vals: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
        tail = None
        if ids is None:
            probs = torch.softmax(vals, dim=0)
            if vals.numel() > self.TOP_P_PREFIX:
                head_probs, head = torch.topk(probs, self.TOP_P_PREFIX, sorted=True)
                head_mass = float(head_probs.sum())
                if head_mass > top_p + 1e-3:
                    # Every token outside the head has at least head_mass >= top_p of probability above it,
                    # so it is dropped; the head's cumulative sums start from the tail's mass.
                    tail = float(probs.sum()) - head_mass
                    ids, vals, desc_probs = head, vals[head], head_probs
            if tail is None:
                desc_probs, ids = torch.sort(probs, descending=True, stable=True)
                vals = vals[ids]
                tail = 0.0
        else:
            tail = 0.0
            desc_probs = torch.softmax(vals, dim=0)  # vals are sorted descending here
        cumulative = torch.cumsum(desc_probs.flip(0), dim=0) + tail
        drop = cumulative <= (1.0 - top_p)
        drop[-1] = False  # the most likely token always survives
        n_keep = int((~drop).sum())
        # the dropped tokens are a prefix of the ascending order = a suffix of the descending order
        return ids[:n_keep], vals[:n_keep]

    def filtered_logits(self, logits: torch.Tensor, previous_ids: Sequence[int] = ()) -> torch.Tensor:
        """Full-vocabulary float32 logits after the chain: removed tokens are ``-inf``."""
        ids, vals = self.candidates(logits, previous_ids)
        if ids is None:
            return vals
        out = torch.full((logits.shape[-1],), float("-inf"), dtype=torch.float32)
        out[ids] = vals
        return out

    def probs(self, logits: torch.Tensor, previous_ids: Sequence[int] = ()) -> torch.Tensor:
        """The full-vocabulary distribution the next draw uses."""
        return torch.softmax(self.filtered_logits(logits, previous_ids), dim=0)

    def __call__(self, logits: torch.Tensor, previous_ids: Sequence[int] = ()) -> int:
        if self.params.greedy:
            return int(torch.argmax(self.penalized(logits, previous_ids)))
        ids, vals = self.candidates(logits, previous_ids)
        if ids is not None and ids.numel() == 1:
            return int(ids[0])
        probs = torch.softmax(vals, dim=0)
        if not bool(torch.isfinite(probs).all()):
            raise ValueError("logits give no valid distribution (NaN or infinite values)")
        # Inverse-CDF draw in float64: one uniform number per token, exact down to tiny probabilities.
        cdf = torch.cumsum(probs.to(torch.float64), dim=0)
        u = torch.rand((1,), dtype=torch.float64, generator=self.generator)
        index = int(torch.searchsorted(cdf, u * cdf[-1], right=True))
        if index >= probs.numel():  # u * total rounded up to total
            index = int(probs.nonzero().max())
        return index if ids is None else int(ids[index])
