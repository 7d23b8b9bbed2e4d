"""fate-serve: an OpenAI-compatible HTTP server for a fate bundle.

Usage::

    fate-serve model.gguf [--host 127.0.0.1] [--port 8080] [--queue 16] [--api-key KEY] [fate-run model options]

Endpoints:

* ``POST /v1/completions`` and ``POST /v1/chat/completions`` (the bundle's chat template), with
  ``stream: true`` as server-sent events in OpenAI's chunk format (``data: {...}`` events, then
  ``data: [DONE]``).  Fields: ``prompt`` / ``messages``, ``max_tokens`` (chat: also
  ``max_completion_tokens``), ``temperature``, ``top_p``, ``seed``, ``stop`` (a string or a list; the text
  is cut at the first stop string), ``stream``, ``stream_options.include_usage``, ``n`` (1 only), and
  fate's extras ``top_k``, ``min_p``, ``repetition_penalty``.  Omitted sampling fields take the bundle's
  generation defaults, exactly as ``fate.load(...).generate`` does, so the same seed and values give the
  same tokens.  Fields fate cannot honour (``n`` > 1, ``echo``, ``logprobs``, ``tools``, ...) are refused
  with a 400 rather than ignored; other unknown fields are ignored.
* ``GET /v1/models``, ``GET /health`` (never needs the API key), ``GET /metrics`` (Prometheus text).

The engine runs one sequence at a time: one worker thread owns the model and takes requests from a
bounded FIFO queue (``--queue``); a request that finds it full gets a 503 with ``Retry-After``.  Every
request carries a cancel flag the worker checks between tokens: a client that disconnects (or the server
shutting down) stops its generation at the next token.  Bad requests get OpenAI-style JSON errors
(``{"error": {"message", "type", "param", "code"}}``); nothing a request does can stop the server (a 500 JSON
error at worst).

Python: ``create_app(fate.load(path), queue_size=16, api_key=None, max_body=1 << 20)`` returns the FastAPI
app, to run under any ASGI server.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import logging
import math
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from starlette.requests import Request
from starlette.responses import Response as _Response

from fate.cli_common import parse_size, user_errors

log = logging.getLogger("fate.serve")

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
ENDPOINTS = (COMPLETIONS, CHAT, "/v1/models", "/health", "/metrics")
DEFAULT_QUEUE = 16
DEFAULT_MAX_BODY = 1 << 20
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_STOP_STRINGS = 16
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


# --- errors -------------------------------------------------------------------------------------------


class ApiError(Exception):
    """A request that ends in an OpenAI-style JSON error."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


async def _send_json(send, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
    body = _json_bytes(obj)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _internal_error(what: str = "internal server error") -> ApiError:
    return ApiError(500, what, type="server_error", code="internal_error")


# --- metrics ------------------------------------------------------------------------------------------

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
    """Counters the server exposes at /metrics; every method is thread-safe."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = collections.Counter()
        self.latency = _Histogram()
        self.generations: dict[tuple[str, str], int] = collections.Counter()
        self.ttft = _Histogram()
        self.queue_wait = _Histogram()
        self.tokens = collections.Counter()  # prompt, completion, prefill, decode
        self.seconds = collections.Counter()  # prefill, decode, generation
        self.last_tps = {"prefill": 0.0, "decode": 0.0}
        self.experts = collections.Counter()
        self.expert_bytes: dict[str, int] = collections.Counter()
        self.expert_generations = 0

    def request_started(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, str(status))] += 1

    def request_done(self, endpoint: str, seconds: float) -> None:
        with self.lock:
            self.latency.observe((endpoint,), seconds)

    def generation(self, endpoint: str, finish_reason: str, *, prompt_tokens: int = 0, completion_tokens: int = 0,
                   queue_wait: float | None = None, stats=None, experts: dict | None = None,
                   raw: dict | None = None, seconds: float = 0.0) -> None:
        with self.lock:
            self.generations[(endpoint, finish_reason)] += 1
            if queue_wait is not None:
                self.queue_wait.observe((endpoint,), queue_wait)
            self.tokens["prompt"] += prompt_tokens
            self.tokens["completion"] += completion_tokens
            self.seconds["generation"] += seconds
            if stats is not None:
                p, d = len(stats.prompt_token_ids), stats.decode_tokens
                self.tokens["prefill"] += p
                self.tokens["decode"] += d
                self.seconds["prefill"] += stats.prefill_seconds
                self.seconds["decode"] += stats.decode_seconds
                if stats.prefill_seconds > 0:
                    self.last_tps["prefill"] = p / stats.prefill_seconds
                if stats.decode_seconds > 0 and d:
                    self.last_tps["decode"] = d / stats.decode_seconds
            if experts:
                self.expert_generations += 1
                for k in ("needed", "hits", "misses", "late_prefetches", "evictions"):
                    self.experts[k] += int(experts.get(k) or 0)
                self.experts["stall_seconds"] += float(experts.get("stall_seconds") or 0.0)
                for prec, n in (experts.get("bytes_by_precision") or {}).items():
                    self.expert_bytes[prec] += int(n)
                if raw:
                    for k in ("predicted_needed", "named_needed", "named"):
                        self.experts[k] += int(raw.get(k, 0))

    def first_token(self, endpoint: str, seconds: float) -> None:
        with self.lock:
            self.ttft.observe((endpoint,), seconds)

    def mean_generation_seconds(self) -> float | None:
        with self.lock:
            n = sum(self.generations.values())
            return self.seconds["generation"] / n if n else None

    def render(self, engine: "Engine", model_name: str) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help: str, rows: list[tuple[str, Any]]):
            out.append(f"# HELP {name} {help}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in rows:
                out.append(f"{name}{labels} {_num(value)}")

        model = engine.model
        depth, busy = engine.queue_depth(), engine.busy()
        with self.lock:
            metric("fate_model_info", "gauge", "The model being served (value 1).", [(_labels(
                ("model", "precision", "device", "policy", "offloaded"),
                (model_name, getattr(model, "precision", ""), getattr(model, "device", ""),
                 getattr(model, "policy", ""), "true" if getattr(model, "expert_stats", None) is not None
                 else "false")), 1)])
            metric("fate_context_tokens", "gauge", "Context size of the engine in tokens.",
                   [("", getattr(model, "context", 0))])
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
            metric("fate_queue_depth", "gauge", "Requests waiting for the engine.", [("", depth)])
            metric("fate_queue_capacity", "gauge", "Requests that may wait for the engine (--queue).",
                   [("", engine.queue_size)])
            metric("fate_engine_busy", "gauge", "1 while the engine generates.", [("", int(busy))])
            metric("fate_prompt_tokens_total", "counter", "Prompt tokens of the requests generated for.",
                   [("", self.tokens["prompt"])])
            metric("fate_completion_tokens_total", "counter", "Tokens generated.",
                   [("", self.tokens["completion"])])
            metric("fate_prefill_seconds_total", "counter", "Seconds spent in prompt processing.",
                   [("", self.seconds["prefill"])])
            metric("fate_decode_tokens_total", "counter", "Decode forward passes (one per generated token "
                   "but the last).", [("", self.tokens["decode"])])
            metric("fate_decode_seconds_total", "counter", "Seconds spent decoding.", [("", self.seconds["decode"])])
            avg = lambda t, s: self.tokens[t] / self.seconds[s] if self.seconds[s] > 0 else 0.0  # noqa: E731
            metric("fate_prefill_tokens_per_second", "gauge", "Prompt tokens per second (all requests; "
                   "phase=\"last\": the latest request).",
                   [('{phase="all"}', avg("prefill", "prefill")), ('{phase="last"}', self.last_tps["prefill"])])
            metric("fate_decode_tokens_per_second", "gauge", "Generated tokens per second while decoding (all "
                   "requests; phase=\"last\": the latest request).",
                   [('{phase="all"}', avg("decode", "decode")), ('{phase="last"}', self.last_tps["decode"])])
            if getattr(model, "expert_stats", None) is not None:
                e = self.experts
                ratio = lambda a, b: e[a] / e[b] if e[b] else float("nan")  # noqa: E731
                metric("fate_expert_generations_total", "counter", "Generations whose expert statistics are "
                       "counted below.", [("", self.expert_generations)])
                metric("fate_expert_needed_total", "counter", "Experts the router needed (layer x expert per "
                       "forward step).", [("", e["needed"])])
                metric("fate_expert_hits_total", "counter", "Needed experts already resident.", [("", e["hits"])])
                metric("fate_expert_misses_total", "counter", "Needed experts loaded on demand.",
                       [("", e["misses"])])
                metric("fate_expert_late_prefetches_total", "counter", "Needed experts whose prefetch was still "
                       "in flight.", [("", e["late_prefetches"])])
                metric("fate_expert_evictions_total", "counter", "Experts evicted from the cache.",
                       [("", e["evictions"])])
                metric("fate_expert_hit_rate", "gauge", "Hits over needed experts (all requests).",
                       [("", ratio("hits", "needed"))])
                metric("fate_expert_prefetch_recall", "gauge", "Needed experts the prediction had named, over "
                       "needed experts with a prediction (all requests).",
                       [("", ratio("named_needed", "predicted_needed"))])
                metric("fate_expert_prefetch_precision", "gauge", "Named experts that were needed, over named "
                       "experts (all requests).", [("", ratio("named_needed", "named"))])
                metric("fate_expert_bytes_moved_total", "counter", "Expert bytes copied to the device, by precision.",
                       [(_labels(("precision",), (p,)), n) for p, n in sorted(self.expert_bytes.items())])
                metric("fate_expert_stall_seconds_total", "counter", "Seconds computation waited for expert "
                       "copies.", [("", e["stall_seconds"])])
        return "\n".join(out) + "\n"


# --- the engine: one worker thread owns the model ----------------------------------------------------


@dataclass
class Job:
    """One generation request, from validation to its last event."""

    endpoint: str
    prompt_ids: list[int]
    max_tokens: int
    params: Any  # SamplingParams
    stops: list[str]
    loop: asyncio.AbstractEventLoop
    arrived: float = field(default_factory=time.perf_counter)  # when the request came in
    queued: float = field(default_factory=time.perf_counter)  # when it was validated and queued
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str | None = None
    finished: bool = False

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def emit(self, kind: str, payload: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is gone (server stopped): nobody is listening
            pass


@dataclass
class JobEnd:
    finish_reason: str  # stop, length, cancelled, error
    prompt_tokens: int
    completion_tokens: int
    error: ApiError | None = None


class _StopMatcher:
    """Cut streamed text at the first stop string; hold back text that may begin one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """The text safe to emit now, and whether a stop string was found (generation must end)."""
        if not self.stops:
            return piece, False
        buf = self.pending + piece
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return buf[:min(hits)], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self.pending = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


class Engine:
    """A bounded FIFO of :class:`Job` and the one thread that runs them on the model."""

    def __init__(self, model, queue_size: int = DEFAULT_QUEUE, metrics: Metrics | None = None):
        if queue_size < 0:
            raise ValueError("queue_size must be >= 0")
        self.model = model
        self.queue_size = queue_size
        self.metrics = metrics or Metrics()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._cv = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._current: Job | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="fate-serve-engine", daemon=True)
        self._thread.start()

    # --- called from the event loop ---
    def queue_depth(self) -> int:
        with self._cv:
            return len(self._waiting)

    def busy(self) -> bool:
        with self._cv:
            return self._current is not None

    @property
    def closing(self) -> bool:
        return self._closing

    def submit(self, job: Job) -> None:
        """Queue ``job`` or raise a 503 ApiError (queue full, or shutting down)."""
        with self._cv:
            if self._closing:
                raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
            idle = self._current is None and not self._waiting
            if not idle and len(self._waiting) >= self.queue_size:
                depth = len(self._waiting)
            else:
                self._waiting.append(job)
                self._cv.notify()
                return
        mean = self.metrics.mean_generation_seconds()
        retry = 1 if mean is None else max(1, min(60, math.ceil(mean * (depth + 1))))
        raise ApiError(503, f"the server is busy: {depth} requests are already waiting (queue size "
                            f"{self.queue_size}); retry later", type="server_error", code="queue_full",
                       headers={"Retry-After": str(retry)})

    def cancel(self, job: Job, reason: str = "client") -> None:
        """Stop ``job``: taken off the queue at once, or stopped by the worker at its next token."""
        with self._cv:
            if job.finished:
                return
            self._flag(job, reason)
            queued = job in self._waiting
            if queued:
                self._waiting.remove(job)
        if queued:
            self._finish(job, JobEnd("cancelled", len(job.prompt_ids), 0, _cancel_error(job)))

    def shutdown(self) -> None:
        """Refuse new jobs, drop the queued ones and stop the running one at its next token."""
        with self._cv:
            self._closing = True
            dropped = list(self._waiting)
            self._waiting.clear()
            for job in dropped + ([self._current] if self._current is not None else []):
                self._flag(job, "shutdown")
            self._cv.notify_all()
        for job in dropped:
            self._finish(job, JobEnd("cancelled", len(job.prompt_ids), 0, _cancel_error(job)))

    @staticmethod
    def _flag(job: Job, reason: str) -> None:
        if job.cancel_reason is None:
            job.cancel_reason = reason
        job.cancel_event.set()

    def close(self, timeout: float | None = 30.0) -> None:
        self.shutdown()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # --- the worker thread ---
    def _finish(self, job: Job, end: JobEnd, ran: bool = False, **figures) -> None:
        with self._cv:
            if job.finished:
                return
            job.finished = True
        self.metrics.generation(job.endpoint, end.finish_reason, prompt_tokens=end.prompt_tokens if ran else 0,
                                completion_tokens=end.completion_tokens, **figures)
        job.emit("end", end)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._closing:
                    self._cv.wait()
                if not self._waiting:
                    return  # closing, nothing left
                job = self._waiting.popleft()
                self._current = job
            try:
                self._run_job(job)
            except BaseException as e:  # noqa: BLE001 - the worker must survive anything a request does
                log.exception("generation failed")
                self._finish(job, JobEnd("error", len(job.prompt_ids), 0, _internal_error(
                    f"generation failed: {type(e).__name__}: {e}")))
            finally:
                with self._cv:
                    self._current = None

    def _run_job(self, job: Job) -> None:
        from fate.runtime.engine import RuntimeUserError
        from fate.runtime.kv import KVCacheFull

        model = self.model
        started = time.perf_counter()
        wait = started - job.queued
        if job.cancelled:
            self._finish(job, JobEnd("cancelled", len(job.prompt_ids), 0, _cancel_error(job)))
            return
        job.emit("start")
        decoder = model.tokenizer.stream_decoder(skip_special_tokens=True)
        stop = _StopMatcher(job.stops)
        before = model.last_stats
        n, reason, error = 0, None, None
        gen = model.generate_ids(job.prompt_ids, job.max_tokens, job.params, stop_at_eos=True)
        try:
            for tok in gen:
                n += 1
                if n == 1:
                    self.metrics.first_token(job.endpoint, time.perf_counter() - job.arrived)
                text, hit = stop.feed(decoder.feed(tok))
                if text:
                    job.emit("text", text)
                if hit:
                    reason = "stop"
                    break
                if job.cancelled:
                    reason = "cancelled"
                    break
            else:
                text, hit = stop.feed(decoder.flush())
                if not hit:
                    text += stop.flush()
                if text:
                    job.emit("text", text)
                eos = model.last_stats is not None and model.last_stats.stop_reason == "eos"
                reason = "stop" if hit or eos else "length"
        except (RuntimeUserError, KVCacheFull) as e:
            reason, error = "error", ApiError(400, str(e), code="invalid_request")
        except Exception as e:  # noqa: BLE001
            log.exception("generation failed")
            reason, error = "error", _internal_error(f"generation failed: {type(e).__name__}: {e}")
        finally:
            gen.close()
        if reason == "cancelled":
            error = _cancel_error(job)
        stats = model.last_stats if model.last_stats is not before else None
        experts = stats.experts if stats is not None else None
        self._finish(job, JobEnd(reason, len(job.prompt_ids), n, error), ran=True, queue_wait=wait, stats=stats,
                     experts=experts, raw=_raw_expert_counts(model) if experts else None,
                     seconds=time.perf_counter() - started)


def _cancel_error(job: Job) -> ApiError:
    if job.cancel_reason == "shutdown":
        return ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
    return ApiError(499, "the request was cancelled: the client went away", code="cancelled")


def _raw_expert_counts(model) -> dict | None:
    """Prediction counts of the last generation (recall and precision need their numerators and
    denominators to be summed over requests)."""
    try:
        tot: collections.Counter = collections.Counter()
        for rows in model.expert_stats.c.values():
            for row in rows:
                tot.update(row)
        return dict(tot)
    except Exception:  # noqa: BLE001 - figures only
        return None


# --- request validation ------------------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_KINDS = {
    "integer": (_is_int, "an integer"),
    "number": (_is_number, "a number"),
    "string": (lambda v: isinstance(v, str), "a string"),
    "boolean": (lambda v: isinstance(v, bool), "a boolean"),
    "object": (lambda v: isinstance(v, dict), "an object"),
    "array": (lambda v: isinstance(v, list), "an array"),
}


def _field(body: dict, name: str, kind: str, default=None, *, required: bool = False):
    if name not in body or body[name] is None:
        if required:
            raise ApiError(400, f"'{name}' is required", param=name, code="missing_required_parameter")
        return default
    value = body[name]
    check, what = _KINDS[kind]
    if not check(value):
        raise ApiError(400, f"'{name}' must be {what}, got {_describe(value)}", param=name, code="invalid_type")
    return value


def _describe(v) -> str:
    text = json.dumps(v, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _unsupported(name: str, why: str) -> ApiError:
    return ApiError(400, f"'{name}' {why}", param=name, code="unsupported_parameter")


def _stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "'stop' must be a string or an array of strings", param="stop", code="invalid_type")
    if len(stop) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' holds {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed",
                       param="stop", code="invalid_value")
    if any(s == "" for s in stop):
        raise ApiError(400, "'stop' strings must not be empty", param="stop", code="invalid_value")
    return stop


_SAMPLING_FIELDS = (("temperature", "number"), ("top_p", "number"), ("top_k", "integer"), ("min_p", "number"),
                    ("repetition_penalty", "number"), ("seed", "integer"))


@dataclass
class ParsedRequest:
    """A validated request, ready to queue."""

    kind: str  # "completion" or "chat"
    endpoint: str
    prompt_ids: list[int]
    max_tokens: int
    params: Any
    stops: list[str]
    stream: bool
    include_usage: bool


def _common(body: dict, model, kind: str) -> dict:
    """Validate the fields both endpoints share."""
    _field(body, "model", "string")
    _field(body, "user", "string")
    n = _field(body, "n", "integer", 1)
    if n != 1:
        raise _unsupported("n", "must be 1: fate generates one sequence per request")
    stream = _field(body, "stream", "boolean", False)
    options = _field(body, "stream_options", "object", {})
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ApiError(400, "'stream_options.include_usage' must be a boolean", param="stream_options.include_usage",
                       code="invalid_type")
    for name in ("presence_penalty", "frequency_penalty"):
        if _field(body, name, "number", 0) != 0:
            raise _unsupported(name, "is not supported (use repetition_penalty)")
    if _field(body, "logit_bias", "object", {}):
        raise _unsupported("logit_bias", "is not supported")
    sampling = {}
    for name, k in _SAMPLING_FIELDS:
        sampling[name] = _field(body, name, k)
    try:
        params = model.sampling_params(**sampling)
    except ValueError as e:  # RuntimeUserError
        msg = str(e)
        param = next((name for name, _ in _SAMPLING_FIELDS if msg.startswith(name)), None)
        raise ApiError(400, msg, param=param, code="invalid_value") from None
    max_name = "max_tokens"
    max_tokens = _field(body, "max_tokens", "integer")
    if kind == "chat" and max_tokens is None:
        max_tokens = _field(body, "max_completion_tokens", "integer")
        max_name = "max_completion_tokens"
    if max_tokens is not None and max_tokens <= 0:
        raise ApiError(400, f"'{max_name}' must be at least 1, got {max_tokens}", param=max_name,
                       code="invalid_value")
    return dict(stream=stream, include_usage=include_usage, params=params, max_tokens=max_tokens,
                max_name=max_name, stops=_stop_strings(body))


def _fit(model, ids: list[int], max_tokens: int | None, max_name: str, default: int | None, prompt_param: str) -> int:
    ctx = model.context
    if not ids:
        raise ApiError(400, "the prompt is empty (0 tokens)", param=prompt_param, code="invalid_value")
    if len(ids) >= ctx:
        raise ApiError(400, f"the prompt has {len(ids)} tokens but the model's context holds {ctx}; shorten it",
                       param=prompt_param, code="context_length_exceeded")
    room = ctx - len(ids)
    if max_tokens is None:
        return room if default is None else min(default, room)
    if max_tokens > room:
        raise ApiError(400, f"the context holds {ctx} tokens, but {len(ids) + max_tokens} were requested "
                            f"({len(ids)} in the prompt, {max_tokens} to generate); lower '{max_name}' or shorten "
                            f"the prompt", param=max_name, code="context_length_exceeded")
    return max_tokens


def parse_completion(body: dict, model) -> ParsedRequest:
    c = _common(body, model, "completion")
    for name, ok in (("echo", lambda v: v is False), ("suffix", lambda v: v == ""), ("logprobs", lambda v: False),
                     ("best_of", lambda v: v == 1)):
        if body.get(name) is not None and not ok(body[name]):
            raise _unsupported(name, "is not supported")
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(400, "'prompt' is required", param="prompt", code="missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = model.encode_prompt(prompt, chat=False)
    elif isinstance(prompt, list) and all(_is_int(t) for t in prompt):
        vocab = model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="prompt",
                           code="invalid_value")
        ids = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise _unsupported("prompt", "holds several prompts; fate answers one prompt per request")
    else:
        raise ApiError(400, "'prompt' must be a string or an array of token ids", param="prompt",
                       code="invalid_type")
    max_tokens = _fit(model, ids, c["max_tokens"], c["max_name"], DEFAULT_COMPLETION_TOKENS, "prompt")
    return ParsedRequest("completion", COMPLETIONS, ids, max_tokens, c["params"], c["stops"], c["stream"],
                    c["include_usage"])


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "'messages' is required", param="messages", code="missing_required_parameter")
    if not isinstance(messages, list):
        raise ApiError(400, "'messages' must be an array of messages", param="messages", code="invalid_type")
    if not messages:
        raise ApiError(400, "'messages' must hold at least one message", param="messages", code="invalid_value")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"'{where}' must be an object", param=where, code="invalid_type")
        role = m.get("role")
        if not isinstance(role, str):
            raise ApiError(400, f"'{where}.role' must be a string", param=f"{where}.role", code="invalid_type")
        if role not in CHAT_ROLES:
            raise ApiError(400, f"'{where}.role' is {role!r}; use one of {', '.join(CHAT_ROLES)}",
                           param=f"{where}.role", code="invalid_value")
        content = m.get("content")
        if content is None:
            if role != "assistant":
                raise ApiError(400, f"'{where}.content' is required", param=f"{where}.content",
                               code="missing_required_parameter")
            content = ""
        elif isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"'{where}.content[{j}]': only text parts ({{\"type\": \"text\", \"text\": "
                                        f"...}}) are supported", param=f"{where}.content[{j}]", code="invalid_value")
                texts.append(part["text"])
            content = "".join(texts)
        elif not isinstance(content, str):
            raise ApiError(400, f"'{where}.content' must be a string or an array of text parts",
                           param=f"{where}.content", code="invalid_type")
        msg = {"role": "system" if role == "developer" else role, "content": content}
        name = m.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise ApiError(400, f"'{where}.name' must be a string", param=f"{where}.name", code="invalid_type")
            msg["name"] = name
        out.append(msg)
    return out


def parse_chat(body: dict, model) -> ParsedRequest:
    from fate.runtime.chat import ChatTemplateError, render_chat

    c = _common(body, model, "chat")
    if body.get("tools") or body.get("functions"):
        raise _unsupported("tools", "are not supported")
    if body.get("logprobs"):
        raise _unsupported("logprobs", "is not supported")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise _unsupported("response_format", "is not supported (only {\"type\": \"text\"})")
    messages = _messages(body)
    if not model.chat_template:
        raise ApiError(400, "this model has no chat template; use /v1/completions", param="messages",
                       code="no_chat_template")
    tok = model.tokenizer
    try:
        text = render_chat(model.chat_template, messages, add_generation_prompt=True, bos_token=tok.bos_token,
                           eos_token=tok.eos_token)
    except ChatTemplateError as e:
        raise ApiError(400, f"the chat template refused the messages: {e}", param="messages",
                       code="chat_template_error") from None
    ids = tok.encode_chat(text)
    max_tokens = _fit(model, ids, c["max_tokens"], c["max_name"], None, "messages")
    return ParsedRequest("chat", CHAT, ids, max_tokens, c["params"], c["stops"], c["stream"], c["include_usage"])


async def read_json(request, max_body: int) -> dict:
    """The request body as a JSON object, at most ``max_body`` bytes (Content-Length and actual size)."""
    from starlette.requests import ClientDisconnect

    too_big = ApiError(413, f"the request body is larger than {max_body} bytes", param=None,
                       code="request_too_large")
    cl = request.headers.get("content-length")
    if cl is not None:
        try:
            declared = int(cl)
        except ValueError:
            raise ApiError(400, "the Content-Length header is not a number", code="invalid_request") from None
        if declared > max_body:
            raise too_big
    size, chunks = 0, []
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise too_big
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected while sending the request", code="client_disconnected") \
            from None
    raw = b"".join(chunks)
    if not raw.strip():
        raise ApiError(400, "the request body is empty; send a JSON object", code="invalid_json")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


# --- responses ---------------------------------------------------------------------------------------


class _Formatter:
    """OpenAI response objects for one request."""

    def __init__(self, req: ParsedRequest, model_name: str):
        self.req, self.model = req, model_name
        self.chat = req.kind == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    @staticmethod
    def usage(end: JobEnd) -> dict:
        return {"prompt_tokens": end.prompt_tokens, "completion_tokens": end.completion_tokens,
                "total_tokens": end.prompt_tokens + end.completion_tokens}

    def whole(self, text: str, end: JobEnd) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": end.finish_reason}
            d = self._base("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": end.finish_reason}
            d = self._base("text_completion")
        d.update(choices=[choice], usage=self.usage(end))
        return d

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False) -> dict:
        if self.chat:
            delta = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            d = self._base("chat.completion.chunk")
            d["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        else:
            d = self._base("text_completion")
            d["choices"] = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]
        if self.req.include_usage:
            d["usage"] = None
        return d

    def usage_chunk(self, end: JobEnd) -> dict:
        d = self._base("chat.completion.chunk" if self.chat else "text_completion")
        d.update(choices=[], usage=self.usage(end))
        return d


async def _watch_disconnect(receive, on_disconnect) -> None:
    """Wait for the client to go away (the body was read already), then call ``on_disconnect``."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            on_disconnect()
            return


def _sse(obj: Any) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else _json_bytes(obj)) + b"\n\n"


class _JobResponse(_Response):
    """An ASGI response that follows a queued job: a JSON answer, or server-sent events when streaming.

    The status is sent once the engine takes the job, so a job dropped from the queue (shutdown) still gets a
    proper error status.  Whatever way the response ends (done, client gone, task cancelled), the job is
    cancelled if it is still running."""

    def __init__(self, engine: Engine, job: Job, req: ParsedRequest, fmt: _Formatter):
        super().__init__()
        self.engine, self.job, self.req, self.fmt = engine, job, req, fmt

    async def __call__(self, scope, receive, send) -> None:
        job = self.job
        watcher = asyncio.ensure_future(_watch_disconnect(receive, lambda: self.engine.cancel(job, "client")))
        try:
            if self.req.stream:
                await self._stream(send)
            else:
                await self._whole(send)
        finally:
            watcher.cancel()
            self.engine.cancel(job, "client")

    async def _whole(self, send) -> None:
        parts = []
        while True:
            kind, payload = await self.job.events.get()
            if kind == "text":
                parts.append(payload)
            elif kind == "end":
                end: JobEnd = payload
                if end.error is not None:
                    await _send_json(send, end.error.status, end.error.body(), end.error.headers)
                else:
                    await _send_json(send, 200, self.fmt.whole("".join(parts), end))
                return

    async def _stream(self, send) -> None:
        fmt = self.fmt
        kind, payload = await self.job.events.get()
        if kind == "end":  # never started (shutdown, cancelled)
            err = payload.error or _internal_error("the request ended before it started")
            await _send_json(send, err.status, err.body(), err.headers)
            return
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no")]})

        async def event(obj) -> None:
            await send({"type": "http.response.body", "body": _sse(obj), "more_body": True})

        if fmt.chat:
            await event(fmt.chunk("", role=True))
        while True:
            kind, payload = await self.job.events.get()
            if kind == "text":
                await event(fmt.chunk(payload))
            elif kind == "end":
                end: JobEnd = payload
                if end.error is not None:
                    await event(end.error.body())
                else:
                    await event(fmt.chunk(None, end.finish_reason))
                    if self.req.include_usage:
                        await event(fmt.usage_chunk(end))
                    await event(b"[DONE]")
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return


# --- the app ----------------------------------------------------------------------------------------


class _Gate:
    """Pure ASGI middleware: API key check, request counts and latencies, and a last-resort 500."""

    def __init__(self, app, metrics: Metrics, api_key: str | None):
        self.app, self.metrics = app, metrics
        self.key = api_key.encode("utf-8") if api_key else None

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    return hmac.compare_digest(token.strip(), self.key)
                return False
        return False

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else ("/v1/models" if path.startswith("/v1/models/") else "other")
        t0 = time.perf_counter()
        started = False

        async def counted_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                self.metrics.request_started(endpoint, message["status"])
            await send(message)

        try:
            if self.key is not None and path != "/health" and not self._authorized(scope):
                err = ApiError(401, "a valid API key is required: send 'Authorization: Bearer KEY'",
                               code="invalid_api_key")
                await _send_json(counted_send, 401, err.body(), {"WWW-Authenticate": "Bearer"})
                return
            await self.app(scope, receive, counted_send)
        except Exception:  # noqa: BLE001 - a request must never take the server down
            log.exception("unhandled error in %s %s", scope.get("method"), path)
            if not started:
                with contextlib.suppress(Exception):
                    err = _internal_error()
                    await _send_json(counted_send, 500, err.body())
        finally:
            self.metrics.request_done(endpoint, time.perf_counter() - t0)


def create_app(model, queue_size: int = DEFAULT_QUEUE, api_key: str | None = None, max_body: int = DEFAULT_MAX_BODY,
               model_name: str | None = None):
    """The FastAPI app serving ``model`` (a :class:`fate.runtime.engine.FateModel`).

    It starts the engine's worker thread now; the app's lifespan shutdown (or ``app.state.engine.close()``)
    stops it.  The caller keeps ownership of ``model`` and closes it after the server stopped."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    if queue_size < 0:
        raise ValueError("queue_size must be >= 0")
    if max_body <= 0:
        raise ValueError("max_body must be positive")
    if model_name is None:
        bundle = getattr(model, "bundle", None)
        model_name = Path(str(getattr(bundle, "path", "fate"))).stem or "fate"
    metrics = Metrics()
    engine = Engine(model, queue_size, metrics)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.loop = asyncio.get_running_loop()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.close)

    app = FastAPI(title="fate", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.model_name = model_name

    def error_response(e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = {404: f"no such endpoint: {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                      str(exc.detail))
        return error_response(ApiError(exc.status_code, message, code=code, headers=dict(exc.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return error_response(ApiError(400, f"invalid request: {exc.errors()}", code="invalid_request"))

    async def generate(request: Request, parse):
        arrived = time.perf_counter()
        try:
            body = await read_json(request, max_body)
            req = await asyncio.to_thread(parse, body, model)
            job = Job(req.endpoint, req.prompt_ids, req.max_tokens, req.params, req.stops,
                      asyncio.get_running_loop(), arrived=arrived)
            engine.submit(job)
        except ApiError as e:
            return error_response(e)
        except Exception as e:  # noqa: BLE001
            log.exception("request failed")
            return error_response(_internal_error(f"internal error: {type(e).__name__}: {e}"))
        return _JobResponse(engine, job, req, _Formatter(req, model_name))

    @app.post(COMPLETIONS)
    async def completions(request: Request):
        return await generate(request, parse_completion)

    @app.post(CHAT)
    async def chat_completions(request: Request):
        return await generate(request, parse_chat)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "fate"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        if name != model_name:
            return error_response(ApiError(404, f"the model {name!r} does not exist; this server has "
                                                f"{model_name!r}", param="model", code="model_not_found"))
        return model_card()

    @app.get("/health")
    async def health():
        if engine.closing:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return {"status": "ok", "model": model_name, "queue_depth": engine.queue_depth(), "busy": engine.busy()}

    @app.get("/metrics")
    async def metrics_endpoint():
        return _Response(metrics.render(engine, model_name), media_type="text/plain; version=0.0.4; charset=utf-8")

    app.add_middleware(_Gate, metrics=metrics, api_key=api_key)
    return app


# --- the command ------------------------------------------------------------------------------------


def _make_server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server; a SIGINT/SIGTERM also cancels the generation in flight and the queue, and is
        not re-raised after the graceful shutdown (the command then closes the model and exits 0)."""

        engine: Engine | None = None

        def handle_exit(self, sig, frame) -> None:
            engine, loop = self.engine, (self.engine.loop if self.engine else None)
            if engine is not None and loop is not None:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(engine.shutdown)  # not from the signal handler: it takes locks
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in previous.items():
                    signal.signal(s, h)

    return Server


def _bind(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    if not infos:
        raise OSError(f"cannot resolve {host!r}")
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("bundle", required=False, type=click.Path(path_type=str))
@click.option("--demo", is_flag=True, help="Serve the tiny demo bundle shipped with fate.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port to listen on (0: any free port).")
@click.option("--queue", "queue_size", type=click.IntRange(min=0), default=DEFAULT_QUEUE, show_default=True,
              help="Requests that may wait for the engine; more get 503 with Retry-After.")
@click.option("--max-body", default="1MiB", show_default=True, help="Largest request body (e.g. 64KiB, 1MiB).")
@click.option("--api-key", envvar="FATE_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every endpoint but /health [env: FATE_API_KEY].")
@click.option("--model-name", default=None, help="Model id shown by /v1/models [default: the bundle's file name].")
@click.option("-c", "--ctx-size", "ctx", type=int, default=None, help="Context size in tokens [default: min(4096, model's)].")
@click.option("-t", "--threads", type=int, default=None, help="CPU threads.")
@click.option("--experts", "precision", default="q4", show_default=True,
              help="Stored expert precision to compute with: f16, q4 or q2.")
@click.option("--device", default=None, help="cpu or cuda [default: cuda when available].")
@click.option("--compute-dtype", default=None, help="fp32, fp16 or bf16 [default: fp32 on cpu, fp16 on cuda].")
@click.option("--no-verify", is_flag=True, help="Skip crc32 checks of expert blobs (faster first use).")
@click.option("--mem", default=None, help="Device memory budget for the whole model: 6GiB, 512MiB, or P% "
              "(resident weights + KV + P% of all experts). Default: everything resident.")
@click.option("--policy", type=click.Choice(["fate", "ondemand", "lru", "resident"]), default="fate", show_default=True,
              help="Expert offloading policy.")
@click.option("--evict", type=click.Choice(["arc", "lru", "lfu"]), default="arc", show_default=True,
              help="Cache eviction policy per layer.")
@click.option("--cache-alloc", type=click.Choice(["auto", "recall", "shallow4", "even"]), default="auto",
              show_default=True, help="How expert slots are spread over layers.")
@click.option("--prefetch-extra", type=int, default=None,
              help="Extra prefetch candidates beyond top-k [default: from the timing profile].")
@click.option("--int2-share", type=float, default=0.3, show_default=True,
              help="Prefill: least popular experts covering at most this share of assignments run as INT2.")
@click.option("--link", default=None, help="Emulate a host-to-device link: 12GB/s, pcie4, ratio:R, ...")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True, help="Server log level.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def main(bundle, demo, host, port, queue_size, max_body, api_key, model_name, ctx, threads, precision, device,
         compute_dtype, no_verify, mem, policy, evict, cache_alloc, prefetch_extra, int2_share, link, log_level,
         debug):
    """Serve a fate BUNDLE over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions).

    \b
    Examples:
      fate-serve model.gguf --port 8080
      fate-serve model.gguf --mem 4GiB --api-key secret --queue 32
      curl localhost:8080/v1/completions -d '{"prompt": "The module", "max_tokens": 32}'
    """
    with user_errors(debug):
        _serve(bundle, demo, host, port, queue_size, max_body, api_key, model_name, log_level,
               dict(context=ctx, threads=threads, experts=precision, device=device, compute_dtype=compute_dtype,
                    verify=not no_verify, mem=mem, policy=policy, evict=evict, cache_alloc=cache_alloc,
                    prefetch_extra=prefetch_extra, int2_share=int2_share, link=link))
    sys.exit(0)


def _serve(bundle, demo, host, port, queue_size, max_body, api_key, model_name, log_level, options) -> None:
    import uvicorn

    import fate
    from fate.runtime.engine import RuntimeUserError

    if demo:
        from fate.runtime.cli import demo_path

        if bundle:
            raise RuntimeUserError("give either a BUNDLE or --demo, not both")
        bundle = str(demo_path())
    if not bundle:
        raise RuntimeUserError("no bundle given: fate-serve BUNDLE (or --demo); see fate-serve --help")
    try:
        max_body_bytes = parse_size(max_body)
    except ValueError as e:
        raise RuntimeUserError(f"--max-body: {e}") from None
    if max_body_bytes <= 0:
        raise RuntimeUserError("--max-body must be positive")
    if api_key is not None and not api_key.strip():
        raise RuntimeUserError("the API key (--api-key or FATE_API_KEY) is empty")
    sock = _bind(host, port)  # before the (slow) load: a busy port fails at once
    model = None
    try:
        model = fate.load(bundle, **options)
        app = create_app(model, queue_size=queue_size, api_key=api_key, max_body=max_body_bytes,
                         model_name=model_name)
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=10, lifespan="on")
        server = _make_server_class()(config)
        server.engine = app.state.engine
        bound = sock.getsockname()
        shown = f"[{bound[0]}]" if sock.family == socket.AF_INET6 else bound[0]
        click.echo(f"fate-serve: {Path(bundle).name} on http://{shown}:{bound[1]}/v1 (queue {queue_size}"
                   f"{', API key required' if api_key else ''}); Ctrl-C stops", err=True)
        server.run(sockets=[sock])
    finally:
        sock.close()
        if model is not None:
            model.close()


if __name__ == "__main__":
    main()
