"""Decode from a CUDA graph when every expert stays on the GPU (qwen3moe, llama-with-experts).

When the device tier holds the whole model nothing needs to be fetched, so the host has no reason to
see the routing: one token's pass through every layer (attention, routing, the fused expert kernels,
the head) is captured once as a CUDA graph and replayed per token, with the token's embedding and
its position as device inputs (the embedding lookup runs before the replay). The experts are
addressed through per-layer offset tables indexed by the router's choice on the device. Eager decode
costs a Python round trip and a host sync per layer; a replay costs one launch per token.

Attention reads the whole static KV cache under a mask (positions past the current one are masked
out), so the graph does not depend on the length filled.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..quant import fused_gemv_pairs
from .common import fused_supported_for, mm, rms_norm, rope_angles, rotate, route


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
        self.ctx = torch.arange(kv.n_ctx, device=dev)
        self.cos, self.sin = rope_angles(self.ctx, c.head_dim, c.rope_theta)  # [n_ctx, 1, D/2]: a lookup per step
        self.graph = None
        self.logits = None

    @staticmethod
    def supported(model) -> bool:
        """Whether ``model`` can decode from a graph here: a CUDA device, no llama.cpp activation rounding,
        and every layer's expert types taken by the fused kernels (asked of the cache, before any load)."""
        dev = model.device
        return dev.type == "cuda" and not model.llama_numerics and \
            all(fused_supported_for(model.experts, i, dev) for i in range(model.cfg.n_layer))

    # --- one step, as captured ------------------------------------------------------------------
    def _attend(self, i: int, x: torch.Tensor) -> torch.Tensor:
        m, c, kv = self.model, self.cfg, self.kv
        w = m.attn[i]
        h = rms_norm(x, w.norm, c.rms_eps).to(w.q.dtype)
        q = mm(h, w.q, None).view(1, c.n_head, c.head_dim)
        k = mm(h, w.k, None).view(1, c.n_head_kv, c.head_dim)
        v = mm(h, w.v, None).view(1, c.n_head_kv, c.head_dim)
        if w.q_norm is not None:
            q, k = rms_norm(q, w.q_norm, c.rms_eps).to(v.dtype), rms_norm(k, w.k_norm, c.rms_eps).to(v.dtype)
        cos, sin = self.cos[self.pos], self.sin[self.pos]
        q, k = rotate(q, cos, sin, c.rope_neox), rotate(k, cos, sin, c.rope_neox)
        kv.k[i].index_copy_(0, self.pos, k.to(kv.k.dtype))
        kv.v[i].index_copy_(0, self.pos, v.to(kv.v.dtype))
        mask = (self.ctx <= self.pos).view(1, 1, -1)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), kv.k[i].transpose(0, 1), kv.v[i].transpose(0, 1),
                                             attn_mask=mask, enable_gqa=c.n_head != c.n_head_kv).transpose(0, 1)
        return mm(out.reshape(1, c.n_head * c.head_dim), w.o, None).float()

    def _moe(self, i: int, x: torch.Tensor) -> torch.Tensor:
        m, c = self.model, self.cfg
        w = m.ffn_w[i]
        h = rms_norm(x, w.norm, c.rms_eps)
        weights, ids = route(h, w.router, c.n_expert_used, c.expert_weights_norm)
        self.ids[i].copy_(ids[0])
        self.weights[i].copy_(weights[0])
        offs = self.tables[i][:, ids[0]]  # [3, k]
        hd = h.to(m.dtype)
        (tg, sg), (tu, su), (td, sd) = self.types["gate"], self.types["up"], self.types["down"]
        k = c.n_expert_used
        if tg == tu:
            gu = fused_gemv_pairs(hd, self.base, offs[:2].reshape(-1), self.xrows_gu, tg, sg, self.aligned)
            g, u = gu[:k], gu[k:]
        else:
            g = fused_gemv_pairs(hd, self.base, offs[0], self.xrows_gu[:k], tg, sg, self.aligned)
            u = fused_gemv_pairs(hd, self.base, offs[1], self.xrows_gu[:k], tu, su, self.aligned)
        y = fused_gemv_pairs(F.silu(g) * u, self.base, offs[2], self.xrows_down, td, sd, self.aligned)
        return (y * weights[0].float().unsqueeze(-1)).sum(0, keepdim=True)

    def _step(self) -> torch.Tensor:
        x = self.x_in
        for i in range(self.cfg.n_layer):
            x = x + self._attend(i, x)
            x = x + self._moe(i, x)
        return self.model.head(x)

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
        """The last step's expert ids and router weights, [n_layer, k] each."""
        return self.ids, self.weights


__all__ = ["GraphDecode"]
