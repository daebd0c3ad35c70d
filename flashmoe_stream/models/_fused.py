"""Triton kernels of the CUDA-graph decode step (models/graph.py).

Torch runs a layer's small steps for one token as ~80 kernels of a few microseconds each (an RMSNorm
alone is six); here each is one launch: residual add + RMSNorm, q/k-norm + RoPE + the KV-cache write,
attention of one token over the cache, top-k routing (with the experts' weight offsets looked up for
the fused GEMV kernels), and SiLU(gate) * up. Float32 arithmetic throughout, as the eager path's.
Imported only where Triton is (CUDA builds of torch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_norm_kernel(x, d, dw, nw, h, hf, E, eps, ND: tl.constexpr, HAS_W: tl.constexpr, OUT_F: tl.constexpr,
                     BE: tl.constexpr):
    # x += sum_j dw[j] * d[j] (ND rows; weight 1 without HAS_W), then h = RMSNorm(x) * nw
    offs = tl.arange(0, BE)
    m = offs < E
    v = tl.load(x + offs, mask=m, other=0.0)
    for j in tl.static_range(ND):
        dj = tl.load(d + j * E + offs, mask=m, other=0.0)
        if HAS_W:
            dj = dj * tl.load(dw + j)
        v += dj
    if ND > 0:
        tl.store(x + offs, v, mask=m)
    r = tl.rsqrt(tl.sum(v * v, axis=0) / E + eps)
    y = v * r * tl.load(nw + offs, mask=m, other=0.0)
    tl.store(h + offs, y.to(h.dtype.element_ty), mask=m)
    if OUT_F:
        tl.store(hf + offs, y, mask=m)


def add_norm(x: torch.Tensor, d: torch.Tensor | None, dw: torch.Tensor | None, nw: torch.Tensor, eps: float,
             h: torch.Tensor, hf: torch.Tensor | None = None) -> None:
    """x [E] float32 += sum_j dw[j] * d[j] (d [n, E] float32; dw [n] or None for weight 1; d None: no add),
    in place; then h (and hf, float32, where given) = RMSNorm(x) * nw."""
    E = x.numel()
    if d is not None:
        d = d.reshape(-1, E)
    nd = 0 if d is None else d.shape[0]
    _add_norm_kernel[(1,)](x, x if d is None else d, x if dw is None else dw, nw, h, x if hf is None else hf, E,
                           eps, ND=nd, HAS_W=dw is not None, OUT_F=hf is not None, BE=triton.next_power_of_2(E),
                           num_warps=8)


@triton.jit
def _qk_rope_kernel(q, k, v, qn, kn, cos, sin, pos, kc, vc, qo, H, HKV, eps, D: tl.constexpr, NORM: tl.constexpr,
                    NEOX: tl.constexpr):
    # program = one head: q heads (RMSNorm, RoPE, to qo), then k heads (the same, into the cache at pos,
    # with the head's v beside it)
    hd = tl.program_id(0)
    p = tl.load(pos)
    half = tl.arange(0, D // 2)
    if NEOX:
        ia, ib = half, half + D // 2
    else:
        ia, ib = 2 * half, 2 * half + 1
    c = tl.load(cos + p * (D // 2) + half)
    s = tl.load(sin + p * (D // 2) + half)
    if hd < H:
        a = tl.load(q + hd * D + ia)
        b = tl.load(q + hd * D + ib)
        if NORM:
            r = tl.rsqrt((tl.sum(a * a, axis=0) + tl.sum(b * b, axis=0)) / D + eps)
            a, b = a * r * tl.load(qn + ia), b * r * tl.load(qn + ib)
        tl.store(qo + hd * D + ia, a * c - b * s)
        tl.store(qo + hd * D + ib, a * s + b * c)
    else:
        g = hd - H
        a = tl.load(k + g * D + ia)
        b = tl.load(k + g * D + ib)
        if NORM:
            r = tl.rsqrt((tl.sum(a * a, axis=0) + tl.sum(b * b, axis=0)) / D + eps)
            a, b = a * r * tl.load(kn + ia), b * r * tl.load(kn + ib)
        at = p.to(tl.int64) * HKV * D + g * D
        tl.store(kc + at + ia, (a * c - b * s).to(kc.dtype.element_ty))
        tl.store(kc + at + ib, (a * s + b * c).to(kc.dtype.element_ty))
        tl.store(vc + at + ia, tl.load(v + g * D + ia).to(vc.dtype.element_ty))
        tl.store(vc + at + ib, tl.load(v + g * D + ib).to(vc.dtype.element_ty))


def qk_rope(q, k, v, qn, kn, cos, sin, pos, kc, vc, qo, eps: float, neox: bool) -> None:
    """q [H*D], k and v [HKV*D] float32 (the projections of one token); qn, kn: per-head RMSNorm weights
    or None; cos, sin [n_ctx, D/2]; pos: int64 [1] on the device. Writes q rotated to qo (float32) and k
    rotated and v into the caches kc, vc [n_ctx, HKV, D] at pos."""
    HKV, D = kc.shape[1], kc.shape[2]
    H = q.numel() // D
    _qk_rope_kernel[(H + HKV,)](q, k, v, q if qn is None else qn, k if kn is None else kn, cos, sin, pos, kc, vc,
                                qo, H, HKV, eps, D=D, NORM=qn is not None, NEOX=neox, num_warps=1)


@triton.jit
def _attend_kernel(q, kc, vc, pos, out, HKV, scale, GROUP: tl.constexpr, D: tl.constexpr, BT: tl.constexpr):
    # program = one q head, over positions 0..pos of its KV head, with an online softmax
    h = tl.program_id(0)
    g = h // GROUP
    p = tl.load(pos)
    d = tl.arange(0, D)
    qv = tl.load(q + h * D + d) * scale
    m_i = tl.max(tl.full([BT], float("-inf"), tl.float32), axis=0)
    l_i = tl.sum(tl.zeros([BT], tl.float32), axis=0)
    acc = tl.zeros([D], tl.float32)
    for t0 in range(0, p + 1, BT):
        t = t0 + tl.arange(0, BT)
        tm = t <= p
        at = (t.to(tl.int64) * HKV + g)[:, None] * D + d[None, :]
        kk = tl.load(kc + at, mask=tm[:, None], other=0.0).to(tl.float32)
        sc = tl.where(tm, tl.sum(kk * qv[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=0))
        alpha = tl.exp(m_i - m_new)
        e = tl.exp(sc - m_new)
        l_i = l_i * alpha + tl.sum(e, axis=0)
        vv = tl.load(vc + at, mask=tm[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(e[:, None] * vv, axis=0)
        m_i = m_new
    tl.store(out + h * D + d, (acc / l_i).to(out.dtype.element_ty))


def attend(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, pos: torch.Tensor, out: torch.Tensor) -> None:
    """Softmax attention of one token's q [H*D] (float32) over the cache's positions 0..pos (kc, vc [n_ctx,
    HKV, D]), scaled by 1/sqrt(D): out [H*D]."""
    HKV, D = kc.shape[1], kc.shape[2]
    H = q.numel() // D
    _attend_kernel[(H,)](q, kc, vc, pos, out, HKV, D ** -0.5, GROUP=H // HKV, D=D, BT=32, num_warps=4)


@triton.jit
def _route_kernel(logits, table, ids, wts, offs, NE, K: tl.constexpr, NORM: tl.constexpr, BE: tl.constexpr):
    # softmax over the experts, the K largest (lowest id first among equals), their weights (renormalised
    # over the K with NORM), and each one's gate, up and down offsets from table [3, NE]
    e = tl.arange(0, BE)
    m = e < NE
    z = tl.load(logits + e, mask=m, other=float("-inf"))
    pr = tl.exp(z - tl.max(z, axis=0))
    pr = tl.where(m, pr / tl.sum(pr, axis=0), -1.0)
    total = tl.sum(tl.zeros([BE], tl.float32), axis=0)
    left = pr
    for j in tl.static_range(K):
        best = tl.max(left, axis=0)
        total += best
        idx = tl.min(tl.where(left == best, e, BE), axis=0)
        left = tl.where(e == idx, -2.0, left)
    if NORM:
        scale = 1.0 / total
    else:
        scale = total * 0.0 + 1.0
    left = pr
    for j in tl.static_range(K):
        best = tl.max(left, axis=0)
        idx = tl.min(tl.where(left == best, e, BE), axis=0)
        left = tl.where(e == idx, -2.0, left)
        tl.store(ids + j, idx.to(tl.int64))
        tl.store(wts + j, best * scale)
        tl.store(offs + j, tl.load(table + idx))
        tl.store(offs + K + j, tl.load(table + NE + idx))
        tl.store(offs + 2 * K + j, tl.load(table + 2 * NE + idx))


def route_topk(logits: torch.Tensor, table: torch.Tensor, k: int, norm: bool, ids: torch.Tensor,
               wts: torch.Tensor, offs: torch.Tensor) -> None:
    """Top-k softmax routing of one token's router logits [NE]: ids [k] int64, wts [k] float32, and offs
    [3k] int64: the chosen experts' gate, then up, then down byte offsets from ``table`` [3, NE]."""
    NE = logits.numel()
    _route_kernel[(1,)](logits, table, ids, wts, offs, NE, K=k, NORM=norm, BE=triton.next_power_of_2(NE),
                        num_warps=1)


@triton.jit
def _silu_mul_kernel(gu, out, F, K, BF: tl.constexpr):
    r = tl.program_id(0)
    f = tl.program_id(1) * BF + tl.arange(0, BF)
    m = f < F
    g = tl.load(gu + r * F + f, mask=m, other=0.0)
    u = tl.load(gu + (K + r) * F + f, mask=m, other=0.0)
    tl.store(out + r * F + f, (g / (1.0 + tl.exp(-g)) * u).to(out.dtype.element_ty), mask=m)


def silu_mul(gu: torch.Tensor, out: torch.Tensor) -> None:
    """gu [2k, F] float32 (k gate rows, then k up rows): out [k, F] = SiLU(gate) * up."""
    k, F = out.shape
    _silu_mul_kernel[(k, triton.cdiv(F, 1024))](gu, out, F, k, BF=1024, num_warps=4)
