"""The ASGI middleware in front of every endpoint: the API key check (``Authorization: Bearer KEY``; never on
/health), request counts and latencies for /metrics, and a last-resort 500 so no request can take the
server down."""

from __future__ import annotations

import contextlib
import hmac
import logging
import time

from fate.errors import ApiError
from fate.serve.metrics import Metrics
from fate.serve.protocol import ENDPOINTS, internal_error, send_json

log = logging.getLogger("fate.serve")

class Gate:
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
                await send_json(counted_send, 401, err.body(), {"WWW-Authenticate": "Bearer"})
                return
            await self.app(scope, receive, counted_send)
        except Exception:  # noqa: BLE001 - a request must never take the server down
            log.exception("unhandled error in %s %s", scope.get("method"), path)
            if not started:
                with contextlib.suppress(Exception):
                    err = internal_error()
                    await send_json(counted_send, 500, err.body())
        finally:
            self.metrics.request_done(endpoint, time.perf_counter() - t0)
