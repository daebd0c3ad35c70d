"""Device: run a module or script with the fused GEMVs' block shapes from a sweep (tools/gpu_gemv_sweep.py
--write BEST.json) in place of quant._triton.config's, to measure a model with them before config changes
(keys "planar:..." for weights in the planar layout, which GPUs use unless FLASHMOE_PLANAR=0).

usage: python3 tools/with_tunes.py BEST.json -m flashmoe_stream bench run ...
       python3 tools/with_tunes.py BEST.json tools/gpu_profile.py MODEL
"""
import json
import runpy
import sys

from flashmoe_stream.quant import _triton

tunes = json.load(open(sys.argv[1]))
default = _triton.config


def config(name, N, K, P, q8=True, planar=False):
    t = tunes.get(f"{'planar:' if planar else ''}{name}:{N}:{K}:{P}") if q8 else None
    return tuple(t) if t else default(name, N, K, P, q8, planar)


_triton.config = config
if sys.argv[2] == "-m":
    sys.argv = [sys.argv[3], *sys.argv[4:]]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")
