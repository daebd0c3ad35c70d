import json
import subprocess
import sys

import pytest

from flashmoe_stream.synth import PRESETS


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "flashmoe_stream", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def test_synth_then_inspect_json(tmp_path):
    out = tmp_path / "m.gguf"
    r = run("synth", "--arch", "llama", "--qtype", "Q8_0", "--layers", "3", "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["files"] == [str(out)]
    r = run("inspect", out, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    p = PRESETS["tiny"]
    expert_params = 3 * p.n_ff_exp * p.n_embd
    assert info["arch"] == "llama" and info["n_layer"] == 3 and info["n_moe_layer"] == 3
    assert info["bytes_per_expert"] == expert_params // 32 * 34  # Q8_0: 34 bytes per 32 weights
    assert info["bytes_per_token_cold"] == 3 * p.n_expert_used * info["bytes_per_expert"]
    assert info["bytes_experts"] == 3 * p.n_expert * info["bytes_per_expert"]
    assert info["bytes_dense"] + info["bytes_experts"] == info["bytes_total"]
    dense = info["params_total"] - 3 * p.n_expert * expert_params
    assert info["params_active"] == dense + 3 * p.n_expert_used * expert_params
    attn = 2 * p.n_embd * p.n_head * p.head_dim + 2 * p.n_embd * p.n_head_kv * p.head_dim
    assert dense == 2 * p.n_vocab * p.n_embd + 3 * (attn + p.n_expert * p.n_embd + 2 * p.n_embd) + p.n_embd


def test_inspect_human_output(make_model):
    r = run("inspect", make_model())
    assert r.returncode == 0, r.stderr
    assert "qwen3moe" in r.stdout and "read per token, 0% hits" in r.stdout


@pytest.mark.parametrize("make", [
    lambda d: d / "missing.gguf",
    lambda d: (d / "foreign.gguf").write_bytes(b"not a gguf" * 50) and d / "foreign.gguf",
])
def test_bad_model_is_one_line_no_traceback(tmp_path, make):
    r = run("inspect", make(tmp_path))
    assert r.returncode != 0
    assert r.stderr.startswith("flashmoe: error:") and r.stderr.count("\n") == 1
    assert "Traceback" not in r.stderr


def test_unsupported_architecture_one_line(tmp_path):
    from gguf import GGUFWriter

    w = GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    r = run("inspect", tmp_path / "gpt2.gguf")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "unsupported architecture 'gpt2' (supported: deepseek2, llama, qwen3moe)" in r.stderr


def test_help_explains_commands():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("synth", "inspect", "bench", "demo"):
        assert cmd in r.stdout
    assert "--split-size" in run("synth", "--help").stdout


def test_bad_split_size_is_usage_error(tmp_path):
    r = run("synth", "-o", tmp_path / "x.gguf", "--split-size", "lots")
    assert r.returncode == 2 and "not understood" in r.stderr


def test_repack_verify_and_bench_io_through_the_main_cli(make_model, tmp_path):
    store = tmp_path / "store"
    r = run("repack", make_model("llama", "Q4_K_M"), "-o", store, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["experts"] == PRESETS["tiny"].n_layer * PRESETS["tiny"].n_expert
    r = run("repack", "--verify", store)
    assert r.returncode == 0 and "every checksum matches" in r.stdout
    r = run("bench", "io", store, "--queue-depths", "1,4", "--seconds", "0.2", "--json")
    assert r.returncode == 0, r.stderr
    assert [d["queue_depth"] for d in json.loads(r.stdout)["depths"]] == [1, 4]


def test_bench_run_reports_decode_against_the_io_bound(make_model):
    r = run("bench", "run", make_model("qwen3moe", "Q8_0"), "--ram-cache", "30%", "--tokens", "6", "--json",
            "--disk-sample-seconds", "0.05")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["decode"]["tokens"] == 6 and d["decode"]["tok_per_s"] > 0
    assert d["miss_bytes_per_token"] > 0 and d["io_bound_tok_per_s"] > 0  # 30 %: some experts must be read
    assert d["ratio_to_io_bound"] == round(d["decode"]["tok_per_s"] / d["io_bound_tok_per_s"], 3) or \
        abs(d["ratio_to_io_bound"] - d["decode"]["tok_per_s"] / d["io_bound_tok_per_s"]) < 0.01
    assert d["distinct_expert_sets_per_layer_min"] >= 4  # teacher-forced tokens route variously
    # reads ran during decode, for at most the decode's time
    assert 0 < d["disk_busy_fraction"] <= 1.05 and d["read_gb_per_s_while_busy"] > 0
    # the disk is sampled before decode and after each of its chunks (6 tokens: 6 chunks of one)
    assert len(d["disk_raw_sequential_samples_gb_per_s"]) == 7 and len(d["ratio_to_io_bound_per_chunk"]) == 6
    assert min(d["disk_raw_sequential_samples_gb_per_s"]) > 0
    assert len(d["disk_random_expert_reads_gb_per_s"]) == 2 and min(d["disk_random_expert_reads_gb_per_s"]) > 0
    assert abs(d["ratio_to_random_read_bound"] - d["decode"]["tok_per_s"] / d["random_read_bound_tok_per_s"]) < 0.01
    mid = sorted(d["ratio_to_io_bound_per_chunk"])[2:4]
    assert abs(d["ratio_to_io_bound_chunk_median"] - sum(mid) / 2) <= 0.001


def test_the_cli_works_without_the_server_extra(make_model, tmp_path):
    """Only `serve` needs fastapi and uvicorn; without them it says so in one line, and the rest works."""
    import subprocess
    import sys

    shim = tmp_path / "noserver.py"
    shim.write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('fastapi', 'uvicorn', 'starlette'):\n"
        "            raise ImportError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from flashmoe_stream.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    model = str(make_model("qwen3moe", "Q8_0"))
    ok = subprocess.run([sys.executable, shim, "inspect", model], capture_output=True, text=True)
    assert ok.returncode == 0 and "qwen3moe" in ok.stdout, ok.stderr
    bad = subprocess.run([sys.executable, shim, "serve", "-m", model], capture_output=True, text=True)
    assert bad.returncode == 1 and "pip install 'flashmoe-stream[server]'" in bad.stderr
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
