"""Valid random quantised blocks with zero mean and a chosen standard deviation, made at disk speed.

Nothing is quantised: the blocks start as random bytes (so every quant is uniform over its range), then
only the scale fields are overwritten with sane values. A block's fp16 super-scale is taken from a
65536-entry table indexed by the random bits already in the field: the low byte picks a magnitude
(jittered between 0.5 and 1.5 of the target, so blocks differ) and bit 15 a random sign. Flipping the
sign of the whole block (d and dmin together) makes the expected mean exactly 0 for every format, and
the mins of Q4_1/Q5_1/Q2_K/Q4_K/Q5_K are set to cancel the mean of scale x quant in each sub-block.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from ..errors import UnsupportedError
from ._formats import FP4_VALUES_X2, IQ4_VALUES, as_qtype


def _msq(values) -> float:
    """Mean square of equally likely ``values``."""
    return float(np.mean(np.square(np.asarray(values, dtype=np.float64))))


def _var(lo: int, hi: int) -> float:
    """Variance of a uniform integer in lo..hi."""
    return float(np.var(np.arange(lo, hi + 1, dtype=np.float64)))


_INT6, _INT8 = _msq(range(-32, 32)), _msq(range(-128, 128))  # random signed sub-scales (Q3_K, IQ4_XS; Q6_K)
_K_SUB = _msq(range(32, 64))  # our Q4_K/Q5_K sub-scales 32..63
_Q2K_SUB = _msq(range(8, 16))  # our Q2_K sub-scales 8..15
_JITTER = 0.5 + (np.arange(256) + 0.5) / 256  # block scale magnitude factor, by the low byte of the field
_JITTER /= np.sqrt(np.mean(_JITTER ** 2))


def _f16_column(blocks: np.ndarray, at: int) -> np.ndarray:
    return blocks[:, at:at + 2].view(np.uint16)[:, 0]


def _block_scale(at: int, rms: float, min_at: int | None = None, min_ratio: float = 0.0):
    """Set the random fp16 field at byte ``at`` to ±rms·jitter, and the one at ``min_at`` to min_ratio·d."""
    bits = np.arange(1 << 16)
    d = (rms * _JITTER)[bits & 255] * np.where(bits >> 15, -1.0, 1.0)
    d = d.astype(np.float16)
    m = (min_ratio * d.astype(np.float64)).astype(np.float16)  # follows the stored (rounded) scale

    def finish(blocks: np.ndarray) -> None:
        col = _f16_column(blocks, at)
        r = col.copy()
        col[:] = d.view(np.uint16)[r]
        if min_at is not None:
            _f16_column(blocks, min_at)[:] = m.view(np.uint16)[r]
    return finish


def _k_sub_scales(blocks: np.ndarray) -> None:
    """Q4_K/Q5_K: eight 6-bit scales 32..63 from the random bytes, each sub-block's min equal to its scale.

    Works on the 12 packed bytes as three little-endian words, four bytes at a time.
    """
    w = blocks[:, 4:16].view(np.uint32)
    sc_lo = (w[:, 0] & 0x1F1F1F1F) | 0x20202020  # scales 0..3, whole
    sc_hi = (w[:, 1] & 0x1F1F1F1F) | 0x20202020  # scales 4..7: high 2 bits go to bits 6-7 of bytes 0..7
    w[:, 0] = sc_lo | ((sc_hi >> 4) & 0x03030303) << 6
    w[:, 1] = w[:, 0]  # mins 0..3 (and high bits of mins 4..7) = scales
    w[:, 2] = (sc_hi & 0x0F0F0F0F) * 0x11  # low nibble: scale, high nibble: min


def _q2_k_sub_scales(blocks: np.ndarray) -> None:
    """Q2_K: sixteen bytes of scale nibble and min nibble, both 8..15 and equal, eight bytes at a time."""
    w = blocks[:, 0:16].view(np.uint64)
    w[:] = ((w & 0x0707070707070707) | 0x0808080808080808) * 0x11


def _e8m0_scale(std: float):
    """MXFP4's scales are powers of two: mix 2^k and 2^(k+1) per block so the mean square is right."""
    t = std / np.sqrt(_msq(FP4_VALUES_X2))  # ggml's value is 2^(e-128) x the doubled fp4 value
    k = int(np.floor(np.log2(t)))
    p_low = (4.0 - (t / 2.0 ** k) ** 2) / 3.0
    e = np.clip(np.where(np.arange(256) < round(p_low * 256), k + 128, k + 129), 2, 254).astype(np.uint8)

    def finish(blocks: np.ndarray) -> None:
        blocks[:, 0] = e[blocks[:, 0]]
    return finish


# qtype -> std -> the steps that make its random bytes valid blocks with that std
_PLANS = {
    Q.Q8_0: lambda std: [_block_scale(0, std / np.sqrt(_msq(range(-128, 128))))],
    Q.Q4_0: lambda std: [_block_scale(0, std / np.sqrt(_msq(range(-8, 8))))],
    Q.Q5_0: lambda std: [_block_scale(0, std / np.sqrt(_msq(range(-16, 16))))],
    Q.Q4_1: lambda std: [_block_scale(0, std / np.sqrt(_var(0, 15)), 2, -7.5)],
    Q.Q5_1: lambda std: [_block_scale(0, std / np.sqrt(_var(0, 31)), 2, -15.5)],
    Q.IQ4_NL: lambda std: [_block_scale(0, std / np.sqrt(_msq(IQ4_VALUES)))],
    Q.IQ4_XS: lambda std: [_block_scale(0, std / np.sqrt(_INT6 * _msq(IQ4_VALUES)))],
    Q.Q2_K: lambda std: [_q2_k_sub_scales, _block_scale(80, std / np.sqrt(_Q2K_SUB * _var(0, 3)), 82, 1.5)],
    Q.Q3_K: lambda std: [_block_scale(108, std / np.sqrt(_INT6 * _msq(range(-4, 4))))],
    Q.Q4_K: lambda std: [_k_sub_scales, _block_scale(0, std / np.sqrt(_K_SUB * _var(0, 15)), 2, 7.5)],
    Q.Q5_K: lambda std: [_k_sub_scales, _block_scale(0, std / np.sqrt(_K_SUB * _var(0, 31)), 2, 15.5)],
    Q.Q6_K: lambda std: [_block_scale(208, std / np.sqrt(_INT8 * _msq(range(-32, 32))))],
    Q.MXFP4: lambda std: [_e8m0_scale(std)],
}
_FLOATS = (Q.F32, Q.F16, Q.BF16)
_CHUNK = 1 << 19  # bytes fixed at a time


def _random_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    words = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, (n + 7) // 8, np.int64, endpoint=True)
    return words.view(np.uint8)[:n]


def random_blocks(qtype: Q, n_elements: int, std: float, rng: np.random.Generator) -> np.ndarray:
    """``n_elements`` random values of ``qtype`` as its raw bytes (uint8, 1-D): mean 0, std about ``std``."""
    qtype = as_qtype(qtype)
    if qtype not in _PLANS and qtype not in _FLOATS:
        raise UnsupportedError(f"cannot make random {qtype.name} blocks: supported types are "
                               f"{', '.join(t.name for t in _FLOATS + tuple(_PLANS))}")
    per_block, block_bytes = GGML_QUANT_SIZES[qtype]
    if n_elements % per_block:
        raise ValueError(f"{qtype.name} needs a multiple of {per_block} elements, got {n_elements}")
    if not (np.isfinite(std) and 0 <= std <= 1e3):
        raise ValueError(f"std must be in [0, 1000], got {std}")
    if qtype in _FLOATS:
        x = rng.standard_normal(n_elements, dtype=np.float32)
        x *= np.float32(std)
        if qtype == Q.F16:
            return x.astype(np.float16).view(np.uint8)
        if qtype == Q.BF16:  # truncating is fine for random data
            return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        return x.view(np.uint8)
    n_blocks = n_elements // per_block
    if std == 0:  # all-zero bytes decode to zeros in every format
        return np.zeros(n_blocks * block_bytes, np.uint8)
    steps = _PLANS[qtype](std)
    out = _random_bytes(rng, n_blocks * block_bytes)
    step = max(1, _CHUNK // block_bytes) * block_bytes
    for start in range(0, out.size, step):  # each fix touches a chunk while the last left it in cache
        chunk = out[start:start + step].reshape(-1, block_bytes)
        for fix in steps:
            fix(chunk)
    return out
