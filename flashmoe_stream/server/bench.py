"""`flashmoe bench serve`: a bounded load test on loopback — N concurrent clients (the official
`openai` client, streamed chat completions) for a fixed time; throughput, latency percentiles, errors.

It starts its own server on 127.0.0.1 (``-m MODEL``) or drives one already running on this machine
(``--url``); it refuses any address that is not loopback.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import socket
import sys
import threading
import time
import urllib.parse
import urllib.request

from ..errors import FlashMoeError

_WORDS = ("the model streams experts from disk through a cache of memory and the device while tokens are "
          "generated one at a time for each request what why how when fast slow large small layer router "
          "prompt answer question").split()


def _check_loopback(url: str) -> None:
    host = urllib.parse.urlparse(url).hostname
    if not host:
        raise FlashMoeError(f"--url {url}: give http://127.0.0.1:PORT")
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        raise FlashMoeError(f"--url {url}: cannot resolve {host}") from None
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs):
        raise FlashMoeError(f"--url {url}: the load test only runs against this machine (127.0.0.1 or ::1)")


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q / 100 * (len(v) - 1))))]


def bench_serve(url: str, clients: int, seconds: float, max_tokens: int = 48, prompt_words: tuple[int, int] = (4, 40),
                api_key: str | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Run ``clients`` threads, each sending streamed chat completions back to back until ``seconds``
    have passed (requests in flight then finish). Latency is per request, first byte sent to last
    chunk received; TTFT to the first chunk carrying text."""
    from openai import OpenAI
    from tqdm import tqdm

    _check_loopback(url)
    lock = threading.Lock()
    lat: list[float] = []
    ttft: list[float] = []
    tokens = [0]
    errors: list[str] = []
    deadline = time.perf_counter() + seconds
    bar = tqdm(total=int(seconds), unit="s", desc="bench serve", file=sys.stderr, disable=not progress,
               bar_format="{desc}: {n}/{total} s {postfix}")

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        api = OpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key or "none", max_retries=0, timeout=600)
        while time.perf_counter() < deadline:
            words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(*prompt_words)))
            t0 = time.perf_counter()
            first = None
            try:
                stream = api.chat.completions.create(
                    model="any", messages=[{"role": "user", "content": words}], max_tokens=max_tokens,
                    temperature=0.8, seed=rng.randrange(2 ** 31), stream=True,
                    stream_options={"include_usage": True})
                used = None
                for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter() - t0
                    if chunk.usage is not None:
                        used = chunk.usage.completion_tokens
                if used is None:
                    raise RuntimeError("the stream ended without usage")
            except Exception as e:  # counted, reported, never fatal to the test
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                lat.append(time.perf_counter() - t0)
                if first is not None:
                    ttft.append(first)
                tokens[0] += used

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(0.5)
        with lock:
            bar.n = min(int(time.perf_counter() - t0), int(seconds))
            bar.set_postfix_str(f"{len(lat)} requests, {tokens[0]} tokens, {len(errors)} errors")
    wall = time.perf_counter() - t0
    bar.close()
    metrics = urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=30).read().decode()
    server = {}
    for line in metrics.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            server[name.removeprefix("flashmoe_")] = float(value)
    return {
        "url": url, "clients": clients, "seconds": round(wall, 2), "max_tokens": max_tokens,
        "requests": len(lat), "errors": len(errors), "error_samples": errors[:5],
        "completion_tokens": tokens[0], "tokens_per_s": round(tokens[0] / wall, 2),
        "requests_per_s": round(len(lat) / wall, 3),
        "latency_s": {"p50": _r(_pct(lat, 50)), "p99": _r(_pct(lat, 99)), "max": _r(max(lat, default=None))},
        "ttft_s": {"p50": _r(_pct(ttft, 50)), "p99": _r(_pct(ttft, 99))},
        "server": {k: server.get(k) for k in ("batched_steps_total", "steps_total", "tokens_per_second",
                                             'cache_hit_ratio{tier="device"}', 'requests_total{outcome="rejected"}',
                                             'requests_total{outcome="failed"}')},
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def add_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("-m", "--model", help="start a server on 127.0.0.1 for this GGUF or store")
    s.add_argument("--url", help="or drive a server already running on this machine (http://127.0.0.1:8080)")
    s.add_argument("-np", "--parallel", type=int, default=2, help="slots of the server started here (default 2)")
    s.add_argument("-c", "--ctx-size", type=int, default=4096,
                   help="its context, split across the slots (default 4096)")
    s.add_argument("--clients", type=int, help="concurrent clients (default: 2 x -np)")
    s.add_argument("--seconds", type=float, default=120, help="how long to send requests (default 120)")
    s.add_argument("--max-tokens", type=int, default=48, help="max_tokens of each request (default 48)")
    s.add_argument("--api-key", help="the key of the server at --url")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true", help="print the result as JSON (no progress)")


def run(a: argparse.Namespace) -> int:
    if (a.model is None) == (a.url is None):
        raise FlashMoeError("give -m MODEL (a server is started here) or --url of a running one, not both")
    clients = a.clients or 2 * a.parallel
    if clients < 1 or a.seconds <= 0:
        raise FlashMoeError("--clients and --seconds must be positive")
    if a.url is not None:
        out = bench_serve(a.url, clients, a.seconds, a.max_tokens, api_key=a.api_key, seed=a.seed,
                          progress=not a.json)
    else:
        from .server import Server

        with Server(a.model, port=0, n_slots=a.parallel, n_ctx=a.ctx_size, max_queue=max(16, clients),
                    device=a.device, vram_cache=a.vram_cache, ram_cache=a.ram_cache, policy=a.policy,
                    prefetch=not a.no_prefetch, io_threads=a.io_threads) as srv:
            out = bench_serve(srv.url, clients, a.seconds, a.max_tokens, seed=a.seed, progress=not a.json)
        out.update(model=str(a.model), slots=a.parallel, ctx_size=a.ctx_size, device=a.device)
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        lat, ttft = out["latency_s"], out["ttft_s"]
        print(f"{out['requests']} requests from {clients} clients in {out['seconds']} s, {out['errors']} errors | "
              f"{out['tokens_per_s']} tok/s, {out['requests_per_s']} req/s | latency p50 {lat['p50']} s, p99 "
              f"{lat['p99']} s | first token p50 {ttft['p50']} s, p99 {ttft['p99']} s")
        for e in out["error_samples"]:
            print(f"  error: {e}", file=sys.stderr)
    return 1 if out["errors"] else 0
