"""An expert store: where each routed expert's bytes are, and how to turn read bytes into an ExpertBlob.

Two kinds of source behind one class:

* a store directory written by ``repack`` (``manifest.json``, ``dense.gguf``,
  ``experts/<layer>/<expert>.bin``), with an xxh3_64 checksum per block;
* a GGUF file (any shard of a split set), read in place: expert ``e`` of a
  ``blk.L.ffn_{gate,up,down}_exps`` tensor is the contiguous byte range ``[e·n/E, (e+1)·n/E)``.
  Repacking is an optimisation, never a requirement.

Every read goes through an :class:`ExpertLayout`: a list of 4096-aligned file ranges to read into
one aligned buffer, and where each block lies in that buffer. ``ExpertStore.read`` does buffered
reads; ``io.reader.Reader`` does the same ranges with O_DIRECT on a thread pool. Both end in
``ExpertStore.assemble``, which slices, decompresses and checks.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
from gguf import GGMLQuantizationType

from ..errors import BadFileError, ChecksumError, ShortReadError, StoreError, UnsupportedError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
FORMAT_NAME = "flashmoe-expert-store"
ALIGN = 4096
MANIFEST = "manifest.json"
DENSE = "dense.gguf"
JOURNAL = "repack.journal"

# Block names in an ExpertBlob, from the GGUF tensor names blk.N.ffn_<proj>_exps.<kind>.
_EXPERT_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.(weight|bias)$")
BLOCK_ORDER = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")


def block_name(proj: str, kind: str) -> str:
    return proj if kind == "weight" else f"{proj}_bias"


def expert_block_of(tensor_name: str) -> tuple[int, str] | None:
    """(layer, block name) of a routed-expert tensor, else None."""
    m = _EXPERT_RE.match(tensor_name)
    return (int(m[1]), block_name(m[2], m[3])) if m else None


def align_down(x: int) -> int:
    return x - x % ALIGN


def align_up(x: int) -> int:
    return -(-x // ALIGN) * ALIGN


@dataclass(frozen=True)
class ExpertSlice:
    """One block (gate, up, down, …) of one expert inside a GGUF: the expert's contiguous slice."""

    name: str
    path: Path
    offset: int  # absolute offset of the slice in its shard
    size: int
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]


def gguf_experts(model) -> tuple[dict[int, list[tuple[ExpertSlice, ...]]], list, int]:
    """A GGUF's routed experts as slices, per layer in expert order; its dense tensors; n_expert.

    Expert e of ``blk.N.ffn_<proj>_exps.weight`` (shape [n_expert, ...]) is the contiguous bytes
    [e·n/E, (e+1)·n/E). Raises BadFileError/UnsupportedError on a model that has no experts or
    whose expert tensors do not split evenly.
    """
    src = model.paths[0]
    per_layer: dict[int, dict[str, Any]] = {}
    dense = []
    for t in model.tensors.values():
        hit = expert_block_of(t.name)
        if hit is None:
            dense.append(t)
        else:
            per_layer.setdefault(hit[0], {})[hit[1]] = t
    if not per_layer:
        raise UnsupportedError(f"{src}: no routed-expert tensors (blk.N.ffn_{{gate,up,down}}_exps.weight): "
                               f"flashmoe-stream streams the experts of Mixture-of-Experts models only")
    n_expert = None
    experts: dict[int, list[tuple[ExpertSlice, ...]]] = {}
    for layer, tensors in sorted(per_layer.items()):
        missing = [p for p in ("gate", "up", "down") if p not in tensors]
        if missing:
            raise BadFileError(f"{src}: layer {layer} has expert tensors but lacks "
                               f"{', '.join(f'blk.{layer}.ffn_{p}_exps.weight' for p in missing)}")
        names = [n for n in BLOCK_ORDER if n in tensors]
        for n in names:
            t = tensors[n]
            e = t.shape[0] if len(t.shape) >= 2 else 0
            if n_expert is None:
                n_expert = e
            if e < 1 or e != n_expert or t.nbytes % e:
                raise BadFileError(f"{src}: {t.name} (shape {list(t.shape)}, {t.nbytes} bytes) does not split into "
                                   f"{n_expert} equal experts")
        experts[layer] = [
            tuple(ExpertSlice(n, tensors[n].path, tensors[n].offset + x * (tensors[n].nbytes // n_expert),
                              tensors[n].nbytes // n_expert, tensors[n].qtype, tuple(tensors[n].shape[1:]))
                  for n in names)
            for x in range(n_expert)]
    return experts, dense, int(n_expert)


def xxh3_hex(data) -> str:
    return xxhash.xxh3_64_hexdigest(data)


# ---------------------------------------------------------------------------------------------
# What one expert is


@dataclass(frozen=True)
class Block:
    """One projection of one expert: raw GGML bytes (buffer protocol), its type and torch-order shape."""

    data: Any  # numpy uint8 view, memoryview or bytes: exactly the block's bytes
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return memoryview(self.data).nbytes


@dataclass
class ExpertBlob(Mapping):
    """An expert's blocks; as a mapping, block name → bytes (``blob["gate"]``)."""

    layer: int
    expert: int
    blocks: dict[str, Block]
    buffer: Any = field(default=None, repr=False)  # the (aligned) buffer the blocks view, kept alive

    def __getitem__(self, name: str):
        return self.blocks[name].data

    def __iter__(self) -> Iterator[str]:
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blocks.values())


@dataclass(frozen=True)
class ReadRange:
    """Read ``length`` bytes (4096-aligned) of ``path`` at ``offset`` (4096-aligned) into buffer[buf_offset:].

    At least ``need`` bytes must come back (less than ``length`` only where the file ends first)."""

    path: Path
    offset: int
    length: int
    need: int
    buf_offset: int


@dataclass(frozen=True)
class BlockSpec:
    name: str
    buf_offset: int  # where the stored bytes start in the read buffer
    size: int  # stored bytes
    nbytes: int  # raw bytes (== size unless compressed)
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    codec: str | None = None
    xxh3: str | None = None  # hex xxh3_64 of the stored bytes; None for a GGUF source
    label: str = ""  # the file, for messages


@dataclass(frozen=True)
class ExpertLayout:
    layer: int
    expert: int
    ranges: tuple[ReadRange, ...]
    blocks: tuple[BlockSpec, ...]

    @property
    def buffer_nbytes(self) -> int:
        return max((r.buf_offset + r.length for r in self.ranges), default=0)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blocks)


def aligned_empty(nbytes: int) -> np.ndarray:
    """A uint8 array of ``nbytes`` whose address is a multiple of 4096 (over-allocate, then offset)."""
    base = np.empty(nbytes + ALIGN, dtype=np.uint8)
    off = (-base.ctypes.data) % ALIGN
    return base[off:off + nbytes]


def short_read_error(path: Path, offset: int, got: int, need: int) -> ShortReadError:
    try:
        size = f"{path.stat().st_size} bytes"
    except OSError:
        size = "gone"
    return ShortReadError(
        f"{path}: short read at byte {offset}: got {got} of {need} bytes (file is {size}); it was truncated "
        f"or changed while open: run `flashmoe repack --verify` on the store, or repack the model again")


# ---------------------------------------------------------------------------------------------


class ExpertStore:
    """A store directory (``manifest.json`` …) or a GGUF file, as experts by (layer, expert).

    ``verify`` (default True) checks each block's xxh3_64 where the store has checksums: the first time
    each expert is read through this store (a corrupt file is found on its first read), or on every read
    with ``recheck``. Streaming reads each expert many times, and hashing every read took 8 % of decode in
    one pair of runs on a 2-core machine (docs/BENCHMARKS.md); that guards only against a disk that returns
    other bytes the second time.
    """

    def __init__(self, path: str | os.PathLike, verify: bool = True, recheck: bool = False):
        self.path = Path(path)
        self.verify, self.recheck = verify, recheck
        self._checked: set[tuple[int, int]] = set()  # experts whose checksums matched
        if not self.path.exists():
            raise StoreError(f"{self.path}: no such file or directory (give a store directory or a .gguf file)")
        if self.path.is_dir():
            self._open_store_dir()
        else:
            self._open_gguf()
        self.layers: list[int] = sorted(self._layouts)

    # --- opening ---------------------------------------------------------------------------

    def _open_store_dir(self) -> None:
        mpath = self.path / MANIFEST
        if not mpath.exists():
            if (self.path / JOURNAL).exists():
                raise StoreError(f"{self.path}: unfinished repack (no {MANIFEST}): rerun `flashmoe repack` "
                                 f"with the same model and -o {self.path} to finish it")
            raise StoreError(f"{self.path}: no {MANIFEST}: not an expert store; make one with "
                             f"`flashmoe repack MODEL.gguf -o {self.path}` or give the .gguf itself")
        try:
            m = json.loads(mpath.read_text())
            if not isinstance(m, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            raise StoreError(f"{mpath}: corrupt manifest ({e}): repack the model again") from None
        if m.get("format") != FORMAT_NAME or not isinstance(m.get("format_version"), int):
            raise StoreError(f"{mpath}: not a flashmoe expert store manifest: repack the model again")
        v = m["format_version"]
        if v > FORMAT_VERSION:
            raise StoreError(f"{self.path}: store format {v} is newer than this flashmoe-stream supports "
                             f"({FORMAT_VERSION}): upgrade flashmoe-stream")
        self.manifest: dict[str, Any] = m
        self.kind = "store"
        try:
            self.dense_path = self.path / m["dense"]["file"]
            self.config_dict: dict[str, Any] = m["config"]
            self.n_expert = int(m["n_expert"])
            layouts: dict[int, list[ExpertLayout]] = {}
            for lkey, experts in m["layers"].items():
                layer = int(lkey)
                if len(experts) != self.n_expert:
                    raise ValueError(f"layer {layer} lists {len(experts)} experts, expected {self.n_expert}")
                layouts[layer] = [self._store_layout(layer, e, rec) for e, rec in enumerate(experts)]
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{mpath}: corrupt manifest ({type(e).__name__}: {e}): repack the model again") from None
        self._layouts = layouts

    def _store_layout(self, layer: int, expert: int, rec: dict) -> ExpertLayout:
        path = self.path / rec["file"]
        size = int(rec["size"])
        blocks = tuple(
            BlockSpec(name, int(b["offset"]), int(b["size"]), int(b["nbytes"]), GGMLQuantizationType[b["type"]],
                      tuple(int(d) for d in b["shape"]), b.get("codec"), b["xxh3"], rec["file"])
            for name, b in rec["blocks"].items())
        for b in blocks:
            if b.buf_offset + b.size > size:
                raise ValueError(f"{rec['file']}: block {b.name} ends past the file size")
        return ExpertLayout(layer, expert, (ReadRange(path, 0, size, size, 0),), blocks)

    def _open_gguf(self) -> None:
        from ..gguf_file import open_gguf

        model = open_gguf(self.path)
        self.kind = "gguf"
        self.gguf = model
        self.dense_path = model.paths[0]
        self.config_dict = None  # type: ignore[assignment]
        slices, _dense, n_expert = gguf_experts(model)
        layouts: dict[int, list[ExpertLayout]] = {}
        for layer, experts in slices.items():
            layouts[layer] = []
            for x, blocks_of_x in enumerate(experts):
                ranges, blocks, pos = [], [], 0
                for sl in blocks_of_x:
                    a0, a1 = align_down(sl.offset), align_up(sl.offset + sl.size)
                    ranges.append(ReadRange(sl.path, a0, a1 - a0, sl.offset + sl.size - a0, pos))
                    blocks.append(BlockSpec(sl.name, pos + sl.offset - a0, sl.size, sl.size, sl.qtype, sl.shape,
                                            None, None, sl.path.name))
                    pos += a1 - a0
                layouts[layer].append(ExpertLayout(layer, x, tuple(ranges), tuple(blocks)))
        self.n_expert = int(n_expert)
        self._layouts = layouts

    # --- what it holds ---------------------------------------------------------------------

    @cached_property
    def config(self):
        """The model's ModelConfig, parsed from the dense GGUF's metadata (header only)."""
        if self.kind == "gguf":
            return self.gguf.config
        from ..gguf_file import open_gguf

        return open_gguf(self.dense_path).config

    @property
    def n_layer(self) -> int:
        return int(self.config_dict["n_layer"]) if self.config_dict else int(self.config.n_layer)

    @property
    def files(self) -> list[Path]:
        """Every file experts are read from."""
        return sorted({r.path for ls in self._layouts.values() for x in ls for r in x.ranges})

    def layout(self, layer: int, expert: int) -> ExpertLayout:
        try:
            return self._layouts[layer][expert]
        except (KeyError, IndexError):
            raise StoreError(f"{self.path}: no expert {expert} in layer {layer} "
                             f"(layers with experts: {self.layers[0]}..{self.layers[-1]}, experts 0..{self.n_expert - 1})"
                             ) from None

    def expert_nbytes(self, layer: int) -> int:
        """Raw bytes of one expert of ``layer`` (what it occupies once read and decompressed)."""
        return self.layout(layer, 0).nbytes

    def expert_read_nbytes(self, layer: int, expert: int) -> int:
        """Bytes a read of this expert moves from disk (aligned)."""
        return self.layout(layer, expert).buffer_nbytes

    # --- reading ---------------------------------------------------------------------------

    def read(self, layer: int, expert: int, verify: bool | None = None) -> ExpertBlob:
        """Read one expert with plain buffered reads (the Reader does the same with O_DIRECT on threads)."""
        lay = self.layout(layer, expert)
        return self.read_into(layer, expert, aligned_empty(lay.buffer_nbytes), verify)

    def read_into(self, layer: int, expert: int, buf, verify: bool | None = None) -> ExpertBlob:
        """Read one expert into ``buf`` (writable, at least ``layout(...).buffer_nbytes`` bytes)."""
        lay = self.layout(layer, expert)
        view = memoryview(buf).cast("B")
        if view.nbytes < lay.buffer_nbytes:
            raise ValueError(f"buffer of {view.nbytes} bytes is smaller than the {lay.buffer_nbytes} this expert needs")
        for r in lay.ranges:
            try:
                fd = os.open(r.path, os.O_RDONLY)
            except FileNotFoundError:
                raise StoreError(f"{r.path}: missing: the store is incomplete; repack the model again") from None
            try:
                got = 0
                while got < r.length:
                    n = os.preadv(fd, [view[r.buf_offset + got:r.buf_offset + r.length]], r.offset + got)
                    if n == 0:
                        break
                    got += n
            finally:
                os.close(fd)
            if got < r.need:
                raise short_read_error(r.path, r.offset, got, r.need)
        return self.assemble(lay, buf, verify)

    def assemble(self, lay: ExpertLayout, buf, verify: bool | None = None) -> ExpertBlob:
        """Turn a filled read buffer into an ExpertBlob: slice, check checksums, decompress."""
        verify = self.verify if verify is None else verify
        key = (lay.layer, lay.expert)
        verify = verify and (self.recheck or key not in self._checked)
        arr = buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, dtype=np.uint8)
        blocks: dict[str, Block] = {}
        for b in lay.blocks:
            data = arr[b.buf_offset:b.buf_offset + b.size]
            if verify and b.xxh3 is not None and xxh3_hex(data) != b.xxh3:
                raise ChecksumError(
                    f"checksum mismatch: layer {lay.layer} expert {lay.expert} block {b.name} in "
                    f"{self.path / b.label if self.kind == 'store' else b.label}: the store is corrupt; "
                    f"run `flashmoe repack --verify {self.path}` and repack the model again")
            if b.codec == "zstd":
                data = np.frombuffer(_decompress(data, b.nbytes, lay, b), dtype=np.uint8)
            elif b.codec is not None:
                raise StoreError(f"{self.path}: unknown codec {b.codec!r}: upgrade flashmoe-stream")
            blocks[b.name] = Block(data, b.qtype, b.shape)
        if verify:
            self._checked.add(key)
        return ExpertBlob(lay.layer, lay.expert, blocks, buf)

    def __repr__(self) -> str:
        return f"ExpertStore({str(self.path)!r}, kind={self.kind}, layers={len(self.layers)}, n_expert={self.n_expert})"


def _decompress(data, nbytes: int, lay: ExpertLayout, b: BlockSpec) -> bytes:
    import zstandard

    try:
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=nbytes)
    except zstandard.ZstdError as e:
        raise ChecksumError(f"layer {lay.layer} expert {lay.expert} block {b.name} in {b.label}: "
                            f"corrupt zstd data ({e}): repack the model again") from None
    if len(out) != nbytes:
        raise ChecksumError(f"layer {lay.layer} expert {lay.expert} block {b.name} in {b.label}: decompressed to "
                            f"{len(out)} bytes, expected {nbytes}: repack the model again")
    return out
