import json

import numpy as np
import pytest

from flashmoe_stream.errors import FlashMoeError
from flashmoe_stream.gguf_file import open_gguf
from flashmoe_stream.io import ChecksumError, ExpertStore, StoreError


@pytest.mark.parametrize("qtype", ["Q4_K_M", "BF16"])
def test_gguf_and_store_give_the_same_experts(make_model, make_store, qtype):
    src = make_model("qwen3moe", qtype)
    model = open_gguf(src)
    direct, store = ExpertStore(src), ExpertStore(make_store("qwen3moe", qtype))
    assert direct.kind == "gguf" and store.kind == "store"
    assert direct.dense_path == model.paths[0] and store.dense_path.name == "dense.gguf"
    assert store.config == direct.config == model.config
    assert (store.n_layer, store.n_expert) == (direct.n_layer, direct.n_expert) == (4, 8)
    assert store.layers == direct.layers == [0, 1, 2, 3]
    for layer in store.layers:
        t = {p: model.tensors[f"blk.{layer}.ffn_{p}_exps.weight"] for p in ("gate", "up", "down")}
        assert store.expert_nbytes(layer) == direct.expert_nbytes(layer) == sum(x.nbytes for x in t.values()) // 8
        for e in range(store.n_expert):
            a, b = store.read(layer, e), direct.read(layer, e)
            assert list(a) == list(b) == ["gate", "up", "down"]
            for p, ti in t.items():
                n = ti.nbytes // 8
                ref = model.tensor_bytes(ti.name)[e * n:(e + 1) * n]
                assert np.array_equal(np.frombuffer(a[p], np.uint8), ref)
                assert np.array_equal(np.frombuffer(b[p], np.uint8), ref)
                assert a.blocks[p].qtype == b.blocks[p].qtype == ti.qtype
                assert a.blocks[p].shape == b.blocks[p].shape == ti.shape[1:]


def test_flipped_byte_is_caught_on_read_naming_layer_expert_file(store_copy):
    path = store_copy("qwen3moe", "Q8_0")
    m = json.loads((path / "manifest.json").read_text())
    off = m["layers"]["3"][6]["blocks"]["down"]["offset"]
    f = path / "experts" / "3" / "6.bin"
    data = bytearray(f.read_bytes())
    data[off + 7] ^= 0x80
    f.write_bytes(bytes(data))
    store = ExpertStore(path)
    store.read(3, 5)
    with pytest.raises(ChecksumError, match=r"layer 3 expert 6 block down in .*experts/3/6\.bin"):
        store.read(3, 6)
    assert isinstance(ChecksumError("x"), FlashMoeError)
    assert bytes(store.read(3, 6, verify=False)["down"])[7] == data[off + 7]
    assert bytes(ExpertStore(path, verify=False).read(3, 6)["down"])[7] == data[off + 7]


@pytest.mark.parametrize("recheck", [False, True])
def test_checksums_are_checked_on_an_experts_first_read_or_on_every_read(store_copy, recheck):
    """An expert whose checksums matched is not hashed again (unless ``recheck``): a byte flipped on disk
    after its first read goes through; an expert not read before is still checked."""
    path = store_copy("qwen3moe", "Q8_0")
    m = json.loads((path / "manifest.json").read_text())
    store = ExpertStore(path, recheck=recheck)
    store.read(3, 6)
    flipped = {e: _flip_a_byte(path, m, e) for e in (6, 7)}
    if recheck:
        with pytest.raises(ChecksumError, match="layer 3 expert 6"):
            store.read(3, 6)
    else:
        assert bytes(store.read(3, 6)["down"])[7] == flipped[6]
    with pytest.raises(ChecksumError, match="layer 3 expert 7"):
        store.read(3, 7)


def _flip_a_byte(path, m, e) -> int:
    """Flips byte 7 of layer 3 expert e's down block on disk; returns its new value."""
    off = m["layers"]["3"][e]["blocks"]["down"]["offset"]
    f = path / "experts" / "3" / f"{e}.bin"
    data = bytearray(f.read_bytes())
    data[off + 7] ^= 0x80
    f.write_bytes(bytes(data))
    return data[off + 7]


def test_newer_format_version_is_refused(store_copy):
    path = store_copy("qwen3moe", "Q8_0")
    m = json.loads((path / "manifest.json").read_text())
    m["format_version"] = 2
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match=r"store format 2 is newer than this flashmoe-stream supports \(1\): upgrade"):
        ExpertStore(path)


def test_missing_corrupt_and_unfinished_manifests(store_copy, tmp_path):
    path = store_copy("qwen3moe", "Q8_0")
    text = (path / "manifest.json").read_text()
    (path / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(StoreError, match="corrupt manifest"):
        ExpertStore(path)
    m = json.loads(text)
    del m["layers"]["1"][3]["blocks"]["up"]["xxh3"]
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="corrupt manifest"):
        ExpertStore(path)
    (path / "manifest.json").unlink()
    with pytest.raises(StoreError, match="no manifest.json"):
        ExpertStore(path)
    (path / "repack.journal").write_text("{}\n")
    with pytest.raises(StoreError, match="unfinished repack"):
        ExpertStore(path)
    with pytest.raises(StoreError, match="no such file"):
        ExpertStore(tmp_path / "nowhere")


def test_missing_or_truncated_expert_file_is_an_error_not_zeros(store_copy):
    path = store_copy("qwen3moe", "Q8_0")
    store = ExpertStore(path)
    (path / "experts" / "0" / "1.bin").unlink()
    with pytest.raises(StoreError, match="missing"):
        store.read(0, 1)
    with open(path / "experts" / "0" / "2.bin", "r+b") as f:
        f.truncate(4096)
    with pytest.raises(StoreError, match="short read"):
        store.read(0, 2)
    with pytest.raises(StoreError, match="no expert 8 in layer 0"):
        store.read(0, 8)
