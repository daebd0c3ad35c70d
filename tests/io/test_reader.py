import errno
import logging
import os
import shutil
import threading
from concurrent.futures import CancelledError

import numpy as np
import pytest

from flashmoe_stream.io import ExpertStore, Reader, ShortReadError
from flashmoe_stream.io import reader as reader_mod


def _all(store):
    return [(layer, e) for layer in store.layers for e in range(store.n_expert)]


def _same(a, b):
    assert list(a) == list(b)
    for k in a:
        assert bytes(a[k]) == bytes(b[k]), k
        assert a.blocks[k].qtype == b.blocks[k].qtype and a.blocks[k].shape == b.blocks[k].shape


@pytest.mark.parametrize("source", ["store", "gguf"])
def test_direct_and_buffered_reads_give_identical_bytes(make_model, make_store, source):
    path = make_store("qwen3moe", "Q4_K_M") if source == "store" else make_model("qwen3moe", "Q4_K_M")
    store = ExpertStore(path)
    with Reader(store, threads=4, queue_depth=8) as d, Reader(store, threads=2, direct=False) as b:
        futs = [(k, d.submit(*k), b.submit(*k)) for k in _all(store)]
        for k, fd, fb in futs:
            x, y = fd.result(), fb.result()
            _same(x, y)
            _same(x, store.read(*k))
            for blk in x.blocks.values():  # the read buffer is 4096-aligned
                assert x.buffer.ctypes.data % 4096 == 0
        assert d.modes() and set(d.modes().values()) == {"direct"}, d.modes()  # /tmp is a real file system here
        assert set(b.modes().values()) == {"buffered"}


def test_o_direct_refused_on_open_falls_back_and_logs_once(make_store, monkeypatch, caplog):
    store = ExpertStore(make_store("qwen3moe", "Q8_0"))
    real = os.open

    def no_direct(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real(path, flags, *a)

    monkeypatch.setattr(reader_mod.os, "open", no_direct)
    with caplog.at_level(logging.WARNING, logger="flashmoe_stream.io.reader"):
        with Reader(store, threads=2) as r:
            for k in _all(store)[:12]:
                _same(r.submit(*k).result(), store.read(*k))
            assert set(r.modes().values()) == {"buffered"}
    assert len([rec for rec in caplog.records if "O_DIRECT refused" in rec.message]) == 1


def test_o_direct_refused_on_read_falls_back(make_store, monkeypatch, caplog):
    store = ExpertStore(make_store("qwen3moe", "Q8_0"))
    real = os.preadv
    direct_fds = set()
    real_open = os.open

    def track_open(path, flags, *a):
        fd = real_open(path, flags, *a)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def refuse(fd, bufs, off):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, bufs, off)

    monkeypatch.setattr(reader_mod.os, "open", track_open)
    monkeypatch.setattr(reader_mod.os, "preadv", refuse)
    with caplog.at_level(logging.WARNING, logger="flashmoe_stream.io.reader"), Reader(store, threads=2) as r:
        for k in _all(store)[:12]:
            _same(r.submit(*k).result(), store.read(*k))
    assert len([rec for rec in caplog.records if "O_DIRECT refused" in rec.message]) == 1


@pytest.mark.parametrize("source", ["store", "gguf"])
def test_file_truncated_after_open_raises_on_result(make_model, make_store, tmp_path, source):
    if source == "store":
        path = tmp_path / "store"
        shutil.copytree(make_store("qwen3moe", "Q8_0"), path)
        victim, layer, expert = path / "experts" / "2" / "3.bin", 2, 3
    else:
        path = tmp_path / "m.gguf"
        shutil.copy(make_model("qwen3moe", "Q8_0"), path)
        victim = path
    store = ExpertStore(path)
    if source == "gguf":  # cut the file inside the last expert tensor
        last = max((t for t in store.gguf.tensors.values() if "_exps." in t.name), key=lambda t: t.offset)
        layer, expert = int(last.name.split(".")[1]), store.n_expert - 1
        cut = last.offset + last.nbytes - 100
        assert cut < victim.stat().st_size - 100  # more tensors follow: the cut makes a short read, not an EOF
    else:
        cut = 4096
    with Reader(store, threads=2) as r:
        r.read(0, 0)
        with open(victim, "r+b") as f:
            f.truncate(cut)
        fut = r.submit(layer, expert)
        with pytest.raises(ShortReadError, match="short read"):
            fut.result()
        r.read(0, 1)  # the Reader still works


def test_cancel_and_bounded_queue_depth(make_store, gated_reads):
    store = ExpertStore(make_store("qwen3moe", "Q8_0"))
    gate, started = gated_reads.gate, gated_reads.started
    with Reader(store, threads=1, queue_depth=3) as r:
        f0 = r.submit(0, 0)
        assert started.wait(30)
        f1, f2 = r.submit(0, 1), r.submit(0, 2)
        assert r.outstanding == 3
        assert r.submit(0, 3, block=False) is None  # queue depth reached
        assert r.cancel(f1) and f1.cancelled()
        assert not r.cancel(f0)  # running
        f3 = r.submit(0, 3, block=False)  # the cancelled request gave its slot back
        assert f3 is not None
        gate.set()
        _same(f0.result(), store.read(0, 0))
        with pytest.raises(CancelledError):
            f1.result()
        _same(f2.result(), store.read(0, 2))
        _same(f3.result(), store.read(0, 3))
    gate.clear()
    started.clear()
    r = Reader(store, threads=1, queue_depth=4)
    f0 = r.submit(1, 0)
    assert started.wait(30)
    pending = [r.submit(1, e) for e in (1, 2)]
    threading.Timer(0.2, gate.set).start()
    r.close()  # cancels what has not started, waits for what has
    assert f0.result() is not None and all(f.cancelled() for f in pending)


def test_read_into_caller_buffers_and_errors_surface(make_store, tmp_path):
    path = tmp_path / "store"
    shutil.copytree(make_store("qwen3moe", "Q8_0"), path)
    store = ExpertStore(path)
    with Reader(store, threads=2) as r:
        buf = r.alloc(store.layout(1, 1).buffer_nbytes)
        blob = r.submit(1, 1, out=buf).result()
        assert blob.buffer is buf
        _same(blob, store.read(1, 1))
        with pytest.raises(ValueError, match="aligned"):
            r.submit(1, 1, out=np.empty(store.layout(1, 1).buffer_nbytes + 1, np.uint8)[1:])
        (path / "experts" / "1" / "5.bin").unlink()
        with pytest.raises(Exception, match="missing"):
            r.submit(1, 5).result()


def test_busy_time_counts_while_a_read_runs_and_not_while_idle(make_store, monkeypatch):
    """busy_s: the time at least one read was running (overlapping reads count once), nothing while idle."""
    import time

    store = ExpertStore(make_store("qwen3moe", "Q8_0"))
    real = Reader._read

    def slow(self, lay, out):
        time.sleep(0.2)
        return real(self, lay, out)

    monkeypatch.setattr(Reader, "_read", slow)
    with Reader(store, threads=4) as r:
        assert r.busy_s == 0
        t0 = time.perf_counter()
        for f in [r.submit(0, e) for e in range(4)]:  # four at once: about 0.2 s busy, not 0.8
            f.result()
        wall = time.perf_counter() - t0
        busy = r.busy_s
        assert 0.2 <= busy <= wall and busy < 0.6
        time.sleep(0.2)
        assert r.busy_s == busy
        r.read(0, 1)
        assert r.busy_s >= busy + 0.2


def test_urgent_and_promoted_requests_start_first(make_store, gated_reads):
    """One thread, busy: queued requests start in order, the urgent ones (and those promoted) first."""
    store = ExpertStore(make_store("qwen3moe", "Q8_0"))
    gate, started, order = gated_reads.gate, gated_reads.started, gated_reads.order
    with Reader(store, threads=1, queue_depth=8) as r:
        f0 = r.submit(0, 0)
        assert started.wait(30)
        f1, f2, f3 = r.submit(0, 1), r.submit(0, 2), r.submit(0, 3)
        f4 = r.submit(0, 4, urgent=True)
        r.promote(f3)
        r.promote(f0)  # running already: nothing
        gate.set()
        for f, e in ((f0, 0), (f1, 1), (f2, 2), (f3, 3), (f4, 4)):
            _same(f.result(), store.read(0, e))
    assert order == [0, 4, 3, 1, 2]
