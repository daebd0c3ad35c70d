"""Dequantisation throughput per ggml type on one device (``flashmoe bench dequant``)."""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np
import torch

from . import SUPPORTED_TYPES, block_size, dequantize, random_blocks


def _sync(device: torch.device) -> None:
    module = getattr(torch, device.type, None)
    if hasattr(module, "synchronize"):
        module.synchronize()


def bench_dequant(device: str, mib: int = 64, repeat: int = 5) -> list[dict]:
    """For each supported type: median seconds to dequantize ``mib`` MiB of random blocks to float32.

    Returns one dict per type: type, mib_in, ms, gb_per_s_in (quantised bytes read per second) and
    gb_per_s_out (float32 bytes written per second).
    """
    dev = torch.device(device)
    rng = np.random.default_rng(0)
    rows = []
    for qtype in SUPPORTED_TYPES:
        per_block, block_bytes = block_size(qtype)
        n_blocks = max(1, (mib << 20) // block_bytes // 256) * 256
        shape = (n_blocks * per_block // 256, 256)
        raw = torch.from_numpy(random_blocks(qtype, n_blocks * per_block, 0.02, rng)).to(dev)
        dequantize(raw, qtype, shape)  # warm-up: allocator, lookup tables, kernels
        times = []
        for _ in range(repeat):
            _sync(dev)
            t0 = time.perf_counter()
            out = dequantize(raw, qtype, shape)
            _sync(dev)
            times.append(time.perf_counter() - t0)
            del out
        t = statistics.median(times)
        n_in, n_out = raw.numel(), n_blocks * per_block * 4
        rows.append({"type": qtype.name, "mib_in": round(n_in / 2**20, 2), "ms": round(t * 1e3, 3),
                     "gb_per_s_in": n_in / t / 1e9, "gb_per_s_out": n_out / t / 1e9})
        del raw
    return rows


def bench_random_blocks(mib: int = 256, repeat: int = 3) -> list[dict]:
    """For each supported type: the best of ``repeat`` times to make ``mib`` MiB of ``random_blocks``.

    Runs numpy on one thread; gb_per_s counts the bytes made.
    """
    rng = np.random.default_rng(0)
    rows = []
    for qtype in SUPPORTED_TYPES:
        per_block, block_bytes = block_size(qtype)
        n = max(1, (mib << 20) // block_bytes // 256) * 256 * per_block
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            out = random_blocks(qtype, n, 0.02, rng)
            times.append(time.perf_counter() - t0)
        rows.append({"type": qtype.name, "mib_out": round(out.nbytes / 2**20, 2), "ms": round(min(times) * 1e3, 3),
                     "gb_per_s": out.nbytes / min(times) / 1e9})
    return rows


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mib", type=int, default=64, help="MiB of quantised input (or output, --random-blocks) per type")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--random-blocks", action="store_true", help="time random_blocks (CPU, numpy) instead")
    a = p.parse_args(argv)
    if a.random_blocks:
        info = {"device": "cpu (numpy, one thread)", "results": bench_random_blocks(a.mib, a.repeat)}
    else:
        info = {"device": a.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
                "results": bench_dequant(a.device, mib=a.mib, repeat=a.repeat)}
    json.dump(info, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
