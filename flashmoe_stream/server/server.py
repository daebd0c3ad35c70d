"""A running server: the engine, its scheduler thread and uvicorn, owned together and closed together."""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
from pathlib import Path

import uvicorn

from ..engine import Engine, SamplingParams, Scheduler
from ..errors import FlashMoeError
from .app import Defaults, create_app

log = logging.getLogger(__name__)


def _bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise FlashMoeError(f"--host {host}: cannot resolve it ({e.strerror}); give an address like 127.0.0.1") \
            from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        what = "is in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
        raise FlashMoeError(f"{host}:{port} {what}: pick another --port or --host") from None
    sock.set_inheritable(True)
    return sock


class Server:
    """``Server(model, ...)`` opens the model and binds the socket; ``run()`` serves until Ctrl-C (CLI),
    ``start()`` serves from a background thread (tests, benchmarks) until ``close()``.

    The engine runs with exact float activations (``llama_numerics=False``): llama.cpp's activation
    rounding turns the last-bit differences between a matmul over one row and over several into
    visible logit changes, which would let a neighbour in the batch flip a greedy choice.
    """

    def __init__(self, model: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8080, n_slots: int = 2,
                 n_ctx: int = 4096, n_predict: int = 512, max_queue: int = 16, n_batch: int = 512,
                 api_key: str | None = None, alias: str | None = None, sampling: SamplingParams = SamplingParams(),
                 device: str = "cpu",
                 vram_cache=None, ram_cache=None, policy: str = "lfru", prefetch: bool = True, io_threads: int = 8,
                 log_level: str = "warning"):
        if n_predict < 0:
            raise FlashMoeError(f"-n {n_predict}: give 0 or more tokens")
        self.sock = _bind(host, port)
        self.engine = self.scheduler = self._uvicorn = self._thread = None
        try:
            self.engine = Engine.open(model, device=device, vram_cache=vram_cache, ram_cache=ram_cache, policy=policy,
                                      prefetch=prefetch, n_ctx=n_ctx, threads=io_threads, llama_numerics=False)
            self.scheduler = Scheduler(self.engine.model, self.engine.tokenizer, n_slots=n_slots, n_ctx=n_ctx,
                                       max_queue=max_queue, n_batch=n_batch)
            model_id = alias or _model_id(model)
            self.app = create_app(self.scheduler, self.engine.tokenizer, self.engine.metadata, model_id,
                                  cache_stats=self.engine.cache.stats,
                                  defaults=Defaults(max_tokens=n_predict, sampling=sampling), api_key=api_key)
        except BaseException:
            self.close()
            raise
        self.model_id = model_id
        addr = self.sock.getsockname()
        self.host, self.port = host, addr[1]
        url_host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
        self.url = f"http://{url_host}:{self.port}"
        self._uvicorn = uvicorn.Server(uvicorn.Config(self.app, log_level=log_level, timeout_graceful_shutdown=5,
                                                      access_log=log_level in ("debug", "info")))

    def run(self) -> None:
        """Serve in this thread until interrupted (uvicorn handles SIGINT/SIGTERM), then close."""
        self.scheduler.start()
        try:
            self._uvicorn.run(sockets=[self.sock])
        finally:
            self.close()

    def start(self, timeout: float = 30.0) -> "Server":
        """Serve from a background thread; returns once the server accepts connections."""
        self.scheduler.start()
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [self.sock]},
                                        name="flashmoe-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.close()
                raise FlashMoeError("the HTTP server did not start (see the log above)")
            time.sleep(0.01)
        return self

    def close(self) -> None:
        """Stop accepting, end every request (streams get an error chunk), stop the threads, free the model."""
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self.scheduler is not None:
            self.scheduler.close()  # while the event loop still runs, so the open requests hear of it
        if self._thread_alive():
            self._thread.join()
        if self.engine is not None:
            self.engine.close()
        self.sock.close()

    def _thread_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def _model_id(model: str | os.PathLike) -> str:
    p = Path(model)
    name = p.name
    for suffix in (".gguf", ".store"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name or str(p)
