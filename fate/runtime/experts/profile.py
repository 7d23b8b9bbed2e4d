"""Offline timing profile: per-layer decode compute time and per-expert copy time per precision.

The planner and the prefetcher read it: the time one layer's compute leaves for copying, divided by
one expert's transfer time, bounds how many extra candidates are worth prefetching, and ``--link
ratio:R`` is defined against the per-layer compute time. Measured once per (bundle, device, dtype,
threads) and cached as JSON in the user's cache directory (``$FATE_CACHE_DIR`` or
``~/.cache/fate/profiles``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fate.model.experts import ExpertRows
from fate.model.kv import KVCache
from fate.model.transformer import MoEModel
from fate.quant.expert import ExpertCompute
from fate.units import format_size

PROFILE_VERSION = 3  # 2: compute timed as the offloading executor computes (native q4 products); 3: + one expert


@dataclass
class TimingProfile:
    layer_decode_seconds: float  # mean wall time of one decoder layer in a decode step, experts resident
    expert_copy_seconds: dict[str, float]  # one expert blob, map → device slot, per precision (no throttle)
    expert_bytes: dict[str, int]
    device: str
    measured_at: str
    expert_decode_seconds: float = 0.0  # one routed expert on one token, at the profiled precision
    version: int = PROFILE_VERSION

    def transfer_seconds(self, precision: str, bytes_per_s: float | None = None) -> float:
        """Time to move one expert: the measured copy, or the emulated link's, whichever is slower."""
        t = self.expert_copy_seconds[precision]
        if bytes_per_s:
            t = max(t, self.expert_bytes[precision] / bytes_per_s)
        return t

    def copies_in_window(self, precision: str, bytes_per_s: float | None) -> int:
        """How many expert copies fit in one layer's decode compute (at least 1)."""
        return max(1, int(self.layer_decode_seconds / max(self.transfer_seconds(precision, bytes_per_s), 1e-9)))

    def extra_candidates(self, top_k: int, n_experts: int, precision: str, bytes_per_s: float | None) -> int:
        """m of "prefetch top k + m": the transfers that fit in one layer's compute window, beyond k."""
        fit = int(self.layer_decode_seconds / max(self.transfer_seconds(precision, bytes_per_s), 1e-9))
        return max(0, min(n_experts - top_k, fit - top_k))

    def describe(self) -> str:
        parts = ", ".join(f"{p} {1e3 * s:.3f} ms ({format_size(self.expert_bytes[p])})"
                          for p, s in self.expert_copy_seconds.items())
        return f"profile: layer decode {1e3 * self.layer_decode_seconds:.3f} ms; expert copy {parts} [{self.device}]"


def cache_dir() -> Path:
    base = os.environ.get("FATE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fate")
    return Path(base) / "profiles"


def profile_key(bundle_path: Path, device: torch.device, dtype: torch.dtype, precision: str = "",
                kernels: str = "int8", threads: int | None = None) -> str:
    """The cache key of a profile: the bundle file as it is, the device, dtype, precision, kernels and the
    run's -t (``threads``; torch's count where not given — which is 1 whenever fate's kernels take the
    threads, so a run's own -t is what tells two runs apart)."""
    st = bundle_path.stat()
    threads = torch.get_num_threads() if threads is None else threads
    ident = (f"{bundle_path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{device}|{dtype}|{threads}"
             f"|{precision}|{kernels}")
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


def load_cached(key: str) -> TimingProfile | None:
    path = cache_dir() / f"{key}.json"
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("version") != PROFILE_VERSION:  # valid JSON, not a profile
            return None
        return TimingProfile(**data)
    except (OSError, ValueError, TypeError):
        return None


def save_cached(key: str, prof: TimingProfile) -> None:
    try:
        d = cache_dir()
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(asdict(prof), indent=1))
        os.replace(tmp, d / f"{key}.json")
    except OSError:
        pass  # a read-only home is no reason to fail a run


def measure(cfg, weights, store, device: torch.device, dtype: torch.dtype, precision: str,
            steps: int = 12, kernels: str = "int8") -> TimingProfile:
    """Time decode steps of the model (``cfg`` over the non-expert ``weights``) and the copy of one expert
    per stored precision.

    Every routed expert is computed from one blob of ``precision`` held on the device, by the primitive the
    offloading executor uses on its slots: the compute of a decode step without any transfer, whatever
    fits on the device (``kernels``: as the run computes them, fate-run --kernels)."""
    layout = store.layouts[precision]
    experts = _OneBlob(store.blob(cfg.moe_layer_ids[0], 0, precision).to(device, copy=True), layout, dtype, device,
                       kernels) if cfg.moe_layer_ids else None
    model = MoEModel(cfg, weights, experts, dtype=dtype, device=device, max_ctx=steps + 2)
    kv = KVCache.for_model(cfg, steps + 2, dtype=dtype, device=device)
    ids = torch.tensor([1], dtype=torch.long, device=device)
    times = _time_steps(model, kv, ids, device, steps)
    layer_s = min(times) / cfg.n_layers  # the fastest step: noise on a shared machine only ever adds time
    expert_s = 0.0
    if experts is not None:  # one expert on one token, as the executor computes it from a slot
        x = torch.randn(1, cfg.hidden_size, dtype=dtype, device=device)
        samples = []
        with torch.inference_mode():
            for _ in range(20):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t = time.perf_counter()
                experts.compute.swiglu(experts.view, x, one_token=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                samples.append(time.perf_counter() - t)
        expert_s = sorted(samples)[len(samples) // 4]  # a quick one: noise only adds time
    copy_s, nbytes = {}, {}
    layer = cfg.moe_layer_ids[0] if cfg.moe_layer_ids else None
    for p in store.precisions if layer is not None else ():
        n = store.blob_bytes(p)
        dst = torch.empty(n, dtype=torch.uint8, device=device)
        samples = []
        for e in range(min(cfg.n_experts, 6)):
            blob = store.blob(layer, e, p)
            t = time.perf_counter()
            dst.copy_(blob)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            samples.append(time.perf_counter() - t)
        copy_s[p], nbytes[p] = min(samples), n
    return TimingProfile(layer_s, copy_s, nbytes, str(device), time.strftime("%Y-%m-%dT%H:%M:%S"), expert_s)


class _OneBlob:
    """Every routed expert computed from one blob held on the device, the way the offloading executor
    computes from a slot (:class:`fate.quant.expert.ExpertCompute`)."""

    def __init__(self, blob, layout, dtype, device, kernels: str = "int8"):
        self.compute = ExpertCompute(layout, dtype, device, kernels=kernels)
        self.view = self.compute.view(blob)

    def moe(self, layer, x, topk_ids, topk_weights):
        rows = ExpertRows(x, topk_ids, topk_weights)
        for e in rows.experts:
            rows.put(e, self.compute.swiglu(self.view, rows.tokens(e), one_token=rows.T == 1))
        return rows.combine()


def _time_steps(model, kv, ids, device, steps: int) -> list[float]:
    times = []
    with torch.inference_mode():
        for s in range(steps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            model.forward(ids, kv, last_only=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if s >= 2:  # the first steps warm caches up
                times.append(time.perf_counter() - t)
    return times
