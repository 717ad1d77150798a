"""One process, one event loop: the engine's worker thread, uvicorn for REST and grpc.aio for gRPC.

SIGTERM / SIGINT drain: readiness and gRPC health go NOT_SERVING at once, new requests get 503 / UNAVAILABLE,
admitted ones finish within shutdown_grace_s, then the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
from dataclasses import dataclass, field
from typing import Iterator

import uvicorn

from service.engine import Engine
from service.grpc import build_server, set_serving
from service.http_limits import guarded_protocol
from service.rest import build_asgi
from service.settings import ServiceSettings

log = logging.getLogger("monosemantic.serve")


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handlers: the Server below owns shutdown for both protocols."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class Server:
    settings: ServiceSettings
    engine: Engine = field(init=False)
    http_port: int = 0
    grpc_port: int = 0
    started: asyncio.Event = field(default_factory=asyncio.Event)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.engine = Engine(self.settings)

    def _reload_keys(self) -> None:
        self._key_reload = asyncio.ensure_future(self.engine.keys.reload())  # kept: a task nobody holds may vanish

    def request_stop(self) -> None:
        self.engine.begin_drain()
        self._stop.set()

    async def serve(self, install_signal_handlers: bool = True) -> None:
        s = self.settings
        tls = s.tls_pair()  # before the model loads: a wrong file stops startup at once
        await asyncio.to_thread(self.engine.load)
        # Everything loaded so far lives as long as the process: move it out of the collector's way, so full
        # collections under load scan only per-request garbage (shorter pauses, a tighter p99).
        gc.collect()
        gc.freeze()
        self.engine.start()
        config = uvicorn.Config(
            build_asgi(self.engine), host=s.host, port=s.http_port, log_level="warning", lifespan="off",
            timeout_graceful_shutdown=int(s.shutdown_grace_s) or 1, limit_concurrency=None,
            http=guarded_protocol(s.http_read_timeout_s, s.max_connections), timeout_keep_alive=s.http_keepalive_timeout_s,
            ssl_certfile=s.tls_cert_file, ssl_keyfile=s.tls_key_file,
        )
        http = _Uvicorn(config)
        try:
            # Ours to bind: uvicorn logs a failed bind and raises SystemExit inside its task, which asyncio lets
            # out of the loop before the gRPC server could be stopped or a clear message given.
            http_socket = _bind_http(s.host, s.http_port)
            grpc_server, health_servicer, self.grpc_port = build_server(self.engine, f"{s.host}:{s.grpc_port}", s.max_body_bytes, tls)
        except OSError:
            self.engine.stop()
            raise
        await grpc_server.start()
        http_task = asyncio.create_task(http.serve(sockets=[http_socket]))
        while not http.started:
            if http_task.done():
                await grpc_server.stop(0)
                self.engine.stop()
                await http_task
                raise OSError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        self.http_port = http.servers[0].sockets[0].getsockname()[1]
        await set_serving(health_servicer, True)
        keys_task = asyncio.create_task(self.engine.keys.watch())
        if install_signal_handlers:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
            loop.add_signal_handler(signal.SIGHUP, self._reload_keys)
        loaded = self.engine.repository
        log.info("monosemantic serving %s (default %s): HTTP on %s:%d, gRPC on %s:%d, readout in %s", loaded.refs(), loaded.default.ref,
                 s.host, self.http_port, s.host, self.grpc_port, ", ".join(sorted({str(d.encoder.dtype).removeprefix("torch.") for d in loaded})))
        self.started.set()

        await self._stop.wait()
        keys_task.cancel()
        self.engine.begin_drain()
        await set_serving(health_servicer, False)
        http.should_exit = True
        await asyncio.gather(grpc_server.stop(s.shutdown_grace_s), http_task)
        self.engine.stop()


def _bind_http(host: str, port: int) -> socket.socket:
    """The HTTP listening socket, bound as uvicorn binds it (SO_REUSEADDR: a port in TIME_WAIT, never one another
    process listens on); a port in use stops startup with a message naming it and its setting."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise OSError(f"cannot bind the HTTP port {host}:{port}: {exc.strerror or exc} (setting MONOSEMANTIC_HOST)") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot bind the HTTP port {host}:{port}: {exc.strerror or exc}; another process may be serving there (setting MONOSEMANTIC_HTTP_PORT)") from None
    sock.set_inheritable(True)
    return sock
