"""ExpertCache: routed experts by (layer, expert) through a host (RAM) tier and a device tier, with prefetch.

Data path of one key: disk --Reader--> host tier (the read buffer; pinned when the device is cuda/xpu)
--copy--> device tier (uint8 tensors on the device; on a CPU device the "copy" is a zero-copy view of the
host bytes, so there the device tier costs no extra RAM while the host tier holds the same key).

Rules
* ``get(layer, ids)`` blocks only on keys not on the device tier; ``prefetch(layer, ids)`` never blocks.
  A key is loaded at most once at a time: a get of a key in flight waits on the same load.
* Pins: the entries a ``get()`` returns stay on the device tier until the next ``get()`` of a *different*
  layer (or ``release()``); gets of the same layer add to the pins. So a model may use what ``get`` gave it
  until it asks for the next layer. Call ``get`` from one thread (the model's); ``prefetch`` from any.
* Holds: the experts a ``prefetch(layer, ...)`` names stay on the device tier (evicted only when nothing else
  can go) until the gets of ``layer`` are over, i.e. a get of another layer follows them; those they did not
  ask for count as wasted then. Without the hold, the reads of the layer running now would evict the next
  layer's prefetched experts first (never used yet, every policy ranks them lowest).
* Budgets are bytes: the device tier counts the raw bytes of each expert, the host tier the bytes it holds
  (the aligned read buffer). Space for a copy is reserved before the copy starts, so resident + reserved
  never exceeds a budget. A prefetch that finds no room on the device (everything pinned or reserved) stops
  in the host tier; one that finds no room in the host tier passes through to the device without staying.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import BudgetError, FlashMoeError, UnsupportedError
from ..io import ExpertBlob, ExpertStore, Reader
from ..quant import planar_for, to_planar
from .policy import Key, make_policy
from .prefetch import PrefetchGate
from .tiers import Tier

log = logging.getLogger(__name__)


_COUNTERS = ("requests", "device_hits", "device_misses", "host_hits", "host_misses", "disk_bytes", "h2d_bytes",
             "prefetch_issued", "prefetch_useful", "prefetch_wasted")


@dataclass(frozen=True, eq=False)
class WeightBlock:
    """One projection of one expert, raw: ``data`` is a 1-D uint8 tensor on the cache's device."""

    data: torch.Tensor
    qtype: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    planar: bool = False  # data is in quant.to_planar's layout (what the GPU kernels read fastest)

    @property
    def nbytes(self) -> int:
        return self.data.numel()


@dataclass(frozen=True, eq=False)
class ExpertWeights(Mapping):
    """An expert's blocks on the device, by name (``w["gate"].data``, ``.qtype``, ``.shape``); not dequantised."""

    layer: int
    expert: int
    blocks: dict[str, WeightBlock]

    __eq__ = object.__eq__  # identity: comparing tensors element-wise is never what is meant
    __hash__ = object.__hash__

    def __getitem__(self, name: str) -> WeightBlock:
        return self.blocks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blocks.values())


class _Load:
    """One key on its way to the device tier; ``future`` resolves True (on the device) or False (stopped in host)."""

    __slots__ = ("demand", "future", "host_pinned", "issued", "key", "read")

    def __init__(self, key: Key, demand: bool):
        self.key = key
        self.future: Future = Future()
        self.demand = demand  # a get() waits for it: it must reach the device tier
        self.issued = False  # its disk read was submitted (or it needs none)
        self.host_pinned = False
        self.read: Future | None = None  # the Reader's future of its disk read, once submitted


def _resolve_device(device: Any) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UnsupportedError(f"device {device!r} is not a torch device ({e}): use 'cpu', 'cuda' or 'xpu'") from None
    if dev.type == "cpu":
        return dev
    mod = getattr(torch, dev.type, None)
    if mod is None or not hasattr(mod, "is_available") or not mod.is_available():
        raise UnsupportedError(f"device {device!r} is not available in this torch build or machine: use "
                               f"device='cpu' or install torch with {dev.type} support")
    if dev.index is None:
        dev = torch.device(dev.type, mod.current_device())
    return dev


def _as_tensor(data: Any) -> torch.Tensor:
    arr = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
    arr = arr.view(np.uint8).reshape(-1)
    if not arr.flags.writeable:  # bytes (a decompressed block): torch wants writable memory
        arr = arr.copy()
    return torch.from_numpy(arr)


def _host_nbytes(blob: ExpertBlob) -> int:
    """Bytes a host entry keeps alive: the read buffer (if blocks view it) plus any block that is its own copy."""
    buf = blob.buffer
    n = 0
    shared = False
    for b in blob.blocks.values():
        if isinstance(buf, np.ndarray) and isinstance(b.data, np.ndarray) and np.may_share_memory(buf, b.data):
            shared = True
        else:
            n += b.nbytes
    if shared:
        n += memoryview(buf).nbytes
    return n


class ExpertCache:
    """Experts of ``store`` ready on ``device``, within ``device_budget`` and ``host_budget`` bytes.

    ``policy``: a name from ``POLICIES``, ``"module:Class"`` or a class; each tier gets its own instance.
    ``reader``: an object with ``submit(layer, expert) -> Future[ExpertBlob]`` (default: a new
    ``io.Reader`` with ``threads`` threads, owned and closed by the cache). ``prefetch=False`` makes
    ``prefetch()`` do nothing. Use as a context manager, or call ``close()``.
    """

    def __init__(self, store: ExpertStore | str | os.PathLike, device: Any = "cpu", *, device_budget: int,
                 host_budget: int, policy: Any = "lfru", prefetch: bool = True, reader: Any = None,
                 threads: int = 4, queue_depth: int = 16):
        self.store = store if isinstance(store, ExpertStore) else ExpertStore(store)
        self.device = _resolve_device(device)
        n_used = int(self.store.config.n_expert_used)
        self._dev_nbytes = {layer: self.store.expert_nbytes(layer) for layer in self.store.layers}
        host_one = max(max(self._dev_nbytes[layer], self.store.expert_read_nbytes(layer, 0))
                       for layer in self.store.layers)
        self.min_device_budget = n_used * max(self._dev_nbytes.values())
        self.min_host_budget = n_used * host_one
        for name, budget, need in (("device_budget", device_budget, self.min_device_budget),
                                   ("host_budget", host_budget, self.min_host_budget)):
            if int(budget) < need:
                raise BudgetError(
                    f"{name} of {int(budget):,} bytes cannot hold the experts one layer uses per token "
                    f"({n_used} × {need // n_used:,} bytes): give at least {need:,} bytes")
        self._lock = threading.Condition()
        self._dev = Tier("device", device_budget, make_policy(policy), self._evicted)
        self._host = Tier("host", host_budget, make_policy(policy), self._evicted)
        self._inflight: dict[Key, _Load] = {}
        self._prefetched: set[Key] = set()  # brought in by prefetch, not requested yet
        self._pinned: set[Key] = set()
        self._pin_layer: int | None = None
        # the layer of the last get()/start(); its predictions are resolved when another layer is asked for.
        # Not _pin_layer: release() between a layer's groups clears that, and the groups are one ask
        self._asked_layer: int | None = None
        self._started: dict[Key, bool] = {}  # counted and pinned by start(), not yet taken by get(): was it a miss
        self._uses: list[Key] = []  # start()'s misses taken by get(), their use not yet told to the policy
        self._start_rank: dict[Key, int] = {}  # each key's place in the last start()'s ids
        self._stats: dict[int, dict[str, float]] = defaultdict(lambda: dict.fromkeys(_COUNTERS + ("wait_s",), 0))
        self._closed = False
        self._prefetch_on = prefetch
        self._gate = PrefetchGate()  # per layer: prefetch only where recent prefetches were used
        self._stream = self._side_stream()
        self._own_reader = reader is None
        self._reader = Reader(self.store, threads=threads, queue_depth=queue_depth,
                              device=self.device) if reader is None else reader
        self._stage = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="flashmoe-cache")
        self._issue_q: queue.SimpleQueue = queue.SimpleQueue()
        self._issuer = threading.Thread(target=self._issue_loop, name="flashmoe-prefetch", daemon=True)
        self._issuer.start()

    def _side_stream(self):
        if self.device.type == "cpu":
            return None
        try:
            return getattr(torch, self.device.type).Stream(self.device)
        except Exception:  # noqa: BLE001 - no streams on this backend: copies run on the default stream
            log.info("no side stream on %s: host->device copies run on the default stream", self.device)
            return None

    # --- the model's two calls ---------------------------------------------------------------

    def get(self, layer: int, ids: Iterable[int]) -> list[ExpertWeights]:
        """The experts ``ids`` of ``layer`` on the device, in the order asked; blocks only on what is missing."""
        ids = [int(e) for e in ids]
        uniq = list(dict.fromkeys(ids))
        self._check(layer, uniq)
        t0 = time.perf_counter()
        with self._lock:
            missed = self._account(layer, uniq)
        waited = self._wait(missed)
        with self._lock:
            if waited:
                self._stats[layer]["wait_s"] += time.perf_counter() - t0
            return [self._dev.value((layer, e)) for e in ids]

    def start(self, layer: int, ids: Iterable[int]) -> list[int]:
        """get() in two halves, the first now: ``ids`` are pinned and counted as get() counts them, the reads
        of those not on the device begin, and those are returned; never blocks on I/O. The get() of each that
        follows (same layer, before any other layer's) only waits for its own read, so a caller that takes
        the experts one at a time, the resident ones first, computes with each while the rest are read."""
        uniq = list(dict.fromkeys(int(e) for e in ids))
        self._check(layer, uniq)
        with self._lock:
            missed = self._account(layer, uniq)
            to_read = self._loads(missed)
            self._start_rank = {(layer, e): i for i, e in enumerate(uniq)}
            self._started.update({(layer, e): False for e in uniq})
            self._started.update({key: True for key in missed})
        for load in to_read:
            self._submit_read(load)
        return [e for _, e in missed]

    def _account(self, layer: int, uniq: list[int]) -> list[Key]:
        """Under the lock: pin ``uniq`` and count the requests, hits and misses (the keys started() already
        counted are not counted again); the keys still to wait for, in order."""
        if self._closed:
            raise FlashMoeError("ExpertCache is closed")
        nb = self._dev_nbytes[layer]
        if layer != self._pin_layer:
            self._release_locked()
            self._pin_layer = layer
        if layer != self._asked_layer:
            if self._asked_layer is not None:
                self._resolve(self._asked_layer)
            self._asked_layer = layer
        new = [(layer, e) for e in uniq if (layer, e) not in self._pinned]
        if (len(self._pinned) + len(new)) * nb > self._dev.budget:
            raise BudgetError(
                f"layer {layer} needs {len(self._pinned) + len(new)} experts of {nb:,} bytes on the device at "
                f"once ({(len(self._pinned) + len(new)) * nb:,} bytes) but device_budget is "
                f"{self._dev.budget:,} bytes: raise device_budget or ask for fewer experts per get()")
        for key in new:
            self._dev.pin(key)
            self._pinned.add(key)
        st = self._stats[layer]
        missed: list[Key] = []
        for e in uniq:
            key = (layer, e)
            if key in self._started:  # counted by start(); a miss's use is counted once it has arrived
                if self._started.pop(key):
                    self._started[key] = True
                    missed.append(key)
                continue
            st["requests"] += 1
            self._dev.unhold(key)
            if key in self._prefetched:
                self._prefetched.discard(key)
                st["prefetch_useful"] += 1
                self._gate.resolved(layer, True)
            if key in self._dev:
                st["device_hits"] += 1
                self._dev.access(key)
            else:
                st["device_misses"] += 1
                missed.append(key)
        return missed

    def _loads(self, missed: list[Key]) -> list[_Load]:
        """Under the lock: the loads ``missed`` wait on (started where there is none); those to be read
        (a prefetch's read still queued is moved ahead of the other prefetches: someone waits for it now)."""
        to_read = []
        for key in missed:
            if key in self._dev:
                continue
            load = self._inflight.get(key) or self._start(key, demand=True)
            if not load.demand and load.read is not None and hasattr(self._reader, "promote"):
                self._reader.promote(load.read)
            load.demand = True
            if not load.issued:
                load.issued = True
                to_read.append(load)
        return to_read

    def _wait(self, missed: list[Key]) -> bool:
        """Wait until every key of ``missed`` is on the device (re-reading any evicted meanwhile); whether it
        had to wait."""
        waited = False
        while missed:
            with self._lock:
                if self._closed:
                    raise FlashMoeError("ExpertCache is closed")
                to_read = self._loads(missed)
                waits = [self._inflight[key] for key in missed if key not in self._dev]
                if not waits:
                    for key in missed:  # the use that caused the load
                        if self._started.pop(key, None):  # start()'s: once all its keys are in (see release)
                            self._uses.append(key)
                        else:
                            self._dev.access(key)
                    break
            for load in to_read:
                self._submit_read(load)
            for load in waits:
                load.future.result()
            waited = True
        return waited

    def prefetch(self, layer: int, ids: Iterable[int]) -> None:
        """Start loading experts ``ids`` of ``layer`` toward the device in the background; returns at once."""
        uniq = list(dict.fromkeys(int(e) for e in ids))
        self._check(layer, uniq)
        if not self._prefetch_on:
            return
        with self._lock:
            if self._closed or not self._gate.worth_it(layer):
                return
            for e in uniq:
                key = (layer, e)
                if layer != self._asked_layer:  # kept until the layer's next get (a get of it now: in use)
                    self._dev.hold(key)
                if key in self._dev or key in self._inflight:
                    continue
                load = self._start(key, demand=False)
                if key not in self._prefetched:  # else: it stopped in the host tier; now it goes on to the device
                    self._stats[layer]["prefetch_issued"] += 1
                    self._prefetched.add(key)
                if not load.issued:
                    self._issue_q.put(load)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no load is in flight (e.g. before reading stats in a benchmark); False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._inflight or self._closed, timeout)

    def ready(self, layer: int, ids: Iterable[int]) -> list[int]:
        """Those of ``ids`` that are on the device tier now: a get() of them would not wait (after start(),
        the ones whose reads are in)."""
        with self._lock:
            return [int(e) for e in ids if (layer, int(e)) in self._dev]

    def capacity(self, layer: int) -> int:
        """How many experts of ``layer`` one get() may ask for (what the device tier holds at once)."""
        return max(1, int(self._dev.budget) // self._dev_nbytes[layer])

    def count_hits(self, layer: int, n: int) -> None:
        """Count ``n`` device hits of ``layer`` served without a get() (experts the caller holds, on the device)."""
        with self._lock:
            st = self._stats[layer]
            st["requests"] += n
            st["device_hits"] += n

    def qtypes(self, layer: int) -> set:
        """The ggml types of ``layer``'s expert blocks (every expert of a layer has the same)."""
        return {b.qtype for b in self.store.layout(layer, 0).blocks}

    def release(self) -> None:
        """Unpin what get() returned (its entries may be evicted from now on)."""
        with self._lock:
            self._release_locked()
            self._pin_layer = None

    # --- the pipeline ------------------------------------------------------------------------

    def _check(self, layer: int, ids: list[int]) -> None:
        for e in ids:
            self.store.layout(layer, e)  # a StoreError naming the valid range

    def _release_locked(self) -> None:
        # the uses of the keys start() loaded, in start()'s order (whatever order their reads came in and
        # get() took them): after every load of the layer is in, as one get() of them all would have counted
        # them (so policies see what the simulator replays)
        for key in sorted(self._uses, key=lambda key: self._start_rank.get(key, 0)):
            if key in self._dev:
                self._dev.access(key)
        self._uses.clear()
        self._started.clear()
        self._start_rank.clear()
        for key in self._pinned:
            self._dev.unpin(key)
        self._pinned.clear()
        self._lock.notify_all()

    def _start(self, key: Key, demand: bool) -> _Load:
        """A new load of ``key`` (under the lock): from the host tier if there, else it needs a read."""
        load = _Load(key, demand)
        self._inflight[key] = load
        st = self._stats[key[0]]
        if key in self._host:
            st["host_hits"] += 1
            self._host.access(key)
            self._host.pin(key)
            load.host_pinned = True
            load.issued = True
            self._stage.submit(self._to_device, load, self._host.value(key))
        else:
            st["host_misses"] += 1
        return load

    def _issue_loop(self) -> None:
        while True:
            load = self._issue_q.get()
            if load is None:
                return
            with self._lock:
                if load.issued or self._closed:
                    continue
                load.issued = True
            self._submit_read(load)

    def _submit_read(self, load: _Load) -> None:
        try:  # the reads a get() waits for start before queued prefetches (this package's Reader)
            fut = self._reader.submit(*load.key, urgent=True) if load.demand and hasattr(self._reader, "promote") \
                else self._reader.submit(*load.key)
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits
            self._fail(load, e)
            return
        load.read = fut
        fut.add_done_callback(lambda f, load=load: self._after_read(load, f))

    def _after_read(self, load: _Load, fut: Future) -> None:
        try:
            self._stage.submit(self._finish_read, load, fut)
        except RuntimeError:  # the cache is closing
            self._fail(load, FlashMoeError("ExpertCache is closed"))

    def _finish_read(self, load: _Load, fut: Future) -> None:
        try:
            blob = fut.result()
        except BaseException as e:  # noqa: BLE001
            self._fail(load, e)
            return
        key = load.key
        nb = _host_nbytes(blob)
        with self._lock:
            self._stats[key[0]]["disk_bytes"] += memoryview(blob.buffer).nbytes if blob.buffer is not None \
                else blob.nbytes
            if not self._closed and key not in self._host and self._host.make_room(nb):
                self._host.insert(key, blob, nb)
                self._host.pin(key)
                load.host_pinned = True
        self._to_device(load, blob)

    def _to_device(self, load: _Load, blob: ExpertBlob) -> None:
        key = load.key
        nb = self._dev_nbytes[key[0]]
        try:
            with self._lock:
                while True:
                    if self._closed:
                        raise FlashMoeError("ExpertCache is closed")
                    if self._dev.make_room(nb):
                        self._dev.reserve(nb)
                        break
                    if not load.demand:  # no room on the device: this prefetch stops in the host tier
                        self._end(load)
                        load.future.set_result(False)
                        return
                    self._lock.wait()
            try:
                weights = self._copy(key, blob)
            except BaseException:
                with self._lock:
                    self._dev.unreserve(nb)
                    self._lock.notify_all()
                raise
            with self._lock:
                self._dev.unreserve(nb)
                self._dev.insert(key, weights, nb)
                if key in self._prefetched:  # until its layer's next get
                    self._dev.hold(key)
                if self.device.type != "cpu":
                    self._stats[key[0]]["h2d_bytes"] += nb
                self._end(load)
            load.future.set_result(True)
        except BaseException as e:  # noqa: BLE001
            self._fail(load, e)

    def _copy(self, key: Key, blob: ExpertBlob) -> ExpertWeights:
        blocks = {}
        if self.device.type == "cpu":
            for name, b in blob.blocks.items():
                blocks[name] = WeightBlock(_as_tensor(b.data), b.qtype, tuple(b.shape))
            return ExpertWeights(key[0], key[1], blocks)
        mod = getattr(torch, self.device.type)
        ctx = mod.stream(self._stream) if self._stream is not None else _nullcontext()
        with ctx:
            for name, b in blob.blocks.items():
                src = _as_tensor(b.data)
                dst = torch.empty(src.numel(), dtype=torch.uint8, device=self.device)
                dst.copy_(src, non_blocking=True)
                planar = len(b.shape) == 2 and planar_for(b.qtype, self.device)
                if planar:  # rearranged on the device, in the copy's stream
                    dst = to_planar(dst, b.qtype, tuple(b.shape))
                blocks[name] = WeightBlock(dst, b.qtype, tuple(b.shape), planar)
        if self._stream is not None:
            self._stream.record_event().synchronize()  # the host bytes may be evicted after this
        else:
            mod.synchronize(self.device)
        return ExpertWeights(key[0], key[1], blocks)

    def _end(self, load: _Load) -> None:
        """A load is over (under the lock): forget it, unpin its host entry, wake waiters."""
        # the read's future holds the blob and, through its done-callback, this load: a cycle that kept each
        # read buffer alive, past both tiers' budgets, until Python's cyclic GC ran
        load.read = None
        if load.host_pinned:
            self._host.unpin(load.key)
            load.host_pinned = False
        if self._inflight.get(load.key) is load:
            del self._inflight[load.key]
        self._maybe_wasted(load.key)
        self._lock.notify_all()

    def _fail(self, load: _Load, e: BaseException) -> None:
        with self._lock:
            self._end(load)
        if not load.future.done():
            load.future.set_exception(e)
        if not load.demand and not isinstance(e, FlashMoeError):
            log.debug("prefetch of layer %d expert %d failed: %s", *load.key, e)

    def _resolve(self, layer: int) -> None:
        """Under the lock: ``layer``'s gets are over (another layer is asked for): the predictions for them
        that they did not ask for were wasted, and stop being held on the device."""
        for key in [k for k in self._dev.held if k[0] == layer]:
            self._dev.unhold(key)
        for key in [k for k in self._prefetched if k[0] == layer]:
            self._prefetched.discard(key)
            self._stats[layer]["prefetch_wasted"] += 1
            self._gate.resolved(layer, False)

    def _evicted(self, tier: str, key: Key) -> None:
        self._maybe_wasted(key)

    def _maybe_wasted(self, key: Key) -> None:
        """A prefetched key that left the cache before anyone asked for it was wasted."""
        if key in self._prefetched and key not in self._dev and key not in self._host and key not in self._inflight:
            self._prefetched.discard(key)
            self._stats[key[0]]["prefetch_wasted"] += 1
            self._gate.resolved(key[0], False)

    # --- numbers -----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters per layer and in total, with prefetch precision/recall, plus each tier's bytes."""
        with self._lock:
            layers = {layer: dict(c) for layer, c in sorted(self._stats.items())}
            pending: dict[int, int] = defaultdict(int)
            for key in self._prefetched:
                pending[key[0]] += 1
            for layer, c in layers.items():
                c["prefetch_pending"] = pending.get(layer, 0)
            total = dict.fromkeys(_COUNTERS + ("wait_s", "prefetch_pending"), 0)
            for c in layers.values():
                for k in total:
                    total[k] += c[k]
            total["io_busy_s"] = float(getattr(self._reader, "busy_s", 0.0))  # time a disk read was running
            for c in (*layers.values(), total):
                c["prefetch_precision"] = c["prefetch_useful"] / c["prefetch_issued"] if c["prefetch_issued"] else 0.0
                c["prefetch_recall"] = c["prefetch_useful"] / c["requests"] if c["requests"] else 0.0
            tiers = {t.name: {"budget": t.budget, "resident": t.resident, "reserved": t.reserved, "peak": t.peak,
                              "entries": len(t.entries), "pinned": len(t.pins)} for t in (self._dev, self._host)}
            return {"total": total, "layers": layers, **tiers}

    def resident(self) -> dict[str, set[Key]]:
        """The keys each tier holds now."""
        with self._lock:
            return {"device": set(self._dev.entries), "host": set(self._host.entries)}

    # --- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop prefetching, cancel reads not started, wait for the rest, drop every entry."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._lock.notify_all()
        self._issue_q.put(None)
        self._issuer.join()
        if self._own_reader:
            self._reader.close()
        self._stage.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            loads = list(self._inflight.values())
        for load in loads:
            self._fail(load, FlashMoeError("ExpertCache is closed"))
        with self._lock:
            self._dev.clear()
            self._host.clear()
            self._pinned.clear()

    def __enter__(self) -> ExpertCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ExpertCache({self.store!r}, device={self.device}, device_budget={self._dev.budget}, "
                f"host_budget={self._host.budget})")


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
