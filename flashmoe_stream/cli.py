"""The `flashmoe` command line. User errors print one line and exit non-zero, never a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from .config import format_size, parse_size
from .errors import FlashMoeError

log = logging.getLogger("flashmoe")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except FlashMoeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _emit(obj: dict, as_json: bool, human: str) -> None:
    print(json.dumps(obj, indent=2) if as_json else human)


def cmd_bench_qmatmul(a: argparse.Namespace) -> int:
    import torch

    from .quant import _cpu
    from .quant.bench import bench_qmatmul

    from gguf import GGMLQuantizationType

    kw = {"types": [GGMLQuantizationType[t.strip().upper()] for t in a.types.split(",")]} if a.types else {}
    rows = bench_qmatmul(rows=a.rows, n_experts=a.experts, threads=a.threads, **kw)
    info = {"native": _cpu.available(), "simd": _cpu.simd(), "threads": torch.get_num_threads(), "results": rows}
    if a.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"native kernels: {'yes' if info['native'] else 'no'} (AVX2: {'yes' if info['simd'] else 'no'}), "
              f"{info['threads']} threads; G weights/s, {a.experts} experts x T={a.rows}")
        print(f"{'type':>5} {'proj':>8} {'N x K':>11} {'native':>8} {'native':>8} {'native':>9} {'torch':>9}")
        print(f"{'':>5} {'':>8} {'':>11} {'float':>8} {'llama':>8} {'deq+bmm':>9} {'deq+bmm':>9}")
        for r in rows:
            cells = [r.get(k) for k in ("native_float_gw_s", "native_llama_gw_s", "native_dequant_bmm_gw_s",
                                        "torch_dequant_bmm_gw_s")]
            print(f"{r['type']:>5} {r['proj']:>8} {'%d x %d' % tuple(r['shape']):>11} "
                  + " ".join(f"{c:8.2f}" if c is not None else f"{'-':>8}" for c in cells))
    return 0


# ---------------------------------------------------------------------------------------------


def cmd_synth(a: argparse.Namespace) -> int:
    from .synth import synth

    r = synth(a.output, arch=a.arch, preset=a.preset, qtype=a.qtype, layers=a.layers,
              split_size=a.split_size, seed=a.seed, progress=not a.json,
              metadata_only=getattr(a, "metadata_only", False))
    out = {"files": [str(p) for p in r.paths], "bytes": r.nbytes, "seconds": round(r.seconds, 3),
           "write_gb_per_s": round(r.gb_per_s, 3)}
    _emit(out, a.json, f"wrote {', '.join(out['files'])}: {format_size(r.nbytes)} in {r.seconds:.1f} s "
                       f"({r.gb_per_s:.2f} GB/s)")
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from .gguf_file import open_gguf
    from .model_info import ModelInfo

    info = ModelInfo.of(open_gguf(a.model))
    d = info.as_dict()
    plan = None
    if getattr(a, "plan", False):
        if a.disk_gbps is None or a.tok_s is None or a.disk_gbps <= 0 or a.tok_s <= 0:
            raise FlashMoeError("--plan needs --disk-gbps and --tok-s, both positive (e.g. --disk-gbps 3 --tok-s 5)")
        plan = d["plan"] = info.plan(a.disk_gbps, a.tok_s)
    if a.json:
        print(json.dumps(d, indent=2))
        return 0
    rows = [
        ("architecture", info.arch),
        ("layers", f"{info.n_layer} ({info.n_moe_layer} with routed experts)"),
        ("experts", f"{info.n_expert} per layer, {info.n_expert_used} used per token, {info.n_expert_shared} shared"),
        ("parameters", f"{info.params_total / 1e9:.3f} B total, {info.params_active / 1e9:.3f} B active per token"),
        ("file size", format_size(info.bytes_total)),
        ("dense (resident)", format_size(info.bytes_dense)),
        ("routed experts", format_size(info.bytes_experts)),
        ("bytes per expert", format_size(info.bytes_per_expert)),
        ("read per token, 0% hits", format_size(info.bytes_per_token_cold)),
    ]
    if plan is not None:
        rows += [
            (f"plan: {plan['tok_s']:g} tok/s on {plan['disk_gb_per_s']:g} GB/s", ""),
            ("  tok/s at 0% hits", f"{plan['tok_s_at_0pct_hits']:.2f}"),
            ("  hit rate needed", f"{plan['hit_rate_needed']:.1%} (assumes even routing: hit rate = cache share)"),
            ("  expert cache (VRAM+RAM)", format_size(plan["expert_cache_bytes"])),
            ("  + dense, resident", format_size(plan["dense_bytes"])),
            ("  = memory needed", format_size(plan["memory_bytes"])),
        ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0


BUILTIN_MODEL = Path(__file__).parent / "data" / "tiny-moe-Q8_0.gguf"
DEMO_PROMPT = "import os\nimport sys\n\n\ndef main():\n"


def cmd_demo(a: argparse.Namespace) -> int:
    """Repack the built-in model (a small qwen3moe trained on Python sources and Debian docs, docs/MODEL.md)
    and generate from the store with a RAM budget of 30 % of its expert bytes, so the cache has to evict and
    stream."""
    from .io.repack import repack

    if not BUILTIN_MODEL.is_file():
        raise FlashMoeError(f"the built-in model is missing ({BUILTIN_MODEL}): reinstall flashmoe-stream")
    root = Path(a.dir)
    store = root / "tiny-moe-Q8_0.store"
    root.mkdir(parents=True, exist_ok=True)
    cmd_inspect(argparse.Namespace(model=BUILTIN_MODEL, json=False))
    repack(BUILTIN_MODEL, store, progress=True)
    print(f"\nrepacked into {store}; generating with --ram-cache 30% (greedy, repeat penalty 1.2)\n", file=sys.stderr)
    sys.stdout.write(a.prompt)
    return cmd_run(build_parser().parse_args(
        ["run", "-m", str(store), "-no-cnv", "-p", a.prompt, "-n", str(a.n_predict), "--temp", "0",
         "--repeat-penalty", "1.2", "--ram-cache", "30%"]))


def _summary_line(eng) -> str:
    s = eng.stats()
    t, g = s["total"], s["generation"]
    def rate(hits: str, misses: str) -> str:
        n = t.get(hits, 0) + t.get(misses, 0)
        return f"{100 * t.get(hits, 0) / n:.0f}%" if n else "-"
    kept = f" ({g['prompt_cached']} kept from the last turn)" if g.get("prompt_cached") else ""
    return (f"prompt {g['prompt_tokens']} tok{kept} at {g['prompt_tok_s']:.1f} tok/s | decode {g['decode_tokens']} tok at "
            f"{g['decode_tok_s']:.2f} tok/s | hits: device {rate('device_hits', 'device_misses')}, host "
            f"{rate('host_hits', 'host_misses')} | read {t.get('disk_bytes', 0) / 1e9:.2f} GB from disk | "
            f"waited {t.get('wait_s', 0):.1f} s on I/O")


def cmd_run(a: argparse.Namespace) -> int:
    from .engine import Engine

    gen = dict(max_tokens=a.n_predict, temperature=a.temp, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
               repeat_penalty=a.repeat_penalty, seed=a.seed)
    if a.no_conversation and a.prompt is None:
        raise FlashMoeError("-no-cnv needs --prompt TEXT (or drop -no-cnv for a chat)")
    with Engine.open(a.model, device=a.device, vram_cache=a.vram_cache, ram_cache=a.ram_cache, policy=a.policy,
                     prefetch=not a.no_prefetch, n_ctx=a.ctx_size, threads=a.io_threads) as eng:
        rec = _start_trace(eng, a) if a.trace else None
        try:
            return _run(eng, a, gen, rec)
        finally:
            if rec is not None and rec.has_data():
                rec.save(a.trace)
                print(f"routing trace: {a.trace}", file=sys.stderr)


def _start_trace(eng, a: argparse.Namespace):
    """A TraceRecorder on the engine's routes and prefetch predictions (see cache/trace.py)."""
    from .cache.trace import TraceRecorder

    store = eng.store
    cfg = store.config
    rec = TraceRecorder({"model": str(a.model), "arch": cfg.arch, "n_layer": cfg.n_layer, "n_expert": cfg.n_expert,
                         "n_expert_used": cfg.n_expert_used, "prefetch": not a.no_prefetch,
                         "expert_bytes": {str(layer): store.expert_nbytes(layer) for layer in store.layers}})
    eng.model.experts = rec.wrap(eng.model.experts)  # records the next-layer predictions the model prefetches
    return rec


def _run(eng, a: argparse.Namespace, gen: dict, rec) -> int:
    if rec is not None:
        gen = dict(gen, on_route=rec.on_route)

    def done() -> None:
        if rec is not None:
            # a chat turn that kept the last turn's keys and values routed only its new tokens
            kept = eng.last.prompt_cached
            rec.end_sequence(eng.last.tokens[kept:], eng.last.prompt_tokens - kept)
        print(_summary_line(eng), file=sys.stderr)

    if a.no_conversation:
        _print_stream(eng.generate(a.prompt, **gen))
        done()
        return 0
    from .engine import ChatTemplate, NoChatTemplateError

    try:
        template = ChatTemplate.from_metadata(eng.metadata)
    except NoChatTemplateError:
        raise FlashMoeError("this model has no chat template: use -no-cnv --prompt TEXT for plain completion") \
            from None
    messages: list[dict] = []
    first = a.prompt
    while True:
        if first is not None:
            user, first = first, None
            print(f"> {user}", file=sys.stderr)
        else:
            try:
                user = input("> ")
            except EOFError:
                print(file=sys.stderr)
                return 0
        if not user.strip():
            continue
        messages.append({"role": "user", "content": user})
        reply = _print_stream(eng.generate(template.render(messages), **gen))
        messages.append({"role": "assistant", "content": reply})
        done()


def cmd_serve(a: argparse.Namespace) -> int:
    from .engine import SamplingParams
    from .server import Server

    sampling = SamplingParams(a.temp, a.top_k, a.top_p, a.min_p, a.repeat_penalty, seed=a.seed)
    srv = Server(a.model, host=a.host, port=a.port, n_slots=a.parallel, n_ctx=a.ctx_size, n_predict=a.n_predict,
                 n_batch=a.batch_size, max_queue=a.max_queue, api_key=a.api_key, alias=a.alias, sampling=sampling,
                 device=a.device, vram_cache=a.vram_cache, ram_cache=a.ram_cache, policy=a.policy,
                 prefetch=not a.no_prefetch, io_threads=a.io_threads, log_level="info" if a.verbose else "warning")
    print(f"flashmoe serve: {srv.model_id} on {srv.url}/v1 ({a.parallel} slots of {srv.scheduler.n_ctx_slot} "
          f"tokens; Ctrl-C stops)", file=sys.stderr)

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # uvicorn shuts down on SIGTERM, then re-raises it: stop as on Ctrl-C
    try:
        srv.run()
    except KeyboardInterrupt:
        pass
    print("flashmoe serve: stopped", file=sys.stderr)
    return 0


def _print_stream(pieces) -> str:
    out = []
    for piece in pieces:
        out.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(out)


def cmd_simulate(a: argparse.Namespace) -> int:
    from .cache.simulate import plot, simulate, trace_stats
    from .cache.trace import Trace

    trace = Trace.load(a.trace)
    policies = [p.strip() for p in a.policy.split(",") if p.strip()]
    caps = [c.strip() for c in a.capacity.split(",") if c.strip()]
    lower = [c.strip() for c in a.tiers.split(",") if c.strip()] if a.tiers else []
    if not policies or not caps:
        raise FlashMoeError("--policy and --capacity need at least one value each (comma-separated)")
    results = simulate(trace, policies, caps, lower, prefetch=a.prefetch, per_token=a.per_token, progress=not a.json)
    stats = trace_stats(trace) if a.stats else None
    if a.plot:
        plot(results, a.plot)
    if a.json:
        out = {"trace": str(a.trace), "rows": trace.n_rows, "per_token": a.per_token, "prefetch": a.prefetch,
               "lower_tiers": lower, "results": [r.as_dict() for r in results]}
        if stats is not None:
            out["stats"] = stats
        print(json.dumps(out, indent=2))
        return 0
    print(f"{trace.n_rows} tokens, {len(trace.layers)} MoE layers, {trace.meta.get('n_expert', '?')} experts per "
          f"layer ({'each token alone' if a.per_token else 'as the runtime fetched them'})")
    head = f"{'policy':<14}{'capacity':>9}{'experts':>8}{'hit rate':>9}{'× belady':>9}{'read':>12}"
    if a.prefetch != "none":
        head += f"{'precision':>10}{'recall':>8}"
    print(head)
    for r in results:
        line = (f"{r.policy:<14}{r.capacity:>9}{r.capacity_experts:>8}{100 * r.hit_rate:>8.1f}%"
                f"{r.ratio_to_belady:>9.3f}{format_size(r.bytes_read):>12}")
        if a.prefetch != "none":
            pr, rc = r.precision, r.recall
            line += f"{'-' if pr is None else f'{100 * pr:.1f}%':>10}{'-' if rc is None else f'{100 * rc:.1f}%':>8}"
        print(line)
    if stats is not None:
        print("\nper layer: share of accesses to the top 10% of experts | reuse within 1 / 4 / 16 tokens")
        for row in stats["layers"]:
            print(f"  layer {row['layer']:>3}: {100 * row['top10_share']:5.1f}% | {100 * row['reuse_le_1']:5.1f}% "
                  f"{100 * row['reuse_le_4']:5.1f}% {100 * row['reuse_le_16']:5.1f}%")
    if a.plot:
        print(f"plot: {a.plot}")
    return 0


def cmd_repack(a: argparse.Namespace) -> int:
    from .io.repack import run  # (the io door's `repack` is the function, not this module)

    return run(a)


def cmd_bench_io(a: argparse.Namespace) -> int:
    from .io.bench import run

    return run(a)


def cmd_bench_run(a: argparse.Namespace) -> int:
    from .bench import run

    return run(a)


def cmd_bench_serve(a: argparse.Namespace) -> int:
    from .server.bench import run

    return run(a)


def cmd_bench_dequant(a: argparse.Namespace) -> int:
    from .quant.bench import bench_dequant

    rows = bench_dequant(a.device, mib=a.mib)
    if a.json:
        print(json.dumps({"device": a.device, "results": rows}, indent=2))
    else:
        for r in rows:
            print(f"{r['type']:>7}  {r['gb_per_s_in']:8.2f} GB/s in  {r['gb_per_s_out']:8.2f} GB/s out")
    return 0


# ---------------------------------------------------------------------------------------------


def _sampling_arguments(s: argparse.ArgumentParser, when: str = "") -> None:
    s.add_argument("--temp", type=float, default=0.8, help=f"temperature{when}; 0 = greedy (default 0.8)")
    s.add_argument("--top-k", type=int, default=40, help="default 40; 0 = off")
    s.add_argument("--top-p", type=float, default=0.95, help="default 0.95; 1 = off")
    s.add_argument("--min-p", type=float, default=0.05, help="default 0.05; 0 = off")
    s.add_argument("--repeat-penalty", type=float, default=1.0, help="default 1.0 = off")
    s.add_argument("--seed", type=int, help=f"random seed{when} (default: random)")


def _engine_arguments(s: argparse.ArgumentParser) -> None:
    """Device, cache budgets, policy and I/O: how the model is opened (run, serve)."""
    s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or xpu (default cpu)")
    s.add_argument("--vram-cache", metavar="SIZE", help="device-tier budget: 8G, 512M or 10%% of the expert bytes "
                                                         "(default: 80%% of free device memory)")
    s.add_argument("--ram-cache", metavar="SIZE", help="RAM-tier budget (default: half the available RAM)")
    s.add_argument("--policy", default="lfru", help="eviction policy: lru, lfu, lfru, layer-aware, predictive or "
                                                    "module:Class (docs/POLICIES.md)")
    s.add_argument("--no-prefetch", action="store_true", help="do not predict and prefetch the next layer's experts")
    s.add_argument("--io-threads", type=int, default=8, help="threads reading experts (default 8)")


def build_parser() -> argparse.ArgumentParser:
    from .synth import ARCHS, DEEPSEEK2_PRESETS, PRESETS, QTYPES

    p = argparse.ArgumentParser(
        prog="flashmoe",
        description="Run Mixture-of-Experts LLMs larger than RAM and VRAM by streaming experts from NVMe.")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens (to stderr)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)  # -v also works after the command
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log what happens")

    s = sub.add_parser("run", parents=[common], help="generate text with a model larger than memory",
                       description="Stream a MoE model's experts from disk and generate. Without -no-cnv: a chat "
                                   "using the model's chat template (type a message, Ctrl-D ends).")
    s.add_argument("-m", "--model", required=True, type=Path, help="a GGUF (any shard) or an expert store")
    s.add_argument("-p", "--prompt", help="the prompt (in chat mode: the first message)")
    s.add_argument("-no-cnv", "--no-conversation", action="store_true", help="plain completion of --prompt, no chat")
    s.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate at most (default 128)")
    s.add_argument("-c", "--ctx-size", type=int, default=4096, help="context length (default 4096)")
    _sampling_arguments(s)
    _engine_arguments(s)
    s.add_argument("--trace", metavar="FILE", type=Path,
                   help="record the routed experts and router weights of every token, per layer, and the "
                        "prefetch predictions, to FILE (.npz; replay it with flashmoe simulate)")
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("serve", parents=[common], help="an OpenAI-compatible HTTP server with parallel sequences",
                       description="Serve /v1/chat/completions, /v1/completions (both with stream: true), "
                                   "/v1/models, /health and /metrics (Prometheus). -np slots decode together: one "
                                   "batched forward pass per step, so each layer's experts are fetched once for all "
                                   "of them. Requests beyond the slots queue; a full queue answers 503.")
    s.add_argument("-m", "--model", required=True, type=Path, help="a GGUF (any shard) or an expert store")
    s.add_argument("-n", "--n-predict", type=int, default=512,
                   help="tokens to generate when a request gives no max_tokens (default 512)")
    s.add_argument("-np", "--parallel", type=int, default=2, help="slots: sequences decoded together (default 2)")
    s.add_argument("-c", "--ctx-size", type=int, default=4096,
                   help="context of all slots together; each slot gets c / np tokens (default 4096)")
    s.add_argument("-b", "--batch-size", type=int, default=512,
                   help="tokens one step feeds at most: long prompts are prefilled in chunks of this size beside "
                        "the decoding slots (default 512)")
    s.add_argument("--max-queue", type=int, default=16,
                   help="requests that may wait for a slot before new ones get 503 (default 16)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8080, help="TCP port (default 8080)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ (default: no key)")
    s.add_argument("-a", "--alias", help="the model name /v1/models reports (default: the file name)")
    _sampling_arguments(s, " when a request does not set it")
    _engine_arguments(s)
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser("synth", parents=[common], help="write a synthetic model with a real architecture and random weights",
                       description="Write a GGUF with llama.cpp's tensor names, shapes and metadata for ARCH at the "
                                   "dimensions of PRESET, random zero-mean weights and a small byte-level BPE tokenizer.")
    s.add_argument("--arch", choices=ARCHS, default="qwen3moe")
    s.add_argument("--preset", choices=sorted(set(PRESETS) | set(DEEPSEEK2_PRESETS)), default="tiny",
                   help="model dimensions (default: tiny, a few MB); deepseek2: tiny (V3-shaped), tiny-lite "
                        "(V2-Lite-shaped), deepseek-v2-lite, deepseek-v3")
    s.add_argument("--layers", type=int, help="override the preset's number of layers")
    s.add_argument("--qtype", default="Q8_0", metavar="TYPE",
                   help=f"quantisation: a ggml type or a llama.cpp mix ({', '.join(QTYPES)}); default Q8_0")
    s.add_argument("--metadata-only", action="store_true",
                   help="write the header with real tensor shapes and a sparse zero data section (for inspect --plan "
                        "on full-size models; llama.cpp cannot run it)")
    s.add_argument("--split-size", type=_size, default=0, metavar="SIZE",
                   help="split into name-0000k-of-0000n.gguf files of at most SIZE (e.g. 2G)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-o", "--output", required=True, type=Path, metavar="OUT.gguf")
    s.add_argument("--json", action="store_true", help="print the result as JSON (no progress bar)")
    s.set_defaults(fn=cmd_synth)

    s = sub.add_parser("inspect", parents=[common], help="what a model is and what it costs to stream",
                       description="Architecture, experts, parameters, dense and expert bytes, and the bytes one "
                                   "token reads from disk when no expert is cached. Reads metadata only.")
    s.add_argument("model", type=Path, metavar="MODEL", help="a GGUF file (any shard of a split set)")
    s.add_argument("--plan", action="store_true",
                   help="also size the expert cache for --tok-s on a disk of --disk-gbps: miss bytes per token = "
                        "expert bytes per token x (1 - hit rate), hit rate taken as the cache's share of the experts")
    s.add_argument("--disk-gbps", type=float, metavar="GB/S", help="disk read bandwidth in GB/s (with --plan)")
    s.add_argument("--tok-s", type=float, metavar="N", help="target decode tokens per second (with --plan)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("demo", parents=[common], help="repack and stream the built-in model (a small trained MoE)",
                       description="Inspects the built-in model (a 17 MB qwen3moe, 8 layers x 32 experts, trained on "
                                   "Python sources and Debian docs), repacks it into an expert store and generates "
                                   "from the store with a RAM budget of 30%% of its experts.")
    s.add_argument("--dir", default="demo", help="where the demo's expert store goes (default: ./demo)")
    s.add_argument("-p", "--prompt", default=DEMO_PROMPT, help="what to continue (default: the start of a Python script)")
    s.add_argument("-n", "--n-predict", type=int, default=64, help="tokens to generate (default 64)")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("simulate", parents=[common], help="replay a routing trace through the cache policies",
                       description="Replay a trace recorded by `flashmoe run --trace` through the runtime's own tier "
                                   "and policy classes at each capacity, beside Belady's MIN (the offline optimum): "
                                   "hit rate, bytes read from disk, ratio to Belady; with --prefetch, a predictor's "
                                   "precision and recall.")
    s.add_argument("trace", type=Path, metavar="TRACE", help="a .npz trace from flashmoe run --trace")
    s.add_argument("--policy", default="lru,lfu,lfru,layer-aware,predictive,belady",
                   help="comma-separated: built-in names or module:Class (default: all the built-in ones)")
    s.add_argument("--capacity", default="5%,10%,25%,50%",
                   help="comma-separated sizes of the simulated tier: %% of all expert bytes, or bytes (8M, 1G)")
    s.add_argument("--tiers", metavar="SIZE[,SIZE]",
                   help="lower tiers behind the simulated one (e.g. the RAM tier behind VRAM: --tiers 50%%); "
                        "bytes read counts what the last tier misses")
    s.add_argument("--prefetch", default="none", choices=["none", "previous", "router"],
                   help="replay a predictor as prefetch: previous (the layer's experts of the previous call) or "
                        "router (the runtime's recorded next-layer gate look-ahead); default none")
    s.add_argument("--per-token", action="store_true",
                   help="replay every token as its own forward call (decode-like), not as the run fetched them")
    s.add_argument("--stats", action="store_true", help="also print expert popularity skew and reuse distance per layer")
    s.add_argument("--plot", metavar="OUT.png", help="hit rate vs capacity per policy (needs matplotlib)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_simulate)

    s = sub.add_parser("repack", parents=[common], help="turn a MoE GGUF into an expert store made for streaming",
                       description="Write experts/<layer>/<expert>.bin (4 KiB-aligned blocks), dense.gguf and "
                                   "manifest.json (written last). Streaming and resumable: rerun after a crash.")
    from .io.repack import add_arguments as repack_arguments

    repack_arguments(s)
    s.set_defaults(fn=cmd_repack)

    bench = sub.add_parser("bench", help="benchmarks (JSON with --json)").add_subparsers(
        dest="what", required=True, metavar="BENCH")
    s = bench.add_parser("run", parents=[common], help="decode tok/s (teacher-forced, varied tokens) against the "
                                                       "I/O bound measured in the same run")
    from .bench import add_arguments as bench_run_arguments

    bench_run_arguments(s)
    _engine_arguments(s)
    s.set_defaults(fn=cmd_bench_run)
    s = bench.add_parser("serve", parents=[common], help="load test of the server: concurrent streamed chat "
                                                         "requests on loopback, throughput and p50/p99 latency",
                         description="Start `flashmoe serve` on 127.0.0.1 (-m) or use a running one on this machine "
                                     "(--url), run --clients concurrent clients (the openai client, streamed chat "
                                     "completions) for --seconds, and report tok/s, req/s, latency and time to first "
                                     "token percentiles and errors. Exit status 1 when any request failed.")
    from .server.bench import add_arguments as bench_serve_arguments

    bench_serve_arguments(s)
    _engine_arguments(s)
    s.set_defaults(fn=cmd_bench_serve)
    s = bench.add_parser("dequant", parents=[common], help="dequantisation throughput per ggml type")
    s.add_argument("--device", default="cpu", help="cpu, cuda or xpu (default: cpu)")
    s.add_argument("--mib", type=int, default=64, help="MiB of quantised input per type (default: 64)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_bench_dequant)
    s = bench.add_parser("qmatmul", parents=[common], help="quantised matmul throughput (native CPU kernels against "
                                                           "dequantise + matmul), Qwen3-30B-A3B expert shapes")
    s.add_argument("--rows", type=int, default=1, help="activation rows (tokens) per expert (default: 1, decode)")
    s.add_argument("--experts", type=int, default=8, help="experts per call (default: 8)")
    s.add_argument("--threads", type=int, help="torch/native threads (default: torch's)")
    s.add_argument("--types", help="comma-separated ggml types (default: Q4_K,Q5_K,Q6_K,Q8_0,Q4_0,Q2_K,Q3_K)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_bench_qmatmul)
    s = bench.add_parser("io", parents=[common], help="random whole-expert reads at queue depths 1-32 beside the disk's raw "
                                    "sequential O_DIRECT bandwidth, measured in the same run")
    from .io.bench import add_arguments as bench_io_arguments

    bench_io_arguments(s)
    s.set_defaults(fn=cmd_bench_io)
    return p


def _prog(args: argparse.Namespace) -> str:
    return "flashmoe repack" if args.command == "repack" else "flashmoe"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except FlashMoeError as e:
        print(f"{_prog(args)}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        hint = " (rerun the same command to resume)" if args.command == "repack" else ""
        print(f"flashmoe {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:  # disk full, permission denied, ...: still one line
        print(f"{_prog(args)}: error: {e.strerror or e}{': ' + str(e.filename) if e.filename else ''}", file=sys.stderr)
        return 1
