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
from fate.serve.app import create_app  # noqa: F401
