"""Device: where the host's time goes in one-token decode steps (cProfile of the model's thread).

usage: python3 tools/gpu_decode_profile.py MODEL.gguf VRAM RAM [--no-graphs] [TOKENS]

Teacher-forced varied tokens as `bench run` decodes them (with its on_route), after a prompt and two
untimed steps; prints ms per token and the functions with the most own time, as text.
"""
import cProfile
import pstats
import sys
import time

import numpy as np
import torch

import flashmoe_stream as fms

args = [a for a in sys.argv[1:] if not a.startswith("--")]
path, vram, ram = args[:3]
n = int(args[3]) if len(args) > 3 else 24
with fms.Engine.open(path, device="cuda", vram_cache=vram, ram_cache=ram, n_ctx=64,
                     graphs="--no-graphs" not in sys.argv) as eng:
    m = eng.model
    ids = np.random.default_rng(0).integers(0, 32000, 16 + n).tolist()
    kv = m.new_kv_cache(len(ids))
    routes = {}

    def on_route(layer, r, _w):
        routes.setdefault(layer, set()).update(tuple(sorted(x)) for x in r.tolist())

    m.forward(torch.tensor(ids[:8]), kv, on_route)
    for t in ids[8:11]:
        m.forward(torch.tensor([t]), kv, on_route)
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for t in ids[11: 11 + n]:
        m.forward(torch.tensor([t]), kv, on_route)
    torch.cuda.synchronize()
    prof.disable()
    dt = time.perf_counter() - t0
    print(f"{dt / n * 1e3:.2f} ms per token under cProfile ({n} tokens, graphs {m.resident is not None})")
    pstats.Stats(prof).sort_stats("tottime").print_stats(28)
