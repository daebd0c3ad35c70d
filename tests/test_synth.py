import re

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q, MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES

from flashmoe_stream import synth as synth_mod
from flashmoe_stream.gguf_file import open_gguf
from flashmoe_stream.quant import dequantize
from flashmoe_stream.engine.tokenizer import byte_alphabet
from flashmoe_stream.synth import PRESETS, QTYPES, synth, train_bpe

from .reference import forward, weight

ARCH_ENUM = {name: arch for arch, name in MODEL_ARCH_NAMES.items()}


@pytest.mark.parametrize("arch", ["qwen3moe", "llama"])
def test_tensor_names_are_llama_cpp_names_of_the_arch(make_model, arch):
    m = open_gguf(make_model(arch))
    allowed = {TENSOR_NAMES[t] for t in MODEL_TENSORS[ARCH_ENUM[arch]]}
    for name in m.tensors:
        base = re.sub(r"^blk\.\d+\.", "blk.{bid}.", name.removesuffix(".weight"))
        assert base in allowed, name
    n = m.config.n_layer
    assert sum(1 for t in m.tensors if t.endswith("ffn_gate_exps.weight")) == n
    p = PRESETS["tiny"]
    assert m.tensors["blk.0.ffn_down_exps.weight"].shape == (p.n_expert, p.n_embd, p.n_ff_exp)
    assert m.tensors["blk.0.ffn_up_exps.weight"].shape == (p.n_expert, p.n_ff_exp, p.n_embd)
    assert m.tensors["blk.0.attn_k.weight"].shape == (p.n_head_kv * p.head_dim, p.n_embd)
    assert ("blk.0.attn_q_norm.weight" in m.tensors) == (arch == "qwen3moe")


def test_q4_k_m_is_llama_cpp_mix(make_model):
    m = open_gguf(make_model("qwen3moe", "Q4_K_M"))
    for name, t in m.tensors.items():
        if "norm" in name or "ffn_gate_inp" in name:
            assert t.qtype == Q.F32, name
        elif "ffn_down" in name or name == "output.weight":
            assert t.qtype == Q.Q6_K, name
        else:
            assert t.qtype == Q.Q4_K, name


def test_mxfp4_is_llama_cpp_mxfp4_moe_mix(make_model):
    m = open_gguf(make_model("qwen3moe", "MXFP4"))
    for name, t in m.tensors.items():
        want = Q.F32 if ("norm" in name or "ffn_gate_inp" in name) else Q.MXFP4 if "_exps" in name else Q.Q8_0
        assert t.qtype == want, name


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "Q2_K", "Q6_K", "IQ4_XS", "BF16", "MXFP4"])
def test_weights_are_zero_mean_with_the_planned_scale(make_model, qtype):
    m = open_gguf(make_model("qwen3moe", qtype))
    for name, std in [("blk.1.ffn_gate_exps.weight", 256 ** -0.5), ("token_embd.weight", 1.0)]:
        w = weight(m, name)
        assert torch.isfinite(w).all()
        assert abs(w.mean().item()) < 0.03 * std, name
        assert w.std().item() == pytest.approx(std, rel=0.25), name
        # block-level offsets must cancel too (K-quant mins), or every row carries a common direction
        sub = w.reshape(-1, 32).mean(-1)
        assert sub.pow(2).mean().sqrt().item() < 0.4 * std, name


def test_different_seeds_give_different_weights_same_seed_same(tmp_path):
    a = synth(tmp_path / "a.gguf", seed=1).paths[0]
    b = synth(tmp_path / "b.gguf", seed=1).paths[0]
    c = synth(tmp_path / "c.gguf", seed=2).paths[0]
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_tiny_is_a_few_megabytes(make_model):
    assert 1e6 < make_model("qwen3moe", "Q8_0").stat().st_size < 10e6


def _varied_tokens(n_vocab, n=48, seed=0):
    return np.random.default_rng(seed).integers(0, min(n_vocab, 512), n).tolist()


@pytest.mark.parametrize("arch,qtype,layers", [("qwen3moe", "Q4_K_M", 24), ("llama", "Q8_0", 24), ("qwen3moe", "IQ4_XS", 4)])
def test_routing_varies_and_hidden_states_do_not_collapse(make_model, arch, qtype, layers):
    m = open_gguf(make_model(arch, qtype, layers=layers))
    tokens = _varied_tokens(m.config.n_vocab)
    logits, routes, hidden = forward(m, tokens)
    assert torch.isfinite(logits).all()
    n = m.config.n_expert
    for layer, ids in enumerate(routes):
        sets = {tuple(sorted(r)) for r in ids.tolist()}
        assert len(sets) >= len(tokens) // 4, f"layer {layer}: only {len(sets)} distinct expert sets"
        share = torch.bincount(ids.flatten(), minlength=n).max().item() / ids.numel()
        assert share < 3.0 / n, f"layer {layer}: one expert takes {share:.0%} of the routing"
    for layer, h in enumerate(hidden):
        rms = h.pow(2).mean(-1).sqrt()
        assert rms.max() < 50, f"layer {layer}: activations grow to rms {rms.max():.1f}"
        u = torch.nn.functional.normalize(h - h.mean(0), dim=-1)
        off = (u @ u.T)[~torch.eye(len(tokens), dtype=torch.bool)]
        assert off.abs().mean() < 0.5, f"layer {layer}: hidden states collapse onto one direction"
        # the token-specific part stays a real share of the state (a common direction would dominate)
        assert (h - h.mean(0)).norm() / h.norm() > 0.3, f"layer {layer}"
    assert len(set(logits.argmax(-1).tolist())) > len(tokens) // 4


def test_bpe_alphabet_and_merges():
    alpha = byte_alphabet()
    assert len(alpha) == 256 and len(set(alpha.values())) == 256
    assert all(len(c) == 1 and not c.isspace() for c in alpha.values())
    tokens, merges = train_bpe("the cat the hat the bat", 5)
    assert len(tokens) == 256 + len(merges) and merges[0] in ("t h", "h e", "Ġ t")
    assert {a + b for a, b in (m.split(" ") for m in merges)} <= set(tokens)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = synth_mod.quant.random_blocks

    def failing(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        return real(*a, **kw)

    monkeypatch.setattr(synth_mod.quant, "random_blocks", failing)
    with pytest.raises(OSError):
        synth(tmp_path / "m.gguf", split_size=1 << 20)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", ["Q9_9", "IQ2_XXS"])
def test_unknown_qtype(tmp_path, bad):
    from flashmoe_stream.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match=bad):
        synth(tmp_path / "m.gguf", qtype=bad)
    assert list(tmp_path.iterdir()) == []


def test_every_listed_qtype_writes_and_dequantizes(make_model):
    for qtype in QTYPES:
        m = open_gguf(make_model("qwen3moe", qtype))
        t = m.tensors["blk.0.ffn_up_exps.weight"]
        w = dequantize(torch.from_numpy(m.tensor_bytes(t.name).copy()), t.qtype, t.shape)
        assert torch.isfinite(w).all() and w.std() > 0, qtype
