"""The built-in model (flashmoe_stream/data, docs/MODEL.md): what it is, and our greedy output equals llama.cpp's."""

import pytest

import flashmoe_stream as fms
from flashmoe_stream.cli import BUILTIN_MODEL
from flashmoe_stream.gguf_file import open_gguf

from .reference import assert_agrees_but_at_ties

PROMPTS = ["import os\nimport sys\n\n\ndef main():\n", "This program is free software",
           "<|im_start|>user\nWhat does `os.path.join` do?<|im_end|>\n<|im_start|>assistant\n"]


def test_builtin_model_is_a_small_trained_qwen3moe():
    m = open_gguf(BUILTIN_MODEL)
    c = m.config
    assert (c.arch, c.n_layer, c.n_expert, c.n_expert_used) == ("qwen3moe", 8, 32, 4)
    assert BUILTIN_MODEL.stat().st_size < 20 << 20
    assert m.tensors["blk.0.ffn_gate_exps.weight"].qtype.name == "Q8_0"


@pytest.mark.llama_cpp
@pytest.mark.parametrize("prompt", PROMPTS)
def test_builtin_model_greedy_equals_llama_cpp(llama_cpp, prompt):
    llm = llama_cpp.Llama(model_path=str(BUILTIN_MODEL), n_ctx=128, n_threads=2, verbose=False, seed=0)
    ptoks = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    theirs = []
    for tok in llm.generate(ptoks, temp=0.0, top_k=1, repeat_penalty=1.0):
        if len(theirs) == 32 or tok == llm.token_eos():
            break
        theirs.append(tok)
    with fms.Engine.open(BUILTIN_MODEL, ram_cache="30%") as eng:
        assert eng.tokenize(prompt) == ptoks
        text = eng.generate(prompt, max_tokens=32, temperature=0.0, stream=False)
        ours = eng.last.tokens[len(ptoks):]
    assert ours == theirs
    assert text == llm.detokenize(theirs).decode("utf-8", errors="replace")
    assert len(set(theirs)) > 3  # not one token repeated


def test_demo_streams_the_builtin_model_through_a_small_cache(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "flashmoe_stream", "demo", "--dir", str(tmp_path), "-n", "24"],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("architecture             qwen3moe")  # inspect's table first
    prompt = "import os\nimport sys\n\n\ndef main():\n"
    assert prompt in r.stdout
    generated = r.stdout.split(prompt, 1)[1]
    assert len(set(generated.split())) >= 5  # words, not one token repeated
    assert "decode 24 tok" in r.stderr and "read " in r.stderr
    assert (tmp_path / "tiny-moe-Q8_0.store" / "manifest.json").is_file()


def _agreement(llama_cpp, path, prompt, add_bos=False, watch=None):
    """(our logits, llama.cpp's) for every position of ``prompt`` on the model at ``path``; ``watch(engine)``,
    if given, is called on our engine before it computes them."""
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, n_batch=256, logits_all=True, verbose=False)
    toks = llm.tokenize(prompt.encode(), add_bos=add_bos, special=True)
    llm.eval(toks)
    ref = np.asarray(llm.scores[: len(toks)])
    with fms.Engine.open(path, ram_cache="10%") as eng:
        if watch is not None:
            watch(eng)
        ours = eng.logits(toks).numpy()
    return ours, ref


@pytest.mark.llama_cpp
@pytest.mark.parametrize("prompt", PROMPTS)
def test_builtin_model_logits_agree_with_llama_cpp_at_every_position(llama_cpp, prompt):
    """Issue 4's bar on a model with real routing, at Q8_0 and a 10 % cache: the same argmax at every
    position and no logit further than 2 % of llama.cpp's logit range."""
    _assert_agrees(*_agreement(llama_cpp, BUILTIN_MODEL, prompt))


def _assert_agrees(ours, ref):
    """The same argmax at every position, and no logit further than 2 % of llama.cpp's logit range."""
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    assert abs(ours - ref).max() <= 0.02 * (ref.max() - ref.min())


def _quantize_q4_k_m(llama_cpp, src, out):
    """``src`` requantised to Q4_K_M by llama.cpp's own quantiser, written to ``out``."""
    import ctypes

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.nthread, p.allow_requantize = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, 2, True
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(p)) == 0
    assert {t.qtype.name for t in open_gguf(out).tensors.values()} >= {"Q4_K", "Q6_K"}
    return out


@pytest.fixture(scope="module")
def builtin_q4_k_m(llama_cpp, tmp_path_factory):
    """The built-in model requantised to Q4_K_M by llama.cpp's own quantiser."""
    return _quantize_q4_k_m(llama_cpp, BUILTIN_MODEL, tmp_path_factory.mktemp("q4km") / "tiny-moe-Q4_K_M.gguf")


@pytest.mark.llama_cpp
@pytest.mark.parametrize("prompt", PROMPTS)
def test_builtin_model_at_llama_cpp_q4_k_m_agrees_but_at_exact_ties(llama_cpp, builtin_q4_k_m, prompt):
    """At llama.cpp's Q4_K_M every logit is within 2 % of the range. The argmax is llama.cpp's wherever
    llama.cpp's own top two logits are further apart than our difference there. Where they are not (a
    tie to 1e-4 of the range was seen), no implementation that is not bit-identical can promise the
    same choice."""
    ours, ref = _agreement(llama_cpp, builtin_q4_k_m, prompt)
    assert_agrees_but_at_ties(ours, ref)
