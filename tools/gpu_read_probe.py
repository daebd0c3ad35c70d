"""Device: how fast can a kernel read weights? Pure read kernels (no arithmetic beyond a running sum) in
the GEMV kernels' access patterns, against torch's own reductions and copies, on one 512 MB buffer.

usage: python3 tools/gpu_read_probe.py
Prints one JSON line per probe: GB/s (bytes read / time; copies count bytes read + written), timed
eagerly and replayed from a CUDA graph.
"""
import json

import torch
import triton
import triton.language as tl

from _cuda_timing import timed  # tools/

dev = torch.device("cuda")


@triton.jit
def _rows(w, y, N, row_bytes, BN: tl.constexpr, SL: tl.constexpr, BW: tl.constexpr, K: tl.constexpr):
    # one 144-byte block (BW words) a thread, lanes over [rows BN, blocks SL] as the lanes GEMV kernels
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    s = tl.arange(0, SL)[None, :]
    v4 = tl.arange(0, 4)[None, None, :]
    row0 = w + rows.to(tl.int64) * row_bytes
    acc = tl.zeros([BN, SL, 4], dtype=tl.int32)
    for sb0 in range(0, K // 256, SL):
        blk = (row0[:, None] + (sb0 + s) * (4 * BW)).to(tl.pointer_type(tl.int32))[:, :, None] + v4
        for c in tl.static_range(BW // 4):
            acc += tl.load(blk + 4 * c)
    tl.store(y + rows, tl.sum(tl.sum(acc, axis=2), axis=1))


@triton.jit
def _flat(w, y, CH: tl.constexpr, STEPS: tl.constexpr):
    # contiguous: each program STEPS chunks of CH words
    p = tl.program_id(0).to(tl.int64)
    base = w.to(tl.pointer_type(tl.int32)) + p * (CH * STEPS)
    acc = tl.zeros([CH], dtype=tl.int32)
    for i in range(STEPS):
        acc += tl.load(base + i * CH + tl.arange(0, CH))
    tl.store(y + p, tl.sum(acc, axis=0))


n = 512 << 20
buf = torch.randint(0, 255, (n,), dtype=torch.uint8, device=dev)
out = torch.empty(n // 256, dtype=torch.int32, device=dev)


def report(name, fn, nbytes, graph=True):
    t = timed(fn, graph=graph)
    print(json.dumps({"probe": name, "graph": graph, "GB_s": round(nbytes / t / 1e9)}), flush=True)


dst = torch.empty_like(buf)
for g in (False, True):
    report("copy_ (read+write)", lambda: dst.copy_(buf), 2 * n, g)
    report("torch.sum int32", lambda: buf.view(torch.int32).sum(), n, g)
    report("torch.sum float32", lambda: buf.view(torch.float32).sum(), n, g)
K = 4096
row_bytes = K // 256 * 144
N = n // row_bytes
for bn, sl, warps in [(2, 16, 1), (8, 16, 4), (16, 16, 8), (4, 8, 1), (16, 8, 4), (32, 4, 4), (64, 2, 4)]:
    report(f"rows bn{bn} sl{sl} w{warps}",
           lambda: _rows[(N // bn,)](buf, out, N, row_bytes, BN=bn, SL=sl, BW=36, K=K, num_warps=warps), N * row_bytes)
for ch, steps, warps in [(512, 4, 4), (1024, 8, 4), (2048, 8, 8), (4096, 16, 8), (1024, 1, 4), (256, 16, 2)]:
    report(f"flat ch{ch} steps{steps} w{warps}",
           lambda: _flat[(n // 4 // (ch * steps),)](buf, out, CH=ch, STEPS=steps, num_warps=warps), n)
# the GEMV kernels themselves on the same bytes as one [N, 4096] Q4_K weight
from gguf import GGMLQuantizationType as Q  # noqa: E402

from flashmoe_stream.quant import _triton  # noqa: E402

x = torch.randn(1, K, device=dev)
x8 = _triton.quantize_q8(x)
offs = torch.zeros(1, dtype=torch.int64, device=dev)
xr = torch.zeros(1, dtype=torch.int64, device=dev)
for t in [(2, 1, 4), (2, 1, 8), (8, 4, 1, 16), (16, 4, 1, 8), (2, 1, 1, 16), (16, 1, 1, 2)]:
    report(f"gemv Q4_K {t}", lambda t=t: _triton.gemv_pairs(x, buf, offs, xr, Q.Q4_K, (N, K), tune=t, x8=x8),
           N * row_bytes)
