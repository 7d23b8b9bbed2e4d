"""``fate.load``: a bundle, memory-mapped, ready to generate.

The engine is built once, in a straight line, from one :class:`~fate.runtime.options.EngineOptions`:
bundle → model config → expert store → tokenizer → non-expert weights → KV cache → memory plan →
(offloading: timing profile, link, cache, transfers, predictor) → the expert executor → the model.

``FateModel.stream`` yields text as it is generated; ``generate`` returns it all at once; both leave
llama.cpp-style figures in ``last_stats`` (prefill and decode tokens/s, load time, peak RSS, and the
offloading figures), in the schema of :mod:`fate.runtime.stats`.  ``logits`` runs a window from scratch
(what fate-perplexity scores).
"""

from __future__ import annotations

import json
import time
import weakref
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from fate.errors import BundleError, BundleMetadataError, ConfigError, RequestError
from fate.formats import constants as C
from fate.formats.bundle import Bundle
from fate.model.config import ModelConfig
from fate.model.kv import KVCache
from fate.model.transformer import MoEModel
from fate.quant import kernels as K
from fate.runtime.chat import render_chat
from fate.runtime.experts import offloading
from fate.runtime.experts.budget import BudgetPlan
from fate.runtime.experts.link import LinkSpec, parse_link
from fate.runtime.experts.profile import TimingProfile
from fate.runtime.experts.resident import ResidentExperts
from fate.runtime.experts.store import ExpertStore
from fate.runtime.options import EngineOptions
from fate.runtime.sampling import Sampler, SamplingParams
from fate.runtime.stats import GenerationStats
from fate.runtime.tokenizer import BundleTokenizer
from fate.runtime.weights import BundleWeights, ResidentWeights, verified_non_expert_tensors
from fate.sysinfo import default_threads, peak_rss_bytes

__all__ = ["FateModel", "GenerationResult", "GenerationStats", "EngineOptions", "load"]

_DTYPES = {"fp32": torch.float32, "f32": torch.float32, "fp16": torch.float16, "f16": torch.float16,
           "bf16": torch.bfloat16}


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: GenerationStats


def _resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RequestError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
    return torch.device(device)


class FateModel:
    """A bundle opened for generation: ``FateModel(path, options)`` or ``fate.load(path, **options)``.

    Always set: ``options``, ``bundle``, ``config``, ``store``, ``precision``, ``device``, ``dtype``,
    ``context``, ``tokenizer``, ``chat_template``, ``generation_defaults``, ``weights``, ``kv``, ``model``,
    ``link`` (NO_LINK unless one was asked for), ``plan`` (None without --mem), ``timing`` (None unless
    measured), ``offloading`` (None when every expert is resident), ``last_stats`` (None before the first
    generation), ``threads`` (the -t in use), ``native`` (whether fate's kernels compute the products: then they
    take the threads and torch's intra-op count is 1)."""

    def __init__(self, path, options: EngineOptions | None = None, **overrides):
        t0 = time.perf_counter()
        self.options = opts = EngineOptions.of(options, **overrides)
        if opts.compute_dtype is not None and opts.compute_dtype not in _DTYPES:
            raise RequestError(f"--compute-dtype {opts.compute_dtype!r}: use one of fp32, fp16, bf16")
        self.threads = opts.threads or default_threads()
        torch.set_num_threads(self.threads)
        self.device = _resolve_device(opts.device)
        self.dtype = _DTYPES[opts.compute_dtype or ("fp32" if self.device.type == "cpu" else "fp16")]
        self.policy = opts.policy

        self.bundle = Bundle(path)
        try:
            self.config: ModelConfig = ModelConfig.from_json(self.bundle.require(C.K_MODEL_CONFIG))
        except ConfigError as e:  # the bundle's own metadata is wrong, not the user's request
            raise BundleMetadataError(f"{self.bundle.path}: {e}") from None
        cfg = self.config
        self.store = ExpertStore(self.bundle, cfg, verify=opts.verify)
        self.precision = self.store.check_precision(opts.experts)
        self.context = int(opts.context or min(4096, cfg.max_position))
        self._load_tokenizer()

        if self.device.type == "cpu" and self.dtype == torch.float32:
            # projections stay in their stored f16/bf16 and are widened per call: decode reads half
            # the bytes, with the same results (fate.runtime.weights)
            self.weights = ResidentWeights(verified_non_expert_tensors(self.bundle, opts.verify), self.dtype,
                                           self.device, kernels=opts.kernels)
        else:
            self.weights = BundleWeights(self.bundle, self.dtype, self.device, verify=opts.verify)
        kv_bytes = KVCache.bytes_needed(cfg, self.context, self.dtype)
        try:
            self.kv = KVCache.for_model(cfg, self.context, dtype=self.dtype, device=self.device)
        except (RuntimeError, MemoryError):
            raise RequestError(f"the KV cache for -c {self.context} needs {kv_bytes / 2**30:.2f} GiB, which "
                               "could not be allocated; use a smaller -c") from None

        self.link: LinkSpec = parse_link(opts.link)  # validated even where nothing is moved
        self.plan: BudgetPlan | None = None
        self.timing: TimingProfile | None = None
        self.offloading: offloading.Offloading | None = None
        if opts.offloads and cfg.moe_layer_ids:
            def timing():
                return offloading.timing_profile(self.bundle, cfg, self.weights, self.store, self.device, self.dtype,
                                                 self.precision, force=opts.profile, kernels=opts.kernels,
                                                 threads=self.threads)

            copies = offloading.copies_per_layer(self.link, timing, self.store.blob_bytes(self.precision))
            self.plan = offloading.plan(cfg, self.store, self.bundle, opts, self.precision, self.weights.nbytes,
                                        self.kv.nbytes, self.dtype, self.context, copies)
            if not self.plan.fully_resident:  # a budget that holds everything keeps it resident
                self.offloading = offloading.build(cfg, self.bundle, self.store, self.weights, opts, self.plan,
                                                   self.precision, self.device, self.dtype)
                self.link, self.timing = self.offloading.link, self.offloading.timing
                weakref.finalize(self, self.offloading.close)  # the transfer thread ends with the model
        if self.timing is None and opts.profile and cfg.moe_layer_ids:
            self.timing = offloading.timing_profile(self.bundle, cfg, self.weights, self.store, self.device,
                                                    self.dtype, self.precision, force=True, kernels=opts.kernels,
                                                    threads=self.threads)

        observer = None
        if self.offloading is not None:
            experts = self.offloading.executor
            observer = experts if self.offloading.predicts else None
        elif cfg.moe_layer_ids:
            # by default (CPU) experts are computed in place from the map, read when first used; with
            # --no-mmap every expert is read into memory now (like llama.cpp's), RSS = all experts; on a
            # GPU always (resident means in device memory, not a copy per use from the map)
            experts = ResidentExperts(self.store, self.precision, self.dtype, self.device, 0,
                                      mapped=not opts.no_mmap and self.device.type == "cpu", kernels=opts.kernels)
        else:
            experts = None
        self.experts = experts
        self.model = MoEModel(cfg, self.weights, experts, dtype=self.dtype, device=self.device, observer=observer,
                              max_ctx=self.context)
        if self.offloading is not None and self.offloading.predicts and not cfg.router_ranks_by_logits:
            self.offloading.executor.predictor.select = self.model.selection_scores
        self._share_threads()
        self.load_seconds = time.perf_counter() - t0
        self.last_stats: GenerationStats | None = None

    def _share_threads(self) -> bool:
        """Whether fate's kernels compute the model's products (then :meth:`use_threads` gives them the -t
        threads and torch one); applies the split."""
        w = self.weights
        native_weights = isinstance(w, ResidentWeights) and bool(w.native_names)
        self.native = native_weights or (self.experts is not None and self.experts.native)
        self.use_threads()
        return self.native

    def use_threads(self) -> None:
        """This model's thread split, for the process (thread counts are per process; every generation and
        ``logits`` call applies it, so models loaded with different -t take turns correctly): fate's kernels
        get -t threads and torch one while the kernels compute the products (two pools sized to the cores
        would spin on each other's: fate.quant.kernels); else torch gets them."""
        torch_threads = 1 if self.native else self.threads
        if self.native and K.threads() != self.threads:
            K.set_threads(self.threads)
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)

    def _load_tokenizer(self) -> None:
        b = self.bundle
        tj = b.require(C.K_TOKENIZER_HF_JSON)
        eos_ids = b.get(C.K_EOS_IDS) or ([b.get(C.K_EOS_ID)] if b.get(C.K_EOS_ID) is not None else [])
        try:
            self.tokenizer = BundleTokenizer(tj, b.get(C.K_BOS_ID), eos_ids, None, bos_token=b.get(C.K_BOS_TOKEN),
                                             eos_token=b.get(C.K_EOS_TOKEN))
        except ValueError as e:
            raise BundleError(f"{b.path}: the tokenizer cannot be loaded ({e})") from None
        self.chat_template: str | None = b.get(C.K_CHAT_TEMPLATE)
        try:
            self.generation_defaults = json.loads(b.get(C.K_GEN_DEFAULTS) or "{}")
        except ValueError:
            self.generation_defaults = {}

    # --- figures --------------------------------------------------------------------------------------
    @property
    def hybrid(self) -> bool:
        """Whether the least popular prefill experts may run as INT2 (fate's hybrid precision is in use; the
        Offloader sends them so where the link limits the prefill, ``int2_link_share``)."""
        off = self.offloading
        return off is not None and off.executor.low_precision is not None and off.executor.int2_share > 0

    def reset_stats(self) -> None:
        """Start the offloading counters afresh (each generation does)."""
        if self.offloading is not None:
            self.offloading.stats.reset()

    def experts_report(self) -> dict | None:
        """The ``experts`` block of the stats schema since the last reset (None when nothing is offloaded)."""
        return None if self.offloading is None else self.offloading.report(self.policy)

    def logits(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Logits [T, V] (float32, on the device) of token ids run from scratch: positions from 0, no KV
        cache — one window of fate-perplexity."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        self.use_threads()
        with torch.inference_mode():
            return self.model.forward(ids.to(self.device), None)

    # --- prompts --------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | Sequence[int], chat: bool = False, system: str | None = None) -> list[int]:
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        if chat:
            if not self.chat_template:
                raise RequestError("this bundle has no chat template; run without --chat")
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            text = render_chat(self.chat_template, messages, add_generation_prompt=True,
                               bos_token=self.tokenizer.bos_token, eos_token=self.tokenizer.eos_token)
            return self.tokenizer.encode_chat(text)
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def sampling_params(self, **overrides) -> SamplingParams:
        d = {k: v for k, v in self.generation_defaults.items() if k in ("temperature", "top_k", "top_p", "min_p",
                                                                     "repetition_penalty")}
        if self.generation_defaults.get("do_sample") is False:
            d["temperature"] = 0.0
        d.update({k: v for k, v in overrides.items() if v is not None})
        params = SamplingParams(**d)
        try:
            params.validate()
        except ValueError as e:
            raise RequestError(str(e)) from None
        return params

    # --- generation -----------------------------------------------------------------------------------
    def generate_ids(self, prompt_ids: list[int], max_tokens: int = 128, sampling: SamplingParams | None = None,
                     stop_at_eos: bool = True) -> Iterator[int]:
        """Yield generated token ids; figures land in ``self.last_stats`` when the iterator ends."""
        if not prompt_ids:
            raise RequestError("the prompt is empty (0 tokens); give some text")
        if max_tokens < 0:
            raise RequestError("-n must be ≥ 0")
        if len(prompt_ids) >= self.context:
            raise RequestError(
                f"the prompt has {len(prompt_ids)} tokens but the context holds {self.context}; "
                f"raise -c (up to {self.config.max_position}) or shorten the prompt")
        bad = [t for t in prompt_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        sampler = Sampler(sampling or self.sampling_params())
        self.use_threads()
        stats = GenerationStats(prompt_token_ids=list(prompt_ids), load_seconds=self.load_seconds)
        self.last_stats = stats
        self.kv.reset()
        self.reset_stats()
        history = list(prompt_ids)
        try:
            with torch.inference_mode():
                t = time.perf_counter()
                logits = self.model.forward(torch.tensor(prompt_ids, dtype=torch.long, device=self.device), self.kv,
                                            last_only=True)
                stats.prefill_seconds = time.perf_counter() - t
                t = time.perf_counter()
                for n in range(max_tokens):
                    tok = int(sampler(logits[-1].float().cpu(), history))
                    history.append(tok)
                    stats.generated_token_ids.append(tok)
                    yield tok
                    if stop_at_eos and self.tokenizer.is_eos(tok):
                        stats.stop_reason = "eos"
                        break
                    if n == max_tokens - 1:
                        break
                    if self.kv.length + 1 > self.context:
                        stats.stop_reason = "context"
                        break
                    logits = self.model.forward(torch.tensor([tok], dtype=torch.long, device=self.device), self.kv,
                                                last_only=True)
                    stats.decode_tokens += 1
                stats.decode_seconds = time.perf_counter() - t
                stats.stop_reason = stats.stop_reason or "length"
        finally:
            stats.peak_rss_bytes = peak_rss_bytes()
            stats.experts = self.experts_report()
            stats.budget = self.plan.to_dict() if self.plan is not None else None

    def stream(self, prompt: str | Sequence[int], max_tokens: int = 128, *, chat: bool = False,
               system: str | None = None, stop_at_eos: bool = True, **sampling) -> Iterator[str]:
        """Yield the generated text piece by piece (complete UTF-8 characters only)."""
        ids = self.encode_prompt(prompt, chat=chat, system=system)
        params = self.sampling_params(**sampling)
        decoder = self.tokenizer.stream_decoder(skip_special_tokens=True)
        for tok in self.generate_ids(ids, max_tokens, params, stop_at_eos):
            piece = decoder.feed(tok)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 128, **kwargs) -> GenerationResult:
        text = "".join(self.stream(prompt, max_tokens, **kwargs))
        stats = self.last_stats
        return GenerationResult(text, list(stats.generated_token_ids), stats)

    def close(self) -> None:
        if self.offloading is not None:
            self.offloading.close()
        self.bundle.close()


def load(path, options: EngineOptions | None = None, **overrides) -> FateModel:
    """Open a bundle: ``fate.load("model.gguf", device="cpu", experts="q4", context=4096)``; the options
    are :class:`EngineOptions`' fields (or pass one)."""
    return FateModel(path, options, **overrides)
