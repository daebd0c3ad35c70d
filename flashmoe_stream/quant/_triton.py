"""Fused dequantise-and-multiply kernels (Triton) for GPUs: y = W @ x straight from the GGML blocks.

Decoding a token reads each active weight once. Dequantising first writes and re-reads the weights in
bf16 (3.5x the bytes of a Q4_K block), so the few rows of a decode step are multiplied here inside one
kernel that reads only the quantised bytes. One launch covers many (weight, input row) pairs: each pair
``p`` names its weight by address (``ptrs[p]``: the experts of a layer are separate tensors in the cache)
and its input row (``xrows[p]``), so every routed expert of a layer runs in one launch per projection.

The arithmetic is float32: per 16- or 32-weight group, the integer quants times the activations are
summed, then scaled (``d*sc*sum(q*x) - dmin*m*sum(x)``), which is the reference dequantisation
``(d*sc)*q - dmin*m`` regrouped: the same function to float32 rounding.

Q4_K, Q5_K and Q6_K multiply 8-bit activations instead, as llama.cpp's GPU kernels do: x is rounded per
32 values to int8 with one float scale (``quantize_q8``), and four weights times four activation bytes
are summed by one integer instruction (dp4a); converting every weight to float was what bounded the
float kernels (a quarter-rate instruction per weight). ``q8=False`` keeps float activations.

Two layouts of the work: the first kernels spread a block's words over neighbouring threads (reads side
by side, sums shuffled between threads); the ``lanes`` kernels give each thread one superblock (nothing
shuffled until a row's last sum). ``config`` picks per shape, from sweeps. On the GGUF layout a lanes
kernel's threads read 144 or 210 bytes apart; on ``to_planar``'s layout, which the runtime keeps K-quant
weights in on GPUs (``planar_for``), side by side: 1.1-1.6x faster on an H200.
"""

from __future__ import annotations

import os

import torch
from gguf import GGML_QUANT_SIZES

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds ship no Triton
    triton = None
try:  # grid dependency control (Hopper and later; Triton 3.3 and later)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_wait = None


def config(name: str, N: int, K: int, P: int, q8: bool = True, planar: bool = False) -> tuple[int, ...]:
    """(rows per program, warps, K-quant superblocks per step[, lanes]): the fastest of sweeps
    on an H200 for the Qwen3-235B shapes, timed inside CUDA graphs (tools/gpu_gemv_sweep.py;
    docs/BENCHMARKS.md). On 8-bit activations, few rows a program over many superblocks a step: more reads
    in flight per thread, and small weights (k, v: 512 rows) spread over many programs instead of looping
    16 times in a few. A 4th number picks the kernels that give each thread one superblock (``lanes``
    superblocks of a row at once, masked past a row's end): they win on the head (Q6_K, 13 %), the experts'
    down (K 1536: Q4_K 6-11 %, Q6_K 5 %) and o (K 8192: 2 %)."""
    sbs = K // 256
    if planar:  # to_planar's layout, one superblock a thread (the sweep's best on every shape measured)
        if name == "Q6_K":
            return 4, 1, 1, 8  # the head 136 µs (GGUF layout 212), the experts' down 14.5 (22.8)
        if sbs % 8:
            return 16, 1, 1, 2  # the experts' down at K 1536: 11.8 µs (13.7)
        return (2, 1, 1, 16) if N * P <= 1024 else (4, 2, 1, 16)  # q 9.5 (10.6), o 9.5 (11.2), gate+up 24.6 (26.5)
    if name in ("Q4_K", "Q5_K"):
        if not q8:  # float activations (weights not 16-byte aligned)
            return (8, 2, 2) if P >= 8 else (8, 4, 4)
        if sbs % 8:  # K 1536 (the experts' down): 8 superblocks a step do not divide a row
            return (16, 1, 1, 2) if sbs % 2 == 0 else ((32, 4, 2) if P >= 8 else (8, 4, 2))
        if N * P <= 1024:
            return 1, 1, 8
        return (2, 1, 4) if K <= 4096 else (8, 4, 1, 16)
    if name == "Q6_K":
        if q8:  # small weights (v: 512 rows) 1 row, 8 superblocks; the head and the experts' down (K 1536, its
            # 6 superblocks on 8 lanes) one superblock a thread
            if N >= 32768:
                return 8, 4, 1, 16
            if sbs % 8:
                return 8, 2, 1, 8
            return (1, 1, 8) if N * P <= 1024 else (4, 1, 1)
        return (16, 8, 1) if N >= 32768 else ((4, 1, 1) if P >= 8 else (8, 2, 1))
    return 16, 2, 1


if triton is not None:
    @triton.jit
    def gdc(PDL: tl.constexpr):
        """Under programmatic dependent launch (``PDL``, see ``pdl_for``): wait until the kernel before in the
        stream has finished and its writes are visible, then let the next kernel launch (it waits in turn, so
        each waits for all before it). Every kernel launched with PDL calls this before it reads or writes
        anything another kernel writes or reads; nothing without PDL. (Letting the next kernel launch before
        the wait, so that several kernels ahead wait and prefetch, was 1 % slower on an H200.)"""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

    @triton.jit
    def prefetch_l2(p):
        """Asks for the 128-byte lines at pointers p to be brought into L2: a hint, which holds no registers
        and waits for nothing. Before ``gdc``, a kernel reads weights it is sure no kernel writes (a model's
        resident ones) while the kernel before it still runs."""
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // dummy $0", "=r,l", [p], dtype=tl.int32,
                                  is_pure=False, pack=1)

    @triton.jit
    def _f16(p):
        """The little-endian fp16 at byte pointers p, as float32."""
        lo = tl.load(p).to(tl.uint16)
        hi = tl.load(p + 1).to(tl.uint16)
        return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _scale_min_k4(sb, s):
        """Q4_K/Q5_K: the 6-bit scale and min of sub-block s ([1, S] ints) from the 12 packed bytes at sb ([BN, 1])."""
        low = s < 4
        a = tl.load(sb + tl.where(low, s, s + 4)).to(tl.int32)
        b = tl.load(sb + tl.where(low, s + 4, s - 4)).to(tl.int32)
        c = tl.load(sb + s).to(tl.int32)
        sc = tl.where(low, a & 63, (a & 15) | ((b >> 6) << 4))
        m = tl.where(low, b & 63, (a >> 4) | ((c >> 6) << 4))
        return sc.to(tl.float32), m.to(tl.float32)

    @triton.jit
    def _pair(base, offs, xrows, x, stride_x, N, BN: tl.constexpr, ALIGN: tl.constexpr):
        """This program's weight (byte pointer), input row and output rows."""
        p = tl.program_id(1)
        w = base + tl.multiple_of(tl.load(offs + p), ALIGN)
        xrow = x + tl.load(xrows + p).to(tl.int64) * stride_x
        rows = tl.program_id(0) * BN + tl.arange(0, BN)
        rmask = rows < N
        return p, w, xrow, tl.where(rmask, rows, 0), rmask

    @triton.jit
    def _pair_q8(base, offs, xrows, xq, dx, xs, N, row_bytes, stride_q, stride_d, stride_s, BN: tl.constexpr,
                 ALIGN: tl.constexpr):
        """As _pair, for the kernels on 8-bit activations: the program's input row as int32 words, its
        scales and sums per 16, and its weight rows' byte pointers."""
        p = tl.program_id(1)
        w = base + tl.multiple_of(tl.load(offs + p), ALIGN)
        xr = tl.load(xrows + p).to(tl.int64)
        xw = (xq + xr * stride_q).to(tl.pointer_type(tl.int32))
        rows = tl.program_id(0) * BN + tl.arange(0, BN)
        rmask = rows < N
        row0 = w + tl.where(rmask, rows, 0).to(tl.int64) * row_bytes  # [BN] byte pointers
        return p, xw, dx + xr * stride_d, xs + xr * stride_s, rows, rmask, row0

    @triton.jit
    def _q4_k_kernel(base, offs, xrows, x, y, N, K, row_bytes, stride_x, stride_y, BN: tl.constexpr,
                     ALIGN: tl.constexpr, Q5: tl.constexpr, SB: tl.constexpr):
        # Q4_K block (256 weights, 144 bytes): d, dmin (fp16), 12 bytes of 6-bit scales/mins, 128 bytes of
        # nibbles: byte 32i + l holds weight 64i + l (low nibble, sub-block 2i) and 64i + 32 + l (high, 2i+1).
        # Q5_K (176 bytes) adds qh[32] after the scales: bit 2i (+1 for the high half) of qh[l] is the 5th bit.
        p, w, xrow, rows, rmask = _pair(base, offs, xrows, x, stride_x, N, BN, ALIGN)
        BB: tl.constexpr = 176 if Q5 else 144
        QS: tl.constexpr = 48 if Q5 else 16
        row0 = w + rows.to(tl.int64) * row_bytes  # [BN]
        # SB superblocks per step: chunk c (0..4*SB-1) is 32 bytes of superblock c//4, its weights 64*(c%4) + l
        c = tl.arange(0, 4 * SB)
        i4 = c % 4
        l32 = tl.arange(0, 32)
        xoff = ((256 * (c // 4) + 64 * i4)[:, None] + l32[None, :])[None, :, :]  # [1, 4SB, 32]: low nibbles
        boff = (BB * (c // 4))[None, :, None]  # [1, 4SB, 1]: the chunk's block
        qoff = ((32 * i4)[:, None] + l32[None, :])[None, :, :] + boff + QS
        s_lo = (2 * i4)[None, :, None]
        acc = tl.zeros([BN, 4 * SB, 32], dtype=tl.float32)
        for sb in range(0, K // 256, SB):
            blk = row0 + sb * BB
            q = tl.load(blk[:, None, None] + qoff)  # [BN, 4SB, 32]
            qlo = (q & 15).to(tl.int32)
            qhi = (q >> 4).to(tl.int32)
            bb = blk[:, None, None] + boff  # [BN, 4SB, 1]: each chunk's block start
            if Q5:
                qh = tl.load(bb + 16 + l32[None, None, :]).to(tl.int32)
                qlo += ((qh >> s_lo) & 1) << 4
                qhi += ((qh >> (s_lo + 1)) & 1) << 4
            d = _f16(bb)
            dmin = _f16(bb + 2)
            sclo, mlo = _scale_min_k4(bb + 4, s_lo)  # [BN, 4SB, 1]
            schi, mhi = _scale_min_k4(bb + 4, s_lo + 1)
            xlo = tl.load(xrow + sb * 256 + xoff).to(tl.float32)
            xhi = tl.load(xrow + sb * 256 + 32 + xoff).to(tl.float32)
            acc += ((d * sclo) * qlo.to(tl.float32) - dmin * mlo) * xlo
            acc += ((d * schi) * qhi.to(tl.float32) - dmin * mhi) * xhi
        out = tl.sum(tl.sum(acc, axis=2), axis=1)
        tl.store(y + p.to(tl.int64) * stride_y + rows, out, mask=rmask)

    @triton.jit
    def _dp4a(a, b, ASM: tl.constexpr):
        """Per int32 lane: the sum of the products of its four signed bytes in a and in b."""
        return _dp4a_acc(a, b, tl.zeros(a.shape, dtype=tl.int32), False, ASM)

    @triton.jit
    def q8_groups(v, g, gm, xq, dx, xs):
        """Groups g [BG] of 32 values of one row (v [BG, 2, 16] float32; mask gm) rounded to 8 bits, as
        quantize_q8 stores them: int8 q = round(v * 127 / amax) (half away from zero) at xq + 32g + ..,
        the scale amax / 127 at dx + g, the integer sums of q per 16 at xs + 2g + (0, 1)."""
        h = tl.arange(0, 2)
        l16 = tl.arange(0, 16)
        at = (32 * g)[:, None, None] + (16 * h)[None, :, None] + l16[None, None, :]  # [BG, 2, 16]
        amax = tl.max(tl.max(tl.abs(v), axis=2), axis=1)  # [BG]
        inv = tl.where(amax > 0, tl.math.div_rn(tl.full(amax.shape, 127.0, tl.float32), tl.maximum(amax, 1e-30)),
                       0.0)
        t = v * inv[:, None, None]
        q = tl.minimum(tl.floor(tl.abs(t) + 0.5), 127.0)
        q = tl.where(t < 0, -q, q)
        tl.store(xq + at, q.to(tl.int8), mask=gm[:, None, None])
        tl.store(dx + g, amax / 127.0, mask=gm)
        tl.store(xs + (2 * g)[:, None] + h[None, :], tl.sum(q, axis=2), mask=gm[:, None])

    @triton.jit
    def _quantize_q8_kernel(x, xq, dx, xs, K, stride_x, stride_q, stride_d, stride_s, BG: tl.constexpr):
        # BG groups of 32 values of one row, see q8_groups
        r = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1) * BG + tl.arange(0, BG)
        gm = g < K // 32
        at = (32 * g)[:, None, None] + (16 * tl.arange(0, 2))[None, :, None] + tl.arange(0, 16)[None, None, :]
        v = tl.load(x + r * stride_x + at, mask=gm[:, None, None], other=0.0).to(tl.float32)
        q8_groups(v, g, gm, xq + r * stride_q, dx + r * stride_d, xs + r * stride_s)

    @triton.jit
    def _q4_k_q8_kernel(base, offs, xrows, xq, dx, xs, y, N, K, row_bytes, stride_q, stride_d, stride_s, stride_y,
                        BN: tl.constexpr, ALIGN: tl.constexpr, Q5: tl.constexpr, SB: tl.constexpr,
                        ASM: tl.constexpr):
        # As _q4_k_kernel, on 8-bit activations, over [rows BN, superblocks SB, chunks 4, words 8]: word j of
        # chunk i holds the nibbles of weights 64i + 4j.. (low) and 64i + 32 + 4j.. (high), so it meets
        # activation words 16i + j and 16i + 8 + j; the two dp4a sums are scaled per sub-block (2i, 2i + 1).
        # A block's first 16 bytes are read as four words (d | dmin, then the 12 scale bytes), and the
        # 6-bit scales and mins are cut from them in registers.
        p, xw, dxr, xsr, rows, rmask, row0 = _pair_q8(base, offs, xrows, xq, dx, xs, N, row_bytes, stride_q, stride_d,
                                                       stride_s, BN, ALIGN)
        BW: tl.constexpr = 44 if Q5 else 36  # block words
        QW: tl.constexpr = 12 if Q5 else 4  # where the nibbles start
        sbi = tl.arange(0, SB)[None, :, None, None]
        i = tl.arange(0, 4)[None, None, :, None]
        j = tl.arange(0, 8)[None, None, None, :]
        qword = BW * sbi + QW + 8 * i + j  # [1, SB, 4, 8]
        xlo = 64 * sbi + 16 * i + j
        i3 = tl.arange(0, 4)[None, None, :]  # chunk, as [1, 1, 4]
        s3 = tl.arange(0, SB)[None, :, None]
        acc = tl.zeros([BN, SB, 4], dtype=tl.float32)
        for sb in range(0, K // 256, SB):
            blk = (row0 + sb * (4 * BW)).to(tl.pointer_type(tl.int32))
            blkw = blk[:, None, None, None]  # [BN, 1, 1, 1]
            q = tl.load(blkw + qword)  # [BN, SB, 4, 8]
            lo = q & 0x0F0F0F0F
            hi = (q >> 4) & 0x0F0F0F0F
            if Q5:  # qh word j holds the 5th bits of chunk i's weights at bits 2i (low) and 2i + 1 (high)
                qh = tl.load(blkw + (BW * sbi + 4 + j))  # [BN, SB, 1, 8]
                lo |= ((qh >> (2 * i)) & 0x01010101) << 4
                hi |= ((qh >> (2 * i + 1)) & 0x01010101) << 4
            xl = tl.load(xw + sb * 64 + xlo)  # [1, SB, 4, 8]
            xh = tl.load(xw + sb * 64 + 8 + xlo)
            il = tl.sum(_dp4a(lo, tl.broadcast_to(xl, lo.shape), ASM), axis=3).to(tl.float32)  # [BN, SB, 4]
            ih = tl.sum(_dp4a(hi, tl.broadcast_to(xh, hi.shape), ASM), axis=3).to(tl.float32)
            hw = blk[:, None, None] + BW * s3  # [BN, SB, 1]: each superblock's first word
            w0 = tl.load(hw)
            w1 = tl.load(hw + 1)
            w2 = tl.load(hw + 2)
            w3 = tl.load(hw + 3)
            d = (w0 & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
            dmin = ((w0 >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
            sclo, mlo = _scale_min_words(w1, w2, w3, 2 * i3)
            schi, mhi = _scale_min_words(w1, w2, w3, 2 * i3 + 1)
            g32 = sb * 8 + 8 * s3 + 2 * i3  # [1, SB, 4]: the low sub-block's activation group
            dl = tl.load(dxr + g32)
            dh = tl.load(dxr + g32 + 1)
            sl = tl.load(xsr + 2 * g32) + tl.load(xsr + 2 * g32 + 1)
            shi = tl.load(xsr + 2 * g32 + 2) + tl.load(xsr + 2 * g32 + 3)
            acc += d * (sclo * dl * il + schi * dh * ih) - dmin * (mlo * dl * sl + mhi * dh * shi)
        out = tl.sum(tl.sum(acc, axis=2), axis=1)
        tl.store(y + p.to(tl.int64) * stride_y + rows, out, mask=rmask)

    @triton.jit
    def _dp4a_acc(a, b, c, UA: tl.constexpr, ASM: tl.constexpr):
        """Per int32 lane: c + the sum of the products of a's four bytes (unsigned if UA, else signed) and
        b's four signed bytes."""
        if ASM:
            if UA:
                return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                                 dtype=tl.int32, is_pure=True, pack=1)
            return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                             dtype=tl.int32, is_pure=True, pack=1)
        else:
            for k in tl.static_range(4):
                bk = (b << (24 - 8 * k)) >> 24
                if UA:
                    c += ((a >> (8 * k)) & 0xFF) * bk
                else:
                    c += ((a << (24 - 8 * k)) >> 24) * bk
            return c

    @triton.jit
    def _scale_min_const(w1, w2, w3, s: tl.constexpr):
        """As _scale_min_words, for a sub-block s known when compiling: integer (scale, min)."""
        b: tl.constexpr = 8 * (s % 4)
        if s < 4:
            return (w1 >> b) & 63, (w2 >> b) & 63
        A = w1 >> b
        B = w2 >> b
        C = w3 >> b
        return (C & 15) | ((A >> 2) & 48), ((C >> 4) & 15) | ((B >> 2) & 48)

    @triton.jit
    def _q4k_chunk(blk3, w1, w2, w3, i: tl.constexpr, xa, xa2, xh, xh2, dl, dh, sl_x, sh_x, accd, accm,
                   Q5: tl.constexpr, PSW: tl.constexpr, ASM: tl.constexpr):
        """One row's chunk i (sub-blocks 2i, 2i + 1) of its superblock, for _q4_k_q8_lanes_kernel: adds to the
        scale and min sums. PSW: words from one 16-byte piece of a block to the next (4, or a plane's)."""
        QP: tl.constexpr = 3 if Q5 else 1  # the piece where the nibbles start
        zero = tl.zeros(blk3.shape, dtype=tl.int32)
        qa = tl.load(blk3 + (QP + 2 * i) * PSW)  # [BN, SL, 4]: words 8i..8i+3 of the nibbles, then 8i+4..
        qb = tl.load(blk3 + (QP + 2 * i + 1) * PSW)
        if Q5:  # qh word j: the 5th bits of chunk i's words j at bit 2i (low) and 2i + 1 (high)
            ha = tl.load(blk3 + PSW)
            hb = tl.load(blk3 + 2 * PSW)
            la = (qa & 0x0F0F0F0F) | (((ha >> (2 * i)) & 0x01010101) << 4)
            lb = (qb & 0x0F0F0F0F) | (((hb >> (2 * i)) & 0x01010101) << 4)
            ua = ((qa >> 4) & 0x0F0F0F0F) | (((ha >> (2 * i + 1)) & 0x01010101) << 4)
            ub = ((qb >> 4) & 0x0F0F0F0F) | (((hb >> (2 * i + 1)) & 0x01010101) << 4)
            il = tl.sum(_dp4a_acc(lb, xa2, _dp4a_acc(la, xa, zero, False, ASM), False, ASM), axis=2)
            ih = tl.sum(_dp4a_acc(ub, xh2, _dp4a_acc(ua, xh, zero, False, ASM), False, ASM), axis=2) * 16
        else:
            il = tl.sum(_dp4a_acc(qb & 0x0F0F0F0F, xa2, _dp4a_acc(qa & 0x0F0F0F0F, xa, zero, False, ASM),
                                  False, ASM), axis=2)
            ih = tl.sum(_dp4a_acc(qb & -252645136, xh2, _dp4a_acc(qa & -252645136, xh, zero, True, ASM),
                                  True, ASM), axis=2)  # -252645136: 0xF0F0F0F0 as int32; 16x the sum
        scl, ml = _scale_min_const(w1, w2, w3, 2 * i)
        sch, mh = _scale_min_const(w1, w2, w3, 2 * i + 1)
        accd += dl * (scl * il).to(tl.float32) + (dh * 0.0625) * (sch * ih).to(tl.float32)
        accm += sl_x * ml.to(tl.float32) + sh_x * mh.to(tl.float32)
        return accd, accm

    @triton.jit
    def _q4_k_q8_lanes_kernel(base, offs, xrows, xq, dx, xs, y, N, K, row_bytes, stride_q, stride_d, stride_s,
                              stride_y, BN: tl.constexpr, ALIGN: tl.constexpr, Q5: tl.constexpr, SL: tl.constexpr,
                              PSW: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr = False,
                              EARLY: tl.constexpr = False):
        # As _q4_k_q8_kernel, one superblock a thread: over [rows BN, superblocks SL], each thread reads its
        # block in 16-byte pieces, cuts its scales once and sums its 256 products in registers, so nothing is
        # shuffled between threads until the row's last sum. Chunk i (32 bytes, words 8i..8i+7) holds the
        # nibbles of sub-blocks 2i (low) and 2i + 1 (high); the high nibbles are multiplied in place
        # (q & 0xF0 = 16 q, unsigned) and the 16 divided out of the float sum. EARLY (PDL, planar): the weight
        # is resident (its offset and bytes written by no kernel): the first superblocks are prefetched into
        # L2 before the wait for the kernel before.
        if not EARLY:
            gdc(PDL)  # the offsets (a routing) may come from the kernel before
        p, xw, dxr, xsr, rows, rmask, row0 = _pair_q8(base, offs, xrows, xq, dx, xs, N, row_bytes, stride_q, stride_d,
                                                       stride_s, BN, ALIGN)
        BW: tl.constexpr = 44 if Q5 else 36  # block words
        s = tl.arange(0, SL)[None, :]  # [1, SL]
        if EARLY:
            if PDL and PSW != 4:
                first = row0[:, None] + tl.minimum(s, K // 256 - 1) * 16  # [BN, SL]: piece 0 of each
                for j in tl.static_range(BW // 4):
                    prefetch_l2(first + 4 * PSW * j)
            gdc(PDL)
        v4 = tl.arange(0, 4)[None, None, :]  # [1, 1, 4]
        zrow = tl.zeros([BN, 1], dtype=tl.int32)
        acc = tl.zeros([BN, SL], dtype=tl.float32)
        for sb0 in range(0, K // 256, SL):
            sbk = sb0 + s  # [1, SL]
            live = sbk < K // 256  # threads past the row's end read its last block and add nothing
            sbk = tl.minimum(sbk, K // 256 - 1)
            if PSW == 4:  # the GGUF layout: blocks one after another
                blk = (row0[:, None] + sbk * (4 * BW)).to(tl.pointer_type(tl.int32))  # [BN, SL]
            else:  # planar (see to_planar): piece j of superblock i at 16 i + 4 PSW j, rows of K // 256 superblocks
                blk = (row0[:, None] + sbk * 16).to(tl.pointer_type(tl.int32))
            w1 = tl.load(blk + 1)
            w2 = tl.load(blk + 2)
            w3 = tl.load(blk + 3)
            # loads of what all rows share are made in the rows' shape ([BN, SL, 4], [BN, SL]), so they land in
            # the weights' layout (one thread's copies in its registers) instead of being shuffled there
            xb = xw + (zrow + sbk * 64)[:, :, None] + v4  # the superblock's first activation words
            g0 = zrow + sbk * 8  # [BN, SL]: its first 32-value activation group
            accd = tl.zeros([BN, SL], dtype=tl.float32)
            accm = tl.zeros([BN, SL], dtype=tl.float32)
            for i in tl.static_range(4):
                xa = tl.load(xb + 16 * i)
                xa2 = tl.load(xb + 16 * i + 4)
                xh = tl.load(xb + 16 * i + 8)
                xh2 = tl.load(xb + 16 * i + 12)
                g = g0 + 2 * i  # the low sub-block's activation group
                dl = tl.load(dxr + g)
                dh = tl.load(dxr + g + 1)
                sl_x = dl * (tl.load(xsr + 2 * g) + tl.load(xsr + 2 * g + 1))
                sh_x = dh * (tl.load(xsr + 2 * g + 2) + tl.load(xsr + 2 * g + 3))
                accd, accm = _q4k_chunk(blk[:, :, None] + v4, w1, w2, w3, i, xa, xa2, xh, xh2, dl, dh, sl_x, sh_x,
                                        accd, accm, Q5, PSW, ASM)
            w0 = tl.load(blk)
            d = (w0 & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
            dmin = ((w0 >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
            acc += tl.where(live, d * accd - dmin * accm, 0.0)
        tl.store(y + p.to(tl.int64) * stride_y + rows, tl.sum(acc, axis=1), mask=rmask)

    @triton.jit
    def _scale_min_words(w1, w2, w3, s):
        """Q4_K/Q5_K: the 6-bit scale and min of sub-block s from the scale bytes as words (bytes 0-3, 4-7,
        8-11): below 4, bytes s and s + 4; from 4, byte s + 4's nibbles with the top bits of bytes s - 4, s."""
        b = 8 * (s % 4)
        A = (w1 >> b) & 0xFF
        B = (w2 >> b) & 0xFF
        C = (w3 >> b) & 0xFF
        sc = tl.where(s < 4, A & 63, (C & 15) | ((A >> 6) << 4))
        m = tl.where(s < 4, B & 63, (C >> 4) | ((B >> 6) << 4))
        return sc.to(tl.float32), m.to(tl.float32)

    @triton.jit
    def _q6_k_kernel(base, offs, xrows, x, y, N, K, row_bytes, stride_x, stride_y, BN: tl.constexpr,
                     ALIGN: tl.constexpr):
        # Q6_K block (256 weights, 210 bytes): ql[128], qh[64], int8 scales[16], d (fp16 at 208).
        # Group G (0..7) of 16 ql bytes: half h = G//4, p = (G//2)%2, g = G%2; byte 64h + 32p + 16g + l'
        # gives (low nibble) weight 128h + 32p + 16g + l' and (high) that + 64; the two top bits come from
        # qh[32h + 16g + l'] at shift 2p (low) and 2p + 4 (high); scales 8h + g + 2p (+4 for high).
        p, w, xrow, rows, rmask = _pair(base, offs, xrows, x, stride_x, N, BN, ALIGN)
        row0 = w + rows.to(tl.int64) * row_bytes
        G = tl.arange(0, 8)
        l16 = tl.arange(0, 16)
        h = G // 4
        pp = (G // 2) % 2
        g = G % 2
        ql_off = ((16 * G)[:, None] + l16[None, :])[None, :, :]  # [1, 8, 16]
        qh_off = ((32 * h + 16 * g)[:, None] + l16[None, :])[None, :, :] + 128
        x_off = ((128 * h + 32 * pp + 16 * g)[:, None] + l16[None, :])[None, :, :]
        sh = (2 * pp)[None, :, None]
        sc_off = (8 * h + g + 2 * pp)[None, :, None] + 192  # [1, 8, 1]
        acc = tl.zeros([BN, 8, 16], dtype=tl.float32)
        for sb in range(K // 256):
            blk = row0 + sb * 210
            ql = tl.load(blk[:, None, None] + ql_off).to(tl.int32)  # [BN, 8, 16]
            qh = tl.load(blk[:, None, None] + qh_off).to(tl.int32)
            # the 6-bit value into a float's mantissa under the exponent of 2^23: two integer ops and a float
            # subtraction, exact, in place of a conversion instruction (quarter rate)
            qlo = (((ql & 15) | (((qh >> sh) & 3) << 4)) | 0x4B000000).to(tl.float32, bitcast=True) - 8388640.0
            qhi = (((ql >> 4) | (((qh >> (sh + 4)) & 3) << 4)) | 0x4B000000).to(tl.float32, bitcast=True) - 8388640.0
            d = _f16(blk + 208)[:, None, None]
            sclo = tl.load(blk[:, None, None] + sc_off).to(tl.int8, bitcast=True).to(tl.float32)  # [BN, 8, 1]
            schi = tl.load(blk[:, None, None] + sc_off + 4).to(tl.int8, bitcast=True).to(tl.float32)
            xlo = tl.load(xrow + sb * 256 + x_off).to(tl.float32)
            xhi = tl.load(xrow + sb * 256 + 64 + x_off).to(tl.float32)
            acc += (d * sclo) * qlo * xlo + (d * schi) * qhi * xhi
        out = tl.sum(tl.sum(acc, axis=2), axis=1)
        tl.store(y + p.to(tl.int64) * stride_y + rows, out, mask=rmask)

    @triton.jit
    def _q6_k_q8_kernel(base, offs, xrows, xq, dx, xs, y, N, K, row_bytes, stride_q, stride_d, stride_s, stride_y,
                        BN: tl.constexpr, ALIGN: tl.constexpr, SB: tl.constexpr, ASM: tl.constexpr):
        # As _q6_k_kernel, on 8-bit activations. A block is 105 halfwords (210 bytes: every other block of a
        # row is only 2-byte aligned), read as halfwords and paired into words. Over [rows BN, superblocks SB,
        # u 4, words 4]: u = 2h + s picks half h and 16-weight step s; word jj of it (j = 4s + jj) holds bytes
        # 4j.. of ql's quarters A = ql[64h:], B = ql[64h + 32:] and of H = qh[32h:]. The four 6-bit values
        # v_k of weight 128h + 32k + 4j.. are A's and B's low then high nibbles with H's bits 2k, 2k + 1 on top;
        # dp4a(v_k, x) - 32 * sum(x) is the integer dot of (v - 32) with the group of 16, scale byte 8h + 2k + s.
        p, xw, dxr, xsr, rows, rmask, row0 = _pair_q8(base, offs, xrows, xq, dx, xs, N, row_bytes, stride_q, stride_d,
                                                       stride_s, BN, ALIGN)
        sbi = tl.arange(0, SB)[None, :, None, None]
        u = tl.arange(0, 4)[None, None, :, None]
        jj = tl.arange(0, 4)[None, None, None, :]
        h = u // 2
        j = 4 * (u % 2) + jj
        half_a = 105 * sbi + 32 * h + 2 * j  # [1, SB, 4, 4]: halfword index of A's word j
        half_h = 105 * sbi + 64 + 16 * h + 2 * j
        xword = 64 * sbi + 32 * h + j  # the activation word of weights 128h + 4j.. (k = 0; + 8k)
        u3 = tl.arange(0, 4)[None, None, :]
        s3 = tl.arange(0, SB)[None, :, None]
        h3 = u3 // 2
        g16 = 8 * h3 + u3 % 2  # [1, 1, 4]: the k = 0 group of 16 (+ 2k)
        acc = tl.zeros([BN, SB, 4], dtype=tl.float32)
        for sb in range(0, K // 256, SB):
            blk = row0 + sb * 210  # [BN]
            hw = blk.to(tl.pointer_type(tl.int16))[:, None, None, None]
            A = (tl.load(hw + half_a).to(tl.int32) & 0xFFFF) | (tl.load(hw + half_a + 1).to(tl.int32) << 16)
            B = (tl.load(hw + half_a + 16).to(tl.int32) & 0xFFFF) | (tl.load(hw + half_a + 17).to(tl.int32) << 16)
            H = (tl.load(hw + half_h).to(tl.int32) & 0xFFFF) | (tl.load(hw + half_h + 1).to(tl.int32) << 16)
            xb = xw + sb * 64 + xword
            bb = blk[:, None, None] + 210 * s3  # [BN, SB, 1]: each superblock's first byte
            d = _f16(bb + 208)
            gs = sb * 16 + 16 * s3 + g16  # [1, SB, 4]: the k = 0 groups' activation sums
            ga = sb * 8 + 8 * s3 + 4 * h3  # ... and their 32-value activation scales (+ k)
            for kq in tl.static_range(4):
                if kq % 2 == 0:
                    lo4 = (A >> (4 * (kq // 2))) & 0x0F0F0F0F
                else:
                    lo4 = (B >> (4 * (kq // 2))) & 0x0F0F0F0F
                v = lo4 | (((H >> (2 * kq)) & 0x03030303) << 4)
                dot = tl.sum(_dp4a(v, tl.broadcast_to(tl.load(xb + 8 * kq), v.shape), ASM), axis=3)  # [BN, SB, 4]
                sc = tl.load(bb + 192 + g16 + 2 * kq).to(tl.int8, bitcast=True).to(tl.float32)
                xsum = tl.load(xsr + gs + 2 * kq)
                acc += (d * sc) * tl.load(dxr + ga + kq) * (dot.to(tl.float32) - 32.0 * xsum)
        out = tl.sum(tl.sum(acc, axis=2), axis=1)
        tl.store(y + p.to(tl.int64) * stride_y + rows, out, mask=rmask)

    @triton.jit
    def _prmt(a, b, sel, ASM: tl.constexpr):
        """Per int32 lane: the word of bytes picked from (b:a) by sel: 0x3210 gives a, 0x5432 the word two
        bytes on (a's high half, then b's low half)."""
        if ASM:
            return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, sel], dtype=tl.int32,
                                             is_pure=True, pack=1)
        else:
            return tl.where(sel == 0x3210, a, ((a >> 16) & 0xFFFF) | (b << 16))

    @triton.jit
    def _word6(wp, sel, odd, k: tl.constexpr, ASM: tl.constexpr):
        """Word k (0..51) of the Q6_K blocks that start at or two bytes past the aligned words wp."""
        if k < 51:
            nxt = tl.load(wp + k + 1)
        else:  # the word after the block's last: read only where the block starts mid-word
            nxt = tl.load(wp + k + 1, mask=odd, other=0)
        return _prmt(tl.load(wp + k), nxt, sel, ASM)

    @triton.jit
    def _split4(v):
        """[BN, SL, 4] -> its four [BN, SL] parts (as [.., 2, 2]: each split takes the last axis)."""
        v02, v13 = tl.split(tl.reshape(v, [v.shape[0], v.shape[1], 2, 2]))
        v0, v2 = tl.split(v02)
        v1, v3 = tl.split(v13)
        return v0, v1, v2, v3

    @triton.jit
    def _pick4(v0, v1, v2, v3, i: tl.constexpr):
        """v_i, for i known when compiling."""
        r = v3
        if i == 0:
            r = v0
        elif i == 1:
            r = v1
        elif i == 2:
            r = v2
        return r

    @triton.jit
    def _q6_quarter(lo, hi, k: tl.constexpr):
        """Q6_K: the four 6-bit values of quarter k (0..3) packed in a ql word ``lo`` (low nibbles for k 0, 1;
        high for 2, 3) and a qh word ``hi`` (bits 2k, 2k + 1 of each byte), as four bytes."""
        if k >= 2:
            lo = lo >> 4
        if k == 0:
            hi = hi << 4
        elif k == 1:
            hi = hi << 2
        elif k == 3:
            hi = hi >> 2
        return (lo & 0x0F0F0F0F) | (hi & 0x30303030)

    @triton.jit
    def _q6_dot4(wp, sel, odd, xb, h: tl.constexpr, k: tl.constexpr, j0: tl.constexpr, ASM: tl.constexpr):
        """The integer dot of 16 six-bit weights (half h, quarter k, words j0..j0 + 3) with their activations."""
        t = tl.zeros(odd.shape, dtype=tl.int32)
        # the four activation words in one 16-byte load, cut apart in registers
        x0, x1, x2, x3 = _split4(tl.load(xb[:, :, None] + (32 * h + 8 * k + j0) + tl.arange(0, 4)[None, None, :]))
        for j in tl.static_range(j0, j0 + 4):
            lo = _word6(wp, sel, odd, 16 * h + 8 * (k % 2) + j, ASM)
            hi = _word6(wp, sel, odd, 32 + 8 * h + j, ASM)
            t = _dp4a_acc(_q6_quarter(lo, hi, k), _pick4(x0, x1, x2, x3, j % 4), t, False, ASM)
        return t

    @triton.jit
    def _q6_k_q8_lanes_kernel(base, offs, xrows, xq, dx, xs, y, N, K, row_bytes, stride_q, stride_d, stride_s,
                              stride_y, BN: tl.constexpr, ALIGN: tl.constexpr, SL: tl.constexpr, ASM: tl.constexpr):
        # As _q6_k_q8_kernel, one superblock a thread (over [rows BN, superblocks SL]). A block is only 2-byte
        # aligned, so the thread reads the aligned words around it and shifts them two bytes where it starts
        # mid-word (prmt). Half h of the block: ql words A = 16h + j, B = 16h + 8 + j and qh word H = 32 + 8h + j
        # (j = 0..7) hold weights 128h + 32k + 4j.. for k = 0..3: A's low nibbles (k 0), B's (1), A's high (2),
        # B's (3), with H's bits 2k, 2k + 1 on top; group of 16 8h + 2k + j // 4.
        p, xw, dxr, xsr, rows, rmask, row0 = _pair_q8(base, offs, xrows, xq, dx, xs, N, row_bytes, stride_q, stride_d,
                                                       stride_s, BN, ALIGN)
        s = tl.arange(0, SL)[None, :]  # [1, SL]
        zrow = tl.zeros([BN, 1], dtype=tl.int32)
        acc = tl.zeros([BN, SL], dtype=tl.float32)
        for sb0 in range(0, K // 256, SL):
            sbk = sb0 + s
            live = sbk < K // 256  # threads past the row's end read its last block and add nothing
            sbk = tl.minimum(sbk, K // 256 - 1)
            b = row0[:, None] + sbk * 210  # [BN, SL] byte pointers
            odd = (b.to(tl.int64) & 2) != 0
            wp = (b - odd.to(tl.int32) * 2).to(tl.pointer_type(tl.int32))
            sel = tl.where(odd, 0x5432, 0x3210)
            d = _f16(b + 208)
            xb = xw + zrow + sbk * 64  # [BN, SL]: the superblock's first activation word
            g16 = zrow + sbk * 16  # its first group of 16
            acc_s = tl.zeros([BN, SL], dtype=tl.float32)
            for h in tl.static_range(2):
                for k in tl.static_range(4):
                    # the two groups of 16 (words j = 0..3, then 4..7)
                    t0 = _q6_dot4(wp, sel, odd, xb, h, k, 0, ASM)
                    t1 = _q6_dot4(wp, sel, odd, xb, h, k, 4, ASM)
                    gi = 8 * h + 2 * k  # the first group; scale bytes gi, gi + 1 are in word 48 + gi // 4
                    sw = _word6(wp, sel, odd, 48 + gi // 4, ASM)
                    sc0 = (sw << (24 - 8 * (gi % 4))) >> 24
                    sc1 = (sw << (16 - 8 * (gi % 4))) >> 24
                    x0 = tl.load(xsr + g16 + gi)
                    x1 = tl.load(xsr + g16 + gi + 1)
                    m = (sc0 * t0 + sc1 * t1).to(tl.float32) - 32.0 * (sc0.to(tl.float32) * x0 +
                                                                                 sc1.to(tl.float32) * x1)
                    acc_s += tl.load(dxr + sbk * 8 + zrow + (4 * h + k)) * m
            acc += tl.where(live, d * acc_s, 0.0)
        out = tl.sum(acc, axis=1)
        tl.store(y + p.to(tl.int64) * stride_y + rows, out, mask=rmask)

    @triton.jit
    def _q6_k_q8_planar_kernel(base, offs, xrows, xq, dx, xs, y, N, K, row_bytes, stride_q, stride_d, stride_s,
                               stride_y, BN: tl.constexpr, ALIGN: tl.constexpr, SL: tl.constexpr, PSW: tl.constexpr,
                               ASM: tl.constexpr, PDL: tl.constexpr = False, EARLY: tl.constexpr = False):
        # As _q6_k_q8_lanes_kernel, on the planar layout (see to_planar): one superblock a thread, its 16-byte
        # pieces 4 PSW bytes apart (ql words 4j..4j+3 in piece j, qh words in pieces 8..11, the scales in 12),
        # so a warp's loads of one piece are side by side; the fp16 scales d follow the 13 planes, 2 bytes each.
        # Half h, words j0..j0 + 3 (j0 0 or 4) of ql's A = 16h + j, B = 16h + 8 + j and qh's 32 + 8h + j hold
        # weights 128h + 32k + 4j.. for k = 0..3: A's low nibbles (k 0), B's (1), A's high (2), B's (3), with qh's
        # bits 2k, 2k + 1 on top; group of 16 8h + 2k + j0 // 4. EARLY: as in _q4_k_q8_lanes_kernel.
        if not EARLY:
            gdc(PDL)
        p, xw, dxr, xsr, rows, rmask, row0 = _pair_q8(base, offs, xrows, xq, dx, xs, N, row_bytes, stride_q, stride_d,
                                                       stride_s, BN, ALIGN)
        w = base + tl.multiple_of(tl.load(offs + p), ALIGN)
        s = tl.arange(0, SL)[None, :]  # [1, SL]
        v4 = tl.arange(0, 4)[None, None, :]
        zrow = tl.zeros([BN, 1], dtype=tl.int32)
        sb_row = tl.where(rmask, rows, 0)[:, None].to(tl.int64) * (K // 256)  # [BN, 1]: a row's first superblock
        if EARLY:
            if PDL:
                s0 = tl.minimum(s, K // 256 - 1)
                first = row0[:, None] + s0 * 16  # [BN, SL]: piece 0 of each
                for j in tl.static_range(13):
                    prefetch_l2(first + 4 * PSW * j)
                prefetch_l2(w + 52 * PSW + 2 * (sb_row + s0))  # their scales d
            gdc(PDL)
        acc = tl.zeros([BN, SL], dtype=tl.float32)
        for sb0 in range(0, K // 256, SL):
            sbk = sb0 + s
            live = sbk < K // 256  # threads past the row's end read its last block and add nothing
            sbk = tl.minimum(sbk, K // 256 - 1)
            wp = (row0[:, None] + sbk * 16).to(tl.pointer_type(tl.int32))[:, :, None] + v4  # [BN, SL, 4]: piece 0
            d = tl.load((w + 52 * PSW).to(tl.pointer_type(tl.float16)) + sb_row + sbk).to(tl.float32)
            sw0, sw1, sw2, sw3 = _split4(tl.load(wp + 12 * PSW))  # the 16 scale bytes
            xb = xw + (zrow + sbk * 64)[:, :, None] + v4  # [BN, SL, 4]: the superblock's first activation words
            g16 = zrow + sbk * 16  # its first group of 16
            acc_s = tl.zeros([BN, SL], dtype=tl.float32)
            for h in tl.static_range(2):
                for jq in tl.static_range(2):
                    a0, a1, a2, a3 = _split4(tl.load(wp + (4 * h + jq) * PSW))
                    b0, b1, b2, b3 = _split4(tl.load(wp + (4 * h + 2 + jq) * PSW))
                    h0, h1, h2, h3 = _split4(tl.load(wp + (8 + 2 * h + jq) * PSW))
                    for k in tl.static_range(4):
                        x0, x1, x2, x3 = _split4(tl.load(xb + (32 * h + 8 * k + 4 * jq)))
                        t = tl.zeros([BN, SL], dtype=tl.int32)
                        for j in tl.static_range(4):
                            if k % 2 == 0:
                                lo4 = _pick4(a0, a1, a2, a3, j)
                            else:
                                lo4 = _pick4(b0, b1, b2, b3, j)
                            t = _dp4a_acc(_q6_quarter(lo4, _pick4(h0, h1, h2, h3, j), k), _pick4(x0, x1, x2, x3, j),
                                          t, False, ASM)
                        gi = 8 * h + 2 * k + jq  # this group of 16: its scale byte gi
                        sc = ((_pick4(sw0, sw1, sw2, sw3, gi // 4) << (24 - 8 * (gi % 4))) >> 24).to(tl.float32)
                        xsum = tl.load(xsr + g16 + gi)
                        acc_s += tl.load(dxr + sbk * 8 + zrow + (4 * h + k)) * (sc * (t.to(tl.float32) - 32.0 * xsum))
            acc += tl.where(live, d * acc_s, 0.0)
        tl.store(y + p.to(tl.int64) * stride_y + rows, tl.sum(acc, axis=1), mask=rmask)

    @triton.jit
    def _q8_0_kernel(base, offs, xrows, x, y, N, K, row_bytes, stride_x, stride_y, BN: tl.constexpr,
                     ALIGN: tl.constexpr, NB: tl.constexpr):
        # Q8_0 block (32 weights, 34 bytes): d (fp16), 32 int8. NB blocks of a row per step.
        p, w, xrow, rows, rmask = _pair(base, offs, xrows, x, stride_x, N, BN, ALIGN)
        nblk = K // 32
        row0 = w + rows.to(tl.int64) * row_bytes
        b = tl.arange(0, NB)
        l32 = tl.arange(0, 32)
        acc = tl.zeros([BN, NB, 32], dtype=tl.float32)
        for j in range(0, nblk, NB):
            bm = (j + b) < nblk  # [NB]
            blk = row0[:, None] + (j + b)[None, :] * 34  # [BN, NB]
            q = tl.load(blk[:, :, None] + 2 + l32[None, None, :], mask=bm[None, :, None], other=0)
            q = q.to(tl.int8, bitcast=True).to(tl.float32)
            xv = tl.load(xrow + (j + b)[:, None] * 32 + l32[None, :], mask=bm[:, None], other=0.0).to(tl.float32)
            lo = tl.load(blk, mask=bm[None, :], other=0).to(tl.uint16)
            hi = tl.load(blk + 1, mask=bm[None, :], other=0).to(tl.uint16)
            d = (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
            acc += d[:, :, None] * q * xv[None, :, :]
        out = tl.sum(tl.sum(acc, axis=2), axis=1)
        tl.store(y + p.to(tl.int64) * stride_y + rows, out, mask=rmask)


_TYPES = {"Q4_K", "Q5_K", "Q6_K", "Q8_0"}
_ASM = os.environ.get("TRITON_INTERPRET") != "1"  # dp4a as PTX, or (interpreter) in integer arithmetic


PDL = os.environ.get("FLASHMOE_PDL", "1") != "0" and _ASM  # FLASHMOE_PDL=0: launch kernels one after another
_pdl_devices: dict[int, bool] = {}


def pdl_for(device: torch.device) -> bool:
    """Whether the decode kernels on ``device`` launch with programmatic dependent launch: each one launches
    while the one before it still runs, waits for it in ``gdc``, and a resident weight's GEMV fetches its
    first bytes before that wait. CUDA GPUs of compute capability 9 (Hopper) and later."""
    if not PDL or gdc_wait is None or device.type != "cuda" or torch.version.hip is not None:
        return False
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _pdl_devices:
        _pdl_devices[i] = torch.cuda.get_device_capability(i)[0] >= 9
    return _pdl_devices[i]


def pdl_options(device: torch.device) -> dict:
    """A kernel launch's keywords on ``device``: under ``pdl_for`` its ``PDL`` argument and Triton's launch
    attribute, else none."""
    return {"PDL": True, "launch_pdl": True} if pdl_for(device) else {}


PLANAR_TYPES = ("Q4_K", "Q5_K", "Q6_K")
PLANAR = os.environ.get("FLASHMOE_PLANAR", "1") != "0"  # FLASHMOE_PLANAR=0: the GGUF layout on GPUs too (to compare)


def planar_for(qtype, device: torch.device) -> bool:
    """Whether weights of ``qtype`` are kept on ``device`` in ``to_planar``'s layout: the fused kernels' types
    that have one, on GPUs that run them (1.1-1.6x faster GEMVs on an H200: docs/BENCHMARKS.md)."""
    return PLANAR and supports(qtype, device) and getattr(qtype, "name", str(qtype)) in PLANAR_TYPES


def _planes(qtype, raw: torch.Tensor, shape, chunk: int | None) -> tuple[int, int, int]:
    """(chunks, superblocks a chunk, 16-byte pieces a block) of a weight ``shape`` of ``qtype`` held in
    ``raw``, planar in chunks of ``chunk`` rows (None: the whole weight)."""
    name = getattr(qtype, "name", str(qtype))
    if name not in PLANAR_TYPES:
        raise ValueError(f"no planar layout for {name}")
    chunk = chunk or shape[0]
    if shape[0] % chunk:
        raise ValueError(f"planar chunks of {chunk} rows do not divide {shape[0]} rows")
    n_blocks = shape[0] * shape[1] // 256
    block = GGML_QUANT_SIZES[qtype][1]
    if raw.numel() != n_blocks * block:
        raise ValueError(f"{raw.numel()} bytes for a {name} weight of shape {tuple(shape)}")
    C = shape[0] // chunk
    return C, n_blocks // C, block // 16


def to_planar(raw: torch.Tensor, qtype, shape, chunk: int | None = None) -> torch.Tensor:
    """A weight's GGUF blocks (uint8, one after another) rearranged so that a warp's threads, one superblock
    each, read side by side: piece j (16 bytes) of every superblock in plane j, the planes one after another
    (Q4_K 9 planes, Q5_K 11; Q6_K 13, then its 2-byte scales d, one per superblock). The same bytes; the
    kernels read 16 bytes a thread a step from 512 contiguous bytes a warp instead of 144 or 210 bytes apart.
    ``chunk``: each run of that many rows is a planar weight of its own, one after another (so that rows
    c * chunk.. are a [chunk, K] weight the kernels take, as a pair of one launch; None: the whole weight)."""
    C, n, pieces = _planes(qtype, raw, shape, chunk)
    blocks, out = raw.view(C, n, -1), torch.empty_like(raw)  # twice the weight's memory at most
    o = out.view(C, -1)
    o[:, :n * 16 * pieces].view(C, pieces, n, 16).copy_(
        blocks[:, :, :16 * pieces].view(C, n, pieces, 16).transpose(1, 2))
    o[:, n * 16 * pieces:].view(C, n, -1).copy_(blocks[:, :, 16 * pieces:])  # Q6_K: d after the planes
    return out


def from_planar(planar: torch.Tensor, qtype, shape, chunk: int | None = None) -> torch.Tensor:
    """``to_planar``'s inverse: the GGUF blocks."""
    C, n, pieces = _planes(qtype, planar, shape, chunk)
    out = torch.empty_like(planar)
    blocks, p = out.view(C, n, -1), planar.view(C, -1)
    blocks[:, :, :16 * pieces].view(C, n, pieces, 16).copy_(
        p[:, :n * 16 * pieces].view(C, pieces, n, 16).transpose(1, 2))
    blocks[:, :, 16 * pieces:].copy_(p[:, n * 16 * pieces:].view(C, n, -1))
    return out


def planar_rows(planar: torch.Tensor, qtype, shape, ids: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Rows ``ids`` of a planar weight as GGUF blocks: [len(ids), a row's bytes] uint8."""
    C, n, pieces = _planes(qtype, planar, shape, chunk)
    rows_c, sbs = shape[0] // C, shape[1] // 256
    block = planar.numel() // (C * n)
    c, r = ids // rows_c, ids % rows_c
    p = planar.view(C, -1)
    head = p[:, :n * 16 * pieces].view(C, pieces, rows_c, sbs, 16)[c, :, r]  # [T, pieces, sbs, 16]
    rows = head.permute(0, 2, 1, 3).reshape(len(ids), sbs, 16 * pieces)
    if block > 16 * pieces:
        rows = torch.cat([rows, p[:, n * 16 * pieces:].view(C, rows_c, sbs, block - 16 * pieces)[c, r]], dim=2)
    return rows.reshape(len(ids), -1)


def supports(qtype, device: torch.device) -> bool:
    return triton is not None and device.type == "cuda" and getattr(qtype, "name", str(qtype)) in _TYPES


def q8_buffers(R: int, K: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Room for R rows of K values rounded to 8 bits (see quantize_q8): int8 [R, K], float32 [R, K/32] and
    [R, K/16]; kernels that make such rows as they write them (models/_fused.py) fill these."""
    f32 = torch.float32
    return (torch.empty(R, K, dtype=torch.int8, device=device), torch.empty(R, K // 32, dtype=f32, device=device),
            torch.empty(R, K // 16, dtype=f32, device=device))


def quantize_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [R, K] (K a multiple of 32) rounded to 8 bits per 32 values: (int8 [R, K], float32 scales [R, K/32],
    float32 sums of the int8 values per 16 [R, K/16]); x ~= q * scale."""
    R, K = x.shape
    xq, dx, xs = q8_buffers(R, K, x.device)
    bg = 8
    _quantize_q8_kernel[(R, triton.cdiv(K // 32, bg))](x, xq, dx, xs, K, x.stride(0), xq.stride(0), dx.stride(0),
                                                       xs.stride(0), BG=bg, num_warps=1)
    return xq, dx, xs


def gemv_pairs(x: torch.Tensor, base: torch.Tensor, offs: torch.Tensor, xrows: torch.Tensor, qtype, shape,
               aligned: bool = True, tune: tuple[int, ...] | None = None, q8: bool = True,
               x8: tuple | None = None, planar: bool = False, early: bool = False) -> torch.Tensor:
    """For each pair p: y[p] = W_p @ x[xrows[p]], where W_p ([N, K], ``qtype``) starts ``offs[p]`` bytes from
    ``base``'s first byte (negative offsets are fine: any weight on the same device).

    x: [R, K] float32/bf16/fp16 on the GPU; base: a uint8 tensor; offs: int64 [P] device tensor; xrows:
    int32/int64 [P]. ``aligned``: every weight starts 16-byte aligned (then the loads are wide, and Q4_K and
    Q5_K take 8-bit activations, see quantize_q8; Q6_K takes them at any alignment; ``q8=False`` keeps
    them float). Returns float32 [P, N].
    The caller keeps the weights alive until the kernel has run. ``tune``: (rows per program, warps,
    superblocks per step[, lanes]) instead of ``config``'s choice (see there). ``x8``: ``quantize_q8(x)``, where the caller
    has it already (the same x meets several weights); used where this call takes 8-bit activations.
    ``planar``: the weights are in ``to_planar``'s layout (Q4_K, Q5_K, Q6_K; one superblock a thread).
    ``early``: neither the weights nor ``offs`` are written by any kernel (a model's resident weights): under
    programmatic dependent launch (``pdl_for``) the planar kernels prefetch them before waiting for the
    kernel before.
    """
    N, K = shape
    P = offs.numel()
    x = x.contiguous()
    y = torch.empty(P, N, dtype=torch.float32, device=x.device)
    if P == 0:
        return y
    per_block, block_bytes = GGML_QUANT_SIZES[qtype]
    row_bytes = K // per_block * block_bytes
    align = 16 if aligned and base.data_ptr() % 16 == 0 else 2
    name = qtype.name
    q8 = q8 and (align == 16 and name in ("Q4_K", "Q5_K") or name == "Q6_K")
    bn, warps, sb, *lanes = config(name, N, K, P, q8, planar) if tune is None else tune
    lanes = lanes[0] if lanes else 0  # one superblock a thread, lanes superblocks of a row at once
    grid = (triton.cdiv(N, bn), P)
    if planar:
        if name not in PLANAR_TYPES or align != 16 or not lanes:
            raise ValueError(f"planar {name} weights need 16-byte alignment and a tune with lanes, got {align}, "
                             f"{(bn, warps, sb, lanes)}")
        xq, dx, xs = x8 or quantize_q8(x)
        sbs = K // 256
        psw = N * sbs * 4  # int32 words from one plane to the next
        args = (base, offs, xrows, xq, dx, xs, y, N, K, sbs * 16, xq.stride(0), dx.stride(0), xs.stride(0),
                y.stride(0))
        kw = pdl_options(x.device)
        if kw:
            kw["EARLY"] = early
        if name == "Q6_K":
            _q6_k_q8_planar_kernel[grid](*args, BN=bn, ALIGN=16, SL=lanes, PSW=psw, ASM=_ASM, num_warps=warps,
                                         **kw)
        else:
            _q4_k_q8_lanes_kernel[grid](*args, BN=bn, ALIGN=16, Q5=name == "Q5_K", SL=lanes, PSW=psw, ASM=_ASM,
                                        num_warps=warps, **kw)
        return y
    if name == "Q6_K" and q8 and lanes:
        xq, dx, xs = x8 or quantize_q8(x)
        _q6_k_q8_lanes_kernel[grid](base, offs, xrows, xq, dx, xs, y, N, K, row_bytes, xq.stride(0), dx.stride(0),
                                    xs.stride(0), y.stride(0), BN=bn, ALIGN=2, SL=lanes, ASM=_ASM, num_warps=warps)
        return y
    if name == "Q6_K" and q8:
        sb = sb if (K // 256) % sb == 0 else 1
        xq, dx, xs = x8 or quantize_q8(x)
        _q6_k_q8_kernel[grid](base, offs, xrows, xq, dx, xs, y, N, K, row_bytes, xq.stride(0), dx.stride(0),
                              xs.stride(0), y.stride(0), BN=bn, ALIGN=2, SB=sb, ASM=_ASM, num_warps=warps)
        return y
    if name in ("Q4_K", "Q5_K"):
        sb = sb if (K // 256) % sb == 0 else 1
        if q8 and lanes:
            xq, dx, xs = x8 or quantize_q8(x)
            _q4_k_q8_lanes_kernel[grid](base, offs, xrows, xq, dx, xs, y, N, K, row_bytes, xq.stride(0),
                                        dx.stride(0), xs.stride(0), y.stride(0), BN=bn, ALIGN=align,
                                        Q5=name == "Q5_K", SL=lanes, PSW=4, ASM=_ASM, num_warps=warps)
            return y
        if q8:
            xq, dx, xs = x8 or quantize_q8(x)
            _q4_k_q8_kernel[grid](base, offs, xrows, xq, dx, xs, y, N, K, row_bytes, xq.stride(0), dx.stride(0),
                                  xs.stride(0), y.stride(0), BN=bn, ALIGN=align, Q5=name == "Q5_K", SB=sb,
                                  ASM=_ASM, num_warps=warps)
            return y
    args = (base, offs, xrows, x, y, N, K, row_bytes, x.stride(0), y.stride(0))
    if name in ("Q4_K", "Q5_K"):
        _q4_k_kernel[grid](*args, BN=bn, ALIGN=align, Q5=name == "Q5_K", SB=sb, num_warps=warps)
    elif name == "Q6_K":
        _q6_k_kernel[grid](*args, BN=bn, ALIGN=align, num_warps=warps)
    elif name == "Q8_0":
        _q8_0_kernel[grid](*args, BN=bn, ALIGN=align, NB=8, num_warps=warps)
    else:
        raise ValueError(f"no fused kernel for {name}")
    return y
