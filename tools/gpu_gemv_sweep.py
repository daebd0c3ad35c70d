"""Device: the fused GEMV kernels' block shapes, timed inside CUDA graphs on Qwen3-235B-A22B's shapes.

usage: python3 tools/gpu_gemv_sweep.py [CASE,...] [--write BEST.json]

Random weights (moderate fp16 scales), as many copies of each as keep L2 from serving the reads; one
graph replays one launch per copy, so Python's launch cost is not timed. Every block shape's output is
checked against a float64 product of the dequantised weights before it is timed. Prints one JSON line a
case: bytes per call, the copy bandwidth measured in the same run, the best shapes and the default's, on the
GGUF layout and (one-superblock-a-thread tunes) on the planar copy of the same weights (quant.to_planar, the
layout the runtime uses on GPUs). ``--write``: the best shape per case and layout as JSON, for
tools/with_tunes.py.
"""
import json
import math
import sys

import torch
from gguf import GGMLQuantizationType as Q

from flashmoe_stream import quant
from flashmoe_stream.quant import _triton

from _cuda_timing import timed  # tools/

dev = torch.device("cuda")


def graph_us(fn, calls):
    return timed(fn) * 1e6 / calls


a = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
b = torch.empty_like(a)
copy_us = graph_us(lambda a=a, b=b: b.copy_(a), 1)
copy_gb_s = 2 * (1 << 30) / copy_us / 1e3
del a, b

Q4 = [(8, 4, 2), (32, 4, 2), (1, 1, 4), (1, 1, 8), (1, 1, 16), (2, 1, 4), (2, 1, 8), (2, 1, 16), (1, 2, 16),
      (2, 2, 16), (4, 1, 4), (4, 1, 8), (4, 2, 8), (4, 2, 16), (4, 4, 16), (8, 4, 8), (8, 8, 16), (1, 1, 32),
      (2, 2, 32), (2, 4, 32), (16, 4, 4), (1, 1, 2), (2, 1, 2), (4, 1, 2), (8, 2, 2), (16, 2, 2),
      # one superblock a thread (the 4th number: superblocks of a row at once)
      (2, 1, 1, 16), (4, 2, 1, 16), (8, 4, 1, 16), (1, 1, 1, 16), (4, 1, 1, 8), (8, 2, 1, 8), (16, 4, 1, 8),
      (8, 1, 1, 4), (16, 2, 1, 4), (32, 4, 1, 4), (1, 1, 1, 32), (2, 2, 1, 32), (4, 4, 1, 32), (16, 1, 1, 2),
      (32, 2, 1, 2), (32, 1, 1, 1), (64, 2, 1, 1), (2, 1, 1, 8), (4, 1, 1, 4), (8, 1, 1, 2), (16, 1, 1, 1)]
Q6 = [(4, 1, 1), (1, 1, 1), (1, 1, 2), (1, 1, 4), (1, 1, 8), (2, 1, 2), (2, 1, 4), (2, 2, 4), (2, 2, 8),
      (4, 1, 2), (4, 2, 2), (4, 2, 4), (4, 4, 8), (8, 2, 2), (8, 4, 4), (1, 2, 8),
      (2, 1, 1, 16), (4, 2, 1, 16), (8, 4, 1, 16), (1, 1, 1, 16), (4, 1, 1, 8), (8, 2, 1, 8), (8, 1, 1, 4),
      (16, 2, 1, 4), (16, 1, 1, 2), (32, 2, 1, 2), (32, 1, 1, 1), (2, 1, 1, 8), (4, 1, 1, 4), (8, 1, 1, 2),
      (16, 1, 1, 1), (64, 2, 1, 1)]
CASES = [("q", Q.Q4_K, (8192, 4096), 1), ("k", Q.Q4_K, (512, 4096), 1), ("o", Q.Q4_K, (4096, 8192), 1),
         ("gate+up", Q.Q4_K, (1536, 4096), 16), ("down6", Q.Q6_K, (4096, 1536), 8),
         ("down4", Q.Q4_K, (4096, 1536), 8), ("v6", Q.Q6_K, (512, 4096), 1), ("head", Q.Q6_K, (151936, 4096), 1)]
args = sys.argv[1:]
write = args.pop(args.index("--write") + 1) if "--write" in args else None
args = [a for a in args if a != "--write"]
want = [w for w in args[0].split(",") if w] if args else [c[0] for c in CASES]
best = {}
print(json.dumps({"copy_gb_s": round(copy_gb_s, 1), "triton": _triton.triton.__version__}), flush=True)
for name, qt, shape, P in CASES:
    if name not in want:
        continue
    n = quant.nbytes(qt, shape)
    copies = max(2, math.ceil(300e6 / (n * P)))
    bb = quant.block_size(qt)[1]
    pool = torch.randint(0, 256, (copies * P * n,), dtype=torch.uint8, device=dev)
    blk = pool.view(-1, bb)
    for o in {Q.Q4_K: (0, 2), Q.Q6_K: (208,)}[qt]:
        blk[:, o:o + 2] = torch.full((blk.shape[0], 1), 0.01, dtype=torch.float16, device=dev).view(torch.uint8)
    offs = [torch.arange(c * P, (c + 1) * P, device=dev, dtype=torch.int64) * n for c in range(copies)]
    x = torch.randn(P, shape[1], device=dev, dtype=torch.bfloat16)
    xrows = torch.arange(P, device=dev)
    x8 = _triton.quantize_q8(x)
    # the reference: the same 8-bit activations, float64 dequantised weights, pair by pair (copy 0)
    xd = (x8[0].double().view(P, -1, 32) * x8[1].double()[:, :, None]).view(P, -1)
    ref = torch.stack([quant.dequantize(pool[p * n:(p + 1) * n], qt, shape).double() @ xd[p] for p in range(P)])
    tunes = Q4 if qt == Q.Q4_K else Q6
    # the same weights in the planar layout (quant._triton.to_planar), for the one-superblock-a-thread tunes
    planar = torch.cat([_triton.to_planar(w, qt, shape) for w in pool.view(-1, n)])
    res, res_planar = [], []
    for t in tunes:
        sbs = shape[1] // 256
        if t[2] > sbs or sbs % t[2] or len(t) > 3 and t[3] > 2 * sbs:
            continue
        for lay, src, out in ((False, pool, res), (True, planar, res_planar)):
            if lay and len(t) < 4:
                continue
            try:
                y = _triton.gemv_pairs(x, src, offs[0], xrows, qt, shape, tune=t, x8=x8, planar=lay)
                err = float((y.double() - ref).norm() / ref.norm())
                us = graph_us(lambda t=t, src=src, lay=lay: [
                    _triton.gemv_pairs(x, src, o, xrows, qt, shape, tune=t, x8=x8, planar=lay) for o in offs], copies)
            except Exception as e:  # noqa: BLE001 - a shape the compiler rejects
                print(json.dumps({"case": name, "tune": t, "planar": lay, "error": str(e)[:100]}), flush=True)
                continue
            out.append((round(us, 2), t, round(P * n / us / 1e3), f"{err:.1e}"))
    res.sort()
    res_planar.sort()
    d = _triton.config(qt.name, shape[0], shape[1], P)
    dp = _triton.config(qt.name, shape[0], shape[1], P, planar=True)
    print(json.dumps({"case": name, "type": qt.name, "MB": round(P * n / 1e6, 2), "copies": copies,
                      "best": res[:5], "default": [r for r in res if r[1] == d],
                      "best_per_layout": [next((r for r in res if len(r[1]) == k), None) for k in (3, 4)],
                      "planar_best": res_planar[:4],
                      "planar_default": [r for r in res_planar if r[1] == dp]}),
          flush=True)
    if res:
        best[f"{qt.name}:{shape[0]}:{shape[1]}:{P}"] = res[0][1]
    if res_planar:
        best[f"planar:{qt.name}:{shape[0]}:{shape[1]}:{P}"] = res_planar[0][1]
if write:
    with open(write, "w") as f:
        json.dump(best, f, indent=1)
