import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q, GGUFWriter

from flashmoe_stream.errors import BadFileError
from flashmoe_stream.gguf_file import open_gguf, shard_paths
from flashmoe_stream.quant import nbytes
from flashmoe_stream.synth import synth


def test_index_matches_the_readers_view_of_each_tensor(make_model):
    from gguf import GGUFReader

    path = make_model("qwen3moe", "Q4_K_M")
    m = open_gguf(path)
    r = GGUFReader(path)
    assert len(m.tensors) == len(r.tensors)
    for t in r.tensors:
        info = m.tensors[t.name]
        assert info.qtype == t.tensor_type and info.nbytes == t.n_bytes
        assert info.shape == tuple(reversed([int(d) for d in t.shape]))
        assert np.array_equal(m.tensor_bytes(t.name), t.data.reshape(-1).view(np.uint8))


@pytest.mark.parametrize("arch", ["qwen3moe", "llama"])
def test_metadata_equals_gguf_readers(make_model, arch):
    from gguf import GGUFReader

    path = make_model(arch)
    md = open_gguf(path).metadata
    fields = {k: f for k, f in GGUFReader(path).fields.items() if not k.startswith("GGUF.")}
    assert set(md) == set(fields)
    for key, field in fields.items():
        got = md[key]
        assert (got.tolist() if isinstance(got, np.ndarray) else got) == field.contents(), key
    assert len(md["tokenizer.ggml.tokens"]) == 512 and md["tokenizer.ggml.tokens"][-1] == "<|im_end|>"


def test_split_set_opens_from_any_shard_with_the_same_tensors(tmp_path):
    one = synth(tmp_path / "one.gguf", preset="tiny", qtype="Q8_0", seed=3).paths
    split = synth(tmp_path / "m.gguf", preset="tiny", qtype="Q8_0", seed=3, split_size=1 << 20).paths
    assert len(one) == 1 and len(split) >= 3
    assert [p.name for p in split] == [f"m-{i:05d}-of-{len(split):05d}.gguf" for i in range(1, len(split) + 1)]
    ref = open_gguf(one[0])
    for shard in split:
        m = open_gguf(shard)
        assert m.paths == split
        assert set(m.tensors) == set(ref.tensors)
        assert m.metadata["tokenizer.ggml.tokens"] == ref.metadata["tokenizer.ggml.tokens"]
    assert {t.path for t in m.tensors.values()} == set(split)
    for name in ref.tensors:
        assert np.array_equal(m.tensor_bytes(name), ref.tensor_bytes(name)), name


def test_missing_shard_is_named(tmp_path):
    split = synth(tmp_path / "m.gguf", split_size=1 << 20).paths
    split[1].unlink()
    with pytest.raises(BadFileError, match=f"missing {split[1].name}"):
        open_gguf(split[0])


def test_shard_from_another_set_is_refused(tmp_path):
    a = synth(tmp_path / "a" / "m.gguf", split_size=1 << 20).paths
    b = synth(tmp_path / "b" / "m.gguf", split_size=2 << 20).paths
    assert len(a) != len(b)
    os.replace(b[0], a[0].with_name(a[0].name))  # shard 1 of b's set, under a's name
    with pytest.raises(BadFileError, match="shard mismatch"):
        open_gguf(a[1])


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_file_is_a_clear_error(make_model, tmp_path, keep):
    src = make_model()
    data = src.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(BadFileError, match="truncated"):
        open_gguf(cut)


def test_header_cut_short_is_a_clear_error(make_model, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(make_model().read_bytes()[:300])
    with pytest.raises(BadFileError, match="cut.gguf"):
        open_gguf(cut)


@pytest.mark.parametrize("content", [b"", b"hello world\n" * 100, b"GGUF" + b"\xff" * 64])
def test_foreign_file_is_a_clear_error(tmp_path, content):
    p = tmp_path / "foreign.gguf"
    p.write_bytes(content)
    with pytest.raises(BadFileError, match="foreign.gguf"):
        open_gguf(p)


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(BadFileError, match="no such file"):
        open_gguf(tmp_path / "nope.gguf")
    with pytest.raises(BadFileError, match="directory"):
        shard_paths(tmp_path)


def test_opening_a_huge_sparse_split_model_reads_no_tensor_data(tmp_path):
    """Three shards of ~10 GB each, sparse on disk: opening must only touch the headers."""
    expert = (128, 1536, 4096)
    w = GGUFWriter(tmp_path / "big.gguf", "qwen3moe", split_max_size=11 << 30)
    for i in range(12):
        for part in ("gate", "up", "down"):
            w.add_tensor_info(f"blk.{i}.ffn_{part}_exps.weight", expert, np.dtype(np.float32),
                              nbytes(Q.Q8_0, expert), raw_dtype=Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for f, tensors in zip(w.fout, w.tensors):
        f.truncate(-(-f.tell() // 32) * 32 + sum(-(-ti.nbytes // 32) * 32 for ti in tensors.values()))
        f.close()
    shards = sorted(tmp_path.glob("big-*.gguf"))
    assert len(shards) == 3
    assert sum(p.stat().st_size for p in shards) > 30e9
    assert sum(p.stat().st_blocks * 512 for p in shards) < 10e6  # sparse: nothing was written
    import resource

    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    m = open_gguf(shards[2])
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    assert len(m.tensors) == 36 and m.nbytes > 30e9
    assert faults < 20_000  # touching the data would fault in millions of pages (80 MB of pages allowed)
