"""ggml block formats decoded with plain torch tensor ops, on any device.

Every decoder takes ``b``, the blocks as a ``[n_blocks, bytes_per_block]`` uint8 tensor, and returns
float32 values ``[n_blocks, ...]`` whose flattening is the blocks' elements in order. The float
arithmetic is done in exactly the order ggml's reference dequantisers (and gguf-py) use: the fp16
scales are widened to float32 first, each product and difference is a separate float32 operation
(no fused multiply-add), so results are bit-identical.
"""

from __future__ import annotations

from typing import Callable

import torch
from gguf import GGMLQuantizationType as Q

from ..errors import UnsupportedError

# The IQ4 non-linear grid, and the e2m1 (fp4) values doubled as ggml stores them for MXFP4.
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
FP4_VALUES_X2 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


def as_qtype(qtype) -> Q:
    """``qtype`` (a GGMLQuantizationType or its number) as the enum; UnsupportedError if gguf does not know it."""
    try:
        return Q(qtype)
    except ValueError:
        raise UnsupportedError(f"unknown ggml type {qtype!r}") from None


_CONSTANTS: dict[tuple[str, int, torch.device], torch.Tensor] = {}


def _const(name: str, arg: int, device: torch.device) -> torch.Tensor:
    """Small lookup tensors, made once per device and never modified."""
    key = (name, arg, device)
    t = _CONSTANTS.get(key)
    if t is None:
        if name == "shifts":  # the shift of each `arg`-bit field of a byte, low field first
            t = torch.arange(0, 8, arg, dtype=torch.uint8)
        else:
            t = torch.tensor(IQ4_VALUES if name == "iq4" else FP4_VALUES_X2, dtype=torch.float32)
        t = _CONSTANTS.setdefault(key, t.to(device))
    return t


def _fields(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The ``bits``-wide fields of each byte of ``x``, low field first, along a new dimension ``dim``."""
    shifts = _const("shifts", bits, x.device)
    view = [1] * (x.dim() + 1)
    view[dim] = -1
    return (x.unsqueeze(dim) >> shifts.view(view)).bitwise_and_((1 << bits) - 1)


def _f16(b: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 field at byte ``at`` of every block, widened to float32, as ``[n_blocks, 1]``."""
    return b[:, at:at + 2].clone(memory_format=torch.contiguous_format).view(torch.float16).float()


def _lookup(table: str, q: torch.Tensor) -> torch.Tensor:
    """The float32 table entries at the small integers ``q``."""
    return _const(table, 0, q.device).index_select(0, q.reshape(-1).int()).view(q.shape)


def _scaled(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float(q) * scale, as one new float32 tensor (q's shape; scale broadcasts).

    GPUs cast inside the multiply kernel (one pass); on CPU a mixed-dtype multiply is slower than
    widening first and multiplying in place.
    """
    if q.device.type == "cpu":
        return q.float().mul_(scale)
    return q * scale


def _signed(q: torch.Tensor, offset: int) -> torch.Tensor:
    """Unsigned small ints minus ``offset``, as int8."""
    return q.view(torch.int8) - offset


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: the 8 six-bit scales and 8 six-bit mins packed into 12 bytes."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], dim=1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=1)
    return sc, mn


# Quants stay small integers (uint8/int8) until one multiply by the float32 scales makes the output,
# which is then offset in place: one large float allocation per call (fresh pages are costly on CPU).
# float(q) * d is bitwise d * float(q): IEEE multiplication is commutative.

# --- legacy 32-element blocks -------------------------------------------------------------------

def q8_0(b):
    return _scaled(b[:, 2:].view(torch.int8), _f16(b, 0))


def q4_0(b):
    q = _fields(b[:, 2:], 4, 1).flatten(1)
    return _scaled(_signed(q, 8), _f16(b, 0))


def q4_1(b):
    q = _fields(b[:, 4:], 4, 1).flatten(1)
    return _scaled(q, _f16(b, 0)).add_(_f16(b, 2))


def _q5(b, at):
    qh = _fields(b[:, at:at + 4], 1, 2).flatten(1)  # bit i of the little-endian uint32 -> element i
    ql = _fields(b[:, at + 4:], 4, 1).flatten(1)
    return ql.bitwise_or_(qh << 4)


def q5_0(b):
    return _scaled(_signed(_q5(b, 2), 16), _f16(b, 0))


def q5_1(b):
    return _scaled(_q5(b, 4), _f16(b, 0)).add_(_f16(b, 2))


def iq4_nl(b):
    q = _fields(b[:, 2:], 4, 1).flatten(1)
    return _lookup("iq4", q).mul_(_f16(b, 0))


def mxfp4(b):
    e = b[:, :1].int()  # e8m0 exponent; ggml keeps half the scale, as subnormals for e < 2
    d = torch.where(e < 2, (e + 1) << 21, (e - 1) << 23).view(torch.float32)
    q = _fields(b[:, 1:], 4, 1).flatten(1)
    return _lookup("fp4", q).mul_(d)


# --- K-quants: 256-element super-blocks -----------------------------------------------------------

def q2_k(b):
    n = b.shape[0]
    s = b[:, 0:16]
    dl = (_f16(b, 80) * (s & 15)).view(n, 16, 1)
    ml = (_f16(b, 82) * (s >> 4)).view(n, 16, 1)
    q = _fields(b[:, 16:80].view(n, 2, 32), 2, 2).view(n, 16, 16)
    return _scaled(q, dl).sub_(ml)


def q3_k(b):
    n = b.shape[0]
    lo = _fields(b[:, 96:104], 4, 1).flatten(1)
    hi = _fields(b[:, 104:108], 2, 1).flatten(1)
    dl = (_f16(b, 108) * _signed(lo | (hi << 4), 32)).view(n, 16, 1)
    ql = _fields(b[:, 32:96].view(n, 2, 32), 2, 2).view(n, 16, 16)
    hm = _fields(b[:, 0:32], 1, 1).view(n, 16, 16)
    q = ql.view(torch.int8) - ((hm ^ 1) << 2).view(torch.int8)  # a clear hmask bit subtracts 4
    return _scaled(q, dl)


def q4_k(b):
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    d = (_f16(b, 0) * sc).view(n, 8, 1)
    dm = (_f16(b, 2) * mn).view(n, 8, 1)
    q = _fields(b[:, 16:144].view(n, 4, 32), 4, 2).view(n, 8, 32)
    return _scaled(q, d).sub_(dm)


def q5_k(b):
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    d = (_f16(b, 0) * sc).view(n, 8, 1)
    dm = (_f16(b, 2) * mn).view(n, 8, 1)
    ql = _fields(b[:, 48:176].view(n, 4, 32), 4, 2).view(n, 8, 32)
    qh = _fields(b[:, 16:48], 1, 1)
    return _scaled(ql.bitwise_or_(qh << 4), d).sub_(dm)


def q6_k(b):
    n = b.shape[0]
    d = (_f16(b, 208) * b[:, 192:208].view(torch.int8)).view(n, 16, 1)
    ql = _fields(b[:, 0:128].view(n, 2, 64), 4, 2).view(n, 8, 32)
    qh = _fields(b[:, 128:192].view(n, 2, 32), 2, 2).view(n, 8, 32)
    q = _signed(ql.bitwise_or_(qh << 4), 32)
    return _scaled(q.view(n, 16, 16), d)


def iq4_xs(b):
    n = b.shape[0]
    lo = _fields(b[:, 4:8], 4, 2).flatten(1)
    hi = _fields(b[:, 2:4], 2, 2).flatten(1)
    dl = (_f16(b, 0) * _signed(lo | (hi << 4), 32)).view(n, 8, 1)
    q = _fields(b[:, 8:136].view(n, 8, 16), 4, 2).view(n, 8, 32)
    return _lookup("iq4", q).mul_(dl)


# --- plain floats (the whole tensor is one "block" row of 1 element each) ------------------------

def f32(b):
    return b.view(torch.float32).clone()


def f16(b):
    return b.view(torch.float16).float()


def bf16(b):
    return b.view(torch.bfloat16).float()  # exact: bf16 is the high half of a float32


DECODERS: dict[Q, Callable[[torch.Tensor], torch.Tensor]] = {
    Q.F32: f32, Q.F16: f16, Q.BF16: bf16,
    Q.Q8_0: q8_0, Q.Q4_0: q4_0, Q.Q4_1: q4_1, Q.Q5_0: q5_0, Q.Q5_1: q5_1,
    Q.Q2_K: q2_k, Q.Q3_K: q3_k, Q.Q4_K: q4_k, Q.Q5_K: q5_k, Q.Q6_K: q6_k,
    Q.IQ4_NL: iq4_nl, Q.IQ4_XS: iq4_xs, Q.MXFP4: mxfp4,
}
