"""Pieces shared by the MoE decoder families: RMSNorm, RoPE, GQA attention with a KV cache, the
streaming MoE block. No files, no threads: weights come in as tensors, experts from the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from ..quant import dequantize


class ExpertSource(Protocol):
    """What the MoE block needs from the expert cache (cache.ExpertCache satisfies it)."""

    def get(self, layer: int, expert_ids: list[int]) -> list: ...

    def prefetch(self, layer: int, expert_ids: list[int]) -> None: ...


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """In float32 whatever the input (the residual stream stays float32; matmuls cast to the weights)."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float, neox: bool) -> torch.Tensor:
    """x: [T, H, D] at positions pos [T]. NEOX rotates (i, i + D/2) pairs, normal RoPE (2i, 2i + 1)."""
    D = x.shape[-1]
    inv = theta ** (-torch.arange(0, D, 2, dtype=torch.float64, device=x.device) / D)
    ang = pos.to(torch.float64)[:, None] * inv[None, :]
    cos, sin = ang.cos().float()[:, None, :], ang.sin().float()[:, None, :]
    xf = x.float()
    if neox:
        a, b = xf[..., : D // 2], xf[..., D // 2:]
        out = torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
    else:
        a, b = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    return out.to(x.dtype)


class KVCache:
    """Per-layer K and V for one sequence: [n_ctx, n_head_kv, head_dim] each, filled front to back."""

    def __init__(self, n_layer: int, n_ctx: int, n_head_kv: int, head_dim: int, device, dtype):
        self.k = torch.zeros(n_layer, n_ctx, n_head_kv, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.n_ctx = n_ctx
        self.length = 0  # positions filled (advanced by the model after the last layer)

    def reset(self) -> None:
        self.length = 0


@dataclass
class AttentionWeights:
    norm: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None


def attention(x: torch.Tensor, w: AttentionWeights, layer: int, kv: KVCache, pos: torch.Tensor, n_head: int,
              n_head_kv: int, head_dim: int, eps: float, theta: float, neox: bool) -> torch.Tensor:
    """Pre-norm GQA self-attention of the new tokens x [T, n_embd] over the cache and themselves."""
    T = x.shape[0]
    h = rms_norm(x, w.norm, eps).to(w.q.dtype)
    q = (h @ w.q.T).view(T, n_head, head_dim)
    k = (h @ w.k.T).view(T, n_head_kv, head_dim)
    v = (h @ w.v.T).view(T, n_head_kv, head_dim)
    if w.q_norm is not None:
        q, k = rms_norm(q, w.q_norm, eps).to(v.dtype), rms_norm(k, w.k_norm, eps).to(v.dtype)
    q, k = rope(q, pos, theta, neox), rope(k, pos, theta, neox)
    start = kv.length
    kv.k[layer, start: start + T] = k
    kv.v[layer, start: start + T] = v
    keys, values = kv.k[layer, : start + T], kv.v[layer, : start + T]
    # [H, T, D] @ [H, D, S]: causal over the cached prefix and the new tokens
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
        attn_mask=_causal_mask(T, start, x.device), enable_gqa=n_head != n_head_kv)
    return (out.transpose(0, 1).reshape(T, n_head * head_dim) @ w.o.T).float()


def _causal_mask(T: int, start: int, device) -> torch.Tensor:
    i = torch.arange(T, device=device)[:, None] + start
    j = torch.arange(start + T, device=device)[None, :]
    return j <= i


@dataclass
class MoEWeights:
    norm: torch.Tensor
    router: torch.Tensor  # [n_expert, n_embd], resident (it also predicts the next layer's experts)


def route(h: torch.Tensor, router: torch.Tensor, k: int, norm_topk: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax gating, top-k: (weights [T, k], expert ids [T, k])."""
    probs = (h.float() @ router.float().T).softmax(-1)
    w, ids = probs.topk(k, dim=-1)
    if norm_topk:
        w = w / w.sum(-1, keepdim=True)
    return w, ids


def expert_ffn(h: torch.Tensor, expert, dtype: torch.dtype) -> torch.Tensor:
    """SwiGLU expert on the rows h [n, n_embd]; ``expert`` holds raw GGML blocks from the cache."""
    def W(name: str) -> torch.Tensor:
        b = expert.blocks[name]
        return dequantize(b.data, b.qtype, b.shape, dtype)

    gate, up, down = W("gate"), W("up"), W("down")
    return (F.silu(h @ gate.T) * (h @ up.T)) @ down.T


def moe(x: torch.Tensor, w: MoEWeights, layer: int, experts: ExpertSource, n_used: int, norm_topk: bool,
        eps: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The routed-expert FFN for all tokens at once: each expert the batch needs is fetched once.

    Returns (output [T, n_embd], expert ids [T, k]).
    """
    h = rms_norm(x, w.norm, eps)
    weights, ids = route(h, w.router, n_used, norm_topk)
    needed = torch.unique(ids).tolist()
    got = experts.get(layer, needed)
    out = torch.zeros_like(x, dtype=torch.float32)
    hd = h.to(dtype)
    for e, expert in zip(needed, got):
        rows, slot = (ids == e).nonzero(as_tuple=True)
        y = expert_ffn(hd[rows], expert, dtype)
        out.index_add_(0, rows, y.float() * weights[rows, slot, None])
    return out, ids


def predict_next(x: torch.Tensor, nxt: MoEWeights, n_used: int, eps: float) -> list[int]:
    """The next layer's router applied to the current hidden state: its likely experts, for prefetch."""
    h = rms_norm(x, nxt.norm, eps)
    _, ids = route(h, nxt.router, n_used, False)
    return torch.unique(ids).tolist()
