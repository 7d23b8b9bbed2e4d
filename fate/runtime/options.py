"""Everything that decides how a bundle is run, in one dataclass: what ``fate.load`` takes, and what
fate-run, fate-serve, fate-perplexity and fate-bench build from their (shared) command-line options."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fate.errors import RequestError, UsageError
from fate.quant.expert import KERNELS

POLICIES = ("fate", "paper", "ondemand", "lru", "resident")
EVICTIONS = ("auto", "lrfu", "arc", "lru", "lfu")  # auto: lrfu for fate, arc for paper (EngineOptions.eviction)
PREDICTORS = ("fitted", "router")  # the bundle's fitted maps (fate.calib.predict), or the paper's next router
ALLOCS = ("auto", "reuse", "recall", "shallow4", "even")
COMPUTE_DTYPES = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class EngineOptions:
    """How to run a bundle.  Every field has the default fate-run uses.

    * ``experts``: stored expert precision to compute with (``q4``, ``q2``, ``f16``);
    * ``device`` (``cpu``, ``cuda``; None: cuda when available), ``compute_dtype`` (``fp32``, ``fp16``, ``bf16``;
      None: fp32 on cpu, fp16 on cuda), ``context`` (tokens; None: min(4096, the model's)), ``threads``
      (CPU threads for torch and fate's kernels alike; None: :func:`fate.sysinfo.default_threads`, one per
      physical core), ``verify`` (crc32 of every blob on first read), ``no_mmap`` (read every expert at load
      instead of from the map on first use), ``kernels`` (how products are computed on the CPU:
      :data:`fate.quant.expert.KERNELS` — ``int8`` 8-bit activations against q4/q2/q8 weights, the fastest;
      ``fp32`` float32 activations, the reference; ``torch`` torch operations only, bit for bit the plain
      dequantize-then-matmul);
    * offloading: ``mem`` (budget: bytes, a size like ``6GiB`` or ``P%``; None: everything resident),
      ``policy``, ``evict`` (:data:`EVICTIONS`; ``auto``: :meth:`eviction`), ``cache_alloc``, ``predictor``
      (:data:`PREDICTORS`), ``prefetch_extra`` (None: from the timing profile),
      ``int2_share``, ``link`` (emulated link; None: none), ``profile`` (re-measure the timing profile).
    """

    experts: str = "q4"
    device: str | None = None
    compute_dtype: str | None = None
    context: int | None = None
    threads: int | None = None
    verify: bool = True
    no_mmap: bool = False
    kernels: str = "int8"
    mem: str | int | None = None
    policy: str = "fate"
    evict: str = "auto"
    cache_alloc: str = "auto"
    predictor: str = "fitted"
    prefetch_extra: int | None = None
    int2_share: float = 0.3
    link: str | None = None
    profile: bool = False

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def of(cls, options: "EngineOptions | None" = None, **overrides) -> "EngineOptions":
        """``options`` (or the defaults) with ``overrides`` applied; an unknown name is a UsageError."""
        unknown = sorted(set(overrides) - set(cls.fields()))
        if unknown:
            raise UsageError(f"unknown engine option {unknown[0]!r}; the options are: {', '.join(cls.fields())}")
        base = options or cls()
        return dataclasses.replace(base, **overrides).validate()

    def replace(self, **changes) -> "EngineOptions":
        return EngineOptions.of(self, **changes)

    def validate(self) -> "EngineOptions":
        """Check every value that can be checked without opening the bundle (one line per mistake)."""
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
            raise RequestError(f"--compute-dtype {self.compute_dtype!r}: use one of {', '.join(COMPUTE_DTYPES)}")
        if self.device is not None and self.device not in ("auto", "cpu") and not str(self.device).startswith("cuda"):
            raise RequestError(f"--device {self.device!r}: use cpu or cuda")
        if self.context is not None and self.context <= 0:
            raise RequestError(f"-c {self.context}: the context size must be positive")
        if self.threads is not None and self.threads < 1:
            raise RequestError(f"-t {self.threads}: give at least 1 thread")
        if self.kernels not in KERNELS:
            raise RequestError(f"--kernels {self.kernels!r}: choose one of {', '.join(KERNELS)}")
        if self.policy not in POLICIES:
            raise RequestError(f"--policy {self.policy!r}: choose one of {', '.join(POLICIES)}")
        if self.evict not in EVICTIONS:
            raise RequestError(f"--evict {self.evict!r}: choose {', '.join(EVICTIONS)}")
        if self.cache_alloc not in ALLOCS:
            raise RequestError(f"--cache-alloc {self.cache_alloc!r}: choose one of {', '.join(ALLOCS)}")
        if self.predictor not in PREDICTORS:
            raise RequestError(f"--predictor {self.predictor!r}: choose one of {', '.join(PREDICTORS)}")
        if not 0.0 <= self.int2_share <= 1.0:
            raise RequestError(f"--int2-share {self.int2_share}: give a fraction between 0 and 1")
        if self.prefetch_extra is not None and self.prefetch_extra < 0:
            raise RequestError("--prefetch-extra must be ≥ 0")
        return self

    def eviction(self) -> str:
        """The eviction policy of each layer's cache: ``lru`` caching is LRU whatever ``evict`` says (the
        mixtral-offloading baseline); ``auto`` is LRFU for fate (decayed frequency: ahead of ARC on every
        replayed cell, docs/BENCHMARKS.md) and ARC for the paper's policy and load-on-demand."""
        if self.policy == "lru":
            return "lru"
        if self.evict != "auto":
            return self.evict
        return "lrfu" if self.policy == "fate" else "arc"

    @property
    def offloads(self) -> bool:
        """Whether these options ask for experts to be offloaded (the plan may still keep all resident)."""
        return self.policy != "resident" and (self.mem is not None or self.policy == "ondemand")
