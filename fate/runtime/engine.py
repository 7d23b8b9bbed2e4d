"""``fate.load``: a bundle, memory-mapped, ready to generate.

``FateModel.stream`` yields text as it is generated; ``generate`` returns it all at once; both leave
llama.cpp-style figures in ``last_stats`` (prefill and decode tokens/s, load time, peak RSS).
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from fate.formats import constants as C
from fate.formats.bundle import Bundle, BundleError
from fate.runtime.config import ConfigError, ModelConfig
from fate.runtime.kv import KVCache
from fate.runtime.model import DenseExperts, MoEModel
from fate.runtime.sampling import Sampler, SamplingParams
from fate.runtime.store import ExpertStore
from fate.runtime.tokenizer import BundleTokenizer


class RuntimeUserError(ValueError):
    """A request the runtime cannot serve (prompt too long, bad sampling values, no CUDA, ...)."""


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
        ])


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: GenerationStats


class BundleWeights:
    """Every non-expert tensor of the bundle, copied once to the device in the compute dtype."""

    def __init__(self, bundle: Bundle, dtype: torch.dtype, device: torch.device):
        self.tensors = {}
        for name, entry in bundle.tensors.items():
            if name.startswith("blk.") and ".fate_exps." in name or name.startswith("fate."):
                continue
            self.tensors[name] = bundle.tensor(name).to(device=device, dtype=dtype)

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
                 verify: bool = True):
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

        self.weights = BundleWeights(self.bundle, self.dtype, self.device)
        self.experts = self._make_executor()
        self.model = MoEModel(self.config, self.weights, self.experts, dtype=self.dtype, device=self.device)
        self.kv = KVCache.for_model(self.config, self.context, dtype=self.dtype, device=self.device)
        self.load_seconds = time.perf_counter() - t0
        self.last_stats: GenerationStats | None = None

    def _make_executor(self):
        store, prec, dtype, dev = self.store, self.precision, self.dtype, self.device
        return DenseExperts(lambda layer, e: store.dense(layer, e, prec, dtype=dtype, device=dev))

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
        self.bundle.close()


def load(path, **options) -> FateModel:
    """Open a bundle: ``fate.load("model.gguf", device="cpu", experts="q4", context=4096)``."""
    return FateModel(path, **options)
