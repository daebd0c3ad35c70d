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


def _set_scales(blocks: np.ndarray, at: int, rms: float, mins: tuple[int, float] | None = None) -> None:
    """Turn the random fp16 field at byte ``at`` into ±rms·jitter; ``mins=(at2, r)`` sets the fp16 at ``at2`` to r·d."""
    mag = rms * _JITTER
    d = np.concatenate([mag, -mag])[(np.arange(1 << 16) >> 15 << 8) | (np.arange(1 << 16) & 255)]
    col = _f16_column(blocks, at)
    bits = col.copy()
    col[:] = d.astype(np.float16).view(np.uint16)[bits]
    if mins is not None:
        at2, r = mins
        d = d.astype(np.float16).astype(np.float64)  # the min follows the stored (rounded) scale
        _f16_column(blocks, at2)[:] = (r * d).astype(np.float16).view(np.uint16)[bits]


def _k_sub_scales(blocks: np.ndarray) -> None:
    """Q4_K/Q5_K: eight 6-bit scales 32..63 from the random bytes, each sub-block's min equal to its scale."""
    s = blocks[:, 4:16]
    sc = (s[:, :8] & 31) | 32
    lo = sc[:, :4] | (sc[:, 4:] >> 4 << 6)
    s[:, 0:4] = lo
    s[:, 4:8] = lo
    s[:, 8:12] = (sc[:, 4:] & 15) * 17


def _mxfp4(blocks: np.ndarray, std: float) -> None:
    """e8m0 scales are powers of two: mix 2^k and 2^(k+1) per block so the mean square is right."""
    t = std / np.sqrt(_msq(FP4_VALUES_X2))  # ggml's value is 2^(e-128) x the doubled fp4 value
    k = int(np.floor(np.log2(t)))
    p_low = (4.0 - (t / 2.0 ** k) ** 2) / 3.0
    e = np.where(np.arange(256) < round(p_low * 256), k + 128, k + 129)
    blocks[:, 0] = np.clip(e, 2, 254).astype(np.uint8)[blocks[:, 0]]


def _q2_k(blocks: np.ndarray, std: float) -> None:
    s = blocks[:, 0:16]
    s &= 7
    s |= 8
    s *= 17  # scale and min nibbles both 8..15, equal
    _set_scales(blocks, 80, std / np.sqrt(_Q2K_SUB * _var(0, 3)), mins=(82, 1.5))


def _q4_k(blocks: np.ndarray, std: float) -> None:
    _k_sub_scales(blocks)
    _set_scales(blocks, 0, std / np.sqrt(_K_SUB * _var(0, 15)), mins=(2, 7.5))


def _q5_k(blocks: np.ndarray, std: float) -> None:
    _k_sub_scales(blocks)
    _set_scales(blocks, 0, std / np.sqrt(_K_SUB * _var(0, 31)), mins=(2, 15.5))


# qtype -> how to make its random bytes valid, given the target std
_FINISH = {
    Q.Q8_0: lambda b, std: _set_scales(b, 0, std / np.sqrt(_msq(range(-128, 128)))),
    Q.Q4_0: lambda b, std: _set_scales(b, 0, std / np.sqrt(_msq(range(-8, 8)))),
    Q.Q5_0: lambda b, std: _set_scales(b, 0, std / np.sqrt(_msq(range(-16, 16)))),
    Q.Q4_1: lambda b, std: _set_scales(b, 0, std / np.sqrt(_var(0, 15)), mins=(2, -7.5)),
    Q.Q5_1: lambda b, std: _set_scales(b, 0, std / np.sqrt(_var(0, 31)), mins=(2, -15.5)),
    Q.IQ4_NL: lambda b, std: _set_scales(b, 0, std / np.sqrt(_msq(IQ4_VALUES))),
    Q.IQ4_XS: lambda b, std: _set_scales(b, 0, std / np.sqrt(_INT6 * _msq(IQ4_VALUES))),
    Q.Q2_K: _q2_k,
    Q.Q3_K: lambda b, std: _set_scales(b, 108, std / np.sqrt(_INT6 * _msq(range(-4, 4)))),
    Q.Q4_K: _q4_k,
    Q.Q5_K: _q5_k,
    Q.Q6_K: lambda b, std: _set_scales(b, 208, std / np.sqrt(_INT8 * _msq(range(-32, 32)))),
    Q.MXFP4: _mxfp4,
}


def _random_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    words = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, (n + 7) // 8, np.int64, endpoint=True)
    return words.view(np.uint8)[:n]


def random_blocks(qtype: Q, n_elements: int, std: float, rng: np.random.Generator) -> np.ndarray:
    """``n_elements`` random values of ``qtype`` as its raw bytes (uint8, 1-D): mean 0, std about ``std``."""
    qtype = as_qtype(qtype)
    if qtype not in _FINISH and qtype not in (Q.F32, Q.F16, Q.BF16):
        raise UnsupportedError(f"cannot make random {qtype.name} blocks: supported types are "
                               f"F32, F16, BF16, {', '.join(t.name for t in _FINISH)}")
    per_block, block_bytes = GGML_QUANT_SIZES[qtype]
    if n_elements % per_block:
        raise ValueError(f"{qtype.name} needs a multiple of {per_block} elements, got {n_elements}")
    if not (np.isfinite(std) and 0 <= std <= 1e3):
        raise ValueError(f"std must be in [0, 1000], got {std}")
    if qtype in (Q.F32, Q.F16, Q.BF16):
        x = rng.standard_normal(n_elements, dtype=np.float32)
        x *= np.float32(std)
        if qtype == Q.F16:
            return x.astype(np.float16).view(np.uint8)
        if qtype == Q.BF16:  # truncating is fine for random data
            return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        return x.view(np.uint8)
    if std == 0:  # all-zero bytes decode to zeros in every format
        return np.zeros(n_elements // per_block * block_bytes, np.uint8)
    out = _random_bytes(rng, n_elements // per_block * block_bytes)
    if out.size:
        _FINISH[qtype](out.reshape(-1, block_bytes), std)
    return out
