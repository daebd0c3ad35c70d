"""Every synthetic file loads and runs in llama.cpp, and our reference forward agrees with it."""

import numpy as np
import pytest

from flashmoe_stream.gguf_file import open_gguf
from flashmoe_stream.synth import QTYPES

from .reference import forward

pytestmark = pytest.mark.llama_cpp


def _llama(llama_cpp, path, **kw):
    return llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, n_batch=64, logits_all=True,
                           verbose=False, seed=0, **kw)


@pytest.mark.parametrize("arch", ["qwen3moe", "llama", "deepseek2"])
@pytest.mark.parametrize("qtype", QTYPES)
def test_llama_cpp_loads_and_runs(llama_cpp, make_model, arch, qtype):
    llm = _llama(llama_cpp, make_model(arch, qtype))
    tokens = llm.tokenize(b"What's AI? The quick brown fox.", add_bos=False)
    assert len(tokens) > 3
    llm.eval(tokens)
    logits = np.asarray(llm.scores[: len(tokens)])
    assert np.isfinite(logits).all() and logits.std() > 0
    assert llm.detokenize(tokens) == b"What's AI? The quick brown fox."


@pytest.mark.parametrize("arch,qtype", [("qwen3moe", "F32"), ("llama", "F32"), ("qwen3moe", "F16")])
def test_reference_forward_equals_llama_cpp_on_float_weights(llama_cpp, make_model, arch, qtype):
    """With float weights llama.cpp computes in (nearly) float32 too: every logit agrees closely."""
    ours, ref = _both(llama_cpp, make_model(arch, qtype))
    assert np.abs(ours - ref).max() <= 0.005 * (ref.max() - ref.min())
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("arch,qtype", [("qwen3moe", "Q8_0"), ("llama", "Q8_0"), ("qwen3moe", "Q4_K_M"),
                                        ("llama", "Q4_K_M"), ("qwen3moe", "IQ4_XS"), ("qwen3moe", "MXFP4"),
                                        ("llama", "BF16")])
def test_reference_forward_agrees_with_llama_cpp_on_quantized_weights(llama_cpp, make_model, arch, qtype):
    """llama.cpp rounds activations to 8 bits for quantised matmuls (~1 % error; to bf16 for BF16), which can flip a near-tie
    in the expert choice at a position; at least 90 % of positions agree within 2 % of the logit range."""
    ours, ref = _both(llama_cpp, make_model(arch, qtype))
    per_pos = np.abs(ours - ref).max(-1) / (ref.max() - ref.min())
    assert (per_pos <= 0.02).mean() >= 0.9, np.round(per_pos, 3)
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def _both(llama_cpp, path):
    tokens = np.random.default_rng(1).integers(0, 300, 32).tolist()
    llm = _llama(llama_cpp, path)
    llm.eval(tokens)
    ref = np.asarray(llm.scores[: len(tokens)])
    return forward(open_gguf(path), tokens)[0].numpy(), ref
