"""Device: where one CUDA-graph decode step spends its time (a synthetic model with every expert on the GPU).

usage: python3 tools/gpu_profile.py MODEL.gguf [STEPS]

Prints the replay time per token and, from torch.profiler over the same step run eagerly (the same
kernels, launched one by one), the kernels' GPU time grouped by name, as JSON lines.
"""
import json
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import flashmoe_stream as fms

path = sys.argv[1]
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 50
with fms.Engine.open(path, device="cuda", vram_cache="100%", ram_cache="2G", n_ctx=256) as eng:
    m = eng.model
    kv = m.new_kv_cache(256)
    m.forward(torch.tensor([1, 2, 3, 4]), kv)
    for t in range(3):
        m.forward(torch.tensor([5 + t]), kv)
    g = m._graph
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ev[0].record()
    for _ in range(steps):
        g.graph.replay()
    ev[1].record()
    torch.cuda.synchronize()
    replay_ms = ev[0].elapsed_time(ev[1]) / steps
    for _ in range(3):
        g._step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            g._step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" and e.count:
            rows.append((e.device_time_total / 5, e.count / 5, e.key[:90]))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    print(json.dumps({"replay_ms_per_token": round(replay_ms, 3), "kernel_us_per_step": round(total, 1),
                      "kernels_per_step": sum(r[1] for r in rows), "layers": m.cfg.n_layer}))
    for us, n, name in rows[:40]:
        print(json.dumps({"us": round(us, 1), "n": n, "kernel": name}))
    # the fused GEMVs of layer 0's dense weights in place: 8-bit activations against float ones
    import triton.testing as tt

    from flashmoe_stream.quant import QTensor, _triton
    h = torch.randn(1, m.cfg.n_embd, device="cuda", dtype=torch.bfloat16)
    for name in ("q", "k", "v", "o"):
        w = getattr(m.attn[0], name)
        if not isinstance(w, QTensor):
            continue
        x = h if name != "o" else torch.randn(1, w.shape[1], device="cuda", dtype=torch.bfloat16)
        z, r = torch.zeros(1, dtype=torch.int64, device="cuda"), torch.zeros(1, dtype=torch.int64, device="cuda")
        t = {q8: tt.do_bench(lambda q8=q8: _triton.gemv_pairs(x, w.raw, z, r, w.qtype, w.shape, q8=q8), warmup=20,
                             rep=100, return_mode="median") * 1e3 for q8 in (True, False)}
        print(json.dumps({"dense": name, "type": w.qtype.name, "shape": w.shape, "q8_us": round(t[True], 1),
                          "float_us": round(t[False], 1)}))
