import argparse
import json

from flashmoe_stream.io import bench


def test_bench_io_reports_each_queue_depth_beside_raw_sequential(make_store, make_model, capsys):
    for path in (make_store("qwen3moe", "Q8_0"), make_model("qwen3moe", "Q8_0")):
        r = bench.bench_io(path, queue_depths=(1, 4), seconds_per_depth=0.02)
        assert [d["queue_depth"] for d in r["depths"]] == [1, 4]
        for d in r["depths"]:
            assert d["experts"] >= d["queue_depth"] and d["gb_per_s"] > 0 and d["p99_ms"] >= d["p50_ms"] > 0
        assert r["raw_sequential"]["gb_per_s"] > 0 and r["raw_sequential"]["block_bytes"] == 8 << 20
        assert r["ratio_to_sequential"] > 0 and r["best_queue_depth"] in (1, 4)
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    assert bench.run(p.parse_args([str(make_store("qwen3moe", "Q8_0")), "--queue-depths", "2", "--seconds",
                                   "0.02", "--json"])) == 0
    assert json.loads(capsys.readouterr().out)["depths"][0]["queue_depth"] == 2


def test_sequential_samples_go_on_where_the_last_stopped_across_files(tmp_path):
    """Each sample reads on from the previous one's end, file after file, and wraps round only at the end."""
    paths = []
    for i, n in enumerate((40 << 20, 32 << 20)):  # 72 MiB in all, sparse
        p = tmp_path / f"f{i}.bin"
        with open(p, "wb") as f:
            f.truncate(n)
        paths.append(p)
    s = bench.SequentialSampler(paths)
    a = s.sample(0.0)  # at least min(72 MiB, 64 MiB): the first file, then 24 MiB of the second
    assert a["bytes"] == 64 << 20 and a["file_bytes"] == 72 << 20 and a["block_bytes"] == 8 << 20
    assert (s._file, s._pos) == (1, 24 << 20)
    b = s.sample(0.0)  # the second file's last 8 MiB, round to the whole first, then 16 MiB of the second
    assert b["bytes"] == 64 << 20 and (s._file, s._pos) == (1, 16 << 20)
