"""Reader: whole-expert reads on a thread pool, O_DIRECT into 4096-aligned (optionally pinned) buffers.

``submit(layer, expert)`` returns a ``concurrent.futures.Future`` whose result is an ``ExpertBlob``;
a failed or short read raises from ``future.result()``, never hands back zeros. At most
``queue_depth`` requests are outstanding: ``submit`` waits for a free slot (``block=False`` returns
None instead). Requests start in order, the ``urgent`` ones (someone waits for them) before the rest;
``promote(future)`` makes a queued one urgent. Files are opened with O_DIRECT; where the file system
refuses it (EINVAL on open or read, e.g. tmpfs) the file is read buffered instead and that is logged
once per Reader.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreError
from .store import ALIGN, ExpertBlob, ExpertLayout, ExpertStore, aligned_empty, short_read_error

log = logging.getLogger(__name__)

_O_DIRECT = getattr(os, "O_DIRECT", 0)
_MAX_IO = 64 << 20  # bytes per syscall (a multiple of 4096)


class _Request:
    __slots__ = ("layout", "future", "out", "taken")

    def __init__(self, layout: ExpertLayout, future: Future, out):
        self.layout, self.future, self.out = layout, future, out
        self.taken = False  # a worker has it (a promoted request is queued twice, run once)


class Reader:
    """Reads experts of ``store`` on ``threads`` threads, at most ``queue_depth`` requests outstanding.

    ``device`` ("cuda", "xpu", a torch.device, or None): where the experts will go next; for cuda/xpu
    the read buffers are pinned host memory where torch can pin (else plain aligned memory).
    """

    def __init__(self, store: ExpertStore | str | os.PathLike, threads: int = 8, queue_depth: int = 16,
                 device: Any = None, direct: bool = True, verify: bool | None = None):
        self.store = store if isinstance(store, ExpertStore) else ExpertStore(store)
        if threads < 1 or queue_depth < 1:
            raise ValueError("threads and queue_depth must be >= 1")
        self.threads, self.queue_depth = threads, queue_depth
        self.direct = direct and bool(_O_DIRECT)
        self.verify = verify
        self._pin = self._can_pin(device)
        self._fds: dict[Path, tuple[int, bool]] = {}
        self._fd_lock = threading.Lock()
        self._stale: list[int] = []
        self._warned = False
        self._slots = threading.BoundedSemaphore(queue_depth)
        self._queue: list = []  # a heap of (0 urgent / 1 not / 2 stop, order, request)
        self._queued = threading.Condition()
        self._order = itertools.count()
        self._requests: dict[Future, _Request] = {}  # outstanding (queued or running)
        self._lock = threading.Lock()
        self._closed = False
        self._active, self._busy_since, self._busy_total = 0, 0.0, 0.0  # reads running; for busy_s
        self._workers = [threading.Thread(target=self._work, name=f"flashmoe-io-{i}", daemon=True)
                         for i in range(threads)]
        for w in self._workers:
            w.start()

    # --- buffers ---------------------------------------------------------------------------

    @staticmethod
    def _can_pin(device: Any) -> bool:
        if device is None:
            return False
        kind = getattr(device, "type", str(device).split(":")[0])
        if kind not in ("cuda", "xpu"):
            return False
        try:
            import torch

            return bool(torch.cuda.is_available() if kind == "cuda" else torch.xpu.is_available())
        except Exception:  # noqa: BLE001 - no torch, no device: plain memory
            return False

    def alloc(self, nbytes: int) -> np.ndarray:
        """A 4096-aligned uint8 buffer of ``nbytes`` (pinned when the Reader was made for cuda/xpu)."""
        if self._pin:
            import torch

            base = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=True).numpy()
            off = (-base.ctypes.data) % ALIGN
            return base[off:off + nbytes]
        return aligned_empty(nbytes)

    # --- requests --------------------------------------------------------------------------

    def submit(self, layer: int, expert: int, out=None, block: bool = True, urgent: bool = False) -> Future | None:
        """Queue a read of one expert; ``out``: a 4096-aligned writable buffer to read into (else one is made).
        ``urgent``: it starts before every queued request that is not.

        Waits while ``queue_depth`` requests are outstanding, or returns None at once with ``block=False``.
        """
        if self._closed:
            raise StoreError("Reader is closed")
        lay = self.store.layout(layer, expert)
        if out is not None:
            mv = memoryview(out)
            if mv.nbytes < lay.buffer_nbytes:
                raise ValueError(f"out buffer of {mv.nbytes} bytes; this expert needs {lay.buffer_nbytes}")
            if isinstance(out, np.ndarray) and out.ctypes.data % ALIGN:
                raise ValueError("out buffer is not 4096-aligned (use Reader.alloc)")
        if not self._slots.acquire(blocking=block):
            return None
        fut: Future = Future()
        with self._lock:
            if self._closed:
                self._slots.release()
                raise StoreError("Reader is closed")
            req = self._requests[fut] = _Request(lay, fut, out)
        fut.add_done_callback(self._done)
        self._put(0 if urgent else 1, req)
        return fut

    def promote(self, future: Future) -> None:
        """Make a queued request urgent (nothing if it has started or is not this Reader's)."""
        with self._lock:
            req = self._requests.get(future)
        if req is not None and not req.taken:  # (one taken meanwhile is skipped when popped again)
            self._put(0, req)

    def _put(self, rank: int, req) -> None:
        with self._queued:
            heapq.heappush(self._queue, (rank, next(self._order), req))
            self._queued.notify()

    def read(self, layer: int, expert: int) -> ExpertBlob:
        """Submit and wait."""
        return self.submit(layer, expert).result()  # type: ignore[union-attr]

    def cancel(self, future: Future) -> bool:
        """Cancel a request not yet started (True), or report it could not be (running or done: False)."""
        return future.cancel()

    def modes(self) -> dict[Path, str]:
        """How each file opened so far is read: "direct" (O_DIRECT) or "buffered"."""
        with self._fd_lock:
            return {p: "direct" if d else "buffered" for p, (_, d) in self._fds.items()}

    @property
    def outstanding(self) -> int:
        with self._lock:
            return len(self._requests)

    @property
    def busy_s(self) -> float:
        """Seconds so far during which at least one read was running (the disk was kept busy)."""
        with self._lock:
            return self._busy_total + (time.perf_counter() - self._busy_since if self._active else 0.0)

    def _busy(self, delta: int) -> None:
        with self._lock:
            if delta > 0 and self._active == 0:
                self._busy_since = time.perf_counter()
            self._active += delta
            if delta < 0 and self._active == 0:
                self._busy_total += time.perf_counter() - self._busy_since

    def _done(self, fut: Future) -> None:
        with self._lock:
            self._requests.pop(fut, None)
        self._slots.release()

    def _next(self):
        """The next request to run (None: stop), waiting for one."""
        with self._queued:
            while True:
                while not self._queue:
                    self._queued.wait()
                _, _, req = heapq.heappop(self._queue)
                if req is None:
                    return None
                if not req.taken:
                    req.taken = True
                    return req

    def _work(self) -> None:
        while True:
            req = self._next()
            if req is None:
                return
            if not req.future.set_running_or_notify_cancel():
                continue
            self._busy(1)
            try:
                blob = self._read(req.layout, req.out)
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits
                self._busy(-1)
                req.future.set_exception(e)
            else:
                self._busy(-1)
                req.future.set_result(blob)

    # --- the reads -------------------------------------------------------------------------

    def _open(self, path: Path, direct: bool) -> tuple[int, bool]:
        with self._fd_lock:
            got = self._fds.get(path)
            if got is not None:
                return got
            fd = -1
            if direct:
                try:
                    fd = os.open(path, os.O_RDONLY | _O_DIRECT)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise self._open_error(path, e) from None
                    self._fallback(path, "open")
                    direct = False
            if fd < 0:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as e:
                    raise self._open_error(path, e) from None
            self._fds[path] = (fd, direct)
            return fd, direct

    @staticmethod
    def _open_error(path: Path, e: OSError) -> Exception:
        if e.errno == errno.ENOENT:
            return StoreError(f"{path}: missing: the store is incomplete; repack the model again")
        return e

    def _reopen_buffered(self, path: Path, fd: int) -> int:
        with self._fd_lock:
            cur = self._fds.get(path)
            if cur is not None and cur[0] == fd and cur[1]:
                self._fds[path] = (os.open(path, os.O_RDONLY), False)
                # the old O_DIRECT fd may still be in use by another thread's read: close it at close()
                self._stale.append(fd)
            return self._fds[path][0]

    def _fallback(self, path: Path, where: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("O_DIRECT refused on %s (%s): reading buffered from files there", path, where)

    def _read(self, lay: ExpertLayout, out) -> ExpertBlob:
        buf = out if out is not None else self.alloc(lay.buffer_nbytes)
        view = memoryview(buf).cast("B")
        for r in lay.ranges:
            fd, direct = self._open(r.path, self.direct)
            got = 0
            while got < r.length:
                n_ask = min(_MAX_IO, r.length - got)
                try:
                    n = os.preadv(fd, [view[r.buf_offset + got:r.buf_offset + got + n_ask]], r.offset + got)
                except OSError as e:
                    if e.errno == errno.EINVAL and direct:
                        self._fallback(r.path, "read")
                        fd, direct = self._reopen_buffered(r.path, fd), False
                        continue
                    raise
                if n == 0:
                    break
                got += n
                if direct and n % ALIGN:
                    break  # O_DIRECT stops short only at end of file
            if got < r.need:
                raise short_read_error(r.path, r.offset, got, r.need)
        return self.store.assemble(lay, buf, self.verify)

    # --- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Cancel what has not started, wait for what has, stop the threads, close the files."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = list(self._requests)
        for f in pending:
            f.cancel()
        for _ in self._workers:
            self._put(2, None)
        for w in self._workers:
            w.join()
        with self._fd_lock:
            for fd, _ in self._fds.values():
                os.close(fd)
            for fd in self._stale:
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
