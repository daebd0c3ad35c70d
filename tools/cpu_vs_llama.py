"""CPU decode against llama.cpp on the same GGUF, alternated in one run (the ratio is the comparison).

usage: python3 tools/cpu_vs_llama.py MODEL.gguf [PAIRS] [TOKENS]

Both decode the same TOKENS (default 24) random tokens one at a time, teacher-forced, after an 8-token
prompt, on 2 threads with every weight in RAM (ours: --ram-cache 100% after a warm pass; llama.cpp
through llama-cpp-python, the file in the page cache after a warm pass, without CPU weight repacking, as a
model larger than RAM needs; with it, llama.cpp 0.3.36 crashed on an AMX CPU).
Prints one JSON line a pair: tok/s of each and ours ÷ llama.cpp.
"""
import json
import sys
import time

import numpy as np
import torch

import flashmoe_stream as fms

path = sys.argv[1]
pairs = int(sys.argv[2]) if len(sys.argv) > 2 else 2
n = int(sys.argv[3]) if len(sys.argv) > 3 else 24


def ours(toks) -> float:
    with fms.Engine.open(path, device="cpu", ram_cache="100%", n_ctx=len(toks) + 1) as eng:
        m = eng.model
        m.forward(torch.tensor(toks), m.new_kv_cache(len(toks) + 1))  # warm: the experts it uses in RAM
        eng.cache.wait_idle()
        kv = m.new_kv_cache(len(toks) + 1)
        m.forward(torch.tensor(toks[:8]), kv)
        t0 = time.perf_counter()
        for t in toks[8:]:
            m.forward(torch.tensor([t]), kv)
        return (len(toks) - 8) / (time.perf_counter() - t0)


def theirs(toks) -> float:
    import llama_cpp
    import llama_cpp.llama_cpp as low

    if not getattr(low, "_no_repack", False):
        default = low.llama_model_default_params

        def no_repack():
            p = default()
            p.use_extra_bufts = False
            return p

        low.llama_model_default_params, low._no_repack = no_repack, True
    llm = llama_cpp.Llama(model_path=path, n_ctx=len(toks) + 1, n_threads=2, n_batch=8, verbose=False)
    llm.eval(toks)  # warm: the file in the page cache
    llm.reset()
    llm.eval(toks[:8])
    t0 = time.perf_counter()
    for t in toks[8:]:
        llm.eval([t])
    dt = time.perf_counter() - t0
    del llm
    return (len(toks) - 8) / dt


for i in range(pairs):
    toks = np.random.default_rng(i).integers(0, 30000, 8 + n).tolist()
    a, b = ours(toks), theirs(toks)
    print(json.dumps({"pair": i, "ours_tok_s": round(a, 2), "llama_cpp_tok_s": round(b, 2),
                      "ratio": round(a / b, 3)}), flush=True)
