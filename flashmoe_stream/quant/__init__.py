"""ggml quantisation formats: sizes, dequantisation on any torch device, quantised matmuls, and random
valid blocks.

``dequantize`` is bit-identical to ``gguf.quants.dequantize`` (llama.cpp's reference dequantisers)
for every type in ``SUPPORTED_TYPES``. ``qmatmul``/``qbmm`` multiply by quantised weights without
materialising them where a native kernel exists (CPU: ``_qdot.c``), else dequantise and multiply.
``random_blocks`` writes synthetic weights without quantising.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from math import prod

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import UnsupportedError
from . import _cpu
from ._acts import act_rounding
from ._formats import DECODERS, as_qtype
from ._random import random_blocks

__all__ = ["SUPPORTED_TYPES", "act_rounding", "block_size", "dequantize", "nbytes", "qbmm", "qmatmul",
           "random_blocks"]

log = logging.getLogger(__name__)

SUPPORTED_TYPES: tuple[GGMLQuantizationType, ...] = tuple(DECODERS)


def _names(types) -> str:
    return ", ".join(t.name for t in types)


def block_size(qtype: GGMLQuantizationType) -> tuple[int, int]:
    """(elements per block, bytes per block) of any ggml type gguf knows, supported or not."""
    qtype = as_qtype(qtype)
    if qtype not in GGML_QUANT_SIZES:
        raise UnsupportedError(f"ggml type {qtype.name} has no known block size")
    return GGML_QUANT_SIZES[qtype]


def nbytes(qtype: GGMLQuantizationType, shape: Sequence[int]) -> int:
    """Bytes of a tensor of ``shape`` (torch order: the last dimension is ggml's ne0, the row)."""
    per_block, block_bytes = block_size(qtype)
    row = shape[-1] if len(shape) else 1
    if row % per_block:
        raise ValueError(f"{as_qtype(qtype).name} rows must be a multiple of {per_block} elements, "
                         f"got shape {tuple(shape)}")
    return prod(shape) // per_block * block_bytes


def dequantize(raw: torch.Tensor, qtype: GGMLQuantizationType, shape: Sequence[int],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode ``raw`` (the tensor's bytes, a 1-D uint8 tensor) into a new ``shape`` tensor of ``dtype``.

    Runs on ``raw``'s device (on the CPU with the native decoder where it is built and knows the type).
    The values are exactly gguf-py's (and llama.cpp's reference) float32 results, then cast to ``dtype``.
    """
    qtype = as_qtype(qtype)
    decode = DECODERS.get(qtype)
    if decode is None:
        raise UnsupportedError(f"cannot dequantize ggml type {qtype.name}: supported types are "
                               f"{_names(SUPPORTED_TYPES)}")
    if raw.dtype != torch.uint8:
        raise ValueError(f"raw bytes must be a uint8 tensor, got {raw.dtype}")
    shape = tuple(int(s) for s in shape)
    want = nbytes(qtype, shape)
    if raw.numel() != want:
        raise ValueError(f"{qtype.name} tensor of shape {shape} needs {want} bytes, got {raw.numel()}")
    if raw.device.type == "cpu" and raw.dim() == 1:  # the native decoder: same bits, no torch temporaries
        out = _cpu.dequantize_cpu(raw, qtype, prod(shape))
        if out is not None:
            return out.reshape(shape).to(dtype)
    if raw.storage_offset() % 4:  # float views of the bytes need aligned storage
        raw = raw.clone()
    blocks = raw.reshape(-1, block_size(qtype)[1])
    if blocks.device.type != "cpu" and _compile_enabled():
        fused = _fused(qtype, dtype)
        if fused is not None:
            try:
                return fused(blocks).reshape(shape)
            except Exception as e:  # noqa: BLE001 - no working compiler here: stay eager from now on
                log.warning("torch.compile of the %s decoder failed (%s); dequantising with eager kernels",
                            qtype.name, str(e).splitlines()[0] if str(e) else type(e).__name__)
                _FUSED[(qtype, dtype)] = None
    return decode(blocks).reshape(shape).to(dtype)


def _compile_enabled() -> bool:
    return os.environ.get("FLASHMOE_COMPILE", "1") != "0"


_FUSED: dict = {}  # (qtype, dtype) → compiled decoder, or None where compiling failed (a memo)


def _fused(qtype: GGMLQuantizationType, dtype: torch.dtype):
    """The decoder and the cast to ``dtype`` compiled into one kernel (torch.compile; GPUs only): the
    eager decoders are 8–20 elementwise kernels each, bandwidth-bound on their float32 intermediates.
    Same float32 arithmetic, so the same bits. Set FLASHMOE_COMPILE=0 to stay eager."""
    key = (qtype, dtype)
    if key not in _FUSED:
        decode = DECODERS[qtype]
        try:
            _FUSED[key] = torch.compile(lambda b: decode(b).to(dtype), dynamic=True)
        except Exception:  # noqa: BLE001 - torch.compile unavailable in this build
            _FUSED[key] = None
    return _FUSED[key]


# --- matmuls by quantised weights ------------------------------------------------------------------
# One function each, two implementations: a native kernel where one serves the call (it returns None
# where it cannot), else dequantise + matmul. Both compute the same function in float32:
#   round_acts=False: x @ W.T with W = dequantize(raw, qtype, shape), x as given;
#   round_acts=True:  act_rounding(qtype)(x) @ W.T, the activations rounded as llama.cpp's CPU backend does.


def _rounded(x: torch.Tensor, qtype: GGMLQuantizationType, round_acts: bool) -> torch.Tensor:
    x = x.float()
    act = act_rounding(qtype) if round_acts else None
    return x if act is None else act(x)


def qmatmul(x: torch.Tensor, raw: torch.Tensor, qtype: GGMLQuantizationType, shape: Sequence[int],
            round_acts: bool = False) -> torch.Tensor:
    """``x`` [..., K] times the quantised weight [N, K] whose blocks are ``raw`` (1-D uint8): [..., N] float32.

    ``round_acts``: round the activations first as llama.cpp's CPU backend does for ``qtype``.
    """
    qtype = as_qtype(qtype)
    if x.device.type == "cpu":
        rows = x.reshape(-1, x.shape[-1])
        # a prompt's rows in chunks the native kernels take: each row's result is the same either way, and
        # dequantising the weight for every call would cost more than the chunks' extra weight decoding
        parts = [_cpu.qmatmul_cpu(rows[i: i + _cpu.MAX_ROWS], raw, qtype, shape, round_acts)
                 for i in range(0, rows.shape[0], _cpu.MAX_ROWS)]
        if parts and all(p is not None for p in parts):
            out = parts[0] if len(parts) == 1 else torch.cat(parts)  # (a decode step: one part, no copy)
            return out.reshape(*x.shape[:-1], parts[0].shape[-1])
    with _cpu.all_threads():  # a decode step's torch ops run on one thread; this one is large
        return _rounded(x, qtype, round_acts) @ dequantize(raw, qtype, shape).T


def qbmm(x: torch.Tensor, raws: Sequence[torch.Tensor], qtype: GGMLQuantizationType, shape: Sequence[int],
         round_acts: bool = False) -> torch.Tensor:
    """``x`` [n, R, K] times n quantised weights [N, K] (``raws[i]``: weight i's blocks, all of ``qtype`` and
    ``shape``): [n, R, N] float32, out[i] = x[i] @ W_i.T. On the CPU one native call runs all n.

    ``round_acts``: round the activations first as llama.cpp's CPU backend does for ``qtype``.
    """
    qtype = as_qtype(qtype)
    if x.device.type == "cpu":
        out = _cpu.qbmm_cpu(x, raws, qtype, shape, round_acts)
        if out is not None:
            return out
    raw = raws[0] if len(raws) == 1 else torch.cat(list(raws))
    with _cpu.all_threads():
        w = dequantize(raw, qtype, (len(raws), *shape))
        return torch.bmm(_rounded(x, qtype, round_acts), w.transpose(1, 2))


# fused dequantise-multiply (GPUs) and the weight type that uses it; imported last: they use the above
from . import _triton  # noqa: E402
from ._qtensor import QTensor  # noqa: E402
from ._triton import gemv_pairs as fused_gemv_pairs, q8_buffers as fused_q8_buffers  # noqa: E402
from ._triton import quantize_q8 as fused_quantize_q8  # noqa: E402
from ._triton import supports as fused_supported  # noqa: E402
from ._triton import from_planar, planar_for, to_planar  # noqa: E402 - the GPU kernels' weight layout

# a Triton helper for GPU kernels that write a GEMV's input: a row's groups of 32 rounded to 8 bits as
# fused_quantize_q8 rounds them (models/_fused.py); None without Triton
fused_q8_groups = getattr(_triton, "q8_groups", None)
# ... and for every kernel of a decode step: programmatic dependent launch (its launch keywords on a device;
# the wait for the kernel before, and the L2 prefetch of resident weights before that wait)
pdl_options = _triton.pdl_options
fused_gdc = getattr(_triton, "gdc", None)
fused_prefetch_l2 = getattr(_triton, "prefetch_l2", None)

NATIVE_ROWS = _cpu.MAX_ROWS  # rows of x up to which qmatmul/qbmm use the native CPU kernels
native_supported = _cpu.supported  # whether the native CPU kernels take a type (and are built)
small_ops_on_one_thread = _cpu.small_ops_on_one_thread  # torch on one thread, the native kernels on torch's


__all__ += ["NATIVE_ROWS", "QTensor", "fused_gdc", "fused_gemv_pairs", "fused_prefetch_l2", "fused_q8_buffers",
            "fused_q8_groups", "fused_quantize_q8", "fused_supported", "from_planar", "native_supported",
            "pdl_options", "planar_for", "small_ops_on_one_thread", "to_planar"]
