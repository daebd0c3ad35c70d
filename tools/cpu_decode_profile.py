"""CPU: where a decode step's time goes: ms per token, and the native kernels' calls grouped by shape.

usage: python3 tools/cpu_decode_profile.py MODEL [RAM_BUDGET] [TOKENS]

Opens MODEL on the CPU (default budget 100%: every expert in RAM after a warm pass), decodes TOKENS
(default 12) varied tokens one at a time after an 8-token prompt, and prints, per (type, shape, experts,
activation rows, rounding, threads) of ``quant._cpu.qbmm_cpu``, the calls and milliseconds a token, as
JSON lines. The native time against the step's time says how much is Python and torch around them.
"""
import collections
import json
import sys
import time

import numpy as np
import torch

import flashmoe_stream as fms
from flashmoe_stream.quant import _cpu

path = sys.argv[1]
ram = sys.argv[2] if len(sys.argv) > 2 else "100%"
n = int(sys.argv[3]) if len(sys.argv) > 3 else 12
stat = collections.defaultdict(lambda: [0, 0.0])
timing = [False]
native = _cpu.qbmm_cpu


def timed(x, raws, qtype, shape, round_acts=False, n_threads=None):
    t0 = time.perf_counter()
    out = native(x, raws, qtype, shape, round_acts, n_threads)
    if timing[0]:
        k = (qtype.name, tuple(shape), len(raws), x.shape[1], round_acts, _cpu._n_threads(n_threads))
        stat[k][0] += 1
        stat[k][1] += time.perf_counter() - t0
    return out


_cpu.qbmm_cpu = timed
with fms.Engine.open(path, device="cpu", ram_cache=ram, n_ctx=8 + 2 + n + 1) as eng:
    ids = np.random.default_rng(0).integers(0, min(eng.config.n_vocab, 32000), 8 + 2 + n).tolist()
    m = eng.model
    m.forward(torch.tensor(ids), m.new_kv_cache(len(ids)))  # warm: what fits the budget is then resident
    eng.cache.wait_idle()
    kv = m.new_kv_cache(len(ids))
    m.forward(torch.tensor(ids[:8]), kv)
    for t in ids[8:10]:
        m.forward(torch.tensor([t]), kv)
    timing[0] = True
    t0 = time.perf_counter()
    for t in ids[10:]:
        m.forward(torch.tensor([t]), kv)
    step_ms = (time.perf_counter() - t0) / n * 1e3
native_ms = sum(s for _, s in stat.values()) / n * 1e3
print(json.dumps({"ms_per_token": round(step_ms, 1), "native_ms_per_token": round(native_ms, 1),
                  "torch_threads": torch.get_num_threads()}))
for k, (calls, s) in sorted(stat.items(), key=lambda kv: -kv[1][1]):
    print(json.dumps({"type": k[0], "shape": k[1], "weights": k[2], "rows": k[3], "round_acts": k[4], "threads": k[5],
                      "calls_per_token": calls / n, "ms_per_token": round(s / n * 1e3, 2),
                      "ms_per_call": round(s / calls * 1e3, 3)}))
