"""The trained Mixtral-shaped fixture (tests/data/tiny-mixtral-Q8_0.gguf, docs/MODEL.md): ``llama`` with experts,
8 experts, top-2 with renormalised weights, normal RoPE. Our logits against llama.cpp's at every position, at
Q8_0 and at a Q4_K_M made by llama.cpp's own quantiser, on text the model was not trained on.

The bar of the qwen3moe built-in model (every logit within 2 % of llama.cpp's range) does not hold here at
every position. A trained top-2-of-8 router often has its 2nd and 3rd experts close (at a third of the
positions some layer has them within 5 %, relative), and after llama.cpp's 8-bit rounding of activations
ours differ from its by ~0.3 % (F32 and F16 files agree to 3e-4), which flips the second expert at about
1 % of the positions. That expert carries 30-50 % of the layer's output, so that position's logits differ
by up to ~13 % of the range. Measured on 20 held-out 400-character prompts: 35 positions at Q8_0 and 34 at
Q4_K_M (of ~3000 each) beyond 2 %; for 63 of the 69, choosing the other expert at that position's closest
layer brings it back to the usual 0.3-0.9 %. The tests hold every position of two held-out prompts to
that: within 2 %, or a near-tie in the expert choice whose other side is within 2 %."""

from pathlib import Path

import pytest
import torch

import flashmoe_stream as fms
from flashmoe_stream.gguf_file import open_gguf
from tests.reference import assert_argmax_but_at_ties, assert_within_but_at_near_ties, record_routing_margins
from tests.test_builtin_model import _agreement, _quantize_q4_k_m

MIXTRAL = Path(__file__).parent / "data" / "tiny-mixtral-Q8_0.gguf"
# the starts of two documents that `train_tiny_moe.py prepare` held out of training (heldout/code.txt, prose.txt)
PROMPTS = {
    "code": '''# actions.py

from .exceptions import ParseException
from .util import col


class OnlyOnce:
    """
    Wrapper for parse actions, to ensure they are only called once.
    """

    def __init__(self, method_call):
        from .core import _trim_arity

        self.callable = _trim_arity(method_call)
        self.called = False
''',
    "prose": '''Pango
=====

Pango is a library for layout and rendering of text, with an emphasis
on internationalization. Pango can be used anywhere that text layout
is needed; however, most of the work on Pango so far has been done using
the GTK widget toolkit as a test platform. Pango forms the core of text
and font handling for GTK.
''',
}


def test_fixture_is_a_small_trained_mixtral():
    m = open_gguf(MIXTRAL)
    c = m.config
    assert (c.arch, c.n_layer, c.n_expert, c.n_expert_used, c.expert_weights_norm) == ("llama", 6, 8, 2, True)
    assert not type(c).rope_neox and "blk.0.attn_q_norm.weight" not in m.tensors
    assert MIXTRAL.stat().st_size < 8 << 20
    assert m.tensors["blk.0.ffn_gate_exps.weight"].qtype.name == "Q8_0"


@pytest.fixture(scope="module")
def mixtral_q4_k_m(llama_cpp, tmp_path_factory):
    """The fixture requantised to Q4_K_M by llama.cpp's own quantiser."""
    return _quantize_q4_k_m(llama_cpp, MIXTRAL, tmp_path_factory.mktemp("q4km") / "tiny-mixtral-Q4_K_M.gguf")


@pytest.mark.llama_cpp
@pytest.mark.parametrize("prompt", PROMPTS.values(), ids=PROMPTS.keys())
def test_tokenizer_equals_llama_cpp(llama_cpp, prompt):
    """The llama-bpe pre-tokenizer with this BPE, and the BOS llama files add."""
    llm = llama_cpp.Llama(model_path=str(MIXTRAL), n_ctx=64, n_threads=2, verbose=False, vocab_only=True)
    with fms.Engine.open(MIXTRAL, ram_cache="10%") as eng:
        assert eng.tokenize(prompt) == llm.tokenize(prompt.encode(), add_bos=True, special=True)


def _assert_agrees_but_at_near_ties(llama_cpp, monkeypatch, path, prompt):
    """Every position within 2 % of llama.cpp's range, but the rare one where some layer's expert choice is a
    near-tie (margin < 10 %) whose other side is within 2 %; llama.cpp's argmax but at exact ties (as in
    test_builtin_model)."""
    margins = []  # [the list record_routing_margins fills]
    ours, ref = _agreement(llama_cpp, path, prompt, add_bos=True,
                           watch=lambda eng: margins.append(record_routing_margins(eng)))
    with fms.Engine.open(path, ram_cache="100%") as eng:
        toks = eng.tokenize(prompt)
    assert_within_but_at_near_ties(monkeypatch, path, toks, ours, ref, margins[0])  # ~1 % of positions off
    # a model this small is often torn between two tokens: fewer positions are decided than for the built-in one
    assert_argmax_but_at_ties(ours, ref, min_decided=0.65)


@pytest.mark.llama_cpp
@pytest.mark.parametrize("prompt", PROMPTS.values(), ids=PROMPTS.keys())
def test_mixtral_logits_agree_with_llama_cpp_but_at_near_ties(llama_cpp, monkeypatch, prompt):
    """At Q8_0 and a 10 % cache."""
    _assert_agrees_but_at_near_ties(llama_cpp, monkeypatch, MIXTRAL, prompt)


@pytest.mark.llama_cpp
@pytest.mark.parametrize("prompt", PROMPTS.values(), ids=PROMPTS.keys())
def test_mixtral_at_llama_cpp_q4_k_m_agrees_but_at_near_ties(llama_cpp, monkeypatch, mixtral_q4_k_m, prompt):
    """At llama.cpp's Q4_K_M (Q4_K, Q5_K and Q6_K, and Q5_0/Q8_0 where a row of 128 does not fit a K block)."""
    _assert_agrees_but_at_near_ties(llama_cpp, monkeypatch, mixtral_q4_k_m, prompt)


def _budget_invariant(path):
    with fms.Engine.open(path, ram_cache="100%") as a, fms.Engine.open(path, ram_cache="10%") as b:
        toks = a.tokenize(PROMPTS["code"])
        full, tight = a.logits(toks), b.logits(toks)
        assert b.stats()["total"]["disk_bytes"] > a.stats()["total"]["disk_bytes"]  # the small cache really evicted
    assert torch.equal(full, tight)


def test_mixtral_logits_identical_at_10_and_100_percent_cache():
    _budget_invariant(MIXTRAL)


@pytest.mark.llama_cpp
def test_mixtral_q4_k_m_logits_identical_at_10_and_100_percent_cache(mixtral_q4_k_m):
    _budget_invariant(mixtral_q4_k_m)
