"""Device micro-benchmark of the fused GEMV kernels: Qwen3-235B-A22B expert and attention shapes."""
import json
import sys

import torch
import triton.testing as tt
from gguf import GGMLQuantizationType as Q

from flashmoe_stream import quant

dev = torch.device("cuda")
a = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
b = torch.empty_like(a)
copy_ms = tt.do_bench(lambda a=a, b=b: b.copy_(a), warmup=50, rep=300, return_mode="median")
copy_bw = 2 * (1 << 30) / copy_ms / 1e6  # GB/s, read + write
del a, b
res = {"copy_gb_s": round(copy_bw, 1), "cases": []}
SWEEP = [w for w in sys.argv[1].split(",") if w] if len(sys.argv) > 1 else []  # sweep the block shapes of cases named so
cases = [("gate+up Q4_K 16 pairs", Q.Q4_K, (1536, 4096), 16), ("down Q6_K 8 pairs", Q.Q6_K, (4096, 1536), 8),
         ("attn_q Q4_K", Q.Q4_K, (8192, 4096), 1), ("attn_o Q4_K", Q.Q4_K, (4096, 8192), 1),
         ("down Q5_K 8", Q.Q5_K, (4096, 1536), 8), ("Q8_0 8 pairs", Q.Q8_0, (1536, 4096), 8),
         ("output Q6_K", Q.Q6_K, (151936, 4096), 1)]
for name, qt, shape, P in cases:
    n = quant.nbytes(qt, shape)
    sets = []
    for r in range(4):  # rotate over 4 weight sets so L2 does not serve the reads
        ws = [torch.randint(0, 256, (n,), dtype=torch.uint8, device=dev) for _ in range(P)]
        for w in ws:  # moderate fp16 scales
            blk = w.view(-1, quant.block_size(qt)[1])
            at = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.Q8_0: (0,)}[qt]
            for o in at:
                blk[:, o:o + 2] = torch.full((blk.shape[0], 1), 0.01, dtype=torch.float16, device=dev).view(torch.uint8)
        ptrs = torch.tensor([w.data_ptr() - ws[0].data_ptr() for w in ws], dtype=torch.int64, device=dev)
        sets.append((ws, ptrs))
    x = torch.randn(P, shape[1], device=dev, dtype=torch.bfloat16)
    xrows = torch.arange(P, device=dev)
    it = iter(range(10 ** 9))

    def fused():
        ws, ptrs = sets[next(it) % 4]
        return quant.fused_gemv_pairs(x, ws[0], ptrs, xrows, qt, shape)

    def deq():
        ws, _ = sets[next(it) % 4]
        w = quant.dequantize(torch.cat(ws), qt, (P, *shape), torch.bfloat16)
        return torch.bmm(x.unsqueeze(1), w.transpose(1, 2))

    # correctness on the spot
    ws, ptrs = sets[0]
    y = quant.fused_gemv_pairs(x, ws[0], ptrs, xrows, qt, shape)
    ref = torch.stack([x[i].double() @ quant.dequantize(ws[i], qt, shape).double().T for i in range(P)])
    err = float((y.double() - ref).norm() / ref.norm())
    t_f = tt.do_bench(fused, warmup=25, rep=200, return_mode="median")
    if any(w in name for w in SWEEP):
        best = (t_f, "default")
        for bn in (8, 16, 32):
            for nw in (2, 4, 8):
                for sb in ((1, 2, 4) if qt in (Q.Q4_K, Q.Q5_K) else (1,)):
                    def tuned():
                        ws, ptrs = sets[next(it) % 4]
                        return quant.fused_gemv_pairs(x, ws[0], ptrs, xrows, qt, shape, tune=(bn, nw, sb))
                    t = tt.do_bench(tuned, warmup=10, rep=100, return_mode="median")
                    best = min(best, (t, f"BN={bn} warps={nw} SB={sb}"))
        print(f"  best {name}: {best[1]} {best[0] * 1e3:.1f} us {P * n / best[0] / 1e6:.0f} GB/s (default {t_f * 1e3:.1f} us)",
              flush=True)
    t_fl = None
    if qt in (Q.Q4_K, Q.Q5_K):  # the same kernel shape on float activations (the path before 8-bit ones)
        def floats():
            ws, ptrs = sets[next(it) % 4]
            return quant.fused_gemv_pairs(x, ws[0], ptrs, xrows, qt, shape, q8=False)
        t_fl = tt.do_bench(floats, warmup=25, rep=200, return_mode="median")
    t_d = tt.do_bench(deq, warmup=5, rep=100, return_mode="median") if n * P < 2e9 else None
    gbs = P * n / t_f / 1e6
    res["cases"].append({"case": name, "bytes": P * n, "fused_us": round(t_f * 1e3, 1), "fused_gb_s": round(gbs, 1),
                         "ratio_to_copy_bw": round(gbs / copy_bw, 3),
                         "float_acts_us": round(t_fl * 1e3, 1) if t_fl else None,
                         "dequant_bmm_us": round(t_d * 1e3, 1) if t_d else None, "rel_err": err})
json.dump(res, sys.stdout, indent=1)
print()
for c in res["cases"]:
    print(f"{c['case']:<24} {c['bytes'] / 1e6:8.1f} MB  fused {c['fused_us']:8.1f} us {c['fused_gb_s']:7.1f} GB/s "
          f"({c['ratio_to_copy_bw']:.2f} of copy)  float acts {c['float_acts_us']} us  dequant+bmm {c['dequant_bmm_us']} us  err {c['rel_err']:.1e}")
print("copy GB/s (r+w):", res["copy_gb_s"])
