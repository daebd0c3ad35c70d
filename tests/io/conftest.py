import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flashmoe_stream.io import repack

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def make_store(make_model, tmp_path_factory):
    """make_store(arch, qtype, **kw) -> a repacked store of make_model(...), made once per session. Do not modify."""
    cache = {}
    root = tmp_path_factory.mktemp("stores")

    def make(arch="qwen3moe", qtype="Q8_0", compress=None, **kw):
        key = (arch, qtype, compress, tuple(sorted(kw.items())))
        if key not in cache:
            src = make_model(arch, qtype, **kw)
            cache[key] = repack(src, root / f"{len(cache)}-{arch}-{qtype}-{compress}", compress=compress,
                                progress=False)
        return cache[key]

    return make


@pytest.fixture
def store_copy(make_store, tmp_path):
    """store_copy(...) -> a private copy of make_store(...) that a test may damage."""

    def copy(*a, **kw):
        dst = tmp_path / "store"
        shutil.copytree(make_store(*a, **kw), dst)
        return dst

    return copy


def run_repack(*args, env=None, timeout=120):
    """tools/repack.py in a subprocess (what a user runs)."""
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "tools" / "repack.py"), *map(str, args)],
                          capture_output=True, text=True, env=e, timeout=timeout)


def assert_one_line_error(r):
    assert r.returncode not in (0, None), r
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "%|" not in ln]  # tqdm's bar is not the error
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert lines[0].startswith("flashmoe repack: error: "), lines[0]
    return lines[0]
