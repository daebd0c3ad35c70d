"""Pieces shared by the MoE decoder families: RMSNorm, RoPE, GQA attention with a KV cache, the
streaming MoE block. No files, no threads: weights come in as tensors, experts from the cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ..quant import (NATIVE_ROWS, QTensor, act_rounding, as_qtype, dequantize, from_planar, fused_gemv_pairs,
                     fused_supported, qbmm)


# --- llama.cpp's numerics ------------------------------------------------------------------------
# llama.cpp's CPU kernels do not multiply float activations by quantised weights: they first round
# the activations to the weight type's partner format (8-bit blocks with an fp16 or f32 scale, or
# fp16/bf16), then take integer dot products. Rounding the activations the same way here makes our
# logits agree with llama.cpp's to float-summation order instead of to ~1 %, so a near-tie in the
# expert choice goes the same way. `act_for(qtype)` is that rounding for one weight type (quant's rules).


def act_for(qtype) -> "Callable[[torch.Tensor], torch.Tensor] | None":
    """How llama.cpp's CPU backend rounds the activations that meet a weight of ``qtype`` (None: not at all)."""
    return act_rounding(as_qtype(qtype))


def mm(x: torch.Tensor, w: torch.Tensor | QTensor, act) -> torch.Tensor:
    """x @ w.T with the activations first rounded as llama.cpp would (``act`` None: exact). ``w`` may be
    a QTensor (kept in its GGML blocks): the result is then in its ``dtype``."""
    if isinstance(w, QTensor) and act is not None and w.device.type == "cpu":
        return w.matmul(x, round_acts=True)  # the native kernels round as llama.cpp does, then integer dots
    if act is not None:
        x = act(x).to(w.dtype)
    if isinstance(w, QTensor):
        return w.matmul(x)
    return x @ w.T


def plain(w: torch.Tensor | QTensor) -> torch.Tensor:
    """A weight as a float tensor (a QTensor dequantised), for the uses that are not a matmul."""
    return w.dequantize() if isinstance(w, QTensor) else w


def lookup(w: torch.Tensor | QTensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of an embedding table (only those rows are dequantised)."""
    return w.rows(ids) if isinstance(w, QTensor) else w[ids]


class ExpertSource(Protocol):
    """What the MoE block needs from the expert cache (cache.ExpertCache satisfies it)."""

    def get(self, layer: int, expert_ids: list[int]) -> list: ...

    def prefetch(self, layer: int, expert_ids: list[int]) -> None: ...

    # optional: capacity(layer) -> int (experts one get may ask for), release() (unpin the last get),
    # start(layer, ids) -> the missing ones (get in two halves) and ready(layer, ids) -> those on the device


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """In float32 whatever the input (the residual stream stays float32; matmuls cast to the weights)."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope_angles(pos: torch.Tensor, D: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of RoPE's angles at positions pos [T]: [T, 1, D/2] float32 each (computed in float64)."""
    inv = theta ** (-torch.arange(0, D, 2, dtype=torch.float64, device=pos.device) / D)
    ang = pos.to(torch.float64)[:, None] * inv[None, :]
    return ang.cos().float()[:, None, :], ang.sin().float()[:, None, :]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """RoPE's rotation of x [T, H, D] by the angles of rope_angles: NEOX rotates (i, i + D/2) pairs, normal
    RoPE (2i, 2i + 1)."""
    D = x.shape[-1]
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
    acts: tuple = (None, None, None, None)  # activation rounding before q, k, v, o (llama.cpp numerics)
    f16_kv: bool = False  # llama.cpp keeps K and V (and rounds Q and the softmax) in fp16


def attention(x: torch.Tensor, w: AttentionWeights, layer: int, kv: KVCache, pos: torch.Tensor, n_head: int,
              n_head_kv: int, head_dim: int, eps: float, theta: float, neox: bool,
              rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Pre-norm GQA self-attention of the new tokens x [T, n_embd] over the cache and themselves. ``rope``:
    rope_angles(pos, head_dim, theta), where the caller has them (every layer of a step shares them)."""
    T = x.shape[0]
    h = rms_norm(x, w.norm, eps).to(w.q.dtype)
    q = mm(h, w.q, w.acts[0]).view(T, n_head, head_dim)
    k = mm(h, w.k, w.acts[1]).view(T, n_head_kv, head_dim)
    v = mm(h, w.v, w.acts[2]).view(T, n_head_kv, head_dim)
    if w.q_norm is not None:
        q, k = rms_norm(q, w.q_norm, eps).to(v.dtype), rms_norm(k, w.k_norm, eps).to(v.dtype)
    cos, sin = rope or rope_angles(pos, head_dim, theta)  # q's and k's
    q, k = rotate(q, cos, sin, neox), rotate(k, cos, sin, neox)
    start = kv.length
    kv.k[layer, start: start + T] = k
    kv.v[layer, start: start + T] = v
    keys, values = kv.k[layer, : start + T], kv.v[layer, : start + T]
    r = lambda t: t.half().float()  # noqa: E731 - fp16 rounding, as llama.cpp's CPU attention does
    if T == 1 and x.device.type == "cpu":  # one new token on the CPU: it sees every position, and the q heads
        # of a KV head are one matrix against its keys (two matmuls: SDPA, or repeating K and V per q head,
        # costs ~4x as much at this size); with f16_kv in fp16 as below
        G = n_head // n_head_kv
        qq, kk, vv = (r(q.float()), r(keys), r(values)) if w.f16_kv else (q, keys, values)
        att = (torch.matmul(qq.view(n_head_kv, G, head_dim), kk.permute(1, 2, 0)) / head_dim ** 0.5).softmax(-1)
        out = torch.matmul(r(att) if w.f16_kv else att, vv.transpose(0, 1)).reshape(1, n_head, head_dim).to(v.dtype)
        return mm(out.reshape(T, n_head * head_dim), w.o, w.acts[3]).float()
    mask = _causal_mask(T, start, x.device) if (T > 1 or w.f16_kv) else None  # one new token sees all
    if w.f16_kv:  # as llama.cpp's CPU attention: fp16 K, V and Q, softmax in f32 rounded to fp16 for V
        rep = n_head // n_head_kv
        kk, vv = r(keys).repeat_interleave(rep, 1), r(values).repeat_interleave(rep, 1)
        att = torch.einsum("thd,shd->hts", r(q.float()), kk) / head_dim ** 0.5
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        out = torch.einsum("hts,shd->thd", r(att), vv).to(v.dtype)
    else:  # [H, T, D] @ [H, D, S]: causal over the cached prefix and the new tokens
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
            attn_mask=mask, enable_gqa=n_head != n_head_kv).transpose(0, 1)
    return mm(out.reshape(T, n_head * head_dim), w.o, w.acts[3]).float()


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


# Dequantised weights of one group of experts may take this many bytes at once (gate, up and down of
# every expert in the group); a long prompt that needs more experts than that is run group by group.
DEQUANT_BUDGET = {"cpu": 256 << 20}
DEFAULT_DEQUANT_BUDGET = 1 << 30


def _stacked(blocks: list, dtype: torch.dtype) -> torch.Tensor:
    """The same projection of several experts, dequantised together: [n, *shape] in ``dtype``.

    One decode over all of them (a handful of large kernels instead of a handful per expert)."""
    b0 = blocks[0]
    parts = [from_planar(b.data, b.qtype, b.shape) if getattr(b, "planar", False) else b.data for b in blocks]
    raw = parts[0] if len(parts) == 1 else torch.cat(parts)
    return dequantize(raw, b0.qtype, (len(blocks), *b0.shape), dtype)


def run_experts(hd: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, layer: int, experts: ExpertSource,
                dtype: torch.dtype, llama_numerics: bool = False) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(hd[t]) for every row t, as float32 [T, n_embd].

    hd [T, n_embd] is the normed input (in ``dtype``). Each expert the rows need is fetched once from
    ``experts``; the experts of a group are dequantised together and run as one batched matmul per
    projection over their rows (padded to the busiest expert's row count), so a decode step costs a few
    large kernels and one host sync (the expert ids), whatever the number of experts. Shared by every
    architecture's MoE block (routing is the architecture's own business).
    """
    T, k = ids.shape
    dev = hd.device
    flat = ids.reshape(-1).cpu().numpy()  # the one host sync: the cache needs the ids
    if T == 1 and dev.type == "cpu" and k <= FUSED_PAIRS and len(set(flat.tolist())) == k and \
            k <= (experts.capacity(layer) if hasattr(experts, "capacity") else k):  # a decode step on the CPU
        return _cpu_one_row(hd, weights, flat, layer, experts, dtype, llama_numerics)
    order = np.argsort(flat, kind="stable")
    needed, starts, counts = np.unique(flat[order], return_index=True, return_counts=True)
    cap = experts.capacity(layer) if hasattr(experts, "capacity") else len(needed)
    few = T * k <= FUSED_PAIRS and len(needed) <= cap  # a decode step (or a few): all its experts pinned at once
    if few and fused_supported_for(experts, layer, dev):
        return _fused_experts(hd, weights, flat, needed, experts.get(layer, needed.tolist()), llama_numerics)
    # on the CPU such a step reads all its missing experts at once and computes with them as they arrive:
    # those already resident first, together (one native call a projection for several experts is up to
    # twice as fast as one per expert), then, each time, those whose reads are in (or the next to come),
    # so the compute of some experts hides the reads of the others
    pipelined = few and dev.type == "cpu" and hasattr(experts, "start")
    todo = list(range(len(needed)))  # indices into needed, in the order to compute
    resident = 0  # (pipelined) how many at the front of todo are on the device already
    if pipelined:
        missing = set(experts.start(layer, needed.tolist()))
        todo = [j for j in todo if int(needed[j]) not in missing] + [j for j in todo if int(needed[j]) in missing]
        resident = len(needed) - len(missing)
    out = torch.zeros(T + 1, hd.shape[1], dtype=torch.float32, device=dev)  # row T: where padding lands
    hd_pad = torch.cat([hd, hd.new_zeros(1, hd.shape[1])])
    w_pad = torch.cat([weights.reshape(-1).float(), weights.new_zeros(1, dtype=torch.float32)])
    budget = DEQUANT_BUDGET.get(dev.type, DEFAULT_DEQUANT_BUDGET)
    fits = None  # experts whose dequantised weights fit the budget at once: known after the first get
    done = []  # (expert id, rows, outputs) of the experts computed, not yet added
    while todo:
        most = min(fits or len(todo), cap)
        if not pipelined:
            group_at = todo[:most]
        elif resident:  # the resident ones at once
            group_at, resident = todo[:min(resident, most)], 0
        else:  # the missing ones whose reads are in; else wait for the next
            arrived = set(experts.ready(layer, [int(needed[j]) for j in todo])) if hasattr(experts, "ready") else set()
            group_at = [j for j in todo if int(needed[j]) in arrived][:most] or todo[:1]
        group = [int(needed[j]) for j in group_at]
        got = experts.get(layer, group)
        if fits is None:
            per_expert = sum(math.prod(b.shape) for b in got[0].blocks.values()) * torch.finfo(dtype).bits // 8
            fits = max(1, budget // per_expert)
            if len(group) > fits:  # too many at once: take fewer, from the same pins
                group_at, group, got = group_at[:fits], group[:fits], got[:fits]
        taken = set(group_at)
        todo = [j for j in todo if j not in taken]
        # flat (token, slot) positions of each expert's rows, padded with T * k (a zero row, weight 0)
        c = counts[group_at]
        s = starts[group_at]
        size = len(group)
        pos = np.full((size, int(c.max())), T * k, dtype=np.int64)
        for j in range(size):
            pos[j, : c[j]] = order[s[j]: s[j] + c[j]]
        pos_t = torch.from_numpy(pos).to(dev, non_blocking=True)
        rows = torch.where(pos_t < T * k, pos_t // k, T)
        y = _expert_group(hd_pad[rows], got, dtype, llama_numerics, c)  # [size, max_count, n_embd]
        y = y.float() * w_pad[pos_t].unsqueeze(-1)
        done += [(e, rows[j], y[j]) for j, e in enumerate(group)]
        if not pipelined:
            _add(out, done)
        if todo and not pipelined and hasattr(experts, "release"):
            experts.release()  # the next group's get may need the room
    # by expert id: the sums' order depends neither on the budget nor on the order the reads came in
    _add(out, sorted(done, key=lambda d: d[0]))
    return out[:T]


def _cpu_one_row(hd: torch.Tensor, weights: torch.Tensor, flat: np.ndarray, layer: int, experts: ExpertSource,
                 dtype: torch.dtype, llama_numerics: bool) -> torch.Tensor:
    """run_experts for one row on the CPU (a decode step), with the few torch calls it needs: per group of
    experts, one native call for their gates and ups together and one for their downs. The groups and the sums
    are run_experts' own: the resident experts first (their reads begun by start()), then those whose reads
    are in, or else the next to come; the weighted outputs added in the order of the experts' ids. So the
    result is the general path's, bit for bit."""
    ids = flat.tolist()
    k = len(ids)
    by_id = sorted(range(k), key=ids.__getitem__)
    todo = [ids[j] for j in by_id]
    if hasattr(experts, "start"):
        missing = set(experts.start(layer, todo))
        first, todo = [e for e in todo if e not in missing], [e for e in todo if e in missing]
    else:
        first, todo = todo, []
    ys: dict[int, torch.Tensor] = {}
    x = hd.reshape(1, 1, -1)
    while first or todo:
        if first:  # the resident ones, together
            group, first = first, []
        else:  # the missing ones whose reads are in; else the next to come
            arrived = set(experts.ready(layer, todo)) if hasattr(experts, "ready") else set()
            group = [e for e in todo if e in arrived] or todo[:1]
            todo = [e for e in todo if e not in group]
        got = experts.get(layer, group)
        n, b = len(got), got[0].blocks
        gate, up, down = b["gate"], b["up"], b["down"]
        if gate.qtype == up.qtype and tuple(gate.shape) == tuple(up.shape):
            gu = _cpu_proj(x.expand(2 * n, 1, -1), [e.blocks["gate"].data for e in got] +
                           [e.blocks["up"].data for e in got], gate, None, llama_numerics).to(dtype)
            g, u = gu[:n], gu[n:]
        else:
            g = _cpu_proj(x.expand(n, 1, -1), [e.blocks["gate"].data for e in got], gate, None, llama_numerics)
            u = _cpu_proj(x.expand(n, 1, -1), [e.blocks["up"].data for e in got], up, None, llama_numerics)
            g, u = g.to(dtype), u.to(dtype)
        y = _cpu_proj(F.silu(g) * u, [e.blocks["down"].data for e in got], down, None, llama_numerics).to(dtype)
        ys.update(zip(group, y.float()))
    w = weights.reshape(-1).float()
    rows = torch.stack([ys[ids[j]][0] * w[j] for j in by_id])  # [k, n_embd], by expert id
    out = torch.zeros(1, hd.shape[1], dtype=torch.float32)
    return out.index_add_(0, torch.zeros(k, dtype=torch.int64), rows)


def _add(out: torch.Tensor, done: list) -> None:
    for _, rows, y in done:
        out.index_add_(0, rows.reshape(-1), y.reshape(-1, y.shape[-1]))
    done.clear()


FUSED_PAIRS = 64  # (row, expert) pairs up to which a GPU runs the fused kernels (a decode step, a few slots)


def fused_supported_for(experts: ExpertSource, layer: int, dev: torch.device) -> bool:
    """Whether the fused dequantise-multiply kernels take this layer's expert types on ``dev``."""
    types = experts.qtypes(layer) if hasattr(experts, "qtypes") else None
    return types is not None and all(fused_supported(q, dev) for q in types)


def _fused_experts(hd: torch.Tensor, weights: torch.Tensor, flat: np.ndarray, needed: np.ndarray, got: list,
                   llama_numerics: bool) -> torch.Tensor:
    """run_experts for a few rows on a GPU: every (row, slot) pair is one matrix-vector product, all the
    pairs of a projection in one fused kernel that reads the experts' GGML blocks in place (gate and up
    together), so a layer's experts cost three launches whatever their number."""
    T, k = weights.shape
    dev = hd.device
    P = flat.size
    slot = np.searchsorted(needed, flat)  # pair p uses got[slot[p]]
    b0 = got[0].blocks
    base = b0["gate"].data
    names = ("gate", "up", "down")
    addr = np.array([[e.blocks[n].data.data_ptr() for e in got] for n in names], dtype=np.int64)[:, slot]
    aligned = not (addr % 16).any()
    rows = np.concatenate([np.arange(P) // k, np.arange(P) // k, np.arange(P)])
    table = torch.from_numpy(np.stack([addr.reshape(-1) - base.data_ptr(), rows])).pin_memory()
    table = table.to(dev, non_blocking=True)
    offs, xrows = table[0], table[1]

    def proj(x: torch.Tensor, part: slice, name: str) -> torch.Tensor:
        b = b0[name]
        if llama_numerics and act_for(b.qtype) is not None:
            x = act_for(b.qtype)(x)
        return fused_gemv_pairs(x, base, offs[part], xrows[part], b.qtype, b.shape, aligned,
                                planar=getattr(b, "planar", False))

    if b0["gate"].qtype == b0["up"].qtype:
        gu = proj(hd, slice(0, 2 * P), "gate")
        g, u = gu[:P], gu[P:]
    else:
        g, u = proj(hd, slice(0, P), "gate"), proj(hd, slice(P, 2 * P), "up")
    y = proj(F.silu(g) * u, slice(2 * P, 3 * P), "down")  # [P, n_embd]
    return (y.view(T, k, -1) * weights.float().unsqueeze(-1)).sum(1)


def _expert_group(x: torch.Tensor, got: list, dtype: torch.dtype, llama_numerics: bool,
                  counts: np.ndarray) -> torch.Tensor:
    """SwiGLU of several experts at once: x [n, rows, n_embd] → [n, rows, n_embd] (expert j's first
    ``counts[j]`` rows are real, the rest padding); ``got`` holds each expert's raw GGML blocks (from the cache)."""
    def proj(h: torch.Tensor, name: str) -> torch.Tensor:
        blocks = [e.blocks[name] for e in got]
        if h.device.type == "cpu":
            return _cpu_proj(h, [b.data for b in blocks], blocks[0], counts, llama_numerics).to(dtype)
        w = _stacked(blocks, dtype)  # [n, out, in]
        act = act_for(blocks[0].qtype) if llama_numerics else None
        if act is not None:
            h = act(h).to(w.dtype)
        return torch.bmm(h, w.transpose(1, 2))

    return proj(F.silu(proj(x, "gate")) * proj(x, "up"), "down")


def _cpu_proj(h: torch.Tensor, raws: list, b0, counts: np.ndarray, round_acts: bool) -> torch.Tensor:
    """One projection of several experts on the CPU through qbmm (native kernels for up to
    NATIVE_ROWS rows an expert). Which kernel serves an expert depends on its own row count only, never
    on the padding its group gives it, so the logits do not depend on how the cache groups the experts."""
    if h.shape[1] <= NATIVE_ROWS:
        return qbmm(h, raws, b0.qtype, b0.shape, round_acts=round_acts)
    out = h.new_zeros(h.shape[0], h.shape[1], b0.shape[0], dtype=torch.float32)
    for j, n in enumerate(counts.tolist()):
        out[j, :n] = qbmm(h[j: j + 1, :n], raws[j: j + 1], b0.qtype, b0.shape, round_acts=round_acts)[0]
    return out


def moe(x: torch.Tensor, w: MoEWeights, layer: int, experts: ExpertSource, n_used: int, norm_topk: bool,
        eps: float, dtype: torch.dtype, llama_numerics: bool = False
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The routed-expert FFN (softmax top-k gating) for all tokens at once.

    Returns (output [T, n_embd], expert ids [T, k], router weights [T, k]).
    """
    h = rms_norm(x, w.norm, eps)
    weights, ids = route(h, w.router, n_used, norm_topk)
    return run_experts(h.to(dtype), weights, ids, layer, experts, dtype, llama_numerics), ids, weights


def predict_next(x: torch.Tensor, nxt: MoEWeights, n_used: int, eps: float) -> list[int]:
    """The next layer's router applied to the current hidden state: its likely experts, for prefetch."""
    h = rms_norm(x, nxt.norm, eps)
    _, ids = route(h, nxt.router, n_used, False)
    return sorted(set(ids.reshape(-1).tolist()))  # (torch.unique's sorted ids, without its op)
