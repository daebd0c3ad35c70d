"""`flashmoe bench run MODEL`: decode speed against the I/O bound measured in the same run.

Decode is teacher-forced with varied random tokens (greedy decoding of a random-weight model soon
repeats one token and one expert set, which would make any cache look perfect); the routing's
variety is reported. Two single-token steps after the prompt run untimed first (the GPU kernels compile
and, where every expert fits on the GPU, the CUDA graph is captured there). The I/O bound is the disk's
raw sequential O_DIRECT bandwidth divided by the bytes read from disk per decoded token. Shared virtual
disks drift by 2x within a minute, so the raw bandwidth is sampled all through decode: before it and
after every chunk of tokens (about 8 chunks), with the decode timer stopped and the cache's reads
drained; the samples read the model's files on from where the last one stopped (no byte twice, until
they wrap round), and the bound uses their mean. Random whole-expert reads at decode's number of I/O
threads are timed too, once before decode and once after it (``flashmoe bench io``'s measure): what this
disk gives the access pattern decode has, reported beside the sequential bound as a second yardstick.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


WARMUP = 2  # single-token steps after the prompt, before decode is timed


def bench_run(model: str, device: str = "cpu", vram_cache=None, ram_cache=None, policy: str = "lfru",
              prefetch: bool = True, tokens: int = 64, prompt_tokens: int = 16, seed: int = 0,
              seq_seconds: float = 1.0, warm: bool = False, threads: int = 8,
              prefetch_ahead: int = 1, graphs: bool = True, chunks: int = 8) -> dict:
    import torch

    from .engine import Engine
    from .io.bench import SequentialSampler, _drop_cache, random_expert_reads

    with Engine.open(model, device=device, vram_cache=vram_cache, ram_cache=ram_cache, policy=policy,
                     prefetch=prefetch, n_ctx=prompt_tokens + WARMUP + tokens + 1, threads=threads,
                     prefetch_ahead=prefetch_ahead, graphs=graphs) as eng:
        files = sorted({r.path for layer in eng.store.layers for r in eng.store.layout(layer, 0).ranges})
        # the raw disk: the model's big files (a GGUF's shards; a store's dense.gguf, not one expert's file)
        every = set(files) | {eng.store.dense_path}
        big = sorted(p for p in every if p.stat().st_size >= 64 << 20)
        disk = SequentialSampler(big or [max(every, key=lambda p: p.stat().st_size)])
        hbm = _device_bandwidth(eng.device)
        active = _active_bytes_per_token(eng)
        _drop_cache(files)
        rng = np.random.default_rng(seed)
        ids = rng.integers(0, min(eng.config.n_vocab, 32000), prompt_tokens + WARMUP + tokens).tolist()
        if warm:  # one untimed pass over the same tokens first: what fits the cache is then resident
            eng.model.forward(torch.tensor(ids), eng.model.new_kv_cache(len(ids)))
            eng.cache.wait_idle()
        kv = eng.model.new_kv_cache(len(ids))
        seen: list = []  # (layer, ids): read after decode, so that reading them adds no wait to any step

        def on_route(layer, r, _w):
            seen.append((layer, r))

        t0 = time.perf_counter()
        eng.model.forward(torch.tensor(ids[:prompt_tokens]), kv, on_route)
        prefill_s = time.perf_counter() - t0
        for tok in ids[prompt_tokens: prompt_tokens + WARMUP]:  # untimed: kernels compile, a CUDA graph is captured
            eng.model.forward(torch.tensor([tok]), kv, on_route)
        krng = np.random.default_rng(seed + 1)

        def random_reads() -> float:  # cold: O_DIRECT, experts drawn from all of the model's
            return random_expert_reads(eng.store, threads, 3 * seq_seconds, krng)["gb_per_s"]

        eng.cache.wait_idle()
        randoms = [random_reads()]
        samples = [disk.sample(seq_seconds)]  # the disk's speed now, just before decode
        before = eng.cache.stats()["total"]
        decode_s, per_chunk = 0.0, []
        todo = ids[prompt_tokens + WARMUP:]
        size = -(-len(todo) // max(1, min(chunks, len(todo))))
        for c in range(0, len(todo), size):
            b = eng.cache.stats()["total"]["disk_bytes"]
            t0 = time.perf_counter()
            for tok in todo[c: c + size]:
                eng.model.forward(torch.tensor([tok]), kv, on_route)
            if eng.device.type == "cuda":
                torch.cuda.synchronize(eng.device)
            dt = time.perf_counter() - t0
            decode_s += dt
            read = eng.cache.stats()["total"]["disk_bytes"] - b  # (not what finishes after the timer)
            eng.cache.wait_idle()  # untimed: the few reads still running at the end of a token, then the disk
            samples.append(disk.sample(seq_seconds))
            raw_here = (samples[-2]["gb_per_s"] + samples[-1]["gb_per_s"]) / 2
            per_chunk.append(read / dt / 1e9 / raw_here)
        routes: dict[int, set] = {}
        for layer, r in seen:
            routes.setdefault(layer, set()).update(tuple(sorted(x)) for x in r.tolist())
        after = eng.cache.stats()["total"]
        randoms.append(random_reads())
    raw = float(np.mean([s["gb_per_s"] for s in samples]))
    d = {k: after[k] - before[k] for k in after if isinstance(after[k], (int, float))}
    miss_per_tok = d["disk_bytes"] / tokens
    bound = raw * 1e9 / miss_per_tok if miss_per_tok else float("inf")
    rand_bound = float(np.mean(randoms)) * 1e9 / miss_per_tok if miss_per_tok else float("inf")
    tok_s = tokens / decode_s

    def rate(h, m):
        return d[h] / (d[h] + d[m]) if d[h] + d[m] else None

    return {
        "model": str(model), "device": device, "policy": policy, "prefetch": prefetch, "warm": warm,
        "io_threads": threads, "prefetch_ahead": prefetch_ahead, "graphs": graphs,
        "budgets": {"vram_cache": vram_cache, "ram_cache": ram_cache},
        "prefill": {"tokens": prompt_tokens, "seconds": round(prefill_s, 3)},
        "decode": {"tokens": tokens, "seconds": round(decode_s, 3), "tok_per_s": round(tok_s, 3)},
        "disk_raw_sequential_gb_per_s": round(raw, 4),
        "disk_raw_sequential_samples_gb_per_s": [s["gb_per_s"] for s in samples],
        "disk_raw_sequential_files": samples[0]["file"],
        "miss_bytes_per_token": int(miss_per_tok),
        "io_bound_tok_per_s": round(bound, 3),
        "ratio_to_io_bound": round(tok_s / bound, 3) if bound != float("inf") else None,
        # each chunk's read bandwidth over the raw bandwidth sampled just before and just after it: the
        # median is the ratio least moved by the disk's drift
        "ratio_to_io_bound_per_chunk": [round(r, 3) for r in per_chunk],
        "ratio_to_io_bound_chunk_median": round(float(np.median(per_chunk)), 3) if per_chunk else None,
        # the second yardstick: random whole-expert reads (decode's pattern), before and after decode
        "disk_random_expert_reads_gb_per_s": randoms,
        "random_read_bound_tok_per_s": round(rand_bound, 3) if rand_bound != float("inf") else None,
        "ratio_to_random_read_bound": round(tok_s / rand_bound, 3) if rand_bound != float("inf") else None,
        "device_hit_rate": rate("device_hits", "device_misses"),
        "host_hit_rate": rate("host_hits", "host_misses"),
        "prefetch_recall": d["prefetch_useful"] / d["requests"] if d["requests"] else None,
        # over the whole run: a prefetch issued during prefill can be used during decode
        "prefetch_precision": after["prefetch_useful"] / after["prefetch_issued"] if after["prefetch_issued"] else None,
        "waited_on_io_s": round(d["wait_s"], 3),
        # the share of decode time a disk read was running, and the reads' speed while one was: a low
        # share means the disk idled (compute not overlapped with reads), a low speed that reads were slow
        "disk_busy_fraction": round(d["io_busy_s"] / decode_s, 3),
        "read_gb_per_s_while_busy": round(d["disk_bytes"] / d["io_busy_s"] / 1e9, 3) if d["io_busy_s"] else None,
        # the memory-bandwidth bound: GGUF bytes one token reads (dense minus embeddings, k experts per
        # layer) at the device's copy bandwidth measured in this run
        "active_bytes_per_token": active,
        "device_bandwidth_gb_per_s": round(hbm / 1e9, 1) if hbm else None,
        "memory_bound_tok_per_s": round(hbm / active, 1) if hbm else None,
        "ratio_to_memory_bound": round(tok_s / (hbm / active), 4) if hbm else None,
        "distinct_expert_sets_per_layer_min": min(len(v) for v in routes.values()),
    }


def _device_bandwidth(device) -> float | None:
    """Bytes per second a large device-to-device copy moves (read + write), on cuda/xpu; None on cpu."""
    import torch

    if device.type == "cpu":
        return None
    mod = getattr(torch, device.type)
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    mod.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    mod.synchronize(device)
    dt = time.perf_counter() - t0
    del a, b
    return 10 * 2 * (1 << 30) / dt


def _active_bytes_per_token(eng) -> int:
    """GGUF bytes of the weights one decoded token uses: the dense tensors but the embedding table, and
    n_expert_used experts in every layer with routed experts."""
    from .gguf_file import open_gguf
    from .model_info import expert_tensor_layer

    dense = open_gguf(eng.store.dense_path)
    n = sum(t.nbytes for name, t in dense.tensors.items()
            if expert_tensor_layer(name) is None and not name.startswith("token_embd"))
    k = eng.config.n_expert_used
    return int(n + sum(k * eng.store.expert_nbytes(layer) for layer in eng.store.layers))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a GGUF (any shard) or an expert store")
    """This bench's own options; the CLI adds the engine's (device, budgets, policy, prefetch, I/O threads)."""
    p.add_argument("--tokens", type=int, default=64, help="decoded tokens, teacher-forced (default 64)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="random prompt tokens before decode (default 16)")
    p.add_argument("--prefetch-ahead", type=int, default=1, metavar="N",
                   help="after each attention, predict and prefetch the next N layers' experts (default 1)")
    p.add_argument("--warm", action="store_true",
                   help="run the same tokens once, untimed, first (measures decode with a filled cache)")
    p.add_argument("--no-graphs", action="store_true",
                   help="decode eagerly even when every expert fits on the GPU (no CUDA graph)")
    p.add_argument("--disk-sample-seconds", type=float, default=1.0, metavar="S",
                   help="length of each raw-disk sample, taken before decode and after each of 8 chunks of it "
                        "(default 1); the random expert reads before and after decode take 3 times as long")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(a: argparse.Namespace) -> int:
    r = bench_run(a.model, a.device, a.vram_cache, a.ram_cache, a.policy, not a.no_prefetch, a.tokens,
                  a.prompt_tokens, warm=a.warm, seq_seconds=a.disk_sample_seconds,
                  threads=a.io_threads, prefetch_ahead=a.prefetch_ahead, graphs=not a.no_graphs)
    if a.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"decode {r['decode']['tok_per_s']:.2f} tok/s; I/O bound {r['io_bound_tok_per_s']:.2f} tok/s "
              f"({r['disk_raw_sequential_gb_per_s']:.2f} GB/s ÷ {r['miss_bytes_per_token'] / 1e6:.1f} MB missed per "
              f"token) → ratio {r['ratio_to_io_bound']} (median of chunks {r['ratio_to_io_bound_chunk_median']}); to random expert reads' bound {r['ratio_to_random_read_bound']}; hits device {r['device_hit_rate']}, host "
              f"{r['host_hit_rate']}; prefetch recall {r['prefetch_recall']}; waited {r['waited_on_io_s']} s on I/O; "
              f"disk busy {r['disk_busy_fraction']} of decode, reading {r['read_gb_per_s_while_busy']} GB/s when busy")
    return 0
