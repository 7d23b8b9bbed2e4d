"""fate-serve: a real uvicorn server on a loopback port, real HTTP clients (httpx, and openai's when installed).

The model is the tiny Qwen2-MoE bundle of the session fixture (ChatML chat template).  Two engines: one with
every expert resident (fast: equality with ``generate``, errors, auth), and one offloading experts over an
emulated 2 MB/s link (about 80 ms a token: long generations to drop and a queue that fills up).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

import fate
from fate.serve import create_app
from fate.serve.worker import StopMatcher

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The quick brown fox"
SYSTEM = "You are terse."
USER = "Tell me about experts."


# --- fixtures and helpers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(converted):
    return converted["qwen2_moe"][1]


@pytest.fixture(scope="module")
def model(bundle):
    m = fate.load(bundle)
    yield m
    m.close()


SLOW = dict(mem="40%", link="1MB/s")  # offloaded experts over an emulated slow link: ~10-30 ms per token


@pytest.fixture(scope="module")
def slow_model(bundle):
    m = fate.load(bundle, **SLOW)
    assert m.offloading is not None  # really offloading
    yield m
    m.close()


@contextlib.contextmanager
def serving(model, **options):
    """Run ``create_app(model, **options)`` on a uvicorn server in a thread; yield its base URL."""
    app = create_app(model, **options)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"
        assert not app.state.engine._thread.is_alive(), "the engine thread did not stop"


def sse_events(response) -> list:
    """The JSON payloads of a server-sent event stream ("[DONE]" kept as the string)."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", line
    return out


def stream_text(events: list, chat: bool) -> tuple[str, str | None, dict | None]:
    """Concatenated text, finish reason and usage of a stream's events (which must end with [DONE])."""
    assert events and events[-1] == "[DONE]", events[-3:]
    text, finish, usage = [], None, None
    for e in events[:-1]:
        if e.get("usage"):
            usage = e["usage"]
        for c in e["choices"]:
            text.append((c["delta"].get("content") or "") if chat else c["text"])
            finish = c["finish_reason"] or finish
    return "".join(text), finish, usage


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')


def parse_metrics(text: str) -> dict:
    """Prometheus text → {(name, frozenset(labels)): value}."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a Prometheus sample: {line!r}"
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def metric(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def finish_of(stats) -> str:
    return "stop" if stats.stop_reason == "eos" else "length"


# --- same tokens as fate.load(...).generate ----------------------------------------------------------


def test_same_tokens_as_generate(model):
    greedy = model.generate(PROMPT, 12, temperature=0)
    seeded = model.generate(PROMPT, 16, temperature=0.9, top_p=0.8, seed=7)
    chat_seeded = model.generate(USER, 10, chat=True, system=SYSTEM, temperature=1.1, top_p=0.9, seed=3)
    chat_greedy = model.generate(USER, 9, chat=True, temperature=0)
    long_greedy = model.generate(PROMPT, 24, temperature=0)
    assert len(set(long_greedy.text)) > 3
    i = len(long_greedy.text) // 2
    stop = long_greedy.text[i:i + 2]
    cut = long_greedy.text[:long_greedy.text.find(stop)]

    with serving(model) as url, httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v1/completions", json={"model": "m", "prompt": PROMPT, "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        d = r.json()
        assert d["object"] == "text_completion" and d["id"].startswith("cmpl-")
        assert d["choices"][0]["text"] == greedy.text
        assert d["choices"][0]["finish_reason"] == finish_of(greedy.stats)
        assert d["usage"] == {"prompt_tokens": len(greedy.stats.prompt_token_ids),
                              "completion_tokens": len(greedy.token_ids),
                              "total_tokens": len(greedy.stats.prompt_token_ids) + len(greedy.token_ids)}

        # the same prompt as token ids
        r = c.post("/v1/completions", json={"prompt": greedy.stats.prompt_token_ids, "max_tokens": 12,
                                            "temperature": 0})
        assert r.json()["choices"][0]["text"] == greedy.text

        body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0.9, "top_p": 0.8, "seed": 7, "stream": True,
                "stream_options": {"include_usage": True}}
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            text, finish, usage = stream_text(sse_events(r), chat=False)
        assert text == seeded.text and finish == finish_of(seeded.stats)
        assert usage["completion_tokens"] == len(seeded.token_ids)

        r = c.post("/v1/chat/completions", json={
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}],
            "max_tokens": 10, "temperature": 1.1, "top_p": 0.9, "seed": 3})
        assert r.status_code == 200, r.text
        d = r.json()
        assert d["object"] == "chat.completion" and d["choices"][0]["message"]["role"] == "assistant"
        assert d["choices"][0]["message"]["content"] == chat_seeded.text
        assert d["usage"]["prompt_tokens"] == len(chat_seeded.stats.prompt_token_ids)
        assert d["usage"]["completion_tokens"] == len(chat_seeded.token_ids)

        body = {"messages": [{"role": "user", "content": [{"type": "text", "text": USER}]}],
                "max_completion_tokens": 9, "temperature": 0, "stream": True}
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            events = sse_events(r)
        assert events[0]["object"] == "chat.completion.chunk"
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        text, finish, usage = stream_text(events, chat=True)
        assert text == chat_greedy.text and finish == finish_of(chat_greedy.stats) and usage is None

        # stop strings: the text ends before the first one, streaming or not
        r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "stop": stop})
        d = r.json()["choices"][0]
        assert d["text"] == cut and d["finish_reason"] == "stop"
        body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "stop": ["\x00never", stop], "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert stream_text(sse_events(r), chat=False)[:2] == (cut, "stop")

        r = c.get("/v1/models")
        assert r.json()["data"][0]["id"] == Path(model.bundle.path).stem

        openai = pytest.importorskip("openai")
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        out = client.completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=0)
        assert out.choices[0].text == greedy.text and out.usage.completion_tokens == len(greedy.token_ids)
        chunks = client.chat.completions.create(
            model="m", messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}],
            max_tokens=10, temperature=1.1, top_p=0.9, seed=3, stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat_seeded.text


@pytest.mark.parametrize("arch", ["gpt_oss", "deepseek_v2", "deepseek_v3", "glm4_moe", "ernie4_5_moe"])
def test_new_families_serve_what_generate_gives(converted, arch):
    """Each newer family served with its experts offloaded (--mem 50%): completions and chat completions are
    what generate gives.  Without INT2 in prefill: which experts run as INT2 depends on what the cache already
    holds at INT4, so with it two runs of one prompt may differ (README, "Offloading")."""
    m = fate.load(converted[arch][1], mem="50%", int2_share=0.0)
    assert m.offloading is not None
    try:
        greedy = m.generate(PROMPT, 10, temperature=0)
        chat = m.generate(USER, 8, chat=True, system=SYSTEM, temperature=0)
        with serving(m) as url, httpx.Client(base_url=url, timeout=30) as c:
            r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 10, "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == greedy.text
            r = c.post("/v1/chat/completions", json={"max_tokens": 8, "temperature": 0, "messages": [
                {"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == chat.text
    finally:
        m.close()


def test_stop_matcher_holds_back_prefixes():
    m = StopMatcher(["END", "xy"])
    assert m.feed("abcE") == ("abc", False)
    assert m.feed("N") == ("", False)
    assert m.feed("D and more") == ("", True)
    m = StopMatcher(["END"])
    assert m.feed("aEN") == ("a", False)
    assert m.feed("x") == ("ENx", False)
    assert m.feed("E") == ("", False) and m.flush() == "E"
    assert StopMatcher(["b", "abc"]).feed("xabc") == ("x", True)  # the earliest stop string wins


# --- the queue under load ----------------------------------------------------------------------------


def test_concurrent_clients_bounded_queue(slow_model):
    clients, per_client = 20, 3
    results, lock = [], threading.Lock()
    barrier = threading.Barrier(clients)

    def client(k: int, url: str) -> None:
        with httpx.Client(base_url=url, timeout=httpx.Timeout(60, connect=10)) as c:
            barrier.wait()
            for j in range(per_client):
                chat, stream = (k + j) % 2 == 0, (k // 2 + j) % 2 == 0
                path = "/v1/chat/completions" if chat else "/v1/completions"
                body = {"max_tokens": 3, "temperature": 0, "stream": stream}
                body.update({"messages": [{"role": "user", "content": f"client {k} asks {j}"}]} if chat
                            else {"prompt": f"client {k} asks {j}"})
                with c.stream("POST", path, json=body) as r:
                    if r.status_code == 200 and stream:
                        events = sse_events(r)
                        text, finish, _ = stream_text(events, chat)
                        rid = {e["id"] for e in events[:-1]}
                        assert len(rid) == 1
                        outcome = (path, 200, rid.pop(), finish)
                    else:
                        r.read()
                        d = r.json()
                        if r.status_code == 200:
                            outcome = (path, 200, d["id"], d["choices"][0]["finish_reason"])
                        else:
                            assert r.status_code == 503, r.text
                            assert int(r.headers["retry-after"]) >= 1
                            assert d["error"]["code"] == "queue_full" and d["error"]["type"] == "server_error"
                            outcome = (path, 503, None, None)
                with lock:
                    results.append(outcome)

    with serving(slow_model, queue_size=4) as url:
        threads = [threading.Thread(target=client, args=(k, url)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert not any(t.is_alive() for t in threads), "a client hung"
        assert len(results) == clients * per_client  # every request got one answer (errors would be missing)
        ok = [r for r in results if r[1] == 200]
        assert ok and any(r[1] == 503 for r in results)
        assert len({r[2] for r in ok}) == len(ok)  # no answer given twice
        assert all(r[3] in ("stop", "length") for r in ok)

        with httpx.Client(base_url=url, timeout=10) as c:
            assert c.get("/health").json()["status"] == "ok"
            samples = parse_metrics(c.get("/metrics").text)
        for path in ("/v1/completions", "/v1/chat/completions"):
            for status in (200, 503):
                seen = sum(1 for r in results if r[0] == path and r[1] == status)
                assert metric(samples, "fate_http_requests_total", endpoint=path, status=str(status)) == seen
            done = sum(1 for r in ok if r[0] == path)
            gens = sum(metric(samples, "fate_generations_total", endpoint=path, finish_reason=f)
                       for f in ("stop", "length", "cancelled", "error"))
            assert gens == done
            assert metric(samples, "fate_http_request_duration_seconds_count", endpoint=path) == \
                sum(1 for r in results if r[0] == path)
        assert metric(samples, "fate_queue_capacity") == 4 and metric(samples, "fate_queue_depth") == 0


# --- a client that goes away ------------------------------------------------------------------------


def first_token_seconds(c: httpx.Client) -> float:
    """Seconds until the first token of a short streamed completion (read to its end)."""
    t0, first = time.perf_counter(), None
    body = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0, "stream": True}
    with c.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and first is None:
                first = time.perf_counter() - t0
            if line == "data: [DONE]":
                assert first is not None
                return first
    raise AssertionError("the stream did not end with [DONE]")


def test_dropped_client_frees_engine(slow_model):
    long = {"prompt": PROMPT, "max_tokens": 400, "temperature": 0}  # several seconds if it ran to the end
    with serving(slow_model) as url, httpx.Client(base_url=url, timeout=30) as c:
        # a stream dropped after its first token
        with c.stream("POST", "/v1/completions", json={**long, "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break
        assert first_token_seconds(c) < 2.0

        # a non-streaming request whose client gives up
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/completions", json=long, timeout=httpx.Timeout(30, read=0.5))
        assert first_token_seconds(c) < 2.0

        samples = parse_metrics(c.get("/metrics").text)
        assert metric(samples, "fate_generations_total", endpoint="/v1/completions", finish_reason="cancelled") == 2
        assert metric(samples, "fate_generations_total", endpoint="/v1/completions", finish_reason="length") == 2
        # the dropped ones stopped early (cancelled, above): run to the end they would have made 2 x 400
        # tokens; how many they made before the server noticed depends on the machine's speed
        assert metric(samples, "fate_completion_tokens_total") < 2 * 400
        assert metric(samples, "fate_http_requests_total", endpoint="/v1/completions", status="499") == 1

        # expert statistics of the offloading engine
        # expert statistics of the offloading engine, named as in the stats schema (docs/STATS.md)
        for name in ("fate_experts_hit_rate", "fate_experts_prefetch_recall", "fate_experts_prefetch_precision"):
            assert 0.0 <= metric(samples, name) <= 1.0
        needed = metric(samples, "fate_experts_needed_total")
        assert needed > 0 and needed == sum(metric(samples, f"fate_experts_{k}_total")
                                            for k in ("hits", "late_prefetches", "misses"))
        assert metric(samples, "fate_experts_bytes_total", precision="q4") > 0
        assert metric(samples, "fate_experts_stall_seconds_total") > 0
        assert metric(samples, "fate_decode_tokens_per_s", window="all") > 0
        assert metric(samples, "fate_prefill_tokens_per_s", window="last") > 0
        assert metric(samples, "fate_decode_tokens_total") > 0 and metric(samples, "fate_prefill_seconds_total") > 0


# --- bad requests and auth ---------------------------------------------------------------------------

MAX_BODY = 8192


def _big_chunks():
    for _ in range(4):
        yield b" " * 3000
    yield b'{"prompt": "x"}'


BAD = [
    # (path, request kwargs, status, error code, param)
    ("/v1/completions", dict(content=b'{"prompt": "x",'), 400, "invalid_json", None),
    ("/v1/completions", dict(content=b"[1, 2]"), 400, "invalid_json", None),
    ("/v1/completions", dict(content=b""), 400, "invalid_json", None),
    ("/v1/completions", dict(content=b"\xff\xfe{"), 400, "invalid_json", None),
    ("/v1/completions", dict(json={"max_tokens": 2}), 400, "missing_required_parameter", "prompt"),
    ("/v1/completions", dict(json={"prompt": 5}), 400, "invalid_type", "prompt"),
    ("/v1/completions", dict(json={"prompt": "x", "temperature": "hot"}), 400, "invalid_type", "temperature"),
    ("/v1/completions", dict(json={"prompt": "x", "max_tokens": 1.5}), 400, "invalid_type", "max_tokens"),
    ("/v1/completions", dict(json={"prompt": "x", "max_tokens": True}), 400, "invalid_type", "max_tokens"),
    ("/v1/completions", dict(json={"prompt": "x", "stream": "yes"}), 400, "invalid_type", "stream"),
    ("/v1/completions", dict(json={"prompt": "x", "seed": "7"}), 400, "invalid_type", "seed"),
    ("/v1/completions", dict(json={"prompt": "x", "stop": 5}), 400, "invalid_type", "stop"),
    ("/v1/completions", dict(json={"prompt": "x", "stop": ["a", 1]}), 400, "invalid_type", "stop"),
    ("/v1/completions", dict(json={"prompt": "x", "max_tokens": 0}), 400, "invalid_value", "max_tokens"),
    ("/v1/completions", dict(json={"prompt": "x", "max_tokens": -3}), 400, "invalid_value", "max_tokens"),
    ("/v1/completions", dict(json={"prompt": "x", "max_tokens": 10**6}), 400, "context_length_exceeded",
     "max_tokens"),
    ("/v1/completions", dict(json={"prompt": [5] * 600}), 400, "context_length_exceeded", "prompt"),
    ("/v1/completions", dict(json={"prompt": [10**6]}), 400, "invalid_value", "prompt"),
    ("/v1/completions", dict(json={"prompt": "x", "temperature": -1}), 400, "invalid_value", "temperature"),
    ("/v1/completions", dict(json={"prompt": "x", "top_p": 0}), 400, "invalid_value", "top_p"),
    ("/v1/completions", dict(json={"prompt": "x", "n": 2}), 400, "unsupported_parameter", "n"),
    ("/v1/completions", dict(json={"prompt": "x", "pad": "y" * MAX_BODY}), 413, "request_too_large", None),
    ("/v1/completions", dict(content=_big_chunks), 413, "request_too_large", None),  # no Content-Length
    ("/v1/chat/completions", dict(json={"messages": [{"role": "wizard", "content": "hi"}]}), 400,
     "invalid_value", "messages[0].role"),
    ("/v1/chat/completions", dict(json={"messages": [{"role": "user", "content": "a"}, {"content": "b"}]}), 400,
     "invalid_type", "messages[1].role"),
    ("/v1/chat/completions", dict(json={"messages": "hi"}), 400, "invalid_type", "messages"),
    ("/v1/chat/completions", dict(json={"messages": []}), 400, "invalid_value", "messages"),
    ("/v1/chat/completions", dict(json={"prompt": "x"}), 400, "missing_required_parameter", "messages"),
    ("/v1/chat/completions", dict(json={"messages": [{"role": "user", "content": 3}]}), 400, "invalid_type",
     "messages[0].content"),
    ("/v1/chat/completions", dict(json={"messages": [{"role": "user", "content": "hi " * 1500}]}), 400,
     "context_length_exceeded", "messages"),
]


def test_bad_requests(model):
    with serving(model, max_body=MAX_BODY) as url, httpx.Client(base_url=url, timeout=30) as c:
        for path, kwargs, status, code, param in BAD:
            if callable(kwargs.get("content")):
                kwargs = {**kwargs, "content": kwargs["content"]()}
            r = c.post(path, **kwargs)
            assert r.status_code == status, (path, kwargs.get("json"), r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"]
            assert (err["code"], err["param"], err["type"]) == (code, param, "invalid_request_error"), err

        # a Content-Length over the limit is refused before the body is read (raw HTTP: clients won't lie)
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n{}" % (MAX_BODY + 1))
            raw = b""
            while not raw.endswith(b"}}"):
                data = s.recv(65536)
                assert data, raw
                raw += data
        assert raw.startswith(b"HTTP/1.1 413 ") and b'"request_too_large"' in raw

        for method, path, status in (("GET", "/nope", 404), ("GET", "/v1/completions", 405),
                                     ("GET", "/v1/models/other", 404)):
            r = c.request(method, path)
            assert r.status_code == status and r.json()["error"]["code"]

        # an internal error is a 500 JSON answer, and the server carries on
        def broken(*args, **kwargs):
            raise RuntimeError("boom")
            yield  # unreachable: makes this a generator, as generate_ids is

        model.generate_ids = broken
        try:
            r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
            assert "boom" in r.json()["error"]["message"]
            with c.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": True}) as r:
                events = sse_events(r)
            assert events[-1]["error"]["type"] == "server_error"
        finally:
            del model.generate_ids

        assert c.get("/health").status_code == 200
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        samples = parse_metrics(c.get("/metrics").text)
        assert metric(samples, "fate_http_requests_total", endpoint="/v1/completions", status="413") == 3
        assert metric(samples, "fate_http_requests_total", endpoint="/v1/completions", status="500") == 1
        assert metric(samples, "fate_generations_total", endpoint="/v1/completions", finish_reason="error") == 2
        assert not any(name.startswith("fate_experts_") for name, _ in samples)  # nothing offloaded


def test_api_key(model):
    key = "s3cret-key"
    with serving(model, api_key=key) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/health").status_code == 200  # never needs the key
        good = {"Authorization": f"Bearer {key}"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {key}"},
                        {"Authorization": key}):
            for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions"),
                                 ("POST", "/v1/chat/completions"), ("GET", "/nope")):
                r = c.request(method, path, headers=headers, json={"prompt": "x"})
                assert r.status_code == 401, (method, path, headers)
                assert r.json()["error"]["code"] == "invalid_api_key"
                assert r.headers["www-authenticate"] == "Bearer"
        assert c.get("/v1/models", headers=good).status_code == 200
        assert c.get("/metrics", headers=good).status_code == 200
        r = c.post("/v1/completions", headers=good, json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 200
        assert c.get("/nope", headers=good).status_code == 404
        samples = parse_metrics(c.get("/metrics", headers=good).text)
        assert metric(samples, "fate_http_requests_total", endpoint="/v1/models", status="401") == 4

        openai = pytest.importorskip("openai")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0).models.list().data[0].id

    with serving(model) as url, httpx.Client(base_url=url, timeout=30) as c:  # no key: everything open
        assert c.get("/v1/models").status_code == 200
        assert c.get("/metrics").status_code == 200


# --- the command ---------------------------------------------------------------------------------------


def test_cli_sigterm_cancels_and_exits(bundle):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fate.cli.serve", str(bundle), "--port", "0", "--queue", "2", "--log-level",
         "warning", "--mem", SLOW["mem"], "--link", SLOW["link"], "-c", "256"],
        stderr=subprocess.PIPE, text=True, env=env)
    try:
        seen = []
        for line in proc.stderr:  # the first lines: warnings, if any, then where it listens
            seen.append(line)
            m = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
            if m:
                break
        assert m, "".join(seen)
        url = f"http://127.0.0.1:{m.group(1)}"
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.get("/health").json()["status"] == "ok"
            assert c.get("/metrics").text.count("fate_context_tokens 256") == 1
            queued = {}

            def waiting_request():
                queued["r"] = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 5}, timeout=30)

            events = []
            with c.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 200, "stream": True,
                                                            "temperature": 0}) as r:
                lines = r.iter_lines()
                for line in lines:
                    if line.startswith("data: {"):
                        break
                waiter = threading.Thread(target=waiting_request)
                waiter.start()
                deadline = time.monotonic() + 10
                while "fate_queue_depth 1" not in c.get("/metrics").text:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                t0 = time.perf_counter()
                proc.send_signal(signal.SIGTERM)
                for line in lines:
                    if line.startswith("data: "):
                        events.append(json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]")
            assert time.perf_counter() - t0 < 5
            assert events and events[-1]["error"]["code"] == "shutting_down"
            waiter.join(10)
            assert queued["r"].status_code == 503 and queued["r"].json()["error"]["code"] == "shutting_down"
        assert proc.wait(20) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_user_errors(tmp_path):
    from click.testing import CliRunner

    from fate.cli.serve import main

    runner = CliRunner()
    r = runner.invoke(main, [str(tmp_path / "missing.gguf"), "--port", "0"])
    assert r.exit_code == 2 and "error:" in r.output and "Traceback" not in r.output
    r = runner.invoke(main, [str(tmp_path / "missing.gguf"), "--port", "0", "--max-body", "lots"])
    assert r.exit_code == 2 and "--max-body" in r.output
    r = runner.invoke(main, [str(tmp_path / "missing.gguf"), "--port", "0"], env={"FATE_API_KEY": " "})
    assert r.exit_code == 2 and "API key" in r.output
