"""``serve(options)``: bind, load the engine once, run uvicorn until SIGINT/SIGTERM, close the engine.

The socket is bound before the model loads, so a port in use is a one-line error in a second rather
than after the load; with port 0 the kernel picks a free port, and the line announcing the server
names the real one. uvicorn's own signal handling re-raises SIGTERM after its graceful shutdown, which
would kill the process before the engine's ranks are stopped; ours only asks uvicorn to exit, and the
engine is closed once uvicorn has returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

from ..errors import ShardwiseError
from .app import create_app

log = logging.getLogger("shardwise.server")

GRACEFUL_SHUTDOWN_SECONDS = 5  # then requests still streaming are cancelled, so shutdown never hangs


def serve(options: Any, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          served_model_name: str | None = None) -> None:
    """Serve ``options`` (an ``EngineOptions``) over HTTP at ``host:port`` until interrupted."""
    sock = listen_socket(host, port)
    if api_key is None and not _loopback(sock):
        log.warning("listening on %s without an API key: anyone who can reach it can use the model", host)
    try:
        from ..engine import Engine

        with _sigterm_interrupts():  # a SIGTERM while loading stops the load like Ctrl-C does
            engine = Engine(options)
        try:
            app = create_app(engine, api_key=api_key, served_model_name=served_model_name)
            run_app(app, sock, lambda url: _announce(served_model_name or engine.model_name, url))
        finally:
            engine.close()
    finally:
        sock.close()


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: any free port), or a one-line error."""
    if not 0 <= port <= 65535:
        raise ShardwiseError(f"--port must be between 0 and 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ShardwiseError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ShardwiseError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _loopback(sock: socket.socket) -> bool:
    import ipaddress

    return ipaddress.ip_address(sock.getsockname()[0]).is_loopback


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run_app(app: Any, sock: socket.socket, on_ready: Callable[[str], None] | None = None) -> None:
    """Run ``app`` on the bound ``sock`` with uvicorn until SIGINT/SIGTERM (or ``should_exit``)."""
    config = uvicorn.Config(app, log_config=None, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
                            lifespan="off", server_header=False)
    server = _Server(config)

    async def main() -> None:
        async def announce() -> None:
            while not server.started and not server.should_exit:
                await asyncio.sleep(0.02)
            if server.started and on_ready is not None:
                on_ready(url_of(sock))

        task = asyncio.ensure_future(announce())
        try:
            await server.serve(sockets=[sock])
        finally:
            task.cancel()

    asyncio.run(main())


class _Server(uvicorn.Server):
    """uvicorn's server with signal handling that stops it and nothing more (see the module docstring)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)
        captured = getattr(self, "_captured_signals", None)
        if captured:
            log.info("stopped by %s", signal.Signals(captured[-1]).name)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _announce(model: str, url: str) -> None:
    print(f"shardwise: serving {model} on {url}", flush=True)
    log.info("OpenAI-compatible API at %s/v1 (stop with Ctrl-C)", url)
