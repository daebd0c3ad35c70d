"""SentencePiece-style vocabularies (tokenizer.ggml.model = "llama", as Llama 2 / Mixtral GGUFs have)."""

import pytest
from gguf import GGUFValueType as T

from flashmoe_stream.engine import Tokenizer

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
S = "\u2581"
PIECES = [S, "e", "t", "h", "l", "o", "r", "d", "w", "a", "i", "n", "s", "é", "日",
          S + "t", "he", S + "the", "ll", "llo", S + "he", S + "hello", "or", "ld", S + "w", S + "wor", S + "world",
          "in", "ing", S + "a", S + "s", "an", S + "an", "st", S + "st", "é" + "t", S + S, S + S + S, "12", "3"]


def spm_metadata():
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + PIECES + ["<tool>"]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * len(PIECES) + [USER_DEFINED]
    # scores: merged pieces are generally likelier the longer they are, with a deterministic twist
    scores = [0.0] * 259 + [-(20 - len(p)) - ((i * 7) % 5) / 10 for i, p in enumerate(PIECES)] + [0.0]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True}


TEXTS = ["", "the hello world", "Hello World", "  two  spaces", "héllo wörld étant", "日本 and 中文", "😀 emoji",
         "a<s>b</s>c", "call <tool> now", "line\nbreak\ttab", "123 12 3", "<unk> stays text?", "   "]


def test_spm_from_metadata():
    tok = Tokenizer.from_metadata(spm_metadata())
    ids = tok.encode("the hello world")
    assert [tok.tokens[i] for i in ids] == ["<s>", S + "the", S + "hello", S + "world"]
    assert tok.decode(ids, special=False) == "the hello world"
    # byte fallback: characters with no piece are spelled as <0xNN> tokens
    assert [tok.tokens[i] for i in tok.encode("ü", add_bos=False)] == [S, "<0xC3>", "<0xBC>"]
    for text in TEXTS:
        if not any(t in text for t in ("<s>", "</s>", "<tool>", "<unk>")):  # after a special a space is put in again
            assert tok.decode(tok.encode(text, add_bos=False)) == text
    assert tok.eot_ids == {2} and tok.bos_id == 1 and tok.add_space_prefix


def test_spm_space_prefix_can_be_turned_off():
    md = spm_metadata() | {"tokenizer.ggml.add_space_prefix": False}
    tok = Tokenizer.from_metadata(md)
    assert [tok.tokens[i] for i in tok.encode("hello", add_bos=False)] == ["he", "llo"]
    assert tok.decode(tok.encode(" hello", add_bos=False)) == " hello"


@pytest.mark.llama_cpp
def test_spm_matches_llama_cpp(vocab_gguf, llama_cpp):
    md = spm_metadata()
    path = vocab_gguf("llama", {
        "tokenizer.ggml.model": ("llama", T.STRING),
        "tokenizer.ggml.pre": None, "tokenizer.ggml.merges": None, "tokenizer.chat_template": None,
        "tokenizer.ggml.padding_token_id": None,
        "tokenizer.ggml.tokens": (md["tokenizer.ggml.tokens"], T.ARRAY, T.STRING),
        "tokenizer.ggml.scores": (md["tokenizer.ggml.scores"], T.ARRAY, T.FLOAT32),
        "tokenizer.ggml.token_type": (md["tokenizer.ggml.token_type"], T.ARRAY, T.INT32),
        "tokenizer.ggml.bos_token_id": (1, T.UINT32), "tokenizer.ggml.eos_token_id": (2, T.UINT32),
        "tokenizer.ggml.unknown_token_id": (0, T.UINT32), "tokenizer.ggml.add_bos_token": (True, T.BOOL),
    })
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    tok = Tokenizer.from_gguf(path)
    for text in TEXTS:
        for add_bos in (True, False):
            for special in (True, False):
                ref = llm.tokenize(text.encode(), add_bos=add_bos, special=special)
                assert tok.encode(text, add_bos=add_bos, parse_special=special) == ref, (text, add_bos, special)
        ids = tok.encode(text, add_bos=False)
        assert b"".join(tok.token_to_piece(i) for i in ids) == llm.detokenize(ids, special=True), text
    assert tok.eot_ids == {t for t in range(tok.n_vocab) if llama_cpp.llama_vocab_is_eog(llm._model.vocab, t)}
