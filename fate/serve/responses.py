"""OpenAI response objects, and the ASGI response that follows a queued job: one JSON answer, or
server-sent events when streaming."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from starlette.responses import Response as _Response

from fate.serve.protocol import internal_error, json_bytes, send_json
from fate.serve.schemas import ParsedRequest
from fate.serve.worker import Engine, Job, JobEnd

class Formatter:
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
    return b"data: " + (obj if isinstance(obj, bytes) else json_bytes(obj)) + b"\n\n"


class JobResponse(_Response):
    """An ASGI response that follows a queued job: a JSON answer, or server-sent events when streaming.

    The status is sent once the engine takes the job, so a job dropped from the queue (shutdown) still gets a
    proper error status.  Whatever way the response ends (done, client gone, task cancelled), the job is
    cancelled if it is still running."""

    def __init__(self, engine: Engine, job: Job, req: ParsedRequest, fmt: Formatter):
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
                    await send_json(send, end.error.status, end.error.body(), end.error.headers)
                else:
                    await send_json(send, 200, self.fmt.whole("".join(parts), end))
                return

    async def _stream(self, send) -> None:
        fmt = self.fmt
        kind, payload = await self.job.events.get()
        if kind == "end":  # never started (shutdown, cancelled)
            err = payload.error or internal_error("the request ended before it started")
            await send_json(send, err.status, err.body(), err.headers)
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
