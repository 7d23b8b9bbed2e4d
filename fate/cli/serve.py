"""fate-serve: an OpenAI-compatible HTTP server for a fate bundle (the command; the server is fate.serve)."""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading
from pathlib import Path

import click
import uvicorn

import fate
from fate.cli.common import CONTEXT, engine_options, options_from, resolve_bundle, user_errors
from fate.errors import UsageError
from fate.serve.app import create_app
from fate.serve.protocol import DEFAULT_QUEUE
from fate.serve.worker import Engine
from fate.units import SizeError, parse_size

def _make_server_class():
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


@click.command(context_settings=CONTEXT)
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
@engine_options()
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True, help="Server log level.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def main(bundle, demo, host, port, queue_size, max_body, api_key, model_name, log_level, debug, **engine):
    """Serve a fate BUNDLE over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions).

    \b
    Examples:
      fate-serve model.gguf --port 8080
      fate-serve model.gguf --mem 4GiB --api-key secret --queue 32
      curl localhost:8080/v1/completions -d '{"prompt": "The module", "max_tokens": 32}'
    """
    with user_errors(debug):
        serve(resolve_bundle(bundle, demo, "fate-serve"), options_from(engine), host=host, port=port,
              queue_size=queue_size, max_body=max_body, api_key=api_key, model_name=model_name, log_level=log_level)
    sys.exit(0)


def serve(bundle: str, options, *, host, port, queue_size, max_body, api_key, model_name, log_level) -> None:
    try:
        max_body_bytes = parse_size(max_body)
    except SizeError as e:
        raise UsageError(f"--max-body: {e}") from None
    if max_body_bytes <= 0:
        raise UsageError("--max-body must be positive")
    if api_key is not None and not api_key.strip():
        raise UsageError("the API key (--api-key or FATE_API_KEY) is empty")
    sock = _bind(host, port)  # before the (slow) load: a busy port fails at once
    model = None
    try:
        model = fate.load(bundle, options)
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
