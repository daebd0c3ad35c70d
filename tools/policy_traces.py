#!/usr/bin/env python3
"""Record the routing traces behind docs/POLICIES.md: the built-in model reads held-out text of each kind
(code, prose, chat; made by `tools/train_tiny_moe.py prepare DIR`, never trained on) one token per forward
call, as in decoding, through the real runtime (Engine, ExpertCache, the model's next-layer prefetch
predictions), and the routes and predictions go to OUT/<kind>.npz (the `flashmoe run --trace` format).

    python tools/policy_traces.py DIR/heldout docs/traces --tokens 1200 --per-doc 400
    flashmoe simulate docs/traces/code.npz --prefetch router --stats
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import flashmoe_stream as fms
from flashmoe_stream.cache.trace import TraceRecorder
from flashmoe_stream.cli import BUILTIN_MODEL


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("heldout", type=Path, help="folder with code.txt, prose.txt, chat.txt (documents split by \\x1e)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", type=Path, default=BUILTIN_MODEL)
    ap.add_argument("--tokens", type=int, default=1200, help="tokens per kind")
    ap.add_argument("--per-doc", type=int, default=400, help="at most this many tokens of one document")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    with fms.Engine.open(a.model, ram_cache="100%") as eng:
        store, cfg = eng.store, eng.config
        cache = eng.model.experts
        for kind in ("code", "prose", "chat"):
            docs = (a.heldout / f"{kind}.txt").read_text(encoding="utf-8").split("\n\x1e\n")
            rec = TraceRecorder({"model": str(a.model), "arch": cfg.arch, "n_layer": cfg.n_layer,
                                 "n_expert": cfg.n_expert, "n_expert_used": cfg.n_expert_used, "kind": kind,
                                 "how": "held-out text, teacher-forced one token per forward call",
                                 "expert_bytes": {str(layer): store.expert_nbytes(layer) for layer in store.layers}})
            eng.model.experts = rec.wrap(cache)
            done = 0
            with tqdm(total=a.tokens, desc=kind, unit="tok") as bar:
                for doc in docs:
                    ids = eng.tokenize(doc)[: min(a.per_doc, a.tokens - done)]
                    if len(ids) < 16:
                        continue
                    kv = eng.model.new_kv_cache(len(ids))
                    for t in ids:
                        eng.model.forward(torch.tensor([t]), kv, rec.on_route)
                        bar.update()
                    rec.end_sequence(ids, n_prompt=len(ids))
                    done += len(ids)
                    if done >= a.tokens:
                        break
            eng.model.experts = cache
            print(rec.save(a.out / f"{kind}.npz"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
