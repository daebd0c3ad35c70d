"""Fused dequantise-and-multiply kernels (Triton) for GPUs: y = W @ x straight from the GGML blocks.

Decoding a token reads each active weight once. Dequantising first writes and re-reads the weights in
bf16 (3.5x the bytes of a Q4_K block), so the few rows of a decode step are multiplied here inside one
kernel that reads only the quantised bytes. One launch covers many (weight, input row) pairs: each pair
``p`` names its weight by address (``ptrs[p]``: the experts of a layer are separate tensors in the cache)
and its input row (``xrows[p]``), so every routed expert of a layer runs in one launch per projection.

The arithmetic is float32: per 16- or 32-weight group, the integer quants times the activations are
summed, then scaled (``d*sc*sum(q*x) - dmin*m*sum(x)``), which is the reference dequantisation
``(d*sc)*q - dmin*m`` regrouped: the same function to float32 rounding.
"""

from __future__ import annotations

import torch
from gguf import GGML_QUANT_SIZES

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds ship no Triton
    triton = None


def config(name: str, N: int, K: int, P: int) -> tuple[int, int, int]:
    """(rows per program, warps, K-quant superblocks per step): the fastest of a sweep on an H200 for the
    Qwen3-235B shapes (tools/gpu_fused_micro.py sweep; docs/BENCHMARKS.md)."""
    if name == "Q4_K":
        return (8, 2, 2) if P >= 8 else (8, 4, 4)
    if name == "Q5_K":
        return 32, 8, 1
    if name == "Q6_K":
        return 8, 2, 1
    return 16, 2, 1


if triton is not None:
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
            qlo = ((ql & 15) | (((qh >> sh) & 3) << 4)) - 32
            qhi = ((ql >> 4) | (((qh >> (sh + 4)) & 3) << 4)) - 32
            d = _f16(blk + 208)[:, None, None]
            sclo = tl.load(blk[:, None, None] + sc_off).to(tl.int8, bitcast=True).to(tl.float32)  # [BN, 8, 1]
            schi = tl.load(blk[:, None, None] + sc_off + 4).to(tl.int8, bitcast=True).to(tl.float32)
            xlo = tl.load(xrow + sb * 256 + x_off).to(tl.float32)
            xhi = tl.load(xrow + sb * 256 + 64 + x_off).to(tl.float32)
            acc += (d * sclo) * qlo.to(tl.float32) * xlo + (d * schi) * qhi.to(tl.float32) * xhi
        out = tl.sum(tl.sum(acc, axis=2), axis=1)
        tl.store(y + p.to(tl.int64) * stride_y + rows, out, mask=rmask)

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


def supports(qtype, device: torch.device) -> bool:
    return triton is not None and device.type == "cuda" and getattr(qtype, "name", str(qtype)) in _TYPES


def gemv_pairs(x: torch.Tensor, base: torch.Tensor, offs: torch.Tensor, xrows: torch.Tensor, qtype, shape,
               aligned: bool = True, tune: tuple[int, int, int] | None = None) -> torch.Tensor:
    """For each pair p: y[p] = W_p @ x[xrows[p]], where W_p ([N, K], ``qtype``) starts ``offs[p]`` bytes from
    ``base``'s first byte (negative offsets are fine: any weight on the same device).

    x: [R, K] float32/bf16/fp16 on the GPU; base: a uint8 tensor; offs: int64 [P] device tensor; xrows:
    int32/int64 [P]. ``aligned``: every weight starts 16-byte aligned (then the loads are wide). Returns
    float32 [P, N]. The caller keeps the weights alive until the kernel has run. ``tune``: (rows per
    program, warps, superblocks per step) instead of ``config``'s choice.
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
    bn, warps, sb = config(name, N, K, P) if tune is None else tune
    grid = (triton.cdiv(N, bn), P)
    args = (base, offs, xrows, x, y, N, K, row_bytes, x.stride(0), y.stride(0))
    if name in ("Q4_K", "Q5_K"):
        _q4_k_kernel[grid](*args, BN=bn, ALIGN=align, Q5=name == "Q5_K", SB=sb if (K // 256) % sb == 0 else 1,
                           num_warps=warps)
    elif name == "Q6_K":
        _q6_k_kernel[grid](*args, BN=bn, ALIGN=align, num_warps=warps)
    elif name == "Q8_0":
        _q8_0_kernel[grid](*args, BN=bn, ALIGN=align, NB=8, num_warps=warps)
    else:
        raise ValueError(f"no fused kernel for {name}")
    return y
