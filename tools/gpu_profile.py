"""Device: where one CUDA-graph decode step spends its time (a synthetic model with every expert on the GPU).

usage: python3 tools/gpu_profile.py MODEL.gguf [STEPS]

Prints the replay time per token and, from torch.profiler over the same step run eagerly (the same
kernels, launched one by one), the kernels' GPU time grouped by name, as JSON lines. The GEMVs' block
shapes are swept by tools/gpu_gemv_sweep.py.
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
