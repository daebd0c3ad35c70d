"""`flashmoe bench io STORE`: random whole-expert reads at each queue depth vs raw sequential O_DIRECT reads.

Cold cache: before each queue depth the page cache of every store file is dropped
(``POSIX_FADV_DONTNEED``; O_DIRECT bypasses it anyway). The raw sequential bandwidth of the same
disk is measured in the same run with 8 MiB O_DIRECT reads of the largest file of the store, one
at a time (what ``dd bs=8M iflag=direct`` does).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import FIRST_COMPLETED, wait
from pathlib import Path

import numpy as np

from .reader import Reader
from .store import ALIGN, ExpertStore, aligned_empty

SEQ_BLOCK = 8 << 20


def _drop_cache(paths) -> None:
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class SequentialSampler:
    """Raw sequential O_DIRECT bandwidth of ``paths`` read in order as one stream, 8 MiB at a time (what
    ``dd bs=8M iflag=direct`` does to each file), in samples: each sample goes on where the last one
    stopped, so no sample re-reads what an earlier one read (until the end of the last file, when it
    wraps round to the start of the first). One file read for a few seconds is ``raw_sequential``."""

    def __init__(self, paths):
        self.paths = [Path(p) for p in paths]
        self.sizes = [p.stat().st_size for p in self.paths]
        self._file, self._pos = 0, 0
        self._buf = aligned_empty(SEQ_BLOCK)

    def sample(self, seconds: float) -> dict:
        mv = memoryview(self._buf)
        total, direct, elapsed = 0, True, 0.0
        need = min(sum(self.sizes), 64 << 20)
        t0 = time.perf_counter()
        while elapsed < seconds or total < need:
            path, size = self.paths[self._file], self.sizes[self._file]
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
            except OSError:
                fd, direct = os.open(path, os.O_RDONLY), False
            try:
                while elapsed < seconds or total < need:
                    n = os.preadv(fd, [mv], self._pos)
                    total += max(n, 0)
                    elapsed = time.perf_counter() - t0
                    if n <= 0 or self._pos + n >= size - size % ALIGN:
                        self._file, self._pos = (self._file + 1) % len(self.paths), 0  # the next file
                        break
                    self._pos += n
            finally:
                os.close(fd)
        first = self.paths[0]
        return {"file": str(first) if len(self.paths) == 1 else f"{len(self.paths)} files from {first}",
                "file_bytes": sum(self.sizes), "block_bytes": SEQ_BLOCK, "direct": direct, "bytes": total,
                "seconds": round(elapsed, 4), "gb_per_s": round(total / elapsed / 1e9, 4)}


def raw_sequential(path: Path, seconds: float) -> dict:
    """8 MiB O_DIRECT reads of ``path`` from the start (wrapping round) for about ``seconds``."""
    return SequentialSampler([path]).sample(seconds)


def _one_depth(store: ExpertStore, keys: list[tuple[int, int]], qd: int, seconds: float, rng, verify: bool) -> dict:
    max_buf = max(store.layout(layer, e).buffer_nbytes for layer, e in keys[:: max(1, len(keys) // 64)])
    max_buf = max(max_buf, max(store.layout(layer, 0).buffer_nbytes for layer in store.layers))
    lat: list[float] = []
    disk = payload = 0
    with Reader(store, threads=qd, queue_depth=qd, verify=verify) as r:
        free = [r.alloc(max_buf + ALIGN) for _ in range(qd)]
        inflight: dict = {}

        def issue() -> None:
            layer, e = keys[int(rng.integers(len(keys)))]
            buf = free.pop()
            t = time.perf_counter()
            fut = r.submit(layer, e, out=buf)
            done_at: list[float] = []
            fut.add_done_callback(lambda _f, d=done_at: d.append(time.perf_counter()))
            inflight[fut] = (buf, t, done_at, store.layout(layer, e))

        t0 = time.perf_counter()
        while free:
            issue()
        while True:
            done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
            for f in done:
                buf, t, done_at, lay = inflight.pop(f)
                f.result()
                lat.append((done_at[0] if done_at else time.perf_counter()) - t)
                disk += sum(rg.length for rg in lay.ranges)
                payload += lay.nbytes
                free.append(buf)
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds and len(lat) >= qd:
                break
            while free:
                issue()
        for f in list(inflight):
            f.result()
        elapsed = time.perf_counter() - t0  # count the stragglers' time, not their bytes: conservative
    ms = np.array(lat) * 1e3
    return {"queue_depth": qd, "experts": len(lat), "bytes": disk, "seconds": round(elapsed, 4),
            "gb_per_s": round(disk / elapsed / 1e9, 4), "payload_gb_per_s": round(payload / elapsed / 1e9, 4),
            "p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def random_expert_reads(store: ExpertStore, queue_depth: int, seconds: float, rng, verify: bool = False) -> dict:
    """Random whole-expert O_DIRECT reads of ``store`` at ``queue_depth`` for about ``seconds``: ``bench io``'s
    measure at one queue depth (GB/s, p50/p99 ms)."""
    keys = [(layer, e) for layer in store.layers for e in range(store.n_expert)]
    return _one_depth(store, keys, int(queue_depth), seconds, rng, verify)


def bench_io(store_path: str | os.PathLike, queue_depths=(1, 2, 4, 8, 16, 32), seconds_per_depth: float = 3.0,
             cold: bool = True, verify: bool = False, seed: int = 0) -> dict:
    """Random whole-expert reads per queue depth (GB/s, p50/p99 ms) beside raw sequential O_DIRECT GB/s."""
    store = ExpertStore(store_path, verify=verify)
    keys = [(layer, e) for layer in store.layers for e in range(store.n_expert)]
    files = store.files
    biggest = max(set(files) | {store.dense_path}, key=lambda p: p.stat().st_size)
    everything = set(files) | {biggest}
    if cold:
        _drop_cache(everything)
    seq = raw_sequential(biggest, seconds_per_depth)
    rng = np.random.default_rng(seed)
    rows = []
    for qd in queue_depths:
        if cold:
            _drop_cache(everything)
        rows.append(_one_depth(store, keys, int(qd), seconds_per_depth, rng, verify))
    best = max(rows, key=lambda r: r["gb_per_s"])
    mean_expert = int(np.mean([store.layout(layer, e).nbytes for layer, e in keys]))
    return {"store": str(store.path), "kind": store.kind, "experts": len(keys), "expert_bytes_mean": mean_expert,
            "store_bytes": sum(p.stat().st_size for p in files), "cold": cold, "verify": verify,
            "raw_sequential": seq, "depths": rows, "best_queue_depth": best["queue_depth"],
            "best_gb_per_s": best["gb_per_s"], "ratio_to_sequential": round(best["gb_per_s"] / seq["gb_per_s"], 4)}


# ---------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", type=Path, metavar="STORE", help="an expert store directory or a GGUF")
    p.add_argument("--queue-depths", default="1,2,4,8,16,32", metavar="N,N,…",
                   help="queue depths to measure (default 1,2,4,8,16,32)")
    p.add_argument("--seconds", type=float, default=3.0, help="seconds per queue depth (default 3)")
    p.add_argument("--warm", action="store_true", help="do not drop the page cache first")
    p.add_argument("--verify", action="store_true", help="check checksums as the runtime does")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    qds = tuple(int(x) for x in str(args.queue_depths).split(",") if x.strip())
    r = bench_io(args.store, qds, args.seconds, cold=not args.warm, verify=args.verify)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    s = r["raw_sequential"]
    print(f"{r['store']}: {r['experts']} experts, {r['expert_bytes_mean'] / 2**20:.2f} MiB each on average")
    print(f"raw sequential O_DIRECT 8 MiB reads: {s['gb_per_s']:.3f} GB/s")
    print(f"{'QD':>4} {'GB/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'experts':>8}")
    for d in r["depths"]:
        print(f"{d['queue_depth']:>4} {d['gb_per_s']:>8.3f} {d['p50_ms']:>8.2f} {d['p99_ms']:>8.2f} {d['experts']:>8}")
    print(f"best: QD {r['best_queue_depth']} at {r['best_gb_per_s']:.3f} GB/s = "
          f"{r['ratio_to_sequential']:.2f} x raw sequential")
    return 0
