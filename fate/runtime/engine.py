"""``fate.load``: a bundle, memory-mapped, ready to generate.

``FateModel.stream`` yields text as it is generated; ``generate`` returns it all at once; both leave
llama.cpp-style figures in ``last_stats`` (prefill and decode tokens/s, load time, peak RSS).
"""

from __future__ import annotations

import json
import weakref
import zlib
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from fate.cli_common import peak_rss_bytes
from fate.formats import constants as C
from fate.formats.bundle import Bundle, BundleError, ChecksumError
from fate.runtime.config import ConfigError, ModelConfig
from fate.runtime.kv import KVCache
from fate.runtime.link import parse_link
from fate.runtime.profile import TimingProfile
from fate.runtime.resident import ResidentExperts, ResidentWeights
from fate.runtime.model import DenseExperts, MoEModel
from fate.runtime.sampling import Sampler, SamplingParams
from fate.runtime.store import ExpertStore
from fate.runtime.tokenizer import BundleTokenizer


POLICIES = ("fate", "ondemand", "lru", "resident")


class RuntimeUserError(ValueError):
    """A request the runtime cannot serve (prompt too long, bad sampling values, no CUDA, ...)."""




@dataclass
class GenerationStats:
    prompt_token_ids: list[int] = field(default_factory=list)
    generated_token_ids: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_tokens: int = 0  # forward passes after the prefill (one per generated token but the last)
    decode_seconds: float = 0.0
    load_seconds: float = 0.0
    peak_rss_bytes: int = 0
    stop_reason: str = ""  # "eos", "length" or "context"
    experts: dict | None = None  # offloading figures (fate.runtime.stats), when experts are offloaded
    budget: dict | None = None  # the memory plan, when --mem was given

    def to_dict(self) -> dict:
        p, d = len(self.prompt_token_ids), self.decode_tokens
        return {
            "prefill.tokens": p,
            "prefill.seconds": self.prefill_seconds,
            "prefill.tokens_per_s": p / self.prefill_seconds if self.prefill_seconds > 0 else 0.0,
            "decode.tokens": d,
            "decode.seconds": self.decode_seconds,
            "decode.tokens_per_s": d / self.decode_seconds if self.decode_seconds > 0 else 0.0,
            "load_seconds": self.load_seconds,
            "peak_rss_bytes": self.peak_rss_bytes,
            "prompt_token_ids": list(self.prompt_token_ids),
            "generated_token_ids": list(self.generated_token_ids),
            "stop_reason": self.stop_reason,
            **({"experts": self.experts} if self.experts is not None else {}),
            **({"budget": self.budget} if self.budget is not None else {}),
        }

    def timings_text(self) -> str:
        d = self.to_dict()
        ms = lambda s, n: (1000 * s / n) if n else 0.0  # noqa: E731
        return "\n".join([
            f"load time      = {1000 * self.load_seconds:10.2f} ms",
            f"prompt eval    = {1000 * self.prefill_seconds:10.2f} ms / {d['prefill.tokens']:5d} tokens "
            f"({ms(self.prefill_seconds, d['prefill.tokens']):8.2f} ms per token, {d['prefill.tokens_per_s']:8.2f} tokens per second)",
            f"eval time      = {1000 * self.decode_seconds:10.2f} ms / {d['decode.tokens']:5d} runs   "
            f"({ms(self.decode_seconds, d['decode.tokens']):8.2f} ms per token, {d['decode.tokens_per_s']:8.2f} tokens per second)",
            f"generated      = {len(self.generated_token_ids):10d} tokens (stop: {self.stop_reason})",
            f"peak RSS       = {self.peak_rss_bytes / 2**20:10.1f} MiB",
        ] + ([self._experts_line()] if self.experts else []))

    def _experts_line(self) -> str:
        e = self.experts
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        moved = ", ".join(f"{p} {n / 2**20:.1f} MiB" for p, n in e["bytes_by_precision"].items()) or "nothing"
        link = e["link"]
        tag = f" [link {link['label']}]" if link.get("kind") != "none" else ""
        return (f"experts ({e['policy']}) = hit rate {pct(e['hit_rate'])}, prefetch recall {pct(e['prefetch_recall'])}, "
                f"misses {e['misses']}, stall {1000 * e['stall_seconds']:.1f} ms, moved {moved}{tag}")


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: GenerationStats


def verified_non_expert_tensors(bundle: Bundle, verify: bool = True) -> dict[str, torch.Tensor]:
    """Every non-expert tensor of the bundle as stored (views of the map), each checked against its
    crc32 first unless ``verify`` is off: one pass over bytes that are read at load anyway."""
    crcs = {}
    if verify:
        names = bundle.get(C.K_NON_EXPERT_CRC_NAMES)
        if not bundle.has(C.T_NON_EXPERT_CRC) or not isinstance(names, list):
            raise BundleError(f"{bundle.path}: the checksums of the non-expert tensors are missing "
                              "(re-convert it, or run with --no-verify)")
        values = bundle.tensor(C.T_NON_EXPERT_CRC)
        if values.shape != (len(names),):
            raise BundleError(f"{bundle.path}: {C.T_NON_EXPERT_CRC} does not match {C.K_NON_EXPERT_CRC_NAMES}")
        crcs = dict(zip(names, values.tolist()))
    out = {}
    for name in bundle.tensors:
        if name.startswith("blk.") and ".fate_exps." in name or name.startswith("fate."):
            continue
        if verify:
            if name not in crcs:
                raise BundleError(f"{bundle.path}: tensor {name} has no checksum")
            if zlib.crc32(memoryview(bundle.raw(name).numpy())) != crcs[name]:
                raise ChecksumError(f"{bundle.path}: checksum mismatch in tensor {name}; the file is corrupt: "
                                    "re-download or re-convert it")
        out[name] = bundle.tensor(name)
    return out


class BundleWeights:
    """Every non-expert tensor of the bundle, copied once to the device in the compute dtype."""

    def __init__(self, bundle: Bundle, dtype: torch.dtype, device: torch.device, verify: bool = True):
        self.tensors = {name: t.to(device=device, dtype=dtype, copy=True)  # never a view of the map: close() unmaps it
                        for name, t in verified_non_expert_tensors(bundle, verify).items()}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def get(self, name: str):
        return self.tensors.get(name)


def _resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeUserError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise RuntimeUserError(f"--device {device!r}: use cpu or cuda")
    return torch.device(device)


_DTYPES = {"fp32": torch.float32, "f32": torch.float32, "fp16": torch.float16, "f16": torch.float16,
           "bf16": torch.bfloat16}


class FateModel:
    def __init__(self, path, *, device: str | None = None, compute_dtype: str | None = None,
                 experts: str = "q4", context: int | None = None, threads: int | None = None,
                 verify: bool = True, mem: str | int | None = None, policy: str = "fate", evict: str = "arc",
                 cache_alloc: str = "auto", prefetch_extra: int | None = None, int2_share: float = 0.3,
                 link: str | None = None, profile: bool = False, no_mmap: bool = False):
        t0 = time.perf_counter()
        if threads:
            torch.set_num_threads(threads)
        self.device = _resolve_device(device)
        if compute_dtype is None:
            compute_dtype = "fp32" if self.device.type == "cpu" else "fp16"
        if compute_dtype not in _DTYPES:
            raise RuntimeUserError(f"--compute-dtype {compute_dtype!r}: use one of fp32, fp16, bf16")
        self.dtype = _DTYPES[compute_dtype]
        self.bundle = Bundle(path)
        try:
            self.config: ModelConfig = ModelConfig.from_json(self.bundle.require(C.K_MODEL_CONFIG))
        except ConfigError as e:
            raise BundleError(f"{self.bundle.path}: {e}") from None
        self.store = ExpertStore(self.bundle, self.config, verify=verify)
        self.precision = self.store.check_precision(experts)
        self.context = int(context or min(4096, self.config.max_position))
        if self.context <= 0:
            raise RuntimeUserError(f"-c {context}: the context size must be positive")

        tj = self.bundle.require(C.K_TOKENIZER_HF_JSON)
        eos_ids = self.bundle.get(C.K_EOS_IDS) or ([self.bundle.get(C.K_EOS_ID)] if self.bundle.get(C.K_EOS_ID) is not None else [])
        try:
            self.tokenizer = BundleTokenizer(tj, self.bundle.get(C.K_BOS_ID), eos_ids, None,
                                             bos_token=self.bundle.get(C.K_BOS_TOKEN),
                                             eos_token=self.bundle.get(C.K_EOS_TOKEN))
        except ValueError as e:
            raise BundleError(f"{self.bundle.path}: the tokenizer cannot be loaded ({e})") from None
        self.chat_template: str | None = self.bundle.get(C.K_CHAT_TEMPLATE)
        try:
            self.generation_defaults = json.loads(self.bundle.get(C.K_GEN_DEFAULTS) or "{}")
        except ValueError:
            self.generation_defaults = {}

        if self.device.type == "cpu" and self.dtype == torch.float32:
            # projections stay in their stored f16/bf16 and are widened per call: decode reads half
            # the bytes, with the same results (fate.runtime.resident)
            self.weights = ResidentWeights(verified_non_expert_tensors(self.bundle, verify), self.dtype, self.device)
        else:
            self.weights = BundleWeights(self.bundle, self.dtype, self.device, verify=verify)
        kv_bytes = KVCache.bytes_needed(self.config, self.context, self.dtype)
        try:
            self.kv = KVCache.for_model(self.config, self.context, dtype=self.dtype, device=self.device)
        except (RuntimeError, MemoryError):
            raise RuntimeUserError(f"the KV cache for -c {self.context} needs {kv_bytes / 2**30:.2f} GiB, which "
                                   "could not be allocated; use a smaller -c") from None
        self.resident_experts = DenseExperts(
            lambda layer, e: self.store.dense(layer, e, self.precision, dtype=self.dtype, device=self.device))
        self.model = MoEModel(self.config, self.weights, self.resident_experts, dtype=self.dtype, device=self.device,
                              max_ctx=self.context)
        self.offload = None
        self.expert_stats = None
        self.plan = None
        if policy not in POLICIES:
            raise RuntimeUserError(f"--policy {policy!r}: choose one of {', '.join(POLICIES)}")
        self.policy = policy
        if policy != "resident" and (mem is not None or policy == "ondemand"):
            self._setup_offload(mem, policy, evict, cache_alloc, prefetch_extra, int2_share, link, profile)
        elif link is not None or profile:
            self.link = parse_link(link)  # validated, but there is no transfer to throttle
            self.timing = self._timing_profile(force=profile) if profile else None
        if self.offload is None and self.config.moe_layer_ids:
            # by default (CPU) experts are computed in place from the map, read when first used; with
            # --no-mmap every expert is read into memory now (like llama.cpp's), RSS = all experts; on a
            # GPU always (resident means in device memory, not a copy per use from the map)
            mapped = not no_mmap and self.device.type == "cpu"
            self.resident_experts = ResidentExperts(self.store, self.precision, self.dtype, self.device, 0,
                                                    mapped=mapped, native=True)
            self.model.experts = self.resident_experts
        self.load_seconds = time.perf_counter() - t0
        self.last_stats: GenerationStats | None = None

    # --- offloading -------------------------------------------------------------------------------
    def _timing_profile(self, force: bool = False) -> TimingProfile:
        from fate.runtime import profile as P

        key = P.profile_key(self.bundle.path, self.device, self.dtype, self.precision)
        prof = None if force else P.load_cached(key)
        if prof is None:
            prof = P.measure(self.model, self.store, self.device, precision=self.precision)
            P.save_cached(key, prof)
        return prof

    def _setup_offload(self, mem, policy, evict, cache_alloc, prefetch_extra, int2_share, link, profile) -> None:
        from fate.runtime.budget import BudgetError, plan_budget
        from fate.runtime.cache import ExpertCache
        from fate.runtime.link import LinkError, Throttle, resolve_ratio
        from fate.runtime.offload import OffloadedExperts, Prefetcher
        from fate.runtime.stats import ExpertStats
        from fate.runtime.transfer import TransferEngine

        cfg = self.config
        if not cfg.moe_layer_ids:
            return
        if not 0.0 <= int2_share <= 1.0:
            raise RuntimeUserError(f"--int2-share {int2_share}: give a fraction between 0 and 1")
        if evict not in ("arc", "lru", "lfu"):
            raise RuntimeUserError(f"--evict {evict!r}: choose arc, lru or lfu")
        if prefetch_extra is not None and prefetch_extra < 0:
            raise RuntimeUserError("--prefetch-extra must be ≥ 0")
        try:
            self.link = parse_link(link)
        except LinkError as e:
            raise RuntimeUserError(str(e)) from None
        recall = self.bundle.tensor(C.T_CALIB_RECALL).clone() if self.bundle.has(C.T_CALIB_RECALL) else None
        if policy == "lru":  # mixtral-offloading: one LRU cache of equal size per layer
            evict, cache_alloc = "lru", "even"
        slot_bytes = self.store.blob_bytes(self.precision)
        act = torch.finfo(self.dtype).bits // 8
        # activations of a full-context prefill and one dequantized expert (scratch), estimated generously
        buffer_bytes = (4 * self.context * max(cfg.hidden_size, cfg.n_experts * cfg.top_k) * act
                        + 3 * cfg.hidden_size * cfg.expert_ffn * act)
        non_expert = self.weights.nbytes
        try:
            plan = plan_budget(cfg, mem=mem, non_expert_bytes=non_expert, kv_bytes=self.kv.nbytes,
                               buffer_bytes=buffer_bytes, slot_bytes=slot_bytes, alloc=cache_alloc, recall=recall)
        except BudgetError as e:
            raise RuntimeUserError(str(e)) from None
        if policy == "ondemand":  # Load-on-Demand: only the current layer's need, never kept
            plan.slots_per_layer = [cfg.top_k if m else 0 for m in cfg.moe_layers]
            plan.fully_resident = False
            plan.alloc = "ondemand"
        self.plan = plan
        if plan.fully_resident:
            return  # everything fits: keep it resident, no offloading at all (as the reference does)

        timing = None
        if policy == "fate" or self.link.kind == "ratio" or profile:
            timing = self._timing_profile(force=profile)
        self.timing = timing
        if self.link.kind == "ratio":
            self.link = resolve_ratio(self.link, timing.layer_decode_seconds, self.store.blob_bytes(self.precision))
        throttle = Throttle(self.link) if self.link.kind == "bandwidth" else None
        low = "q2" if (policy == "fate" and "q2" in self.store.precisions and self.precision != "q2") else None
        if low is not None and self.store.blob_bytes("q2") > slot_bytes:
            low = None
        self.expert_stats = ExpertStats(cfg.n_layers)
        cache = ExpertCache(plan.slots_per_layer, policy=evict)
        transfer = TransferEngine(self.store, plan.slots_per_layer, slot_bytes, self.device, throttle,
                                  self.expert_stats)
        prefetcher = None
        if policy == "fate":
            extra = prefetch_extra if prefetch_extra is not None else timing.extra_candidates(
                cfg.top_k, cfg.n_experts, self.precision, self.link.bytes_per_s if throttle else None)
            self.prefetch_extra = extra
            routers = {i: self.weights.get(C.T_FFN_GATE_INP.format(i=i)) for i in cfg.moe_layer_ids}
            max_new = None if prefetch_extra is not None else timing.copies_in_window(
                self.precision, self.link.bytes_per_s if throttle else None)
            prefetcher = Prefetcher(cfg, routers, cache, transfer, extra=extra, decode_precision=self.precision,
                                    low_precision=low, int2_share=int2_share, max_new=max_new)
        self.offload = OffloadedExperts(cfg, self.store, cache, transfer, self.expert_stats, dtype=self.dtype,
                                        device=self.device, decode_precision=self.precision, low_precision=low,
                                        int2_share=int2_share, keep=policy != "ondemand", prefetcher=prefetcher)
        self.cache, self.transfer = cache, transfer
        weakref.finalize(self, transfer.close)  # the worker thread ends with the model
        self.model.experts = self.offload
        self.model.observer = prefetcher

    def experts_report(self) -> dict | None:
        """The ``experts`` block of --stats-json for the last generation (None when nothing is offloaded)."""
        if self.expert_stats is None:
            return None
        d = self.expert_stats.to_dict()
        d["evictions"] = (sum(self.cache.layer(i).evictions for i in self.config.moe_layer_ids)
                          - getattr(self, "_evictions_base", 0))
        d["policy"] = self.policy
        d["link"] = self.link.to_dict()
        return d

    # --- prompts --------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | Sequence[int], chat: bool = False, system: str | None = None) -> list[int]:
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        if chat:
            if not self.chat_template:
                raise RuntimeUserError("this bundle has no chat template; run without --chat")
            from fate.runtime.chat import render_chat

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
            raise RuntimeUserError(str(e)) from None
        return params

    # --- generation -----------------------------------------------------------------------------------
    def generate_ids(self, prompt_ids: list[int], max_tokens: int = 128, sampling: SamplingParams | None = None,
                     stop_at_eos: bool = True) -> Iterator[int]:
        """Yield generated token ids; figures land in ``self.last_stats`` when the iterator ends."""
        if not prompt_ids:
            raise RuntimeUserError("the prompt is empty (0 tokens); give some text")
        if max_tokens < 0:
            raise RuntimeUserError("-n must be ≥ 0")
        if len(prompt_ids) >= self.context:
            raise RuntimeUserError(
                f"the prompt has {len(prompt_ids)} tokens but the context holds {self.context}; "
                f"raise -c (up to {self.config.max_position}) or shorten the prompt")
        bad = [t for t in prompt_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise RuntimeUserError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        sampler = Sampler(sampling or self.sampling_params())
        stats = GenerationStats(prompt_token_ids=list(prompt_ids), load_seconds=self.load_seconds)
        self.last_stats = stats
        self.kv.reset()
        if self.expert_stats is not None:
            self.expert_stats.reset()
            self._evictions_base = sum(self.cache.layer(i).evictions for i in self.config.moe_layer_ids)
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
        if self.offload is not None:
            self.transfer.close()
        self.bundle.close()


def load(path, **options) -> FateModel:
    """Open a bundle: ``fate.load("model.gguf", device="cpu", experts="q4", context=4096)``."""
    return FateModel(path, **options)
