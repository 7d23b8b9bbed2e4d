"""The engine side of fate-serve: one worker thread owns the model and runs one request at a time from a
bounded FIFO queue; every request carries a cancel flag the worker checks between tokens."""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from fate.errors import ApiError, RequestError
from fate.serve.metrics import Metrics
from fate.serve.protocol import DEFAULT_QUEUE, internal_error

log = logging.getLogger("fate.serve")

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


class StopMatcher:
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
                self._finish(job, JobEnd("error", len(job.prompt_ids), 0, internal_error(
                    f"generation failed: {type(e).__name__}: {e}")))
            finally:
                with self._cv:
                    self._current = None

    def _run_job(self, job: Job) -> None:
        model = self.model
        started = time.perf_counter()
        wait = started - job.queued
        if job.cancelled:
            self._finish(job, JobEnd("cancelled", len(job.prompt_ids), 0, _cancel_error(job)))
            return
        job.emit("start")
        decoder = model.tokenizer.stream_decoder(skip_special_tokens=True)
        stop = StopMatcher(job.stops)
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
        except RequestError as e:  # the prompt and its tokens no longer fit the context, ...
            reason, error = "error", ApiError(400, str(e), code="invalid_request")
        except Exception as e:  # noqa: BLE001
            log.exception("generation failed")
            reason, error = "error", internal_error(f"generation failed: {type(e).__name__}: {e}")
        finally:
            gen.close()
        if reason == "cancelled":
            error = _cancel_error(job)
        stats = model.last_stats if model.last_stats is not before else None
        self._finish(job, JobEnd(reason, len(job.prompt_ids), n, error), ran=True, queue_wait=wait,
                     stats=stats.to_dict() if stats is not None else None, seconds=time.perf_counter() - started)


def _cancel_error(job: Job) -> ApiError:
    if job.cancel_reason == "shutdown":
        return ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
    return ApiError(499, "the request was cancelled: the client went away", code="cancelled")
