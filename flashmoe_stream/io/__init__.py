"""The I/O room: repack a GGUF into an expert store, open a store (or a GGUF) as experts, read them fast.

    repack(src, out_dir, compress=None)   GGUF → store directory (streaming, resumable)
    verify(store_dir) -> list[str]        bad experts, named
    ExpertStore(path)                     a store directory or a GGUF, experts by (layer, expert)
    Reader(store, threads, queue_depth)   O_DIRECT reads on a thread pool → Future[ExpertBlob]
"""

from ..errors import ChecksumError, DiskFullError, ShortReadError, StoreError
from .reader import Reader
from .repack import repack, verify
from .store import FORMAT_VERSION, Block, ExpertBlob, ExpertStore

__all__ = ["Block", "ChecksumError", "DiskFullError", "ExpertBlob", "ExpertStore", "FORMAT_VERSION", "Reader",
           "ShortReadError", "StoreError", "repack", "verify"]
