"""Device: where the CUDA-graph decode step's time goes, with every kernel launched as in the graph (PDL on).

usage: python3 tools/gpu_marginal.py MODEL.gguf positions|marginal|ncu

* ``positions``: the replay's ms a token at positions 7, 40, 80, 145 and 7 again (attention reads the cache).
* ``marginal``: the replay at position 80 with one group of kernels left out (attention, RoPE, the adds and
  norms, the router, the routing, SiLU, and each GEMV: q/k/v, o, gate+up, down, the head); what the step
  loses without a group is what that group costs inside the graph, overlaps included. The outputs are garbage
  then (a q8 buffer no kernel writes holds whatever was in its memory): only the times mean something.
  Not yet run to its end: its one try (before the routing kernel clamped its index) crashed when leaving out
  attention let NaN reach the routing, whose offsets then read past their table.
* ``ncu``: one eager step between cudaProfilerStart/Stop, for
  ``ncu --profile-from-start off ... python3 tools/gpu_marginal.py MODEL ncu``.
Prints JSON lines.
"""
import contextlib
import json
import sys

import torch

import flashmoe_stream as fms
from _cuda_timing import timed as replay_seconds  # tools/
from flashmoe_stream.models import _fused as K, graph as G

path, mode = sys.argv[1], sys.argv[2]
steps = 50


def timed(g, pos: int) -> float:
    """ms a replay of g's captured step at position pos."""
    g.inp[1] = pos
    return 1e3 * replay_seconds(g.graph.replay, reps=steps, graph=False)


@contextlib.contextmanager
def without(group: str):
    """Leave one group of the step's kernels out (module attributes patched; restored after)."""
    saved = []

    def patch(mod, name, fn):
        saved.append((mod, name, getattr(mod, name)))
        setattr(mod, name, fn)

    gemv, proj = G.fused_gemv_pairs, G._proj
    if group in ("attend", "qk_rope", "silu_mul"):
        patch(K, group, lambda *a, **k: None)
    elif group == "add_norm":
        patch(K, "add_norm", lambda *a, **k: None)
    elif group == "router":
        patch(K, "router_logits", lambda h, w, out: out)
    elif group == "route":
        patch(K, "route_topk", lambda *a, **k: None)
    elif group in ("qkv", "gate_up", "down"):
        def fake(x, base, offs, xrows, qtype, shape, *a, **k):
            kind = "qkv" if k.get("early") else ("down" if x.shape[0] > 1 else "gate_up")
            if kind == group:
                return torch.empty(offs.numel(), shape[0], dtype=torch.float32, device=x.device)
            return gemv(x, base, offs, xrows, qtype, shape, *a, **k)
        patch(G, "fused_gemv_pairs", fake)
    elif group in ("o", "head"):
        def fake_proj(x, w, x8=None):
            is_head = w is model.output
            if (group == "head") == is_head:
                return torch.empty(w.shape[0], dtype=torch.float32, device=x.device)
            return proj(x, w, x8)
        patch(G, "_proj", fake_proj)
    elif group != "none":
        raise SystemExit(f"unknown group {group}")
    try:
        yield
    finally:
        for mod, name, fn in reversed(saved):
            setattr(mod, name, fn)


with fms.Engine.open(path, device="cuda", vram_cache="100%", ram_cache="2G", n_ctx=256) as eng:
    model = eng.model
    kv = model.new_kv_cache(256)
    model.forward(torch.arange(1, 150) % 1000, kv)  # 149 positions filled: attention has real data to read
    model.forward(torch.tensor([5]), kv)  # the graph is captured here
    g = model._graph
    if mode == "positions":
        print(json.dumps({f"replay_ms_at_{p}": round(timed(g, p), 4) for p in (7, 40, 80, 145, 7)}))
    elif mode == "marginal":
        base = timed(g, 80)
        print(json.dumps({"group": "none", "replay_ms": round(base, 4)}))
        for group in ("none", "head", "down", "gate_up", "o", "qkv", "silu_mul", "route", "router", "add_norm",
                      "qk_rope", "attend"):
            with without(group):
                h = G.GraphDecode(model, model.resident, kv)
                for name in ("ids", "weights", "offs"):  # a real routing, where the group left out is the routing
                    getattr(h, name).copy_(getattr(g, name))
                h.step(torch.tensor([5]), 80)
            ms = timed(h, 80)
            print(json.dumps({"group": group, "replay_ms": round(ms, 4), "saves_us": round(1000 * (base - ms), 1)}))
            del h
            torch.cuda.synchronize()
    elif mode == "ncu":
        g.inp[1] = 80
        for _ in range(2):
            g._step()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        g._step()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
    else:
        raise SystemExit(f"unknown mode {mode}")
