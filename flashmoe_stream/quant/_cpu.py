"""Native quantised matmuls on the CPU: the C kernels of ``_qdot.c``, called through ctypes.

ctypes releases the GIL for the call, and each call splits the output rows over its own pthreads (no
pool, no state kept between calls), so calls from several Python threads at once are safe.

Every function returns None where the native path cannot serve the call (the extension was not built,
FLASHMOE_NO_NATIVE=1, a ggml type the C code does not know, more than ``MAX_ROWS`` activation rows);
the caller then dequantises and multiplies in torch, which gives the same function.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import os
from collections.abc import Sequence

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ._formats import as_qtype

log = logging.getLogger(__name__)

# Activation rows per call the native path takes. Each row costs another pass of multiply-adds over the
# decoded weights, while dequantise + torch GEMM costs about the same for any row count, but on the CPU that
# is bound by writing (and page-faulting) the float32 weights: measured on a 2-core Zen 3, dequantise + bmm
# of 8 Qwen3-30B-A3B experts runs at ~0.3 G weights/s, the native kernels at T=32 at 0.4 (float) and 1.1
# (llama) G weights/s per core.
MAX_ROWS = 64

_LIB: dict = {}  # "lib" → the loaded library, or None where it is unavailable (a memo)
_threads: list = []  # the native calls' thread count while torch's ops run on one (small_ops_on_one_thread)


@contextlib.contextmanager
def small_ops_on_one_thread():
    """Within: torch's own ops run on one thread, the native kernels keep the threads torch had.

    A decode step's torch ops (norms, RoPE, attention over one row, routing, the experts' index_add) take
    microseconds, and after each one torch's OpenMP workers spin, waiting for the next, on the cores the
    native kernels' threads need: on a 2-core machine that made every native call of a decode step about
    twice as slow as the same call alone (tools/cpu_decode_profile.py; docs/BENCHMARKS.md). Process-wide,
    as torch's thread count is; nests."""
    n = torch.get_num_threads()
    _threads.append(_threads[-1] if _threads else n)
    if n != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        _threads.pop()
        if n != 1:
            torch.set_num_threads(n)


@contextlib.contextmanager
def all_threads():
    """Within small_ops_on_one_thread: torch's own thread count back, for one large torch op (a weight the
    native kernels do not take, dequantised and multiplied in torch). Elsewhere it does nothing."""
    n = _threads[-1] if _threads else None
    if n is None or torch.get_num_threads() == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(1)


def _n_threads(n_threads: int | None) -> int:
    if n_threads is not None:
        return int(n_threads)
    return _threads[-1] if _threads else torch.get_num_threads()


def _load():
    if os.environ.get("FLASHMOE_NO_NATIVE", "0") == "1":
        return None
    try:
        spec = importlib.util.find_spec(f"{__package__}._qdot")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        log.info("native CPU kernels not built (flashmoe_stream.quant._qdot); using torch kernels")
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError as e:
        log.warning("cannot load the native CPU kernels %s (%s); using torch kernels", spec.origin, e)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.qdot_supported.argtypes, lib.qdot_supported.restype = [ctypes.c_int], ctypes.c_int
    lib.qdot_simd.argtypes, lib.qdot_simd.restype = [], ctypes.c_int
    lib.qdot_mm.argtypes = [ctypes.c_int, ctypes.c_int, ptr, i64, i64, ptr, i64, i64, i64, i64, ptr, ctypes.c_int]
    lib.qdot_mm.restype = ctypes.c_int
    lib.qdot_dequant.argtypes = [ctypes.c_int, ptr, i64, ptr, ctypes.c_int]
    lib.qdot_dequant.restype = ctypes.c_int
    return lib


def _lib():
    if "lib" not in _LIB:
        _LIB["lib"] = _load()
    return _LIB["lib"]


def available() -> bool:
    """Whether the native kernels are built and loaded (and not switched off by FLASHMOE_NO_NATIVE=1)."""
    return _lib() is not None


def simd() -> bool:
    """Whether the native kernels were compiled with AVX2/FMA (else they are portable C)."""
    lib = _lib()
    return bool(lib is not None and lib.qdot_simd())


def supported(qtype) -> bool:
    """Whether the native kernels handle weights of ``qtype``."""
    lib = _lib()
    return lib is not None and bool(lib.qdot_supported(int(as_qtype(qtype))))


_TYPES: dict = {}  # qtype → (number, elements per block, bytes per block), or None where not native (a memo)


def _type_info(lib, qtype):
    try:
        return _TYPES[qtype]
    except KeyError:
        pass
    t = as_qtype(qtype)
    info = (int(t), *GGML_QUANT_SIZES[t]) if t in GGML_QUANT_SIZES and lib.qdot_supported(int(t)) else None
    _TYPES[qtype] = info
    return info


def _check_raw(raw: torch.Tensor, qtype: GGMLQuantizationType, want: int) -> torch.Tensor:
    if raw.dtype != torch.uint8 or raw.dim() != 1:
        raise ValueError(f"raw bytes must be a 1-D uint8 tensor, got {raw.dtype} of shape {tuple(raw.shape)}")
    if raw.numel() != want:
        raise ValueError(f"{qtype.name} weight needs {want} bytes, got {raw.numel()}")
    return raw if raw.is_contiguous() else raw.contiguous()  # any byte offset is fine


def qbmm_cpu(x: torch.Tensor, raws: Sequence[torch.Tensor], qtype, shape: Sequence[int],
             round_acts: bool = False, n_threads: int | None = None) -> torch.Tensor | None:
    """x [n, R, K] times n quantised weights [N, K] (``raws[i]``: weight i's blocks) → [n, R, N] float32.

    out[i] = x[i] @ W_i.T with W_i = dequantize(raws[i], qtype, shape), in one C call whose threads split
    the rows of all n weights. round_acts: the activations are first rounded as llama.cpp's CPU backend
    rounds them for ``qtype`` (Q8_K or Q8_0 blocks) and the block products are integer. x may be an
    expanded view (stride 0 over n: its rows are then rounded once). None where the native path cannot
    serve the call.
    """
    lib = _lib()
    if lib is None:
        return None
    info = _type_info(lib, qtype)
    if info is None or not x.is_cpu or x.dim() != 3:
        return None
    code, per_block, block_bytes = info
    N, K = (int(s) for s in shape)
    n, R = x.shape[0], x.shape[1]
    if n != len(raws) or x.shape[2] != K:
        raise ValueError(f"x {tuple(x.shape)} does not match {len(raws)} weights of shape {(N, K)}")
    if R > MAX_ROWS:
        return None
    if K % per_block:
        raise ValueError(f"{as_qtype(qtype).name} rows must be a multiple of {per_block} elements, got shape {(N, K)}")
    want = N * (K // per_block) * block_bytes
    ptrs = (ctypes.c_void_p * max(n, 1))()
    keep = []  # contiguous copies (if any) must outlive the call
    for i, r in enumerate(raws):
        if not r.is_cpu:
            return None
        if r.dtype != torch.uint8 or r.dim() != 1 or r.numel() != want:
            _check_raw(r, as_qtype(qtype), want)  # raises with the reason
        if r.stride(0) != 1 and r.numel() > 1:
            r = r.contiguous()
            keep.append(r)
        ptrs[i] = r.data_ptr()  # any byte offset: the kernels need no alignment
    out = torch.empty(n, R, N, dtype=torch.float32)
    if n == 0 or R == 0 or N == 0:
        return out
    if x.dtype != torch.float32:
        x = x.float()
    if x.stride(2) != 1:
        x = x.contiguous()
    xs_mat = x.stride(0) if n > 1 else 0
    xs_row = x.stride(1) if R > 1 else K
    threads = _n_threads(n_threads)
    rc = lib.qdot_mm(code, 1 if round_acts else 0, x.data_ptr(), xs_mat, xs_row, ptrs, n, R, N, K,
                     out.data_ptr(), threads)
    if rc == -2:
        raise MemoryError("native quantised matmul: out of memory or no thread could start")
    if rc != 0:
        return None
    return out


def qmatmul_cpu(x: torch.Tensor, raw: torch.Tensor, qtype, shape: Sequence[int], round_acts: bool = False,
                n_threads: int | None = None) -> torch.Tensor | None:
    """x [..., K] @ W.T for one quantised weight W [N, K] → [..., N] float32 (see qbmm_cpu); or None."""
    N, K = (int(s) for s in shape)
    if x.shape[-1] != K:
        raise ValueError(f"x {tuple(x.shape)} does not match a weight of shape {(N, K)}")
    out = qbmm_cpu(x.reshape(1, -1, K), [raw], qtype, shape, round_acts, n_threads)
    return None if out is None else out.reshape(*x.shape[:-1], N)


def dequantize_cpu(raw: torch.Tensor, qtype, n_elements: int, n_threads: int | None = None) -> torch.Tensor | None:
    """The float32 values of ``raw`` (1-D uint8, CPU), bit-identical to ``dequantize``; None where unsupported."""
    lib = _lib()
    qtype = as_qtype(qtype)
    if lib is None or raw.device.type != "cpu" or not lib.qdot_supported(int(qtype)):
        return None
    per_block, block_bytes = GGML_QUANT_SIZES[qtype]
    if n_elements % per_block:
        raise ValueError(f"{qtype.name} needs a multiple of {per_block} elements, got {n_elements}")
    raw = _check_raw(raw, qtype, n_elements // per_block * block_bytes)
    out = torch.empty(n_elements, dtype=torch.float32)
    threads = _n_threads(n_threads)
    if lib.qdot_dequant(int(qtype), raw.data_ptr(), n_elements // per_block, out.data_ptr(), threads) != 0:
        return None
    return out
