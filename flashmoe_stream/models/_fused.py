"""Triton kernels of the CUDA-graph decode step (models/graph.py).

Torch runs a layer's small steps for one token as ~80 kernels of a few microseconds each (an RMSNorm
alone is six); here each is one launch: residual add + RMSNorm, q/k-norm + RoPE + the KV-cache write,
attention of one token over the cache, top-k routing (with the experts' weight offsets looked up for
the fused GEMV kernels), and SiLU(gate) * up. Float32 arithmetic throughout, as the eager path's.
On Hopper and later they launch with programmatic dependent launch (quant.pdl_options): each waits for
the kernel before it in ``gdc`` first, which lets its launch overlap that kernel's end.
Imported only where Triton is (CUDA builds of torch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant import fused_gdc as _gdc, fused_prefetch_l2 as _prefetch_l2, fused_q8_groups as _q8_groups, pdl_options


@triton.jit
def _add_norm_kernel(x, d, dw, nw, h, hf, xq, dx, xs, E, eps, ND: tl.constexpr, HAS_W: tl.constexpr,
                     OUT_F: tl.constexpr, Q8: tl.constexpr, BE: tl.constexpr, PDL: tl.constexpr = False):
    # x += sum_j dw[j] * d[j] (ND rows; weight 1 without HAS_W), then h = RMSNorm(x) * nw (and with Q8, h
    # rounded to 8 bits per 32 for the GEMVs that take it: quantize_q8 of h, without its launch)
    _gdc(PDL)
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
    yh = y.to(h.dtype.element_ty)
    tl.store(h + offs, yh, mask=m)
    if OUT_F:
        tl.store(hf + offs, y, mask=m)
    if Q8:
        g = tl.arange(0, BE // 32)
        _q8_groups(tl.reshape(yh.to(tl.float32), (BE // 32, 2, 16)), g, g < E // 32, xq, dx, xs)


def add_norm(x: torch.Tensor, d: torch.Tensor | None, dw: torch.Tensor | None, nw: torch.Tensor, eps: float,
             h: torch.Tensor, hf: torch.Tensor | None = None, x8: tuple | None = None) -> None:
    """x [E] float32 += sum_j dw[j] * d[j] (d [n, E] float32; dw [n] or None for weight 1; d None: no add),
    in place; then h (and hf, float32, where given) = RMSNorm(x) * nw. ``x8`` (quant.fused_q8_buffers(1, E),
    E a multiple of 32): filled with h rounded to 8 bits, as quantize_q8(h) would."""
    E = x.numel()
    if d is not None:
        d = d.reshape(-1, E)
    nd = 0 if d is None else d.shape[0]
    xq, dx, xs = x8 or (x, x, x)
    _add_norm_kernel[(1,)](x, x if d is None else d, x if dw is None else dw, nw, h, x if hf is None else hf,
                           xq, dx, xs, E, eps, ND=nd, HAS_W=dw is not None, OUT_F=hf is not None,
                           Q8=x8 is not None, BE=max(32, triton.next_power_of_2(E)), num_warps=8,
                           **pdl_options(x.device))


@triton.jit
def _qk_rope_kernel(q, k, v, qn, kn, cos, sin, pos, kc, vc, qo, H, HKV, eps, D: tl.constexpr, NORM: tl.constexpr,
                    NEOX: tl.constexpr, PDL: tl.constexpr = False):
    # program = one head: q heads (RMSNorm, RoPE, to qo), then k heads (the same, into the cache at pos,
    # with the head's v beside it)
    _gdc(PDL)
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
                                qo, H, HKV, eps, D=D, NORM=qn is not None, NEOX=neox, num_warps=1,
                                **pdl_options(q.device))


@triton.jit
def _attend_kernel(q, kc, vc, pos, out, xq, dx, xs, HKV, scale, GROUP: tl.constexpr, D: tl.constexpr,
                   BT: tl.constexpr, Q8: tl.constexpr, PDL: tl.constexpr = False):
    # program = one q head, over positions 0..pos of its KV head, with an online softmax; with Q8 its
    # output also rounded to 8 bits per 32 (D a multiple of 32) for the output projection
    _gdc(PDL)
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
    o = (acc / l_i).to(out.dtype.element_ty)
    tl.store(out + h * D + d, o)
    if Q8:
        g = h * (D // 32) + tl.arange(0, D // 32)
        _q8_groups(tl.reshape(o.to(tl.float32), (D // 32, 2, 16)), g, g >= 0, xq, dx, xs)


def attend(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, pos: torch.Tensor, out: torch.Tensor,
           x8: tuple | None = None) -> None:
    """Softmax attention of one token's q [H*D] (float32) over the cache's positions 0..pos (kc, vc [n_ctx,
    HKV, D]), scaled by 1/sqrt(D): out [H*D]. ``x8`` (fused_q8_buffers(1, H*D), D a multiple of 32): out
    rounded to 8 bits as well."""
    HKV, D = kc.shape[1], kc.shape[2]
    H = q.numel() // D
    xq, dx, xs = x8 or (out, out, out)
    _attend_kernel[(H,)](q, kc, vc, pos, out, xq, dx, xs, HKV, D ** -0.5, GROUP=H // HKV, D=D, BT=32,
                         Q8=x8 is not None, num_warps=4, **pdl_options(q.device))


@triton.jit
def _router_kernel(h, w, out, NE, E, stride_w, BR: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr = False):
    # out[r] = sum_e w[r, e] * h[e], BR rows a program; under PDL the rows' first BK weights are prefetched
    # before the wait (the router is resident)
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    rm = r < NE
    if PDL:
        if BK >= 32:  # one address a 32 weights (128 bytes in float32)
            kp = tl.minimum(tl.arange(0, BK // 32) * 32, E - 1)
            _prefetch_l2(w + tl.minimum(r, NE - 1).to(tl.int64)[:, None] * stride_w + kp[None, :])
    _gdc(PDL)
    acc = tl.zeros([BR, BK], tl.float32)
    for k0 in range(0, E, BK):
        k = k0 + tl.arange(0, BK)
        km = k < E
        wv = tl.load(w + r.to(tl.int64)[:, None] * stride_w + k[None, :], mask=rm[:, None] & km[None, :], other=0.0)
        acc += wv.to(tl.float32) * tl.load(h + k, mask=km, other=0.0)[None, :]
    tl.store(out + r, tl.sum(acc, axis=1), mask=rm)


def router_logits(h: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [NE] float32 = w [NE, E] @ h [E] (float32), one program a row: a GEMV of a few MB spread over
    the GPU, where cuBLAS ran it on a few SMs. Returns out."""
    NE, E = w.shape
    w = w if w.stride(1) == 1 else w.contiguous()
    bk = min(triton.next_power_of_2(E), 4096)
    _router_kernel[(NE,)](h, w, out, NE, E, w.stride(0), BR=1, BK=bk, num_warps=4,
                          **pdl_options(h.device))
    return out


@triton.jit
def _route_kernel(logits, table, ids, wts, offs, NE, K: tl.constexpr, KP: tl.constexpr, NORM: tl.constexpr,
                  BE: tl.constexpr, PDL: tl.constexpr = False):
    _gdc(PDL)
    # softmax over the experts, the K largest (lowest id first among equals) gathered into vectors, their
    # weights (renormalised over the K with NORM), and each one's gate, up and down offsets from table
    # [3, NE]: the loads and stores are one vector each, not one per expert
    e = tl.arange(0, BE)
    m = e < NE
    z = tl.load(logits + e, mask=m, other=float("-inf"))
    pr = tl.exp(z - tl.max(z, axis=0))
    pr = tl.where(m, pr / tl.sum(pr, axis=0), -1.0)
    j = tl.arange(0, KP)
    jm = j < K
    sel = tl.zeros([KP], tl.int32)
    val = tl.zeros([KP], tl.float32)
    left = pr
    for t in tl.static_range(K):
        best = tl.max(left, axis=0)
        idx = tl.minimum(tl.min(tl.where(left == best, e, BE), axis=0), NE - 1)  # (NaN logits: no read past table)
        left = tl.where(e == idx, -2.0, left)
        sel = tl.where(j == t, idx, sel)
        val = tl.where(j == t, best, val)
    if NORM:
        val = val * (1.0 / tl.sum(val, axis=0))
    tl.store(ids + j, sel.to(tl.int64), mask=jm)
    tl.store(wts + j, val, mask=jm)
    for c in tl.static_range(3):
        tl.store(offs + c * K + j, tl.load(table + c * NE + sel, mask=jm, other=0), mask=jm)


def route_topk(logits: torch.Tensor, table: torch.Tensor, k: int, norm: bool, ids: torch.Tensor,
               wts: torch.Tensor, offs: torch.Tensor) -> None:
    """Top-k softmax routing of one token's router logits [NE]: ids [k] int64, wts [k] float32, and offs
    [3k] int64: the chosen experts' gate, then up, then down byte offsets from ``table`` [3, NE]."""
    NE = logits.numel()
    _route_kernel[(1,)](logits, table, ids, wts, offs, NE, K=k, KP=triton.next_power_of_2(k), NORM=norm,
                        BE=triton.next_power_of_2(NE), num_warps=1, **pdl_options(logits.device))


@triton.jit
def _silu_mul_kernel(gu, out, xq, dx, xs, F, K, stride_q, stride_d, stride_s, BF: tl.constexpr, Q8: tl.constexpr,
                     PDL: tl.constexpr = False):
    _gdc(PDL)
    r = tl.program_id(0)
    f = tl.program_id(1) * BF + tl.arange(0, BF)
    m = f < F
    g = tl.load(gu + r * F + f, mask=m, other=0.0)
    u = tl.load(gu + (K + r) * F + f, mask=m, other=0.0)
    o = (g / (1.0 + tl.exp(-g)) * u).to(out.dtype.element_ty)
    tl.store(out + r * F + f, o, mask=m)
    if Q8:
        gr = tl.program_id(1) * (BF // 32) + tl.arange(0, BF // 32)
        _q8_groups(tl.reshape(o.to(tl.float32), (BF // 32, 2, 16)), gr, gr < F // 32, xq + r * stride_q,
                   dx + r * stride_d, xs + r * stride_s)


def silu_mul(gu: torch.Tensor, out: torch.Tensor, x8: tuple | None = None) -> None:
    """gu [2k, F] float32 (k gate rows, then k up rows): out [k, F] = SiLU(gate) * up; ``x8``
    (fused_q8_buffers(k, F), F a multiple of 32): out rounded to 8 bits as well."""
    k, F = out.shape
    xq, dx, xs = x8 or (out, out, out)
    _silu_mul_kernel[(k, triton.cdiv(F, 1024))](gu, out, xq, dx, xs, F, k, xq.stride(0), dx.stride(0), xs.stride(0),
                                                BF=1024, Q8=x8 is not None, num_warps=4,
                                                **pdl_options(gu.device))
