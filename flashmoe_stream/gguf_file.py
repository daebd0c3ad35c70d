"""GGUF files (one file or a ``-0000k-of-0000n`` split set) as a tensor index plus metadata.

The only GGUF parser of the project, built on the ``gguf`` package's reader. Opening maps the
header only; tensor data is never read here (``tensor_bytes`` maps it on request).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

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


def _open_reader(path: Path) -> GGUFReader:
    try:
        return GGUFReader(path, "r")
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
