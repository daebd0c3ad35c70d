"""Dequantisation throughput per ggml type on one device (``flashmoe bench dequant``), and the quantised
matmuls against dequantise + matmul (``flashmoe bench qmatmul``)."""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np
import torch

from gguf import GGMLQuantizationType as Q

from . import SUPPORTED_TYPES, _cpu, block_size, dequantize, random_blocks
from ._formats import DECODERS


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


# Qwen3-30B-A3B's experts, as (N, K) = (out, in): gate and up 768 x 2048, down 2048 x 768; 8 used per token.
QWEN3_30B_A3B = {"gate_up": (768, 2048), "down": (2048, 768)}
QMATMUL_TYPES = (Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0, Q.Q4_0, Q.Q2_K, Q.Q3_K)


def _median_s(fn, repeat: int, min_s: float = 0.2) -> float:
    """Median seconds of one ``fn()`` call, over ``repeat`` timings of at least ``min_s`` each."""
    fn()  # warm-up
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-6)
    inner = max(1, int(min_s / once))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def _torch_dequant_bmm(x: torch.Tensor, raws: list, qtype, shape) -> torch.Tensor:
    """What models/common.py did before the native kernels: torch's elementwise decoders, then bmm."""
    per_block, block_bytes = block_size(qtype)
    blocks = torch.cat(raws).reshape(-1, block_bytes)
    w = DECODERS[qtype](blocks).reshape(len(raws), *shape)
    return torch.bmm(x, w.transpose(1, 2))


def bench_qmatmul(types=QMATMUL_TYPES, rows: int = 1, n_experts: int = 8, repeat: int = 5,
                  threads: int | None = None) -> list[dict]:
    """G weights/s of one qbmm call over ``n_experts`` random experts of Qwen3-30B-A3B's shapes (T = ``rows``
    activation rows each), per type and shape: the native kernel (float activations, and llama.cpp's rounded
    ones) against dequantise + bmm with torch's decoders (the previous path) and with the native decoder."""
    rng = np.random.default_rng(0)
    if threads is not None:
        torch.set_num_threads(threads)
    out = []
    for qtype in types:
        for name, shape in QWEN3_30B_A3B.items():
            N, K = shape
            raws = [torch.from_numpy(random_blocks(qtype, N * K, 0.02, rng)) for _ in range(n_experts)]
            x = torch.randn(n_experts, rows, K)
            n_w = n_experts * N * K
            row = {"type": qtype.name, "proj": name, "shape": [N, K], "experts": n_experts, "rows": rows,
                   "mib": round(sum(r.numel() for r in raws) / 2**20, 2)}
            if _cpu.supported(qtype):
                for mode, round_acts in (("native_float", False), ("native_llama", True)):
                    t = _median_s(lambda: _cpu.qbmm_cpu(x, raws, qtype, shape, round_acts), repeat)
                    row[f"{mode}_gw_s"] = n_w / t / 1e9
                t = _median_s(lambda: torch.bmm(x, _cpu.dequantize_cpu(torch.cat(raws), qtype, n_w)
                                                .reshape(n_experts, N, K).transpose(1, 2)), repeat)
                row["native_dequant_bmm_gw_s"] = n_w / t / 1e9
            t = _median_s(lambda: _torch_dequant_bmm(x, raws, qtype, shape), max(1, repeat // 2), min_s=0.05)
            row["torch_dequant_bmm_gw_s"] = n_w / t / 1e9
            out.append(row)
    return out


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
