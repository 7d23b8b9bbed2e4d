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

PROFILE_VERSION = 2  # 2: compute timed as the offloading executor computes (native q4 products)


@dataclass
class TimingProfile:
    layer_decode_seconds: float  # mean wall time of one decoder layer in a decode step, experts resident
    expert_copy_seconds: dict[str, float]  # one expert blob, map → device slot, per precision (no throttle)
    expert_bytes: dict[str, int]
    device: str
    measured_at: str
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
        parts = ", ".join(f"{p} {1e3 * s:.3f} ms ({self.expert_bytes[p] / 2**20:.2f} MiB)"
                          for p, s in self.expert_copy_seconds.items())
        return f"profile: layer decode {1e3 * self.layer_decode_seconds:.3f} ms; expert copy {parts} [{self.device}]"


def cache_dir() -> Path:
    base = os.environ.get("FATE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fate")
    return Path(base) / "profiles"


def profile_key(bundle_path: Path, device: torch.device, dtype: torch.dtype, precision: str = "") -> str:
    st = bundle_path.stat()
    ident = (f"{bundle_path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{device}|{dtype}|{torch.get_num_threads()}"
             f"|{precision}")
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


def load_cached(key: str) -> TimingProfile | None:
    path = cache_dir() / f"{key}.json"
    try:
        data = json.loads(path.read_text())
        if data.get("version") != PROFILE_VERSION:
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


def measure(model, store, device: torch.device, steps: int = 12, precision: str | None = None) -> TimingProfile:
    """Time ``model``'s decode steps and the copy of one expert per stored precision.

    With ``precision``, every routed expert is computed from one blob of that precision held on the
    device (dequantized per call, as the offloading executor does from its slots): the compute of a
    decode step without any transfer, whatever executor ``model`` has and whatever fits on the device.
    Without it, ``model``'s own executor runs (it must need no transfers)."""
    from fate.runtime.kv import KVCache

    cfg = model.cfg
    kv = KVCache.for_model(cfg, steps + 2, dtype=model.dtype, device=device)
    ids = torch.tensor([1], dtype=torch.long, device=device)
    times = []
    saved = model.experts
    if precision is not None and cfg.moe_layer_ids:
        blob = store.blob(cfg.moe_layer_ids[0], 0, precision).to(device, copy=True)
        layout = store.layouts[precision]
        H, Fd = cfg.hidden_size, cfg.expert_ffn
        out = tuple(torch.empty(s, dtype=model.dtype, device=device) for s in ((Fd, H), (Fd, H), (H, Fd)))
        model.experts = _OneBlob(blob, layout, model.dtype, device, out)
    try:
        times = _time_steps(model, kv, ids, device, steps)
    finally:
        model.experts = saved
    layer_s = min(times) / cfg.n_layers  # the fastest step: noise on a shared machine only ever adds time
    copy_s, nbytes = {}, {}
    layer = cfg.moe_layer_ids[0]
    for p in store.precisions:
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
    return TimingProfile(layer_s, copy_s, nbytes, str(device), time.strftime("%Y-%m-%dT%H:%M:%S"))


class _OneBlob:
    """Every routed expert computed from one blob held on the device, the way the offloading executor
    computes from a slot: one-token q4 products through fate.kernels where it runs, else the blob
    dequantized (into reused buffers) and multiplied."""

    def __init__(self, blob, layout, dtype, device, out):
        from fate import kernels as K
        from fate import quant as Q
        from fate.runtime.model import DenseExperts

        spec = layout.spec
        self.native = (torch.device(device).type == "cpu" and dtype == torch.float32 and spec.bits == 4
                       and spec.group_size == K.GROUP and K.available())
        self.parts = ([(m.packed.view(blob), m.scale.view(blob), m.zero.view(blob)) for m in layout.matrices]
                      if self.native else None)
        self.dense = DenseExperts(lambda layer, e: Q.unpack_expert(blob, layout, dtype=dtype, out=out))
        self.K = K

    def moe(self, layer, x, topk_ids, topk_weights):
        if not (self.native and x.shape[0] == 1):
            return self.dense.moe(layer, x, topk_ids, topk_weights)
        terms = [self.K.q4_swiglu(x, *self.parts) * topk_weights[:, j:j + 1] for j in range(topk_ids.shape[1])]
        return torch.cat(terms).sum(0, keepdim=True).to(x.dtype)


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
