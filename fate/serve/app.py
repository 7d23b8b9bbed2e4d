"""The FastAPI app: routes over the worker, the schemas and the responses."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response as _Response

from fate.errors import ApiError
from fate.serve.auth import Gate
from fate.serve.metrics import Metrics
from fate.serve.protocol import CHAT, COMPLETIONS, DEFAULT_MAX_BODY, DEFAULT_QUEUE, internal_error
from fate.serve.responses import Formatter, JobResponse
from fate.serve.schemas import parse_chat, parse_completion, read_json
from fate.serve.worker import Engine, Job

log = logging.getLogger("fate.serve")

def create_app(model, queue_size: int = DEFAULT_QUEUE, api_key: str | None = None, max_body: int = DEFAULT_MAX_BODY,
               model_name: str | None = None):
    """The FastAPI app serving ``model`` (a :class:`fate.runtime.engine.FateModel`).

    It starts the engine's worker thread now; the app's lifespan shutdown (or ``app.state.engine.close()``)
    stops it.  The caller keeps ownership of ``model`` and closes it after the server stopped."""
    if queue_size < 0:
        raise ValueError("queue_size must be >= 0")
    if max_body <= 0:
        raise ValueError("max_body must be positive")
    if model_name is None:
        model_name = Path(str(model.bundle.path)).stem or "fate"
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
            return error_response(internal_error(f"internal error: {type(e).__name__}: {e}"))
        return JobResponse(engine, job, req, Formatter(req, model_name))

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
        return _Response(metrics.render(engine.model, engine.queue_depth(), engine.queue_size, engine.busy(), model_name), media_type="text/plain; version=0.0.4; charset=utf-8")

    app.add_middleware(Gate, metrics=metrics, api_key=api_key)
    return app
