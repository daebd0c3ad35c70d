"""GGUF files (one file or a ``-0000k-of-0000n`` split set) as a tensor index plus metadata.

The only GGUF parser of the project, built on the ``gguf`` package's reader. Opening maps the
header only; tensor data is never read here (``tensor_bytes`` maps it on request).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.gguf_reader import ReaderField

from .errors import BadFileError

_SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
SHARD_NAME = "{stem}-{no:05d}-of-{count:05d}.gguf"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: file, absolute offset, ggml type, torch-order shape, size."""

    name: str
    path: Path
    offset: int
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class _Metadata(Mapping):
    """Metadata key → plain Python value, converted on first access (token lists are large)."""

    def __init__(self, fields: dict[str, Any]):
        self._fields = fields
        self._values: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        if key not in self._values:
            field = self._fields[key]
            if field.types and field.types[0] == GGUFValueType.ARRAY and field.types[-1] != GGUFValueType.STRING:
                # numeric arrays: one numpy concatenation instead of a Python list of scalars
                value: Any = np.concatenate([field.parts[i] for i in field.data]) if field.data else np.array([])
            else:
                value = field.contents()
            self._values[key] = value
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)


def shard_paths(path: str | os.PathLike) -> list[Path]:
    """All files of the set ``path`` belongs to, in order (just ``[path]`` for a single file)."""
    path = Path(path)
    if not path.exists():
        raise BadFileError(f"{path}: no such file")
    if path.is_dir():
        raise BadFileError(f"{path}: is a directory, expected a .gguf file")
    m = _SHARD_RE.match(path.name)
    if not m:
        return [path]
    count = int(m["count"])
    paths = [path.with_name(SHARD_NAME.format(stem=m["stem"], no=i, count=count)) for i in range(1, count + 1)]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise BadFileError(f"{path}: split set of {count} files is incomplete, missing {', '.join(missing)}")
    return paths


class _StringArrayField(ReaderField):
    """An array-of-strings metadata field decoded on demand (``offsets`` and ``lengths`` into ``parts[-1]``)."""

    def contents(self, index_or_slice: int | slice = slice(None)) -> Any:
        blob, offsets, lengths = self.parts[-1], self.data[0], self.data[1]
        if isinstance(index_or_slice, int):
            o = offsets[index_or_slice]
            return blob[o: o + lengths[index_or_slice]].tobytes().decode("utf-8")
        return [blob[o: o + n].tobytes().decode("utf-8")
                for o, n in zip(offsets[index_or_slice], lengths[index_or_slice])]


class _Reader(GGUFReader):
    """gguf's reader with metadata arrays read as one block each instead of one numpy view per element.

    A 150k-token vocabulary (plus as many merges) otherwise takes seconds to index; this keeps
    opening any model at header speed. Everything else (tensor infos, scalars) is gguf's own code.
    """

    def _build_fields(self, offs: int, count: int) -> int:
        for _ in range(count):
            orig_offs = offs
            klen, kdata = self._get_str(offs)
            offs += int(klen.nbytes + kdata.nbytes)
            raw_type = self._get(offs, np.uint32)
            offs += 4
            name = kdata.tobytes().decode("utf-8")
            head = [klen, kdata, raw_type]
            if raw_type[0] == GGUFValueType.ARRAY:
                itype, alen = self._get(offs, np.uint32), self._get(offs + 4, np.uint64)
                offs += 12
                n = int(alen[0])
                if itype[0] == GGUFValueType.STRING:
                    field, offs = self._string_array(orig_offs, name, head + [itype, alen], offs, n)
                    self._push_field(field, skip_sum=True)
                    continue
                nptype = self.gguf_scalar_to_np.get(GGUFValueType(int(itype[0])))
                if nptype is not None:
                    arr = self._get(offs, nptype, n)
                    offs += int(arr.nbytes)
                    types = [GGUFValueType.ARRAY, GGUFValueType(int(itype[0]))]
                    self._push_field(ReaderField(orig_offs, name, head + [itype, alen, arr], [5], types), skip_sum=True)
                    continue
                offs -= 12  # nested arrays: gguf's generic path
            size, parts, idxs, types = self._get_field_parts(offs, int(raw_type[0]))
            self._push_field(ReaderField(orig_offs, name, head + parts, [i + 3 for i in idxs], types), skip_sum=True)
            offs += size
        return offs

    def _string_array(self, orig_offs: int, name: str, head: list, offs: int, n: int):
        buf = memoryview(self.data)
        order = "big" if (self.byte_order == "S") == (sys.byteorder == "little") else "little"
        start = pos = offs
        offsets, lengths = np.empty(n, np.int64), np.empty(n, np.int64)
        for i in range(n):
            length = int.from_bytes(buf[pos: pos + 8], order)
            offsets[i], lengths[i] = pos + 8 - start, length
            pos += 8 + length
        if pos > len(buf):
            raise ValueError(f"metadata array {name} runs past the end of the file")
        blob = self.data[start:pos]
        types = [GGUFValueType.ARRAY, GGUFValueType.STRING]
        return _StringArrayField(orig_offs, name, head + [blob], [offsets, lengths], types), pos


def _open_reader(path: Path) -> GGUFReader:
    try:
        return _Reader(path, "r")
    except Exception as e:  # the reader raises ValueError, IndexError, ... on foreign or cut files
        size = path.stat().st_size
        raise BadFileError(f"{path}: not a readable GGUF file ({size} bytes; truncated or foreign: {e})") from None


class GGUFModel:
    """A GGUF model: ``tensors`` (name → TensorInfo), ``metadata`` (key → value), ``config``."""

    def __init__(self, path: str | os.PathLike):
        self.paths = shard_paths(path)
        self.tensors: dict[str, TensorInfo] = {}
        fields: dict[str, Any] = {}
        count = len(self.paths)
        for no, shard in enumerate(self.paths):
            reader = _open_reader(shard)
            shard_fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
            if count > 1:
                self._check_shard(shard, shard_fields, no, count)
            if no == 0:
                fields = shard_fields
            size = shard.stat().st_size
            for t in reader.tensors:
                end = t.data_offset + t.n_bytes
                if end > size:
                    raise BadFileError(f"{shard}: truncated: tensor {t.name} ends at byte {end}, file has {size}")
                if t.name in self.tensors:
                    raise BadFileError(f"{shard}: tensor {t.name} appears in two shards")
                self.tensors[t.name] = TensorInfo(
                    t.name, shard, int(t.data_offset), GGMLQuantizationType(t.tensor_type),
                    tuple(int(d) for d in reversed(t.shape.tolist())), int(t.n_bytes),
                )
            del reader
        if count > 1:
            expected = int(fields["split.tensors.count"].contents())
            if expected != len(self.tensors):
                raise BadFileError(f"{self.paths[0]}: split set holds {len(self.tensors)} tensors, header says {expected}")
        self.fields: dict[str, ReaderField] = fields  # typed gguf fields (to copy metadata with its value types)
        self.metadata: Mapping[str, Any] = _Metadata(fields)
        if "general.architecture" not in self.metadata:
            raise BadFileError(f"{self.paths[0]}: GGUF without general.architecture: not a model file")

    @staticmethod
    def _check_shard(shard: Path, fields: dict[str, Any], no: int, count: int) -> None:
        try:
            got_no = int(fields["split.no"].contents())
            got_count = int(fields["split.count"].contents())
        except KeyError:
            raise BadFileError(f"{shard}: named as a split shard but has no split.* metadata") from None
        if (got_no, got_count) != (no, count):
            raise BadFileError(
                f"{shard}: shard mismatch: file says it is {got_no + 1} of {got_count}, name says {no + 1} of {count}")

    @property
    def arch(self) -> str:
        return str(self.metadata["general.architecture"])

    @cached_property
    def config(self):
        from .config import config_from_metadata

        return config_from_metadata(self.metadata)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def tensor_bytes(self, name: str) -> np.ndarray:
        """A read-only uint8 memory map of one tensor's bytes (for tests and tools; the runtime uses io/)."""
        t = self.tensors[name]
        return np.memmap(t.path, dtype=np.uint8, mode="r", offset=t.offset, shape=(t.nbytes,))


def open_gguf(path: str | os.PathLike) -> GGUFModel:
    return GGUFModel(path)
