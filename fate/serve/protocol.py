"""What every part of fate-serve shares: the endpoints, the defaults, and how an error or a JSON object
is sent (OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``)."""

from __future__ import annotations

import json
from typing import Any

from fate.errors import ApiError

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
ENDPOINTS = (COMPLETIONS, CHAT, "/v1/models", "/health", "/metrics")
DEFAULT_QUEUE = 16
DEFAULT_MAX_BODY = 1 << 20
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_STOP_STRINGS = 16
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


async def send_json(send, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
    body = json_bytes(obj)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def internal_error(what: str = "internal server error") -> ApiError:
    return ApiError(500, what, type="server_error", code="internal_error")
