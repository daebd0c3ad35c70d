"""The tokenizer against llama.cpp (llama-cpp-python, vocab only) on the synthetic models, and on its own."""

import ctypes
import logging

import pytest
from gguf import GGUFValueType as T
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashmoe_stream.engine import Tokenizer
from flashmoe_stream.errors import BadFileError, UnsupportedError
from flashmoe_stream.gguf_file import open_gguf

ARCHS = ["qwen3moe", "llama"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

TEXTS = [
    "", " ", "a", "Hello world", "Hello, world! How's it going? I'm fine, we'll see, they've gone.",
    "The quick brown fox jumps over the lazy dog.",
    "def main():\n    return sum(x * x for x in range(10))\n",
    "if (a <= b && c != d) { x += 1; } // comment\n\tindented\ttabs",
    "12345", "1 22 333 4444 55555 666666 3.14159 -42 1e10 0x1F", "   leading and trailing   ",
    "many\n\n\nnewlines\r\nand\rreturns \n \n", "   \n\t  mixed   whitespace \u00a0 nbsp \u3000 ideographic",
    "punctuation!!! ??? ... --- ;;; ''' \"\"\" ``` ~~~ $$$ ^^^ |||",
    "héllo wörld", "naïve café résumé Ærøskøbing", "Привет, мир! Γειά σου κόσμε", "مرحبا بالعالم ١٢٣",
    "emoji 😀👍🏽 👨‍👩‍👧 🇫🇷 ❤️", "日本語のテキストです。中文文本，한국어 텍스트", "数字１２３と漢字",
    "<|im_start|>user\nWhat's AI?<|im_end|>\n<|im_start|>assistant\n", "a<|endoftext|>b<|im_end|><|im_start|>",
    "<|im_start|", "[PAD3] is not special", "don'T SHOUT'S I'LL 'RE", "mixture-of-experts MoE 2025's",
]


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, make_model, llama_cpp):
    path = make_model(request.param, "Q8_0")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    return Tokenizer.from_gguf(path), llm


def _ref(llm, text, add_bos=True, special=True):
    return llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)


@pytest.mark.llama_cpp
@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_llama_cpp(pair, text):
    tok, llm = pair
    assert tok.encode(text) == _ref(llm, text)
    assert tok.encode(text, add_bos=False) == _ref(llm, text, add_bos=False)
    assert tok.encode(text, add_bos=False, parse_special=False) == _ref(llm, text, add_bos=False, special=False)


@pytest.mark.llama_cpp
@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_llama_cpp_and_round_trips(pair, text):
    tok, llm = pair
    ids = tok.encode(text, add_bos=False)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == llm.detokenize(ids, special=True)
    assert tok.decode_bytes(ids, special=False) == llm.detokenize(ids, special=False)
    plain = tok.encode(text, add_bos=False, parse_special=False)
    assert tok.decode(plain) == text


text_and_specials = st.lists(
    st.one_of(st.text(st.characters(blacklist_categories=("Cs", "Cn")), max_size=24),
              st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=24),
              st.sampled_from(SPECIALS + [" ", "\n", "  ", "'s", "123456"])),
    max_size=6).map("".join)


@pytest.mark.llama_cpp
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=text_and_specials)
def test_random_text_matches_llama_cpp(pair, text):
    tok, llm = pair
    assert tok.encode(text) == _ref(llm, text)
    ids = tok.encode(text, add_bos=False)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == llm.detokenize(ids, special=True)


@pytest.mark.llama_cpp
def test_every_piece_and_end_of_generation_matches_llama_cpp(pair, llama_cpp):
    tok, llm = pair
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    buf = (ctypes.c_char * 256)()
    for tid in range(tok.n_vocab):
        for special in (True, False):
            n = llama_cpp.llama_token_to_piece(vocab, tid, buf, 256, 0, special)
            assert tok.token_to_piece(tid, special) == bytes(buf[:n]), (tid, special)
    assert tok.eot_ids == {t for t in range(tok.n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)}
    assert tok.bos_id == llm.token_bos() and tok.eos_id == llm.token_eos()
    assert tok.n_vocab == llm.n_vocab()


@pytest.mark.llama_cpp
@pytest.mark.parametrize("pre", ["default", "gpt-2", "llama3", "qwen2"])
def test_other_pre_tokenizers_match_llama_cpp(vocab_gguf, llama_cpp, pre):
    path = vocab_gguf("llama", {"tokenizer.ggml.pre": (pre, T.STRING)})
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    tok = Tokenizer.from_gguf(path)
    assert tok.pre == pre
    for text in TEXTS + ["a+b=c $5 ^x ~y |z <tag> 1234567 x1234y", "Hello!!!world???"]:
        assert tok.encode(text) == _ref(llm, text), text


def test_metadata_fields(make_model):
    md = open_gguf(make_model("qwen3moe", "Q8_0")).metadata
    tok = Tokenizer.from_metadata(md)
    tokens = md["tokenizer.ggml.tokens"]
    assert tok.n_vocab == len(tokens)
    assert tokens[tok.bos_id] == "<|endoftext|>" and tokens[tok.eos_id] == "<|im_end|>"
    assert {tokens[i] for i in tok.eot_ids} == {"<|endoftext|>", "<|im_end|>"}
    assert tok.encode("<|im_start|>")[0] == tokens.index("<|im_start|>")
    assert not tok.add_bos and Tokenizer.from_gguf(make_model("llama", "Q8_0")).add_bos


def test_unknown_pre_tokenizer_falls_back_with_a_warning(make_model, caplog):
    md = dict(open_gguf(make_model("qwen3moe", "Q8_0")).metadata)
    md["tokenizer.ggml.pre"] = "no-such-pre"
    with caplog.at_level(logging.WARNING):
        tok = Tokenizer.from_metadata(md)
    assert tok.pre == "default" and "no-such-pre" in caplog.text
    assert tok.decode(tok.encode("hello world 123")) == "hello world 123"


@pytest.mark.parametrize("model", ["bert", "rwkv", "t5"])
def test_unsupported_tokenizer_model(make_model, model):
    md = dict(open_gguf(make_model("qwen3moe", "Q8_0")).metadata)
    md["tokenizer.ggml.model"] = model
    with pytest.raises(UnsupportedError, match=model):
        Tokenizer.from_metadata(md)


def test_missing_tokenizer_is_a_bad_file():
    with pytest.raises(BadFileError):
        Tokenizer.from_metadata({"general.architecture": "llama"})


def test_incremental_decoder_holds_split_characters(make_model):
    tok = Tokenizer.from_gguf(make_model("qwen3moe", "Q8_0"))
    text = "é😀日"
    ids = tok.encode(text, add_bos=False)
    assert len(ids) == len(text.encode())  # the tiny vocab has no merges for these: one token per byte
    dec = tok.decoder()
    outs = [dec.add(t) for t in ids]
    assert outs == ["", "é", "", "", "", "😀", "", "", "日"]
    assert dec.flush() == ""
    assert "".join(tok.decode_stream(tok.encode("héllo 😀 wörld", add_bos=False))) == "héllo 😀 wörld"
    # never an unfinished character: every yielded piece is whole text
    assert all("\ufffd" not in s for s in tok.decode_stream(ids))
    # an unfinished character at the end comes out as U+FFFD on flush, not lost
    dec = tok.decoder()
    assert dec.add(ids[0]) == "" and dec.flush() == "\ufffd"
    # special tokens are left out unless asked for
    im_end = tok.encode("<|im_end|>")[0]
    assert tok.decoder().add(im_end) == "" and tok.decoder(special=True).add(im_end) == "<|im_end|>"


def test_names_the_engine_uses(make_model):
    tok = Tokenizer.from_gguf(make_model("qwen3moe", "Q8_0"))
    assert tok.eog_ids == tok.eot_ids
    dec = tok.incremental_decoder()
    assert "".join(dec.push(t) for t in tok.encode("wörld", add_bos=False)) + dec.flush() == "wörld"
