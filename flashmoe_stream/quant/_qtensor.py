"""QTensor: a 2-D weight kept on its device in its GGML blocks, multiplied without a dequantised copy.

A decode step multiplies a few rows by every weight once: on GPUs a fused kernel reads the blocks
directly (``_triton``), on the CPU a native one (``_qdot.c``, through ``qmatmul``); for many rows (a
prompt), or where no kernel takes the type, the weight is dequantised on use. On GPUs the K-quant blocks
are kept in ``_triton.to_planar``'s layout (``planar``), which the fused kernels read faster.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _triton

FUSED_ROWS = 8  # up to this many rows of x go through the fused kernel; more are a prompt: dequantise


class QTensor:
    """``raw`` (1-D uint8, the blocks), ``qtype``, ``shape`` [N, K] (torch order) and ``dtype``, the float
    type it stands for (what ``dequantize`` and ``matmul`` return). Where ``_triton.planar_for`` says so,
    ``raw`` is replaced by its planar copy (``planar`` True); ``dequantize`` and ``rows`` undo it.
    ``chunk`` (rows, dividing N): planar in chunks of that many rows, each a [chunk, K] weight the fused
    kernels take as one pair of a launch, so that weights of different heights that multiply the same
    input (q, k and v) run in one launch (``pairs``)."""

    def __init__(self, raw: torch.Tensor, qtype, shape: Sequence[int], dtype: torch.dtype, chunk: int | None = None):
        from . import as_qtype, nbytes

        self.raw, self.qtype, self.shape, self.dtype = raw, as_qtype(qtype), tuple(int(s) for s in shape), dtype
        if len(self.shape) != 2 or raw.numel() != nbytes(self.qtype, self.shape):
            raise ValueError(f"QTensor needs 2-D {self.qtype.name} blocks, got shape {self.shape}, {raw.numel()} B")
        self.device = raw.device
        self.fused = _triton.supports(self.qtype, self.device) and raw.data_ptr() % 2 == 0
        self.planar = self.fused and _triton.planar_for(self.qtype, self.device)
        self.chunk = chunk if self.planar and chunk and self.shape[0] % chunk == 0 else self.shape[0]
        if self.planar:
            self.raw = _triton.to_planar(raw, self.qtype, self.shape, self.chunk)
        self._pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # rows → (weight offsets, row ids)

    def __repr__(self) -> str:
        return f"QTensor({self.qtype.name}, {self.shape}, {self.dtype}, {self.device})"

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        from . import dequantize

        return dequantize(self.blocks(), self.qtype, self.shape, dtype or self.dtype)

    def blocks(self) -> torch.Tensor:
        """The GGUF blocks (a copy where ``raw`` is planar)."""
        return _triton.from_planar(self.raw, self.qtype, self.shape, self.chunk) if self.planar else self.raw

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` dequantised (an embedding lookup): [*ids.shape, K] in ``dtype``."""
        from . import dequantize

        N, K = self.shape
        if self.planar:
            sel = _triton.planar_rows(self.raw, self.qtype, self.shape, ids.reshape(-1), self.chunk)
        else:
            sel = self.raw.view(N, -1)[ids.reshape(-1)]
        return dequantize(sel.reshape(-1), self.qtype, (sel.shape[0], K), self.dtype).view(*ids.shape, K)

    def matmul(self, x: torch.Tensor, out_dtype: torch.dtype | None = None, round_acts: bool = False,
               x8: tuple | None = None) -> torch.Tensor:
        """x [..., K] @ W.T → [..., N] in ``out_dtype`` (default ``dtype``). ``round_acts`` (CPU): round x
        first as llama.cpp's CPU backend does for this type (the native kernels' integer dot products).
        ``x8``: ``quantize_q8(x)`` already made (several weights multiplying the same x share it; GPUs)."""
        N, K = self.shape
        lead = x.shape[:-1]
        x2 = x.reshape(-1, K)
        T = x2.shape[0]
        if self.fused and 0 < T <= FUSED_ROWS:
            offs, xrows = self._pair_tables(T)
            y = _triton.gemv_pairs(x2, self.raw, offs, xrows, self.qtype, (self.chunk, K), x8=x8, planar=self.planar,
                                   early=True).view(T, N)  # float32; nothing writes the weight or its offsets
        elif self.device.type == "cpu":
            from . import qmatmul

            y = qmatmul(x2, self.raw, self.qtype, self.shape, round_acts)  # native, or dequantise + matmul
        else:
            y = x2.to(self.dtype) @ self.dequantize().T
        return y.to(out_dtype or self.dtype).view(*lead, N)

    def pairs(self, rows: int = 1, base: torch.Tensor | None = None) -> tuple[list[int], list[int]]:
        """The fused kernels' pairs of ``rows`` input rows times this weight's chunks (row-major: pair
        t * chunks + c is row t times chunk c): their byte offsets from ``base`` (default ``raw``) and input
        rows, as lists of ints. Another weight's pairs from the same base join these in one launch."""
        C = self.shape[0] // self.chunk
        step = self.raw.numel() // C
        at = self.raw.data_ptr() - (self.raw if base is None else base).data_ptr()
        return [at + c * step for _ in range(rows) for c in range(C)], [t for t in range(rows) for _ in range(C)]

    def _pair_tables(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = self._pairs.get(T)
        if t is None:
            offs, xrows = self.pairs(T)
            t = self._pairs[T] = (torch.tensor(offs, dtype=torch.int64, device=self.device),
                                  torch.tensor(xrows, dtype=torch.int32, device=self.device))
        return t
