"""User errors through tools/repack.py: one line on stderr, exit != 0, no traceback, nothing that looks valid."""

import importlib
import subprocess

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q, GGUFReader, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES

from flashmoe_stream.gguf_file import open_gguf
from flashmoe_stream.synth import synth

from .conftest import assert_one_line_error, run_repack

R = importlib.import_module("flashmoe_stream.io.repack")


def _nothing_valid(out):
    assert not (out / "manifest.json").exists()
    assert not list(out.rglob("*.tmp")) if out.exists() else True


def test_truncated_gguf(make_model, tmp_path):
    src = tmp_path / "cut.gguf"
    data = make_model("qwen3moe", "Q8_0").read_bytes()
    src.write_bytes(data[: len(data) * 2 // 3])
    out = tmp_path / "store"
    line = assert_one_line_error(run_repack(src, "-o", out))
    assert "truncated" in line
    _nothing_valid(out)


def test_gguf_without_experts(make_store, tmp_path):
    out = tmp_path / "store"
    line = assert_one_line_error(run_repack(make_store("qwen3moe", "Q8_0") / "dense.gguf", "-o", out))
    assert "no routed-expert tensors" in line
    _nothing_valid(out)


def test_missing_shard(tmp_path):
    paths = synth(tmp_path / "m.gguf", preset="tiny", qtype="Q8_0", split_size=1 << 20).paths
    paths[-1].unlink()
    out = tmp_path / "store"
    line = assert_one_line_error(run_repack(paths[0], "-o", out))
    assert paths[-1].name in line
    _nothing_valid(out)


def test_unsupported_expert_type(make_model, tmp_path):
    src = open_gguf(make_model("qwen3moe", "Q8_0"))
    path = tmp_path / "iq2.gguf"
    w = GGUFWriter(path, src.arch)
    R._copy_kv(w, GGUFReader(src.paths[0]).fields)
    per, size = GGML_QUANT_SIZES[Q.IQ2_XXS]
    for layer in range(src.config.n_layer):
        for p in ("gate", "up", "down"):
            e, rows, row = src.tensors[f"blk.{layer}.ffn_{p}_exps.weight"].shape
            w.add_tensor(f"blk.{layer}.ffn_{p}_exps.weight", np.zeros((e, rows, row // per * size), np.uint8),
                         raw_dtype=Q.IQ2_XXS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / "store"
    line = assert_one_line_error(run_repack(path, "-o", out))
    assert "IQ2_XXS" in line
    _nothing_valid(out)


def test_missing_input_and_bad_usage(tmp_path):
    line = assert_one_line_error(run_repack(tmp_path / "nope.gguf", "-o", tmp_path / "s"))
    assert "no such file" in line
    assert_one_line_error(run_repack(tmp_path / "nope.gguf"))  # no -o


@pytest.fixture
def tiny_fs(tmp_path):
    mnt = tmp_path / "full"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a 2 MiB tmpfs to fill (needs root / CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("compress", [None, "zstd"])  # None: caught by the free-space check; zstd: by ENOSPC
def test_disk_full(make_model, tiny_fs, compress):
    out = tiny_fs / "store"
    args = ["--compress", "zstd"] if compress else []
    line = assert_one_line_error(run_repack(make_model("qwen3moe", "Q8_0"), "-o", out, *args))
    assert "no space left" in line
    _nothing_valid(out)


def test_verify_of_a_good_store_and_of_a_non_store(make_store, tmp_path):
    r = run_repack("--verify", make_store("qwen3moe", "Q8_0"), "--json")
    assert r.returncode == 0 and '"bad": []' in r.stdout
    line = assert_one_line_error(run_repack("--verify", tmp_path))
    assert "no manifest.json" in line
