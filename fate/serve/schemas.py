"""Request bodies of /v1/completions and /v1/chat/completions: read, validated, turned into prompt ids and
sampling parameters — or refused with a 400 that names the field."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fate.errors import ApiError, ChatTemplateError
from fate.runtime.chat import render_chat
from starlette.requests import ClientDisconnect

from fate.serve.protocol import (CHAT, CHAT_ROLES, COMPLETIONS, DEFAULT_COMPLETION_TOKENS, MAX_STOP_STRINGS)

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
    except ValueError as e:  # RequestError
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
