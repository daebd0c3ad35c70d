#!/usr/bin/env python3
"""Train the small MoE that flashmoe ships as its built-in model (qwen3moe architecture), or, with
``--arch llama``, the small Mixtral-shaped test fixture (tests/data/tiny-mixtral-Q8_0.gguf).

Three steps, each a subcommand (see docs/MODEL.md for the recipe and the results):

    prepare DIR            here, CPU: offline text (Python's standard library, Debian's docs, chat turns made
                           from stdlib docstrings) -> a byte-level BPE tokenizer (synth.train_bpe) and token ids:
                           DIR/tokenizer.json, DIR/corpus.npz, DIR/heldout/{code,prose,chat}.txt (not trained on)
    train DIR OUT          a GPU, torch + numpy only: DIR/corpus.npz -> OUT/weights-*.npz (fp16/fp32, each file
                           < 16 MB, GGUF tensor names) and OUT/train_log.json
    export DIR WEIGHTS -o MODEL.gguf
                           here: the weights quantised to Q8_0 and written by flashmoe_stream.synth.write_model
                           (synth's tensor names, metadata and tokenizer layout)

``prepare --arch`` picks the architecture (default qwen3moe; llama: Mixtral-like, 8 experts, top-2, no q/k norm,
normal RoPE, the llama-bpe pre-tokenizer); the corpus records it, and ``train`` and ``export`` follow it.

The MoE block in training computes every expert densely and weights them by the (sparse, top-k) router
gates before the down projection, which is the same function as the sparse dispatch and fast on a GPU at
this size. Losses: next-token cross-entropy + 0.01 x load balance (Switch: n_expert * sum f_e P_e per
layer) + 1.0 x prefetch consistency (KL from layer i's routing to layer i's router applied to the hidden
state after layer i-1's attention, which is what the runtime uses to prefetch layer i's experts).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np

# the model: dimensions as flashmoe_stream.synth.Preset fields
CONFIG = dict(n_layer=8, n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_expert=32, n_expert_used=4,
              n_ff_exp=64, n_vocab=4096, n_ctx=512, rope_theta=10000.0, rms_eps=1e-6)
# the Mixtral-shaped fixture (general.architecture = llama with experts): 8 experts, top-2, small enough for tests/data
LLAMA_CONFIG = dict(n_layer=6, n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_expert=8, n_expert_used=2,
                    n_ff_exp=128, n_vocab=2048, n_ctx=512, rope_theta=10000.0, rms_eps=1e-5)
CONFIGS = {"qwen3moe": CONFIG, "llama": LLAMA_CONFIG}
PRE = {"qwen3moe": "qwen2", "llama": "llama-bpe"}  # the pre-tokenizer synth writes for each architecture
NAMES = {"qwen3moe": "flashmoe tiny-moe (trained on Python stdlib + Debian docs)",
         "llama": "flashmoe tiny-mixtral (trained on Python stdlib + Debian docs)"}
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _arch(c: dict) -> str:
    """The architecture a corpus was prepared for (corpora without the key predate --arch: qwen3moe)."""
    return c.get("arch", "qwen3moe")


# =============================================================================================
# prepare


def _code_docs(roots: list[Path]) -> list[str]:
    out = []
    for f in sorted(f for root in roots for f in root.rglob("*.py")):
        if "__pycache__" in f.parts or (f.is_relative_to(roots[0]) and
                                         any(p in f.parts for p in ("site-packages", "dist-packages"))):
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if 200 <= len(text) <= 200_000:
            out.append(text)
    return out


def _prose_docs(roots: list[Path]) -> list[str]:
    import gzip

    out = []
    for root in roots:
        for f in sorted(root.rglob("*")):
            if not f.is_file() or f.is_symlink():
                continue
            n = f.name.lower()
            if f.parent.name == "common-licenses":
                pass
            elif not (n.endswith((".txt", ".md", ".rst", ".pod", ".txt.gz", ".md.gz", ".rst.gz", ".info.gz"))
                      or n.startswith(("readme", "news", "faq", "todo", "thanks", "authors"))):
                continue
            try:
                raw = gzip.decompress(f.read_bytes()) if n.endswith(".gz") else f.read_bytes()
                text = raw.decode("utf-8")
            except (OSError, UnicodeDecodeError, EOFError):
                continue
            if 300 <= len(text) <= 300_000 and text.count("\x00") == 0:
                out.append(text)
    return out


_QUESTIONS = ("What does {q} do?", "Explain {q}.", "How do I use {q} in Python?", "Tell me about {q}.",
              "What is {q} for?")


def _chat_docs(roots: list[Path], rng: random.Random) -> list[str]:
    """Chat turns in the model's template: a question about a stdlib function or class, its docstring as answer."""
    import ast
    import inspect

    out = []
    files = [(root, f) for root in roots for f in sorted(root.rglob("*.py"))]
    for root, f in files:
        parts = f.relative_to(root).parts
        if any(p.startswith("test") or p in ("site-packages", "dist-packages", "_vendor") for p in parts):
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        mod = ".".join(f.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        turns = []
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc or len(doc) < 40:
                continue
            answer = inspect.cleandoc(doc).split("\n\n")[0].strip()[:700]
            q = rng.choice(_QUESTIONS).format(q=f"`{mod}.{node.name}`")
            turns.append(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n")
        for i in range(0, len(turns), 3):
            out.append("".join(turns[i: i + 3]))
    return out


def cmd_prepare(a: argparse.Namespace) -> int:
    import regex
    from tqdm import tqdm

    from flashmoe_stream.engine.tokenizer import PRE_TOKENIZERS, Tokenizer
    from flashmoe_stream.synth import SPECIAL_TOKENS, train_bpe

    assert SPECIAL_TOKENS == SPECIALS
    cfg = CONFIGS[a.arch]
    pre = PRE[a.arch]
    rng = random.Random(0)
    out = Path(a.dir)
    (out / "heldout").mkdir(parents=True, exist_ok=True)
    code_roots = [Path(a.python)] + [Path(p) for p in a.more_code]
    kinds = {"code": _code_docs(code_roots), "prose": _prose_docs([Path(p) for p in a.docs]),
             "chat": _chat_docs(code_roots, rng)}
    caps = {"code": a.code_mb << 20, "prose": a.prose_mb << 20, "chat": a.chat_mb << 20}
    train, heldout, sizes = [], {}, {}
    for kind, docs in kinds.items():
        rng.shuffle(docs)
        heldout[kind], docs = docs[: a.heldout], docs[a.heldout:]
        kept, n = [], 0
        for d in docs:
            if n >= caps[kind]:
                break
            kept.append((kind, d))
            n += len(d)
        sizes[kind] = {"documents": len(kept), "chars": n}
        train += kept
        (out / "heldout" / f"{kind}.txt").write_text("\n\x1e\n".join(heldout[kind]), encoding="utf-8")
    rng.shuffle(train)
    print(f"corpus: {json.dumps(sizes)}", file=sys.stderr)

    # the tokenizer: BPE with the same pre-tokenizer llama.cpp applies for the tokenizer.ggml.pre synth writes
    rx = regex.compile(PRE_TOKENIZERS[pre][0])
    sample = "".join(d for _, d in train[:: max(1, len(train) // 2000)])[: a.bpe_chars]
    n_merges = cfg["n_vocab"] - 256 - len(SPECIALS)
    t0 = time.time()
    tokens, merges = train_bpe(sample, n_merges, split=rx.findall)
    print(f"BPE: {len(merges)} merges from {len(sample):,} chars in {time.time() - t0:.0f} s", file=sys.stderr)
    vocab = tokens + list(SPECIALS)
    vocab += [f"[PAD{i}]" for i in range(cfg["n_vocab"] - len(vocab))]
    (out / "tokenizer.json").write_text(json.dumps({"tokens": tokens, "merges": merges}), encoding="utf-8")
    tok = Tokenizer({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": vocab,
                     "tokenizer.ggml.token_type": [1] * len(tokens) + [3] * len(SPECIALS)
                     + [5] * (len(vocab) - len(tokens) - len(SPECIALS)),
                     "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": len(tokens),
                     "tokenizer.ggml.eos_token_id": len(tokens) + 2})
    eot = len(tokens)
    ids, val = [], []
    n_val = max(1, len(train) // 100)
    for k, (_kind, d) in enumerate(tqdm(train, desc="tokenize", unit="doc")):
        (val if k < n_val else ids).extend([eot] + tok.encode(d, add_bos=False))
    arr, varr = np.asarray(ids, np.uint16), np.asarray(val, np.uint16)
    # qwen3moe's config is saved as it always was (no arch key), so its corpus is byte for byte the same
    np.savez_compressed(out / "corpus.npz", train=arr, val=varr,
                        config=json.dumps(cfg if a.arch == "qwen3moe" else {"arch": a.arch, **cfg}))
    chars = sum(len(d) for _, d in train)
    print(f"tokens: {arr.size:,} train, {varr.size:,} validation ({chars / (arr.size + varr.size):.2f} chars/token)",
          file=sys.stderr)
    (out / "corpus.json").write_text(json.dumps({"kinds": sizes, "train_tokens": int(arr.size),
                                                 "val_tokens": int(varr.size), "bpe_sample_chars": len(sample)},
                                                indent=1))
    return 0


# =============================================================================================
# train (torch and numpy only: runs on a bare GPU machine)


def _model(c: dict, device):
    import torch
    from torch import nn

    E, H, KV, D, NE, FF, V = (c["n_embd"], c["n_head"], c["n_head_kv"], c["head_dim"], c["n_expert"], c["n_ff_exp"],
                              c["n_vocab"])
    g = torch.Generator().manual_seed(0)

    def p(*shape, std=0.02):
        return nn.Parameter((torch.randn(*shape, generator=g) * std).to(device))

    def ones(n):
        return nn.Parameter(torch.ones(n, device=device))

    resid = 0.02 / math.sqrt(2 * c["n_layer"])
    qk_norm = _arch(c) == "qwen3moe"
    P = {"token_embd.weight": p(V, E), "output_norm.weight": ones(E), "output.weight": p(V, E)}
    for i in range(c["n_layer"]):
        b = f"blk.{i}."
        P.update({b + "attn_norm.weight": ones(E), b + "attn_q.weight": p(H * D, E), b + "attn_k.weight": p(KV * D, E),
                  b + "attn_v.weight": p(KV * D, E), b + "attn_output.weight": p(E, H * D, std=resid),
                  **({b + "attn_q_norm.weight": ones(D), b + "attn_k_norm.weight": ones(D)} if qk_norm else {}),
                  b + "ffn_norm.weight": ones(E),
                  b + "ffn_gate_inp.weight": p(NE, E), b + "ffn_gate_exps.weight": p(NE, FF, E),
                  b + "ffn_up_exps.weight": p(NE, FF, E), b + "ffn_down_exps.weight": p(NE, E, FF, std=resid)})
    return nn.ParameterDict({k.replace(".", "/"): v for k, v in P.items()})  # no '.' in ParameterDict keys


def _forward(P, c: dict, tok, want_stats: bool = False):
    """(logits [B, T, V], aux losses dict, stats) — the qwen3moe or llama (Mixtral) forward pass as llama.cpp
    computes it. llama: no q/k norm and normal RoPE, which rotates the adjacent pairs (2i, 2i + 1) of the GGUF
    layout (llama.cpp's converter permutes HF's q/k rows into that layout; trained here, they are born in it)."""
    import torch
    import torch.nn.functional as F

    B, T = tok.shape
    E, H, KV, D, NE, FF, K = (c["n_embd"], c["n_head"], c["n_head_kv"], c["head_dim"], c["n_expert"], c["n_ff_exp"],
                              c["n_expert_used"])
    eps = c["rms_eps"]
    qwen = _arch(c) == "qwen3moe"

    def rms(x, w):
        xf = x.float()
        return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w

    inv = c["rope_theta"] ** (-torch.arange(0, D, 2, device=tok.device, dtype=torch.float32) / D)
    ang = torch.arange(T, device=tok.device, dtype=torch.float32)[:, None] * inv[None]
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]

    def rope(x):  # x [B, T, h, D]
        if qwen:  # NEOX pairing (i, i + D/2)
            a, b = x[..., : D // 2], x[..., D // 2:]
            return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)
        a, b = x[..., 0::2], x[..., 1::2]  # normal pairing (2i, 2i + 1)
        return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)

    def W(name):
        return P[name.replace(".", "/")]

    x = W("token_embd.weight")[tok].float()
    lb, pf, stats = 0.0, 0.0, []
    prev_attn = None
    for i in range(c["n_layer"]):
        b = f"blk.{i}."
        h = rms(x, W(b + "attn_norm.weight")).to(torch.bfloat16)
        q = (h @ W(b + "attn_q.weight").to(h.dtype).T).view(B, T, H, D)
        k = (h @ W(b + "attn_k.weight").to(h.dtype).T).view(B, T, KV, D)
        v = (h @ W(b + "attn_v.weight").to(h.dtype).T).view(B, T, KV, D)
        if qwen:
            q, k = rms(q, W(b + "attn_q_norm.weight")), rms(k, W(b + "attn_k_norm.weight"))
        q, k = rope(q.float()).to(h.dtype), rope(k.float()).to(h.dtype)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                             enable_gqa=True).transpose(1, 2).reshape(B, T, H * D)
        x = x + (att @ W(b + "attn_output.weight").to(h.dtype).T).float()
        # routing (float32)
        router, fnorm = W(b + "ffn_gate_inp.weight"), W(b + "ffn_norm.weight")
        hf = rms(x, fnorm).reshape(B * T, E)
        logits = hf @ router.T
        probs = logits.softmax(-1)
        topv, topi = probs.topk(K, -1)
        gates = torch.zeros_like(probs).scatter(1, topi, topv / topv.sum(-1, keepdim=True))
        f = torch.zeros(NE, device=x.device).index_add_(0, topi.reshape(-1), torch.ones(topi.numel(), device=x.device))
        f = f / topi.numel()
        lb = lb + NE * (f * probs.mean(0)).sum()
        if prev_attn is not None:  # the runtime's next-layer prediction: this router on the state before the last FFN
            pred = (rms(prev_attn, fnorm).reshape(B * T, E) @ router.T).log_softmax(-1)
            target = probs.detach()
            pf = pf + (target * (target.clamp_min(1e-9).log() - pred)).sum(-1).mean()
            if want_stats:
                pk = pred.topk(K, -1).indices
                hit = (pk[:, :, None] == topi[:, None, :]).any(1).float().mean()
                stats.append({"layer": i, "recall": float(hit)})
        prev_attn = x
        # experts: all of them densely, weighted by the sparse gates before the down projection
        hb = hf.to(torch.bfloat16)
        gu = hb @ W(b + "ffn_gate_exps.weight").to(hb.dtype).reshape(NE * FF, E).T
        up = hb @ W(b + "ffn_up_exps.weight").to(hb.dtype).reshape(NE * FF, E).T
        a = (F.silu(gu) * up).view(-1, NE, FF) * gates.to(hb.dtype)[:, :, None]
        down = W(b + "ffn_down_exps.weight").to(hb.dtype).permute(1, 0, 2).reshape(E, NE * FF)
        x = x + (a.reshape(-1, NE * FF) @ down.T).float().view(B, T, E)
        if want_stats:
            stats.append({"layer": i, "usage": f.tolist()})
    h = rms(x, W("output_norm.weight")).to(torch.bfloat16)
    out = h @ W("output.weight").to(h.dtype).T
    n = c["n_layer"]
    return out.float(), {"balance": lb / n, "prefetch": pf / max(1, n - 1)}, stats


def cmd_train(a: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    dev = torch.device(a.device)
    data = np.load(Path(a.dir) / "corpus.npz")
    c = json.loads(str(data["config"]))
    _check_arch(a, c)
    train = torch.from_numpy(data["train"].astype(np.int64)).to(dev)
    val = torch.from_numpy(data["val"].astype(np.int64)).to(dev)
    T, B = a.seq, a.batch
    P = _model(c, dev)
    decay = [v for k, v in P.items() if v.dim() >= 2]
    rest = [v for k, v in P.items() if v.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), fused=dev.type == "cuda")
    gen = torch.Generator(device=dev).manual_seed(0)

    def batch(src, n):
        starts = torch.randint(0, src.numel() - T - 1, (n,), device=dev, generator=gen)
        idx = starts[:, None] + torch.arange(T + 1, device=dev)[None]
        w = src[idx]
        return w[:, :-1], w[:, 1:]

    vgen = torch.Generator(device=dev).manual_seed(1)
    vstarts = torch.randint(0, val.numel() - T - 1, (a.val_batches * B,), device=dev, generator=vgen)

    @torch.no_grad()
    def evaluate(stats=False):
        tot, st = 0.0, []
        for j in range(a.val_batches):
            s = vstarts[j * B:(j + 1) * B]
            w = val[s[:, None] + torch.arange(T + 1, device=dev)[None]]
            logits, _aux, st1 = _forward(P, c, w[:, :-1], want_stats=stats and j == 0)
            tot += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1)))
            st += st1
        return tot / a.val_batches, st

    log = {"config": c, "args": {k: v for k, v in vars(a).items() if k != "fn"}, "steps": []}
    t_start = time.time()
    total = a.steps
    step = 0
    best = (math.inf, 0, None)
    while True:
        el = time.time() - t_start
        if step == 20:
            t20 = el
        if total is None and step == 60:  # the step rate after warm-up sets the number of steps
            total = max(100, int(60 + (a.seconds - el) * 40 / (el - t20)))
            print(f"{(el - t20) / 40 * 1000:.0f} ms/step: {total} steps in the budget", flush=True)
        if total is not None and step >= total:
            break
        frac = step / total if total else 0.0
        lr = a.lr * min(1.0, (step + 1) / a.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))
        for gparam in opt.param_groups:
            gparam["lr"] = lr
        x, y = batch(train, B)
        logits, aux, _ = _forward(P, c, x)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss = ce + a.balance * aux["balance"] + a.prefetch * aux["prefetch"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(P.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0 or step == 1 or step % a.eval_every == 0 or (total and step == total):
            rec = {"step": step, "s": round(time.time() - t_start, 1), "lr": lr, "ce": ce.item(),
                   "balance": aux["balance"].item(), "prefetch_kl": aux["prefetch"].item()}
            if step % a.eval_every == 0 or (total and step == total):
                rec["val_ce"] = evaluate()[0]
                if rec["val_ce"] < best[0]:
                    best = (rec["val_ce"], step, {k: v.detach().clone() for k, v in P.items()})
            log["steps"].append(rec)
            print(json.dumps(rec), flush=True)
    if best[2] is not None:
        with torch.no_grad():
            for k, v in P.items():
                v.copy_(best[2][k])
    vce, st = evaluate(stats=True)
    log["final"] = {"steps": step, "best_step": best[1], "seconds": round(time.time() - t_start, 1), "val_ce": vce,
                    "tokens_seen": step * B * T, "stats": st}
    print(json.dumps({k: v for k, v in log["final"].items() if k != "stats"}), flush=True)
    print(json.dumps([s for s in st if "recall" in s]), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    groups: dict[str, dict[str, np.ndarray]] = {}
    for k, v in P.items():
        name = k.replace("/", ".")
        grp = f"blk{int(name.split('.')[1]) // 2}" if name.startswith("blk.") else "global"  # files < 16 MB
        arr = v.detach().float().cpu().numpy()
        keep32 = arr.ndim < 2 or name.endswith("ffn_gate_inp.weight")
        groups.setdefault(grp, {})[name] = arr if keep32 else arr.astype(np.float16)
    for grp, arrs in groups.items():
        np.savez(out / f"weights-{grp}.npz", **arrs)
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    return 0


# =============================================================================================
# export


def _check_arch(a: argparse.Namespace, c: dict) -> None:
    if a.arch is not None and a.arch != _arch(c):
        sys.exit(f"--arch {a.arch}: the corpus was prepared for {_arch(c)} (prepare --arch {a.arch} first)")


def cmd_export(a: argparse.Namespace) -> int:
    from flashmoe_stream.synth import Preset, write_model

    with np.load(Path(a.dir) / "corpus.npz") as z:
        c = json.loads(str(z["config"]))
    _check_arch(a, c)
    arch = _arch(c)
    tok = json.loads((Path(a.dir) / "tokenizer.json").read_text())
    weights = {}
    for f in sorted(Path(a.weights).glob("weights-*.npz")):
        with np.load(f) as z:
            weights.update({k: z[k].astype(np.float32) for k in z.files})
    p = Preset(**CONFIGS[arch])
    path = write_model(a.output, p, weights, arch=arch, qtype="Q8_0", bpe=(tok["tokens"], tok["merges"]),
                       name=NAMES[arch])
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("prepare", help="corpus + tokenizer + token ids (CPU)")
    s.add_argument("dir")
    s.add_argument("--arch", choices=tuple(CONFIGS), default="qwen3moe",
                   help="qwen3moe: the built-in model; llama: the Mixtral-shaped test fixture")
    s.add_argument("--python", default="/usr/lib/python3.11")
    s.add_argument("--more-code", nargs="*", default=["/usr/lib/python3/dist-packages"],
                   help="more Python sources (for code and for chat turns made of docstrings)")
    s.add_argument("--docs", nargs="+", default=["/usr/share/doc", "/usr/share/common-licenses", "/usr/share/perl",
                                                 "/usr/share/info"])
    s.add_argument("--code-mb", type=int, default=30)
    s.add_argument("--prose-mb", type=int, default=30)
    s.add_argument("--chat-mb", type=int, default=6)
    s.add_argument("--heldout", type=int, default=20, help="documents per kind kept out of training (for traces)")
    s.add_argument("--bpe-chars", type=int, default=3_000_000)
    s.set_defaults(fn=cmd_prepare)
    s = sub.add_parser("train", help="train on a GPU (torch, numpy)")
    s.add_argument("dir")
    s.add_argument("out")
    s.add_argument("--arch", choices=tuple(CONFIGS), help="check that the corpus was prepared for this architecture")
    s.add_argument("--device", default="cuda")
    s.add_argument("--seconds", type=float, default=85, help="training time budget (the step count is set from it)")
    s.add_argument("--steps", type=int, help="train exactly this many steps instead (the shipped model: 1268)")
    s.add_argument("--seq", type=int, default=512)
    s.add_argument("--batch", type=int, default=64)
    s.add_argument("--lr", type=float, default=3e-3)
    s.add_argument("--warmup", type=int, default=100)
    s.add_argument("--balance", type=float, default=0.01, help="load-balancing loss weight")
    s.add_argument("--prefetch", type=float, default=1.0, help="prefetch-consistency loss weight")
    s.add_argument("--eval-every", type=int, default=200)
    s.add_argument("--val-batches", type=int, default=8)
    s.set_defaults(fn=cmd_train)
    s = sub.add_parser("export", help="weights -> Q8_0 GGUF via flashmoe_stream.synth.write_model")
    s.add_argument("dir")
    s.add_argument("weights")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--arch", choices=tuple(CONFIGS), help="check that the corpus was prepared for this architecture")
    s.set_defaults(fn=cmd_export)
    a = ap.parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
