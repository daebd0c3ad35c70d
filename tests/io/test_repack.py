import importlib
import json
import signal

import numpy as np
import pytest
from gguf import GGUFReader

from flashmoe_stream.gguf_file import open_gguf
from flashmoe_stream.io import ExpertStore, StoreError, repack, verify
from flashmoe_stream.model_info import expert_tensor_layer
from flashmoe_stream.synth import synth

from .conftest import run_repack

R = importlib.import_module("flashmoe_stream.io.repack")  # the module (flashmoe_stream.io.repack is the function)


def _expert_slices(model, layer, e):
    """What experts/<layer>/<e>.bin must hold, from the GGUF: block name → bytes."""
    out = {}
    for proj in ("gate", "up", "down"):
        for kind, name in (("weight", proj), ("bias", f"{proj}_bias")):
            t = model.tensors.get(f"blk.{layer}.ffn_{proj}_exps.{kind}")
            if t is not None:
                n = t.nbytes // t.shape[0]
                out[name] = (np.asarray(model.tensor_bytes(t.name)[e * n:(e + 1) * n]), t)
    return out


@pytest.mark.parametrize("arch,qtype", [("qwen3moe", "Q4_K_M"), ("qwen3moe", "Q8_0"), ("llama", "BF16")])
def test_expert_files_hold_the_gguf_slices_aligned(make_model, make_store, arch, qtype):
    model = open_gguf(make_model(arch, qtype))
    store = make_store(arch, qtype)
    m = json.loads((store / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["config"] == model.config.as_dict()
    assert m["source"]["files"][0]["name"] == model.paths[0].name
    assert m["source"]["files"][0]["size"] == model.paths[0].stat().st_size
    cfg = model.config
    assert sorted(map(int, m["layers"])) == list(range(cfg.n_layer))
    for layer in range(cfg.n_layer):
        assert len(m["layers"][str(layer)]) == cfg.n_expert
        for e in range(cfg.n_expert):
            rec = m["layers"][str(layer)][e]
            path = store / "experts" / str(layer) / f"{e}.bin"
            assert rec["file"] == f"experts/{layer}/{e}.bin"
            data = path.read_bytes()
            assert len(data) == rec["size"] and len(data) % 4096 == 0
            want = _expert_slices(model, layer, e)
            assert list(rec["blocks"]) == list(want)
            for name, (ref, t) in want.items():
                b = rec["blocks"][name]
                assert b["offset"] % 4096 == 0 and b["codec"] is None
                assert b["type"] == t.qtype.name and tuple(b["shape"]) == t.shape[1:]
                assert b["size"] == b["nbytes"] == ref.nbytes
                assert data[b["offset"]:b["offset"] + b["size"]] == ref.tobytes()
    assert not list(store.rglob("*.tmp")) and not (store / "repack.journal").exists()


def test_dense_gguf_has_every_non_expert_tensor_and_all_metadata(make_model, make_store):
    src = make_model("qwen3moe", "Q4_K_M")
    model = open_gguf(src)
    dense_path = make_store("qwen3moe", "Q4_K_M") / "dense.gguf"
    r = GGUFReader(dense_path)
    want = {n for n in model.tensors if expert_tensor_layer(n) is None}
    assert {t.name for t in r.tensors} == want
    dense = open_gguf(dense_path)
    for name in want:
        assert dense.tensors[name].qtype == model.tensors[name].qtype
        assert dense.tensors[name].shape == model.tensors[name].shape
        assert np.array_equal(dense.tensor_bytes(name), model.tensor_bytes(name)), name
    src_fields = {k for k in GGUFReader(src).fields if not k.startswith("GGUF.")}
    assert {k for k in r.fields if not k.startswith("GGUF.")} == src_fields
    for k in src_fields:
        a, b = model.metadata[k], dense.metadata[k]
        assert (np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b), k
        assert GGUFReader(src).fields[k].types == r.fields[k].types, k
    assert dense.config == model.config


def test_split_source_from_any_shard_gives_the_same_store_without_split_keys(tmp_path, make_store):
    paths = synth(tmp_path / "m.gguf", preset="tiny", qtype="Q8_0", split_size=1 << 20).paths
    assert len(paths) >= 3
    out = repack(paths[1], tmp_path / "store", progress=False)
    ref = json.loads((make_store("qwen3moe", "Q8_0") / "manifest.json").read_text())
    got = json.loads((out / "manifest.json").read_text())
    assert [f["name"] for f in got["source"]["files"]] == [p.name for p in paths]
    assert got["layers"] == ref["layers"]  # same seed, same bytes, same checksums
    r = GGUFReader(out / "dense.gguf")
    assert not [k for k in r.fields if k.startswith("split.")]
    assert (out / "dense.gguf").read_bytes() == (make_store("qwen3moe", "Q8_0") / "dense.gguf").read_bytes()


def test_manifest_is_written_last(make_model, tmp_path, monkeypatch):
    out = tmp_path / "store"
    seen = []
    real = R._atomic_write_text

    def spy(path, text):
        if path.name == "manifest.json":
            assert not path.exists()
            m = json.loads(text)
            files = [out / r["file"] for layer in m["layers"].values() for r in layer] + [out / "dense.gguf"]
            assert all(f.exists() for f in files)
            assert not list(out.rglob("*.bin.tmp"))
            seen.append(path)
        real(path, text)

    monkeypatch.setattr(R, "_atomic_write_text", spy)
    repack(make_model("qwen3moe", "Q8_0"), out, progress=False)
    assert seen == [out / "manifest.json"]


@pytest.mark.parametrize("kill", ["5", "13:mid"])
def test_kill_9_mid_repack_then_rerun_resumes_to_a_correct_store(make_model, make_store, tmp_path, kill):
    src = make_model("qwen3moe", "Q8_0")
    out = tmp_path / "store"
    r = run_repack(src, "-o", out, env={"FLASHMOE_TEST_REPACK_KILL": kill})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not (out / "manifest.json").exists()
    with pytest.raises(StoreError, match="unfinished repack"):
        ExpertStore(out)
    lines = (out / "repack.journal").read_text().splitlines()
    n_done = int(kill.split(":")[0])
    assert len(lines) == 1 + 1 + n_done  # header, dense, experts
    if kill.endswith("mid"):
        assert list(out.rglob("*.bin.tmp"))  # the half-written expert, under its temporary name
    # damage one finished expert: the resume must notice and redo it
    first = json.loads(lines[2])["record"]["file"]
    with open(out / first, "r+b") as f:
        f.write(b"\xff\x00\xff")
    r = run_repack(src, "-o", out, "-v")
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    ref = make_store("qwen3moe", "Q8_0")
    assert json.loads((out / "manifest.json").read_text())["layers"] == \
        json.loads((ref / "manifest.json").read_text())["layers"]
    assert verify(out) == []
    assert not list(out.rglob("*.tmp")) and not (out / "repack.journal").exists()


def test_existing_output_directory_semantics(make_model, tmp_path):
    a, b = make_model("qwen3moe", "Q8_0"), make_model("llama", "Q8_0")
    out = tmp_path / "store"
    repack(a, out, progress=False)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    repack(a, out, progress=False)  # complete, same model and options: nothing to do
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(StoreError, match="--force"):
        repack(b, out, progress=False)
    with pytest.raises(StoreError, match="--force"):
        repack(a, out, compress="zstd", progress=False)
    repack(b, out, progress=False, force=True)
    assert ExpertStore(out).config.arch == "llama"
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not empty"):
        repack(a, other, progress=False)
    assert (other / "notes.txt").read_text() == "keep me"


def test_verify_finds_a_flipped_byte_and_names_the_expert(store_copy):
    store = store_copy("qwen3moe", "Q8_0")
    r = run_repack("--verify", store)
    assert r.returncode == 0, r.stderr
    m = json.loads((store / "manifest.json").read_text())
    b = m["layers"]["2"][5]["blocks"]["up"]
    path = store / "experts" / "2" / "5.bin"
    data = bytearray(path.read_bytes())
    data[b["offset"] + 100] ^= 0x01
    path.write_bytes(bytes(data))
    r = run_repack("--verify", store)
    assert r.returncode != 0
    bad = [ln for ln in r.stdout.splitlines() if ln.startswith("bad:")]
    assert len(bad) == 1 and "layer 2 expert 5" in bad[0] and "up" in bad[0], r.stdout
    assert verify(store) == [bad[0][len("bad: "):]]


def test_zstd_keeps_compressed_blocks_only_where_they_save_and_reads_back_identical(make_model, tmp_path, monkeypatch):
    src = make_model("qwen3moe", "Q8_0")
    plain = ExpertStore(src)
    out = repack(src, tmp_path / "z", compress="zstd", progress=False)
    m = json.loads((out / "manifest.json").read_text())
    for layer in m["layers"].values():
        for rec in layer:
            for b in rec["blocks"].values():
                assert (b["codec"] == "zstd") == (b["size"] <= 0.9 * b["nbytes"])
    # force every block compressed so the decompressing path is exercised whatever random data does
    monkeypatch.setattr(R, "COMPRESS_MIN_SAVING", -1.0)
    out = repack(src, tmp_path / "z2", compress="zstd", progress=False)
    store = ExpertStore(out)
    m = store.manifest
    assert all(b["codec"] == "zstd" for la in m["layers"].values() for r in la for b in r["blocks"].values())
    for layer in store.layers:
        for e in range(store.n_expert):
            got, ref = store.read(layer, e), plain.read(layer, e)
            assert set(got) == set(ref)
            for k in ref:
                assert bytes(got[k]) == bytes(ref[k])
                assert got.blocks[k].qtype == ref.blocks[k].qtype and got.blocks[k].shape == ref.blocks[k].shape
    assert verify(out) == []


def test_bias_tensors_of_experts_go_into_the_expert_files(tmp_path, make_model):
    """A model with blk.N.ffn_*_exps.bias (gpt-oss style): written by copying a tiny model and adding biases."""
    from gguf import GGMLQuantizationType as Q, GGUFWriter

    src = open_gguf(make_model("qwen3moe", "Q8_0"))
    path = tmp_path / "bias.gguf"
    w = GGUFWriter(path, src.arch)
    R._copy_kv(w, GGUFReader(src.paths[0]).fields)
    rng = np.random.default_rng(0)
    extra = {}
    for layer in range(src.config.n_layer):
        for proj in ("gate", "up", "down"):
            w_t = src.tensors[f"blk.{layer}.ffn_{proj}_exps.weight"]
            extra[f"blk.{layer}.ffn_{proj}_exps.bias"] = rng.normal(size=w_t.shape[:2]).astype(np.float32)
    for name, t in src.tensors.items():
        rows = t.shape[:-1]
        byte_shape = (*rows, t.nbytes // int(np.prod(rows, dtype=np.int64)))
        w.add_tensor(name, np.asarray(src.tensor_bytes(name)).reshape(byte_shape), raw_dtype=t.qtype)
    for name, a in extra.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    model = open_gguf(path)
    out = repack(path, tmp_path / "store", progress=False)
    store, direct = ExpertStore(out), ExpertStore(path)
    blob = store.read(1, 3)
    assert list(blob) == ["gate", "up", "down", "gate_bias", "up_bias", "down_bias"]
    assert blob.blocks["up_bias"].qtype == Q.F32 and blob.blocks["up_bias"].shape == (src.config.n_ff_exp,)
    assert np.array_equal(np.frombuffer(blob["up_bias"], np.float32), extra["blk.1.ffn_up_exps.bias"][3])
    ref = direct.read(1, 3)
    for k in blob:
        assert bytes(blob[k]) == bytes(ref[k])
    for off in (b["offset"] for b in store.manifest["layers"]["1"][3]["blocks"].values()):
        assert off % 4096 == 0
    assert {t.name for t in GGUFReader(out / "dense.gguf").tensors} == \
        {n for n in model.tensors if expert_tensor_layer(n) is None}
