"""Repack a MoE GGUF into an expert store: one 4 KiB-aligned file per routed expert, the rest in dense.gguf.

    STORE/
      experts/<layer>/<expert>.bin   gate, up, down (and any expert bias) blocks, each at a 4096-aligned
                                     offset, file size a multiple of 4096, bytes identical to the GGUF's
      dense.gguf                     every non-expert tensor and every metadata field but split.*
      manifest.json                  written last (temp + fsync + rename): a store without it is unfinished

Streaming: the source is read in chunks of at most 8 MiB on a reader thread while the main thread
hashes (xxh3_64), optionally compresses and writes, so memory stays bounded by a few chunks (plus
one expert block with --compress) whatever the model size.

Crash safety and overwrite semantics of ``-o STORE``:

* every expert file is written under ``<expert>.bin.tmp`` and renamed when complete; each completed
  expert is then appended to ``STORE/repack.journal`` with its checksums;
* after a crash or kill -9, running the same command again resumes: journaled experts whose files
  still match their checksums are kept, everything else is redone;
* ``manifest.json`` appears only after every file is fsynced, so an interrupted store is never
  taken as complete (``ExpertStore`` refuses it and says to rerun repack);
* STORE holding a complete store of the same model and options: nothing to do (``--force`` redoes it);
  of another model or options: refused unless ``--force``;
* STORE holding an unfinished repack of another model or options: started over;
* STORE holding anything else (not empty, no manifest, no journal): refused, nothing is deleted.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import queue
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES

from ..errors import DiskFullError, FlashMoeError, ShortReadError, StoreError, UnsupportedError
from .store import (ALIGN, DENSE, FORMAT_NAME, FORMAT_VERSION, JOURNAL, MANIFEST, ExpertStore,
                    ExpertSlice, align_up, aligned_empty, gguf_experts)
from .writer import _O_DIRECT, AppendWriter
from .writer import fsync_path as _fsync_path

log = logging.getLogger(__name__)

CHUNK = 8 << 20  # bytes per source read
COMPRESS_MIN_SAVING = 0.10  # keep a block compressed only where it saves at least this much
CODECS = ("zstd",)
_KILL_ENV = "FLASHMOE_TEST_REPACK_KILL"  # test hook: "N" → SIGKILL after N experts, "N:mid" → inside expert N
_ZEROS = bytes(ALIGN)
_F32 = np.dtype(np.float32)  # with raw_dtype, tells gguf the shape counts elements, not bytes


@dataclass(frozen=True)
class _Job:
    layer: int
    expert: int
    blocks: tuple[ExpertSlice, ...]

    @property
    def rel(self) -> str:
        return f"experts/{self.layer}/{self.expert}.bin"

    @property
    def nbytes(self) -> int:
        return sum(b.size for b in self.blocks)


# ---------------------------------------------------------------------------------------------
# Planning: which bytes go where


def _supported(qtype: GGMLQuantizationType) -> bool:
    """Whether the runtime's kernels (quant/) can use blocks of this type."""
    from ..quant import SUPPORTED_TYPES

    return qtype in SUPPORTED_TYPES and qtype in GGML_QUANT_SIZES


def _plan(model) -> tuple[list[_Job], list[Any], int]:
    """(expert jobs in layer, expert order; dense TensorInfos in file order; n_expert)."""
    experts, dense, n_expert = gguf_experts(model)
    for blocks in (b for layer in experts.values() for b in layer[:1]):
        for sl in blocks:
            if not _supported(sl.qtype):
                raise UnsupportedError(f"{model.paths[0]}: {sl.name} experts have ggml type {sl.qtype.name}, which "
                                       f"flashmoe-stream cannot run: requantise the model to a supported type "
                                       f"(e.g. Q4_K_M, Q8_0, BF16)")
    jobs = [_Job(layer, x, blocks) for layer, layer_experts in experts.items() for x, blocks in enumerate(layer_experts)]
    return jobs, dense, n_expert


def _fingerprint(model, compress: str | None) -> dict[str, Any]:
    files = []
    for p in model.paths:
        st = p.stat()
        files.append({"name": p.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {"files": files, "compress": compress}


# ---------------------------------------------------------------------------------------------
# Small file helpers


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = os.write(fd, view)
        view = view[n:]


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _hash_file(path: Path) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check_expert_file(out: Path, rec: dict) -> bool:
    """Whether a journaled expert file is still exactly what the journal says."""
    path = out / rec["file"]
    try:
        if path.stat().st_size != rec["size"]:
            return False
        with open(path, "rb", buffering=0) as f:
            for b in rec["blocks"].values():
                f.seek(b["offset"])
                data = f.read(b["size"])
                if len(data) != b["size"] or xxhash.xxh3_64_hexdigest(data) != b["xxh3"]:
                    return False
    except (OSError, KeyError, TypeError):
        return False
    return True


def _disk_full(out: Path, need: int | None = None) -> DiskFullError:
    free = shutil.disk_usage(out).free
    tail = f"; the store needs about {need} bytes more" if need is not None else ""
    return DiskFullError(f"no space left on the device of {out} ({free} bytes free{tail}): free some space or "
                         f"choose another -o; rerunning the same command resumes where it stopped")


# ---------------------------------------------------------------------------------------------
# The output directory: fresh, resume, refuse


def _prepare_out(out: Path, fp: dict, force: bool) -> tuple[dict[tuple[int, int], dict], dict | None, bool]:
    """(journaled expert records, journaled dense record, complete) after deciding what to do with ``out``."""
    if out.exists() and not out.is_dir():
        raise StoreError(f"{out}: exists and is not a directory: choose another -o")
    out.mkdir(parents=True, exist_ok=True)
    manifest, journal = out / MANIFEST, out / JOURNAL
    if manifest.exists():
        try:
            m = json.loads(manifest.read_text())
            same = m.get("source", {}).get("fingerprint") == fp
        except (ValueError, OSError, AttributeError):
            same = False
        if same and not force:
            return {}, None, True
        if not same and not force:
            raise StoreError(f"{out}: holds a complete expert store of another model or other options: pass --force "
                             f"to overwrite it, or choose another -o")
        manifest.unlink()  # from here on the directory is an unfinished store
        _fsync_path(out)
        _clear(out)
        return {}, None, False
    if journal.exists():
        experts, dense, header = _read_journal(journal)
        if header == fp and not force:
            return experts, dense, False
        log.warning("%s: unfinished repack of another model or other options: starting over", out)
        _clear(out)
        return {}, None, False
    ours = {"experts", DENSE, DENSE + ".tmp", MANIFEST + ".tmp"}
    foreign = [p.name for p in out.iterdir() if p.name not in ours]
    if foreign:
        raise StoreError(f"{out}: not empty and not an expert store (holds {', '.join(sorted(foreign)[:3])}"
                         f"{', …' if len(foreign) > 3 else ''}): choose an empty or new directory for -o")
    _clear(out)
    return {}, None, False


def _clear(out: Path) -> None:
    """Remove what a repack writes (and only that)."""
    shutil.rmtree(out / "experts", ignore_errors=True)
    for name in (DENSE, DENSE + ".tmp", MANIFEST + ".tmp", JOURNAL):
        try:
            (out / name).unlink()
        except FileNotFoundError:
            pass


def _read_journal(path: Path) -> tuple[dict[tuple[int, int], dict], dict | None, dict | None]:
    experts: dict[tuple[int, int], dict] = {}
    dense = header = None
    with open(path, "rb") as f:
        for i, line in enumerate(f):
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut by a crash: everything after it is suspect
                break
            if i == 0:
                header = rec.get("fingerprint") if isinstance(rec, dict) else None
            elif "dense" in rec:
                dense = rec["dense"]
            elif "expert" in rec:
                experts[(int(rec["layer"]), int(rec["expert"]))] = rec["record"]
    return experts, dense, header


class _Journal:
    """Append-only record of finished work; (re)started as header + what is already known good."""

    def __init__(self, path: Path, fp: dict, done: dict[tuple[int, int], dict], dense: dict | None):
        lines = [{"journal": 1, "fingerprint": fp}]
        if dense is not None:
            lines.append({"dense": dense})
        lines += [{"layer": k[0], "expert": k[1], "record": r} for k, r in done.items()]
        _atomic_write_text(path, "".join(json.dumps(x, separators=(",", ":")) + "\n" for x in lines))
        self.f = open(path, "ab", buffering=0)

    def add(self, rec: dict) -> None:
        self.f.write((json.dumps(rec, separators=(",", ":")) + "\n").encode())

    def close(self) -> None:
        self.f.close()


# ---------------------------------------------------------------------------------------------
# Source reading on a thread


def _open_direct(path: Path) -> int:
    if _O_DIRECT:
        try:
            return os.open(path, os.O_RDONLY | _O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    return os.open(path, os.O_RDONLY)


def _pread_aligned(fd: int, buf: np.ndarray, offset: int, n: int) -> memoryview:
    """``n`` bytes at ``offset``, read as the page-aligned range around them into ``buf``."""
    start = offset - offset % ALIGN
    length = align_up(offset + n) - start
    try:
        got = os.preadv(fd, [buf[:length]], start)
    except OSError as e:  # O_DIRECT refused for this read: plain read of just the bytes
        if e.errno != errno.EINVAL:
            raise
        got = os.preadv(fd, [buf[: n]], offset)
        return memoryview(buf)[: min(got, n)]
    head = offset - start
    return memoryview(buf)[head: head + max(0, min(got - head, n))]


class _ChunkReader:
    """Reads the jobs' source bytes in order, in chunks of at most CHUNK, on a thread; bounded queue.

    Reads are O_DIRECT (page-aligned ranges into a ring of reused aligned buffers; no page cache, no
    fresh allocations) where the file system allows, else buffered. A chunk handed out stays valid
    until ``depth`` more chunks have been taken: copy it to keep it longer.
    """

    def __init__(self, jobs: list[_Job], depth: int = 8):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        # queued (depth) + held by the consumer (1) + being filled (1)
        self._ring = [aligned_empty(CHUNK + 2 * ALIGN) for _ in range(depth + 2)]
        self._stop = threading.Event()
        self._jobs = jobs
        self._th = threading.Thread(target=self._run, name="repack-reader", daemon=True)
        self._th.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        # one descriptor per (file, block name): each walks its tensor front to back, so the kernel's
        # per-descriptor readahead sees sequential streams instead of three interleaved ones
        fds: dict[tuple[Path, str], int] = {}
        try:
            turn = 0
            for job in self._jobs:
                for b in job.blocks:
                    fd = fds.get((b.path, b.name))
                    if fd is None:
                        fd = fds[(b.path, b.name)] = _open_direct(b.path)
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                    pos = 0
                    while pos < b.size:
                        n = min(CHUNK, b.size - pos)
                        buf = self._ring[turn % len(self._ring)]
                        turn += 1
                        data = _pread_aligned(fd, buf, b.offset + pos, n)
                        if data.nbytes != n:
                            raise ShortReadError(f"{b.path}: short read at byte {b.offset + pos} ({data.nbytes} of "
                                                 f"{n} bytes): the file was truncated or changed during the repack")
                        if not self._put(data):
                            return
                        pos += n
        except BaseException as e:  # noqa: BLE001 - handed to the consuming thread
            self._put(e)
        finally:
            for fd in fds.values():
                os.close(fd)

    def get(self):
        item = self.q.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._th.join()


# ---------------------------------------------------------------------------------------------
# Writing


def _kill_hook() -> tuple[int, bool] | None:
    v = os.environ.get(_KILL_ENV)
    if not v:
        return None
    n, _, where = v.partition(":")
    return int(n), where == "mid"


def _write_expert(out: Path, job: _Job, src: _ChunkReader, cctx, bar, kill_mid: bool) -> dict:
    final = out / job.rel
    tmp = final.with_name(final.name + ".tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
    size = sum(align_up(b.size) for b in job.blocks)
    fd = AppendWriter(tmp, 0, buffer_bytes=min(8 << 20, size), fsync=False)  # whole pages, O_DIRECT: disk speed
    blocks: dict[str, dict] = {}
    pos = 0
    try:
        for i, b in enumerate(job.blocks):
            pad = -pos % ALIGN
            if pad:
                fd.write(_ZEROS[:pad])
                pos += pad
            h = xxhash.xxh3_64()
            codec = None
            if cctx is None:
                got = 0
                while got < b.size:
                    chunk = src.get()
                    h.update(chunk)
                    fd.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
                stored = b.size
            else:
                raw, comp, got = [], [], 0
                cobj = cctx.compressobj(size=b.size)
                while got < b.size:
                    chunk = src.get()
                    raw.append(bytes(chunk))  # the reader reuses its buffers
                    comp.append(cobj.compress(chunk))
                    got += len(chunk)
                    bar.update(len(chunk))
                comp.append(cobj.flush())
                csize = sum(len(c) for c in comp)
                if csize <= (1 - COMPRESS_MIN_SAVING) * b.size:
                    parts, stored, codec = comp, csize, "zstd"
                else:
                    parts, stored = raw, b.size
                for p in parts:
                    h.update(p)
                    fd.write(p)
                del raw, comp, parts
            blocks[b.name] = {"offset": pos, "size": stored, "nbytes": b.size, "type": b.qtype.name,
                              "shape": list(b.shape), "codec": codec, "xxh3": h.hexdigest()}
            pos += stored
            if kill_mid and i == 0:
                os.kill(os.getpid(), signal.SIGKILL)
        pad = -pos % ALIGN
        if pad:
            fd.write(_ZEROS[:pad])
            pos += pad
    except BaseException:
        fd.abort()
        tmp.unlink(missing_ok=True)
        raise
    fd.close()
    os.rename(tmp, final)
    return {"file": job.rel, "size": pos, "blocks": blocks}


def _copy_kv(w: GGUFWriter, fields: dict[str, Any]) -> None:
    for key, f in fields.items():
        if key.startswith(("GGUF.", "split.")) or key == "general.architecture":
            continue
        t = f.types
        if not t:
            continue
        if key == "general.alignment":
            w.add_custom_alignment(int(f.contents()))
            continue
        if t[0] == GGUFValueType.STRING:
            w.add_key_value(key, bytes(f.parts[f.data[0]]), GGUFValueType.STRING)
        elif t[0] == GGUFValueType.ARRAY:
            if len(t) != 2:
                raise UnsupportedError(f"metadata {key!r} is a nested array, which repack cannot copy yet")
            if t[1] == GGUFValueType.STRING:
                val: Any = f.contents()
            else:
                val = [x for i in f.data for x in np.asarray(f.parts[i]).reshape(-1).tolist()]
            if not val:
                continue  # an empty array cannot be written by gguf (and carries nothing)
            w.add_key_value(key, val, GGUFValueType.ARRAY, sub_type=t[1])
        else:
            w.add_key_value(key, f.contents(), t[0])


def _write_dense(out: Path, model, dense: list, bar) -> dict:
    """dense.gguf: every non-expert tensor and the metadata, streamed (temp + fsync + rename)."""
    final = out / DENSE
    tmp = out / (DENSE + ".tmp")
    w = GGUFWriter(tmp, model.arch)
    _copy_kv(w, model.fields)
    for t in dense:
        w.add_tensor_info(t.name, t.shape, _F32, t.nbytes, raw_dtype=t.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    f = w.fout[0]
    align = w.data_alignment
    fds: dict[Path, int] = {}
    try:
        pos = f.tell()
        for t in dense:
            f.write(b"\0" * (-pos % align))
            pos += -pos % align
            fd = fds.get(t.path)
            if fd is None:
                fd = fds[t.path] = os.open(t.path, os.O_RDONLY)
            done = 0
            while done < t.nbytes:
                n = min(CHUNK, t.nbytes - done)
                data = os.pread(fd, n, t.offset + done)
                if len(data) != n:
                    raise ShortReadError(f"{t.path}: short read in tensor {t.name}: the file was truncated or changed "
                                         f"during the repack")
                f.write(data)
                done += n
                bar.update(n)
            pos += t.nbytes
        f.flush()
        os.fsync(f.fileno())
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        for fd in fds.values():
            os.close(fd)
    w.close()
    os.replace(tmp, final)
    return {"file": DENSE, "size": final.stat().st_size, "xxh3": _hash_file(final), "tensors": len(dense)}




# ---------------------------------------------------------------------------------------------


def repack(src: str | os.PathLike, out_dir: str | os.PathLike, compress: str | None = None, progress: bool = True,
           force: bool = False) -> Path:
    """Repack the MoE GGUF ``src`` (any shard of a split set) into the expert store ``out_dir``; returns it.

    Resumes an interrupted repack of the same model into the same directory (see the module docstring
    for what happens to an existing ``out_dir``). ``compress="zstd"`` keeps a block compressed only
    where that saves at least 10 %.
    """
    from tqdm import tqdm

    from ..gguf_file import open_gguf

    if compress not in (None, *CODECS):
        raise UnsupportedError(f"unknown --compress {compress!r} (choose from {', '.join(CODECS)})")
    out = Path(out_dir)
    t_open = time.perf_counter()
    model = open_gguf(src)
    log.info("read the GGUF header of %s in %.2f s", model.paths[0].name, time.perf_counter() - t_open)
    jobs, dense, n_expert = _plan(model)
    config = model.config.as_dict()
    fp = _fingerprint(model, compress)
    done, dense_rec, complete = _prepare_out(out, fp, force)
    if complete:
        log.info("%s: already a complete store of %s: nothing to do (--force redoes it)", out, model.paths[0].name)
        return out

    t0 = time.perf_counter()
    # keep what a previous run finished, where the files still say so
    if done:
        done = {k: r for k, r in done.items() if _check_expert_file(out, r)}
    if dense_rec is not None:
        p = out / DENSE
        if not (p.exists() and p.stat().st_size == dense_rec.get("size") and _hash_file(p) == dense_rec.get("xxh3")):
            dense_rec = None
    todo = [j for j in jobs if (j.layer, j.expert) not in done]
    dense_bytes = sum(t.nbytes for t in dense)
    total = sum(j.nbytes for j in todo) + (dense_bytes if dense_rec is None else 0)
    if compress is None:
        need = sum(align_up(sum(align_up(b.size) for b in j.blocks)) for j in todo)
        need += dense_bytes if dense_rec is None else 0
        if shutil.disk_usage(out).free < need:
            raise _disk_full(out, need)
    if done or dense_rec is not None:
        log.info("%s: resuming: %d of %d experts already done", out, len(done), len(jobs))

    journal = _Journal(out / JOURNAL, fp, done, dense_rec)
    hook = _kill_hook()
    cctx = None
    if compress == "zstd":
        import zstandard

        cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="repack", disable=not progress,
               file=sys.stderr)
    reader = None
    try:
        try:
            if dense_rec is None:
                t1 = time.perf_counter()
                dense_rec = _write_dense(out, model, dense, bar)
                journal.add({"dense": dense_rec})
                log.info("wrote %s (%d bytes) in %.2f s", DENSE, dense_rec["size"], time.perf_counter() - t1)
            t1 = time.perf_counter()
            for layer in sorted({j.layer for j in todo}):
                (out / "experts" / str(layer)).mkdir(parents=True, exist_ok=True)
            reader = _ChunkReader(todo)
            for i, job in enumerate(todo):
                if hook and hook[0] == i and not hook[1]:
                    os.kill(os.getpid(), signal.SIGKILL)
                rec = _write_expert(out, job, reader, cctx, bar, bool(hook and hook[1] and hook[0] == i))
                done[(job.layer, job.expert)] = rec
                journal.add({"layer": job.layer, "expert": job.expert, "record": rec})
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _disk_full(out) from None
            raise
        finally:
            if reader is not None:
                reader.close()
            bar.close()
            journal.close()

        log.info("wrote %d experts in %.2f s", len(todo), time.perf_counter() - t1)
        # make everything durable, then (and only then) the manifest
        t1 = time.perf_counter()
        try:
            files = [out / r["file"] for r in done.values()] + [out / DENSE]
            with ThreadPoolExecutor(8) as ex:
                list(ex.map(_fsync_path, files))
            for layer in sorted({j.layer for j in jobs}):
                _fsync_path(out / "experts" / str(layer))
            _fsync_path(out / "experts")
            _fsync_path(out)
            layers: dict[str, list] = {}
            for j in jobs:
                layers.setdefault(str(j.layer), []).append(done[(j.layer, j.expert)])
            manifest = {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "created_by": "flashmoe-stream " + _version(),
                "source": {"arch": model.arch, "files": fp["files"], "fingerprint": fp},
                "compress": compress,
                "alignment": ALIGN,
                "config": config,
                "n_layer": int(config.get("n_layer", max(j.layer for j in jobs) + 1)),
                "n_expert": n_expert,
                "dense": dense_rec,
                "layers": layers,
            }
            _atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1, default=str))
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                (out / (MANIFEST + ".tmp")).unlink(missing_ok=True)
                raise _disk_full(out) from None
            raise
        (out / JOURNAL).unlink(missing_ok=True)
        log.info("fsync and manifest in %.2f s", time.perf_counter() - t1)
    except KeyboardInterrupt:
        log.warning("interrupted: rerun the same command to resume")
        raise
    log.info("repacked %s into %s in %.1f s", model.paths[0].name, out, time.perf_counter() - t0)
    return out


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("flashmoe-stream")
    except Exception:  # noqa: BLE001 - not installed: a source checkout
        return "dev"


def verify(store_dir: str | os.PathLike, progress: bool = False) -> list[str]:
    """Re-check every checksum of a store; one line per bad expert (and for a bad dense.gguf). Empty: all good."""
    from tqdm import tqdm

    path = Path(store_dir)
    if not path.is_dir():
        raise StoreError(f"{path}: --verify needs an expert store directory (a GGUF has no checksums to check)")
    store = ExpertStore(path, verify=True)
    bad: list[str] = []
    d = store.manifest["dense"]
    dp = path / d["file"]
    if not dp.exists():
        bad.append(f"{d['file']}: missing")
    elif dp.stat().st_size != d["size"] or _hash_file(dp) != d["xxh3"]:
        bad.append(f"{d['file']}: checksum mismatch")
    keys = [(layer, e) for layer in store.layers for e in range(store.n_expert)]

    def check(key: tuple[int, int]) -> str | None:
        layer, e = key
        try:
            store.read(layer, e)
        except FlashMoeError as err:
            return f"layer {layer} expert {e} (experts/{layer}/{e}.bin): {err}"
        except OSError as err:
            return f"layer {layer} expert {e} (experts/{layer}/{e}.bin): {err.strerror or err}"
        return None

    with ThreadPoolExecutor(4) as ex, tqdm(total=len(keys), unit="expert", desc="verify", disable=not progress,
                                           file=sys.stderr) as bar:
        for msg in ex.map(check, keys):
            bar.update(1)
            if msg:
                bad.append(msg)
    return bad


# ---------------------------------------------------------------------------------------------
# Command line: `flashmoe repack` and tools/repack.py


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", type=Path, metavar="IN.gguf", help="a MoE GGUF (any shard of a split set)")
    p.add_argument("-o", "--output", type=Path, metavar="STORE", help="the store directory to write (resumable)")
    p.add_argument("--compress", choices=CODECS, help="keep each expert block zstd-compressed where that saves >= 10%%")
    p.add_argument("--force", action="store_true", help="overwrite a complete store in STORE (of any model)")
    p.add_argument("--verify", type=Path, metavar="STORE", help="re-check every checksum of STORE; exit 1 naming each "
                                                                 "bad expert")
    p.add_argument("--json", action="store_true", help="print the result as JSON (no progress bar)")


def _summary(store: Path) -> dict:
    m = json.loads((store / MANIFEST).read_text())
    by_type: dict[str, list[int]] = {}
    for experts in m["layers"].values():
        for rec in experts:
            for b in rec["blocks"].values():
                s = by_type.setdefault(b["type"], [0, 0])
                s[0] += b["nbytes"]
                s[1] += b["size"]
    raw = sum(v[0] for v in by_type.values())
    stored = sum(v[1] for v in by_type.values())
    return {"store": str(store), "experts": sum(len(v) for v in m["layers"].values()), "expert_bytes": raw,
            "stored_bytes": stored, "dense_bytes": m["dense"]["size"], "compress": m["compress"],
            "ratio_by_type": {t: round(v[0] / max(v[1], 1), 4) for t, v in by_type.items()}}


def run(args: argparse.Namespace) -> int:
    if args.verify is not None and args.model is None:
        bad = verify(args.verify, progress=not args.json)
        if args.json:
            print(json.dumps({"store": str(args.verify), "bad": bad}, indent=2))
        else:
            for line in bad:
                print(f"bad: {line}")
            if not bad:
                print(f"{args.verify}: every checksum matches")
        return 1 if bad else 0
    if args.model is None or args.output is None:
        raise FlashMoeError("give a model and an output directory: repack IN.gguf -o STORE (or --verify STORE)")
    t0 = time.perf_counter()
    store = repack(args.model, args.output, compress=args.compress, progress=not args.json, force=args.force)
    s = _summary(store)
    s["seconds"] = round(time.perf_counter() - t0, 3)
    if args.verify is not None:
        bad = verify(args.verify, progress=not args.json)
        s["bad"] = bad
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        print(f"{store}: {s['experts']} experts, {s['expert_bytes']} expert bytes ({s['stored_bytes']} stored), "
              f"{s['dense_bytes']} dense bytes, {s['seconds']:.1f} s")
        for line in s.get("bad", []):
            print(f"bad: {line}")
    return 1 if s.get("bad") else 0


def main(argv: list[str] | None = None) -> int:
    """tools/repack.py and ``python -m flashmoe_stream.io.repack``: the same as ``flashmoe repack``."""
    from ..cli import main as cli_main

    return cli_main(["repack", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
