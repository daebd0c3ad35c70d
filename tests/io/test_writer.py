import errno
import os

import numpy as np
import pytest

from flashmoe_stream.io import writer as writer_mod
from flashmoe_stream.io.writer import AppendWriter


@pytest.mark.parametrize("start", [0, 1, 4095, 4096, 10_000])
@pytest.mark.parametrize("pieces", [[1], [5000, 1, 70_000, 3], [40_000] * 7])
def test_append_writer_writes_exact_bytes_after_the_kept_head(tmp_path, start, pieces):
    rng = np.random.default_rng(start + len(pieces))
    head = rng.integers(0, 256, start, dtype=np.uint8).tobytes()
    path = tmp_path / "f.bin"
    path.write_bytes(head)
    data = [rng.integers(0, 256, n, dtype=np.uint8) for n in pieces]
    with AppendWriter(path, start, buffer_bytes=64 << 10) as w:  # small buffer: many aligned flushes
        for d in data:
            w.write(d)
    assert path.read_bytes() == head + b"".join(d.tobytes() for d in data)


def test_append_writer_falls_back_to_buffered_when_o_direct_is_refused(tmp_path, monkeypatch, caplog):
    real_open = os.open

    def no_direct(path, flags, *a):
        if flags & writer_mod._O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(writer_mod.os, "open", no_direct)
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    with caplog.at_level("INFO"):
        with AppendWriter(path, 3, buffer_bytes=8192) as w:
            w.write(b"x" * 10_000)
    assert path.read_bytes() == b"abc" + b"x" * 10_000
    assert "O_DIRECT refused" in caplog.text


def test_append_writer_refuses_a_start_past_the_end(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    with pytest.raises(OSError, match="expected 100"):
        AppendWriter(path, 100)
