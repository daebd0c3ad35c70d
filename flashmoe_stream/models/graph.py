"""Decode from a CUDA graph when every expert stays on the GPU (qwen3moe, llama-with-experts).

When the device tier holds the whole model nothing needs to be fetched, so the host has no reason to
see the routing: one token's pass through every layer (attention, routing, the fused expert kernels,
the head) is captured once as a CUDA graph and replayed per token, with the token's embedding and
its position as device inputs (the embedding lookup runs before the replay). The experts are
addressed through per-layer offset tables indexed by the router's choice on the device. Eager decode
costs a Python round trip and a host sync per layer; a replay costs one launch per token.

Each layer is about fifteen launches (models/_fused.py: residual add + RMSNorm, q/k-norm + RoPE + the
KV-cache write, attention, routing, SiLU * up; the fused GEMV kernels for the matmuls). Attention
reads the position from the device and loops over the filled part of the cache, so the graph does
not depend on the length filled.
"""

from __future__ import annotations

import numpy as np
import torch

from ..quant import QTensor, fused_gemv_pairs
from .common import fused_supported_for, mm, rope_angles


def _proj(x: torch.Tensor, w) -> torch.Tensor:
    """x [1, K] @ w.T as float32 [N] (a fused kernel where w is a QTensor that one takes)."""
    return (w.matmul(x, torch.float32) if isinstance(w, QTensor) else mm(x, w, None).float()).view(-1)


class GraphDecode:
    """One-token steps of ``model`` (an MoEDecoder) over one KV cache, replayed from a CUDA graph.

    ``experts[layer]`` lists every expert of the layer (the cache's ExpertWeights, on the GPU); holding
    them keeps their memory valid for the graph's lifetime whatever the cache does.
    """

    def __init__(self, model, experts: dict[int, list], kv):
        c = model.cfg
        self.model, self.kv, self.cfg = model, kv, c
        self.experts = experts  # referenced: the addresses in the tables stay valid
        dev = model.device
        self.device = dev
        first = experts[min(experts)][0].blocks
        self.base = first["gate"].data
        self.types = {n: (b.qtype, b.shape) for n, b in first.items()}
        addrs = np.array([[[e.blocks[n].data.data_ptr() for e in experts[i]] for n in ("gate", "up", "down")]
                          for i in range(c.n_layer)], dtype=np.int64)  # [L, 3, n_expert]
        self.aligned = not (addrs % 16).any()
        self.tables = torch.from_numpy(addrs - self.base.data_ptr()).to(dev)
        k = c.n_expert_used
        self.xrows_gu = torch.zeros(2 * k, dtype=torch.int64, device=dev)
        self.xrows_down = torch.arange(k, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(1, dtype=torch.int64, device=dev)
        self.x_in = torch.zeros(1, c.n_embd, dtype=torch.float32, device=dev)
        self.ids = torch.zeros(c.n_layer, k, dtype=torch.int64, device=dev)
        self.weights = torch.zeros(c.n_layer, k, dtype=torch.float32, device=dev)
        cos, sin = rope_angles(torch.arange(kv.n_ctx, device=dev), c.head_dim, c.rope_theta)
        self.cos, self.sin = cos[:, 0].contiguous(), sin[:, 0].contiguous()  # [n_ctx, D/2]: a lookup per step
        self.offs = torch.zeros(c.n_layer, 3 * k, dtype=torch.int64, device=dev)  # the routed experts' offsets
        self.h = torch.zeros(c.n_embd, dtype=model.dtype, device=dev)  # the normed input of the next matmuls
        self.hf = torch.zeros(c.n_embd, dtype=torch.float32, device=dev)  # ... in float32, for the router
        self.q = torch.zeros(c.n_head * c.head_dim, dtype=torch.float32, device=dev)
        self.att = torch.zeros(c.n_head * c.head_dim, dtype=model.dtype, device=dev)
        self.act = torch.zeros(k, self.types["down"][1][1], dtype=model.dtype, device=dev)
        self.graph = None
        self.logits = None
        self._host = None  # pinned host copies of ids and weights (routes())

    @staticmethod
    def supported(model) -> bool:
        """Whether ``model`` can decode from a graph here: a CUDA device, no llama.cpp activation rounding,
        a power-of-two head size (the attention kernel's), and every layer's expert types taken by the
        fused kernels (asked of the cache, before any load)."""
        dev, c = model.device, model.cfg
        return dev.type == "cuda" and not model.llama_numerics and c.head_dim & (c.head_dim - 1) == 0 and \
            c.n_head % c.n_head_kv == 0 and all(fused_supported_for(model.experts, i, dev) for i in range(c.n_layer))

    # --- one step, as captured ------------------------------------------------------------------
    def _step(self) -> torch.Tensor:
        from . import _fused as K

        m, c, kv = self.model, self.cfg, self.kv
        k, eps = c.n_expert_used, c.rms_eps
        (tg, sg), (tu, su), (td, sd) = self.types["gate"], self.types["up"], self.types["down"]
        x, h, h1 = self.x_in.view(-1), self.h, self.h.view(1, -1)  # the residual stream, updated in place
        K.add_norm(x, None, None, m.attn[0].norm, eps, h)
        for i in range(c.n_layer):
            w, f = m.attn[i], m.ffn_w[i]
            q, kk, v = (_proj(h1, t) for t in (w.q, w.k, w.v))
            K.qk_rope(q, kk, v, w.q_norm, w.k_norm, self.cos, self.sin, self.pos, kv.k[i], kv.v[i], self.q, eps,
                      c.rope_neox)
            K.attend(self.q, kv.k[i], kv.v[i], self.pos, self.att)
            K.add_norm(x, _proj(self.att.view(1, -1), w.o), None, f.norm, eps, h, self.hf)
            K.route_topk((self.hf.view(1, -1) @ f.router.T).view(-1), self.tables[i], k, c.expert_weights_norm,
                         self.ids[i], self.weights[i], self.offs[i])
            offs = self.offs[i]
            if tg == tu:
                gu = fused_gemv_pairs(h1, self.base, offs[:2 * k], self.xrows_gu, tg, sg, self.aligned)
            else:
                gu = torch.cat([fused_gemv_pairs(h1, self.base, offs[j * k:(j + 1) * k], self.xrows_gu[:k], t, sh,
                                                 self.aligned) for j, (t, sh) in enumerate(((tg, sg), (tu, su)))])
            K.silu_mul(gu, self.act)
            y = fused_gemv_pairs(self.act, self.base, offs[2 * k:], self.xrows_down, td, sd, self.aligned)
            nxt = m.attn[i + 1].norm if i + 1 < c.n_layer else m.out_norm
            K.add_norm(x, y, self.weights[i], nxt, eps, h)
        return _proj(h1, m.output).view(1, -1)

    # --- use ------------------------------------------------------------------------------------
    def _capture(self) -> None:
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        saved = (self.kv.k[:, 0].clone(), self.kv.v[:, 0].clone())  # the warm-up writes position 0
        with torch.cuda.stream(s):
            for _ in range(2):  # compile the kernels, settle the allocator
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()
        self.kv.k[:, 0], self.kv.v[:, 0] = saved

    def step(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """Logits [1, n_vocab] of ``token`` (one id) at position ``pos``; writes its K and V there."""
        if self.graph is None:
            self.pos.fill_(0)
            self._capture()
        self.x_in.copy_(self.model.embed(token.to(self.device)))
        self.pos.fill_(pos)
        self.graph.replay()
        return self.logits.clone()

    def routes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The last step's expert ids and router weights, [n_layer, k] each, on the host."""
        if self._host is None:
            self._host = (torch.empty(self.ids.shape, dtype=self.ids.dtype, pin_memory=True),
                          torch.empty(self.weights.shape, dtype=self.weights.dtype, pin_memory=True))
        ids, weights = self._host
        ids.copy_(self.ids, non_blocking=True)
        weights.copy_(self.weights, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return ids.clone(), weights.clone()


__all__ = ["GraphDecode"]
