"""The counters fate-serve exposes at ``/metrics`` (Prometheus text format)."""

from __future__ import annotations

import collections
import math
import threading
from typing import Any

from fate.runtime.experts.stats import COUNTERS
from fate.runtime.stats import EXPERT_FIELDS, PHASE_FIELDS

RATE_TERMS = {"hit_rate": ("hits", "needed"), "prefetch_recall": ("named_needed", "predicted_needed"),
              "prefetch_precision": ("named_needed", "named")}

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _label_value(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _labels(names: tuple[str, ...], values: tuple, extra: str = "") -> str:
    parts = [f'{n}="{_label_value(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "NaN"
    if isinstance(v, float) and math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if isinstance(v, float) else str(int(v))


class _Histogram:
    def __init__(self, buckets: tuple[float, ...] = _LATENCY_BUCKETS):
        self.buckets = buckets
        self.series: dict[tuple, list] = {}

    def observe(self, key: tuple, value: float) -> None:
        s = self.series.setdefault(key, [[0] * len(self.buckets), 0.0, 0])
        for i, b in enumerate(self.buckets):
            if value <= b:
                s[0][i] += 1
        s[1] += value
        s[2] += 1

    def render(self, out: list[str], name: str, help: str, labelnames: tuple[str, ...]) -> None:
        out.append(f"# HELP {name} {help}")
        out.append(f"# TYPE {name} histogram")
        for key in sorted(self.series):
            counts, total, n = self.series[key]
            for b, c in zip(self.buckets, counts):
                le = 'le="%s"' % b
                out.append(f"{name}_bucket{_labels(labelnames, key, le)} {c}")
            le = 'le="+Inf"'
            out.append(f"{name}_bucket{_labels(labelnames, key, le)} {n}")
            out.append(f"{name}_sum{_labels(labelnames, key)} {_num(total)}")
            out.append(f"{name}_count{_labels(labelnames, key)} {n}")


class Metrics:
    """Counters the server exposes at /metrics; every method is thread-safe.

    The generation figures use the names of the stats schema (:mod:`fate.runtime.stats`, docs/STATS.md):
    ``prefill.tokens`` is ``fate_prefill_tokens_total``, ``decode.tokens_per_s`` ``fate_decode_tokens_per_s``,
    ``experts.total.hits`` ``fate_experts_hits_total``, ``experts.bytes_by_precision``
    ``fate_experts_bytes_total{precision=...}``: sums over the requests served (rates over those sums)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = collections.Counter()
        self.latency = _Histogram()
        self.generations: dict[tuple[str, str], int] = collections.Counter()
        self.ttft = _Histogram()
        self.queue_wait = _Histogram()
        self.tokens = collections.Counter()  # prompt, completion
        self.generation_seconds = 0.0
        self.phases = {ph: {"tokens": 0, "seconds": 0.0} for ph in ("prefill", "decode")}
        self.last_tps = {"prefill": 0.0, "decode": 0.0}
        self.experts = collections.Counter()  # sums of experts.total's counters and stall_seconds
        self.expert_bytes: dict[str, int] = collections.Counter()
        self.expert_generations = 0

    def request_started(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, str(status))] += 1

    def request_done(self, endpoint: str, seconds: float) -> None:
        with self.lock:
            self.latency.observe((endpoint,), seconds)

    def generation(self, endpoint: str, finish_reason: str, *, prompt_tokens: int = 0, completion_tokens: int = 0,
                   queue_wait: float | None = None, stats: dict | None = None, seconds: float = 0.0) -> None:
        """One generation ended; ``stats`` is its GenerationStats.to_dict() (None when it never ran)."""
        with self.lock:
            self.generations[(endpoint, finish_reason)] += 1
            if queue_wait is not None:
                self.queue_wait.observe((endpoint,), queue_wait)
            self.tokens["prompt"] += prompt_tokens
            self.tokens["completion"] += completion_tokens
            self.generation_seconds += seconds
            if stats is None:
                return
            for ph in ("prefill", "decode"):
                p = stats[ph]
                self.phases[ph]["tokens"] += p["tokens"]
                self.phases[ph]["seconds"] += p["seconds"]
                if p["seconds"] > 0 and p["tokens"]:
                    self.last_tps[ph] = p["tokens_per_s"]
            experts = stats.get("experts")
            if experts:
                self.expert_generations += 1
                for k in COUNTERS:
                    self.experts[k] += int(experts["total"][k])
                self.experts["stall_seconds"] += float(experts["total"]["stall_seconds"])
                self.experts["host_seconds"] += float(experts["total"]["host_seconds"])
                for prec, n in experts["bytes_by_precision"].items():
                    self.expert_bytes[prec] += int(n)

    def first_token(self, endpoint: str, seconds: float) -> None:
        with self.lock:
            self.ttft.observe((endpoint,), seconds)

    def mean_generation_seconds(self) -> float | None:
        with self.lock:
            n = sum(self.generations.values())
            return self.generation_seconds / n if n else None

    def render(self, model, queue_depth: int, queue_size: int, busy: bool, model_name: str) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help: str, rows: list[tuple[str, Any]]):
            out.append(f"# HELP {name} {help}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in rows:
                out.append(f"{name}{labels} {_num(value)}")

        offloaded = model.offloading is not None
        with self.lock:
            metric("fate_model_info", "gauge", "The model being served (value 1).", [(_labels(
                ("model", "precision", "device", "policy", "offloaded"),
                (model_name, model.precision, model.device, model.policy, "true" if offloaded else "false")), 1)])
            metric("fate_context_tokens", "gauge", "Context size of the engine in tokens.", [("", model.context)])
            metric("fate_http_requests_total", "counter", "HTTP requests answered, by endpoint and status code.",
                   [(_labels(("endpoint", "status"), k), v) for k, v in sorted(self.requests.items())])
            self.latency.render(out, "fate_http_request_duration_seconds",
                                "Time from request arrival to the end of the response (streams included).",
                                ("endpoint",))
            metric("fate_generations_total", "counter",
                   "Generations by endpoint and outcome (stop, length, cancelled, error).",
                   [(_labels(("endpoint", "finish_reason"), k), v) for k, v in sorted(self.generations.items())])
            self.ttft.render(out, "fate_time_to_first_token_seconds",
                             "Time from request arrival to its first generated token.", ("endpoint",))
            self.queue_wait.render(out, "fate_queue_wait_seconds",
                                   "Time requests waited in the queue before the engine took them.", ("endpoint",))
            metric("fate_queue_depth", "gauge", "Requests waiting for the engine.", [("", queue_depth)])
            metric("fate_queue_capacity", "gauge", "Requests that may wait for the engine (--queue).",
                   [("", queue_size)])
            metric("fate_engine_busy", "gauge", "1 while the engine generates.", [("", int(busy))])
            metric("fate_prompt_tokens_total", "counter", "Prompt tokens of the requests generated for.",
                   [("", self.tokens["prompt"])])
            metric("fate_completion_tokens_total", "counter", "Tokens generated.",
                   [("", self.tokens["completion"])])
            for ph, p in self.phases.items():
                metric(f"fate_{ph}_tokens_total", "counter", f"{ph}.tokens: {PHASE_FIELDS['tokens']}.",
                       [("", p["tokens"])])
                metric(f"fate_{ph}_seconds_total", "counter", f"{ph}.seconds: {PHASE_FIELDS['seconds']}.",
                       [("", p["seconds"])])
                metric(f"fate_{ph}_tokens_per_s", "gauge", f"{ph}.tokens_per_s over all requests "
                       "(window=\"last\": the latest request).",
                       [('{window="all"}', p["tokens"] / p["seconds"] if p["seconds"] > 0 else 0.0),
                        ('{window="last"}', self.last_tps[ph])])
            if offloaded:
                e = self.experts
                metric("fate_experts_generations_total", "counter", "Generations whose expert figures are counted "
                       "below.", [("", self.expert_generations)])
                for k in COUNTERS + ("stall_seconds", "host_seconds"):
                    metric(f"fate_experts_{k}_total", "counter", f"experts.total.{k}: {EXPERT_FIELDS[k]}.",
                           [("", e[k])])
                ratio = lambda a, b: e[a] / e[b] if e[b] else float("nan")  # noqa: E731
                for k, (a, b) in RATE_TERMS.items():
                    metric(f"fate_experts_{k}", "gauge", f"experts.total.{k}: {EXPERT_FIELDS[k]} (all requests).",
                           [("", ratio(a, b))])
                metric("fate_experts_bytes_total", "counter", "experts.bytes_by_precision: expert bytes copied to "
                       "the device, by precision.",
                       [(_labels(("precision",), (p,)), n) for p, n in sorted(self.expert_bytes.items())])
        return "\n".join(out) + "\n"
