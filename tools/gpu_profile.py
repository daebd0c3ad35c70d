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

    # the GEMVs timed inside CUDA graphs (no Python launch cost, which the loop above includes), one launch
    # per layer on that layer's weight (so L2 does not serve them), under several block shapes
    def graph_us(fn, reps=20):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):
            fn()
        gr.replay()
        ev[0].record()
        for _ in range(reps):
            gr.replay()
        ev[1].record()
        torch.cuda.synchronize()
        return ev[0].elapsed_time(ev[1]) / reps * 1e3

    L = m.cfg.n_layer
    z, r = torch.zeros(1, dtype=torch.int64, device="cuda"), torch.zeros(1, dtype=torch.int64, device="cuda")
    kk = m.cfg.n_expert_used
    gen = torch.Generator(device="cuda").manual_seed(0)
    picks = [torch.randperm(m.cfg.n_expert, device="cuda", generator=gen)[:kk] for _ in range(L)]
    gu_offs = [g.tables[i][:2][:, picks[i]].reshape(-1).contiguous() for i in range(L)]
    d_offs = [g.tables[i][2][picks[i]].contiguous() for i in range(L)]
    xr_gu, xr_d = torch.zeros(2 * kk, dtype=torch.int64, device="cuda"), torch.arange(kk, device="cuda")
    act = torch.randn(kk, g.types["down"][1][1], device="cuda", dtype=torch.bfloat16)
    (tg, sg), (td, sd) = g.types["gate"], g.types["down"]
    q4 = [(8, 4, 2), (8, 2, 2), (8, 4, 4), (16, 4, 2), (16, 2, 2), (16, 4, 4), (32, 4, 2), (32, 8, 4), (4, 2, 2),
          (8, 8, 2), (4, 1, 2), (16, 8, 2)]
    q6 = [(8, 2, 1), (8, 4, 1), (16, 2, 1), (16, 4, 1), (16, 8, 1), (32, 4, 1), (32, 8, 1), (4, 1, 1), (4, 2, 1),
          (8, 4, 2), (16, 4, 2), (4, 2, 2), (2, 1, 1), (4, 1, 2), (8, 1, 1), (8, 1, 2), (2, 1, 2), (1, 1, 1)]
    cases = {
        "dense q": (q4, lambda t, q8: [_triton.gemv_pairs(h, m.attn[i].q.raw, z, r, m.attn[i].q.qtype,
                                                          m.attn[i].q.shape, tune=t, q8=q8) for i in range(L)],
                    m.attn[0].q.qtype.name, m.attn[0].q.raw.numel() * L),
        "gate+up": (q4, lambda t, q8: [_triton.gemv_pairs(h, g.base, gu_offs[i], xr_gu, tg, sg, tune=t, q8=q8)
                                       for i in range(L)], tg.name, 2 * kk * L * _triton.GGML_QUANT_SIZES[tg][1]
                    * sg[0] * sg[1] // _triton.GGML_QUANT_SIZES[tg][0]),
        "down": (q6, lambda t, q8: [_triton.gemv_pairs(act, g.base, d_offs[i], xr_d, td, sd, tune=t, q8=q8)
                                    for i in range(L)], td.name, kk * L * _triton.GGML_QUANT_SIZES[td][1]
                 * sd[0] * sd[1] // _triton.GGML_QUANT_SIZES[td][0]),
        "head": (q6, lambda t, q8: _triton.gemv_pairs(h, m.output.raw, z, r, m.output.qtype, m.output.shape, tune=t,
                                                      q8=q8),
                 m.output.qtype.name, m.output.raw.numel()),
    }
    for case, (tunes, fn, qt, nbytes) in cases.items():
        per = 1 if case == "head" else L
        res = []
        for q8 in ((True, False) if qt in ("Q4_K", "Q5_K", "Q6_K") else (True,)):
            for t in tunes:
                if t[2] > 1 and not q8 and qt == "Q6_K":
                    continue  # the float Q6_K kernel takes one superblock a step
                try:
                    us = graph_us(lambda t=t, q8=q8: fn(t, q8)) / per
                except Exception as e:  # noqa: BLE001 - a shape the compiler rejects
                    print(json.dumps({"case": case, "tune": t, "error": str(e)[:80]}))
                    continue
                res.append((us, t, q8))
        res.sort()
        print(json.dumps({"case": case, "type": qt, "MB_per_call": round(nbytes / per / 1e6, 1),
                          "best": [(round(u, 1), t, q8, round(nbytes / per / u / 1e3)) for u, t, q8 in res[:4]],
                          "default": [(round(u, 1), t, q8) for u, t, q8 in res if t in ((8, 4, 2), (8, 4, 4), (8, 2, 1),
                                                                                       (4, 1, 1))]}))
