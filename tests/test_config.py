import pytest

from flashmoe_stream.config import LlamaMoeConfig, Qwen3MoeConfig, config_from_metadata, parse_size
from flashmoe_stream.errors import BadFileError, BudgetError, UnsupportedError
from flashmoe_stream.gguf_file import open_gguf
from flashmoe_stream.synth import PRESETS


@pytest.mark.parametrize("arch,cls", [("qwen3moe", Qwen3MoeConfig), ("llama", LlamaMoeConfig)])
def test_config_matches_the_preset_written(make_model, arch, cls):
    cfg = open_gguf(make_model(arch)).config
    p = PRESETS["tiny"]
    assert type(cfg) is cls
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_head_kv, cfg.head_dim) == (p.n_layer, p.n_embd, p.n_head, p.n_head_kv, p.head_dim)
    assert (cfg.n_expert, cfg.n_expert_used, cfg.n_ff_exp, cfg.n_vocab) == (p.n_expert, p.n_expert_used, p.n_ff_exp, p.n_vocab)
    assert cfg.rope_theta == p.rope_theta and cfg.rms_eps == pytest.approx(p.rms_eps)
    assert cfg.rope_neox == (arch == "qwen3moe")


def test_unsupported_architecture_names_it_and_the_supported_ones():
    with pytest.raises(UnsupportedError, match=r"unsupported architecture 'gpt2' \(supported: deepseek2, llama, qwen3moe\)"):
        config_from_metadata({"general.architecture": "gpt2"})


def test_llama_without_experts_is_refused():
    md = {"general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": 64,
          "llama.attention.head_count": 4, "llama.context_length": 128, "llama.feed_forward_length": 128,
          "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": 100}
    with pytest.raises(UnsupportedError, match="no routed experts"):
        config_from_metadata(md)


def test_missing_required_key_is_a_bad_file():
    with pytest.raises(BadFileError, match="qwen3moe.expert_feed_forward_length"):
        config_from_metadata({"general.architecture": "qwen3moe", "qwen3moe.embedding_length": 64,
                              "qwen3moe.attention.head_count": 4, "qwen3moe.expert_count": 8,
                              "qwen3moe.expert_used_count": 2, "qwen3moe.block_count": 1,
                              "qwen3moe.context_length": 128, "qwen3moe.attention.layer_norm_rms_epsilon": 1e-6,
                              "tokenizer.ggml.tokens": ["a", "b"]})


@pytest.mark.parametrize("text,total,expected", [
    ("512M", None, 512 << 20), ("8G", None, 8 << 30), ("1.5GiB", None, 3 << 29), ("4096", None, 4096),
    (123, None, 123), ("10%", 1000, 100), ("100%", 7, 7), ("2t", None, 2 << 40),
])
def test_parse_size(text, total, expected):
    assert parse_size(text, total) == expected


@pytest.mark.parametrize("text,total", [("lots", None), ("10%", None), ("150%", 100), ("-5", None), ("8X", None)])
def test_parse_size_rejects(text, total):
    with pytest.raises(BudgetError):
        parse_size(text, total)
