"""How llama.cpp's CPU backend rounds the activations that meet a weight of each ggml type.

Its CPU kernels never multiply float activations by quantised weights: the activations are first
rounded to the weight type's partner format (8-bit blocks with an fp16 scale (Q8_0) or a float32 one
(Q8_K), or fp16/bf16), then integer dot products are taken. models/common.py's act_for is this.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from gguf import GGMLQuantizationType as Q

Q8_0_PARTNER = frozenset({Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.IQ4_NL, Q.MXFP4})
Q8_K_PARTNER = frozenset({Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_XS})


def round_q8_0(x: torch.Tensor) -> torch.Tensor:
    """As quantize_row_q8_0: blocks of 32, d = amax/127 stored as fp16, q = round(x/d)."""
    xb = x.float().reshape(*x.shape[:-1], -1, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    return (torch.round(xb * inv) * d.half().float()).reshape(x.shape)


def round_q8_k(x: torch.Tensor) -> torch.Tensor:
    """As quantize_row_q8_K: blocks of 256, iscale = -127/max (max: the signed value of largest |x|)."""
    xb = x.float().reshape(*x.shape[:-1], -1, 256)
    mx = xb.gather(-1, xb.abs().argmax(-1, keepdim=True))
    iscale = torch.where(mx != 0, -127.0 / mx, torch.zeros_like(mx))
    q = torch.round(iscale * xb).clamp(max=127)
    d = torch.where(mx != 0, 1.0 / iscale, torch.zeros_like(mx))
    return (q * d).reshape(x.shape)


def act_rounding(qtype: Q) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The rounding llama.cpp applies to activations meeting a ``qtype`` weight (None: none), float32 out."""
    if qtype in Q8_0_PARTNER:
        return round_q8_0
    if qtype in Q8_K_PARTNER:
        return round_q8_k
    if qtype == Q.F16:
        return lambda x: x.half().float()
    if qtype == Q.BF16:
        return lambda x: x.bfloat16().float()
    return None
