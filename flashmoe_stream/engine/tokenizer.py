"""Tokenizers built from GGUF metadata, token for token the same as llama.cpp's.

Two vocabulary kinds are handled:

* ``tokenizer.ggml.model = "gpt2"``: byte-level BPE. Text is cut at special tokens, each piece is
  split by the pre-tokenizer regexes named by ``tokenizer.ggml.pre``, every word is mapped to
  GPT-2's printable byte alphabet and merged pair by pair in merge-rank order.
* ``tokenizer.ggml.model = "llama"``: SentencePiece-style (Llama 1/2, Mistral, Mixtral). Spaces
  become ``▁``, a space is put in front of the text (``add_space_prefix``), characters are merged
  pair by pair preferring the highest scoring token, and characters with no token fall back to
  ``<0xNN>`` byte tokens.

Special tokens (CONTROL, USER_DEFINED, UNKNOWN types) are matched as whole tokens before any of
that, longest first, as llama.cpp does; with ``parse_special=False`` only USER_DEFINED ones are.
"""

from __future__ import annotations

import codecs
import heapq
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import regex

from ..errors import BadFileError, UnsupportedError

log = logging.getLogger(__name__)

# GGUF token types (gguf.TokenType), as stored in tokenizer.ggml.token_type.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_SPECIAL_TYPES = (CONTROL, USER_DEFINED, UNKNOWN)

# Token texts llama.cpp treats as end of generation wherever they appear in a vocabulary.
_EOG_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>",
    "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
)

# Pre-tokenizer regexes, applied one after the other: each splits the pieces the previous left,
# keeping the unmatched stretches as pieces too. `regex` gives \p{..} classes and a \s that is
# Unicode White_Space, which is what llama.cpp's own tables call whitespace.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")

PRE_TOKENIZERS: Mapping[str, tuple[str, ...]] = {
    "default": _DEFAULT,
    "llama3": (_LLAMA3,), "llama-v3": (_LLAMA3,), "llama-bpe": (_LLAMA3,), "falcon3": (_LLAMA3,),
    "pixtral": (_LLAMA3,),
    "qwen2": (_QWEN2,), "deepseek-r1-qwen": (_QWEN2,),
    "gpt-2": (_GPT2,), "gpt2": (_GPT2,), "phi-2": (_GPT2,), "jina-es": (_GPT2,), "jina-de": (_GPT2,),
    "mpt": (_GPT2,), "olmo": (_GPT2,), "jais": (_GPT2,), "trillion": (_GPT2,),
}
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"}  # whole-word vocab hit wins
_CLEAN_SPACES_OFF = {"qwen2", "deepseek-r1-qwen"}
_ADD_BOS_DEFAULT_ON = {"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"}


def byte_alphabet() -> dict[int, str]:
    """GPT-2's printable stand-in character for every byte value (byte-level BPE's alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return dict(sorted(table.items()))


def merge_pair(symbols: list[str] | tuple[str, ...], a: str, b: str) -> list[str]:
    """``symbols`` with every adjacent (a, b) replaced by a + b, left to right (one BPE merge)."""
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
            merged.append(a + b)
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


_BYTE_TO_CHAR = byte_alphabet()  # constant tables, never mutated
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _as_list(value: Any) -> list:
    return value.tolist() if hasattr(value, "tolist") else list(value)


class Tokenizer:
    """Text ↔ token ids for one model. Build with :meth:`from_gguf` or :meth:`from_metadata`."""

    def __init__(self, md: Mapping[str, Any]):
        model = md.get("tokenizer.ggml.model")
        if model is None:
            raise BadFileError("the GGUF has no tokenizer (tokenizer.ggml.model is missing); "
                               "use a GGUF converted with its vocabulary")
        model = str(model)
        if model not in ("gpt2", "llama"):
            raise UnsupportedError(f"tokenizer model {model!r} is not supported (only 'gpt2' byte-level BPE "
                                   "and 'llama' SentencePiece vocabularies are); use a model with one of those")
        if "tokenizer.ggml.tokens" not in md:
            raise BadFileError("the GGUF has no tokenizer.ggml.tokens; re-convert the model with its vocabulary")
        self.model = model
        self.tokens: list[str] = [str(t) for t in _as_list(md["tokenizer.ggml.tokens"])]
        n = len(self.tokens)
        types = md.get("tokenizer.ggml.token_type")
        self.token_types: list[int] = [int(t) for t in _as_list(types)] if types is not None else [NORMAL] * n
        if len(self.token_types) != n:
            raise BadFileError(f"tokenizer.ggml.token_type has {len(self.token_types)} entries for {n} tokens; "
                               "the file is inconsistent, re-convert it")
        self._token_to_id: dict[str, int] = {t: i for i, t in enumerate(self.tokens)}  # last one wins

        spm = model == "llama"
        self.pre = None
        self.clean_spaces = False
        self._ignore_merges = False
        if spm:
            add_bos, self.add_space_prefix = True, True
            bos, eos, unk = 1, 2, 0
            scores = md.get("tokenizer.ggml.scores")
            self.scores: list[float] = [float(s) for s in _as_list(scores)] if scores is not None else [0.0] * n
            if len(self.scores) != n:
                raise BadFileError(f"tokenizer.ggml.scores has {len(self.scores)} entries for {n} tokens; "
                                   "the file is inconsistent, re-convert it")
        else:
            add_bos, self.add_space_prefix = False, False
            bos, eos, unk = 11, 11, None
            pre = str(md.get("tokenizer.ggml.pre") or "default")
            if pre not in PRE_TOKENIZERS:
                log.warning("unknown pre-tokenizer %r; using the default GPT-2 style split, "
                            "so tokens may differ from the model's own tokenizer", pre)
                pre = "default"
            self.pre = pre
            self.clean_spaces = pre not in _CLEAN_SPACES_OFF
            self._ignore_merges = pre in _IGNORE_MERGES
            add_bos = pre in _ADD_BOS_DEFAULT_ON
            self._split_res = [regex.compile(p) for p in PRE_TOKENIZERS[pre]]
            merges = md.get("tokenizer.ggml.merges")
            if merges is None:
                raise BadFileError("a byte-level BPE vocabulary without tokenizer.ggml.merges; re-convert the model")
            self._ranks: dict[tuple[str, str], int] = {}
            for rank, m in enumerate(_as_list(merges)):
                pos = m.find(" ", 1)
                if pos < 0:
                    raise BadFileError(f"tokenizer.ggml.merges entry {rank} ({m!r}) is not two tokens; re-convert the model")
                self._ranks.setdefault((m[:pos], m[pos + 1:]), rank)
            self._bpe_cache: dict[str, list[int]] = {}

        def tid(key: str, default: int | None) -> int | None:
            v = md.get(key)
            v = default if v is None else int(v)
            return v if v is not None and 0 <= v < n else None

        self.bos_id: int | None = tid("tokenizer.ggml.bos_token_id", bos)
        self.eos_id: int | None = tid("tokenizer.ggml.eos_token_id", eos)
        self.unk_id: int | None = tid("tokenizer.ggml.unknown_token_id", unk)
        self.eot_id: int | None = tid("tokenizer.ggml.eot_token_id", None)
        self.eom_id: int | None = tid("tokenizer.ggml.eom_token_id", None)
        self.pad_id: int | None = tid("tokenizer.ggml.padding_token_id", None)
        self.add_bos: bool = bool(md.get("tokenizer.ggml.add_bos_token", add_bos))
        self.add_eos: bool = bool(md.get("tokenizer.ggml.add_eos_token", False))
        if spm:
            self.add_space_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))

        eog = {i for i in (self.eos_id, self.eot_id, self.eom_id) if i is not None}
        for text in _EOG_TEXTS:
            i = self._token_to_id.get(text)
            if i is not None:
                eog.add(i)
                if self.token_types[i] != CONTROL:  # llama.cpp makes them control tokens
                    self.token_types[i] = CONTROL
        self.eot_ids: frozenset[int] = frozenset(eog)

        # Special tokens matched in text before anything else, longest first.
        self._specials = sorted((i for i, t in enumerate(self.token_types) if t in _SPECIAL_TYPES and self.tokens[i]),
                                key=lambda i: -len(self.tokens[i].encode()))
        self._pieces: list[bytes] = [self._piece(i) for i in range(n)]

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any]) -> Tokenizer:
        """The tokenizer described by a GGUF metadata mapping (``GGUFModel.metadata`` or a plain dict)."""
        return cls(md)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        """The tokenizer of the GGUF file at ``path`` (the first file of a split set is enough)."""
        from ..gguf_file import open_gguf

        return cls(open_gguf(path).metadata)

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return f"Tokenizer(model={self.model!r}, pre={self.pre!r}, n_vocab={self.n_vocab})"

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True,
               add_eos: bool | None = None) -> list[int]:
        """Token ids of ``text``.

        ``add_bos``/``add_eos``: None follows the model (``tokenizer.ggml.add_bos_token`` /
        ``add_eos_token``); ``parse_special``: match control tokens such as ``<|im_start|>`` written
        in the text as single tokens (user-defined tokens are always matched).
        """
        add_bos = self.add_bos if add_bos is None else add_bos
        add_eos = self.add_eos if add_eos is None else add_eos
        out: list[int] = []
        if add_bos:
            if self.bos_id is None:
                raise BadFileError("the model has no BOS token but one was asked for; pass add_bos=False")
            out.append(self.bos_id)
        prev_special = True
        for frag in self._partition(text, parse_special):
            if isinstance(frag, int):
                out.append(frag)
                prev_special = True
            elif self.model == "llama":
                s = (" " if self.add_space_prefix and prev_special else "") + frag
                self._spm(s.replace(" ", "\u2581"), out)
                prev_special = False
            else:
                for word in self._pretokenize(frag):
                    out.extend(self._bpe_word(word))
        if add_eos:
            if self.eos_id is None:
                raise BadFileError("the model has no EOS token but one was asked for; pass add_eos=False")
            out.append(self.eos_id)
        return out

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """``text`` cut into raw strings and special token ids, specials taken longest first."""
        frags: list[str | int] = [text] if text else []
        for tid in self._specials:
            if not parse_special and self.token_types[tid] != USER_DEFINED:
                continue
            tok = self.tokens[tid]
            new: list[str | int] = []
            changed = False
            for f in frags:
                if isinstance(f, int) or tok not in f:
                    new.append(f)
                    continue
                changed = True
                parts = f.split(tok)
                for k, p in enumerate(parts):
                    if k:
                        new.append(tid)
                    if p:
                        new.append(p)
            if changed:
                frags = new
        return frags

    def _pretokenize(self, text: str) -> list[str]:
        pieces = [text]
        for rx in self._split_res:
            out = []
            for p in pieces:
                start = 0
                for m in rx.finditer(p):
                    if m.start() > start:
                        out.append(p[start:m.start()])
                    if m.end() > m.start():
                        out.append(m.group())
                    start = m.end()
                if start < len(p):
                    out.append(p[start:])
            pieces = out
        return pieces

    def _bpe_word(self, word: str) -> list[int]:
        cached = self._bpe_cache.get(word)
        if cached is not None:
            return cached
        chars = "".join(_BYTE_TO_CHAR[b] for b in word.encode("utf-8"))
        whole = self._token_to_id.get(chars) if self._ignore_merges else None
        if whole is not None:
            ids = [whole]
        else:
            syms = list(chars)
            ranks = self._ranks
            while len(syms) > 1:
                best, best_rank = None, None
                for pair in zip(syms, syms[1:]):
                    r = ranks.get(pair)
                    if r is not None and (best_rank is None or r < best_rank):
                        best, best_rank = pair, r
                if best is None:
                    break
                syms = merge_pair(syms, *best)
            ids = []
            for s in syms:
                t = self._token_to_id.get(s)
                if t is not None:
                    ids.append(t)
                else:  # as llama.cpp: the symbol's single bytes, where the vocabulary has them
                    ids.extend(self._token_to_id[c] for c in s if c in self._token_to_id)
        if len(self._bpe_cache) < 65536:
            self._bpe_cache[word] = ids
        return ids

    def _spm(self, text: str, out: list[int]) -> None:
        """llama.cpp's SentencePiece merge: highest scoring adjacent pair first, leftmost on ties."""
        if not text:
            return
        syms = list(text)  # one symbol per character
        n = len(syms)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        heap: list[tuple[float, int, int, int]] = []

        def push(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            s = syms[left] + syms[right]
            t = self._token_to_id.get(s)
            if t is not None:
                heapq.heappush(heap, (-self.scores[t], left, right, len(s)))

        for i in range(1, n):
            push(i - 1, i)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            if not syms[left] or not syms[right] or len(syms[left]) + len(syms[right]) != size:
                continue
            syms[left] += syms[right]
            syms[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            push(prev[left], left)
            push(left, nxt[left])
        i = 0
        while i != -1:
            s = syms[i]
            t = self._token_to_id.get(s)
            if t is not None:
                out.append(t)
            else:
                for b in s.encode("utf-8"):
                    out.append(self._byte_token(b))
            i = nxt[i]

    def _byte_token(self, b: int) -> int:
        t = self._token_to_id.get(f"<0x{b:02X}>")
        if t is None:
            t = self._token_to_id.get(chr(b)) if b < 128 else None
        if t is None:
            t = self.unk_id
        if t is None:
            raise BadFileError(f"the vocabulary has no byte token <0x{b:02X}> and no unknown token to fall back on; "
                               "the file's tokenizer is incomplete")
        return t

    # ------------------------------------------------------------------ decoding

    def _piece(self, tid: int) -> bytes:
        """What ``tid`` stands for when special tokens are rendered (the cached form)."""
        text, typ = self.tokens[tid], self.token_types[tid]
        if typ in _SPECIAL_TYPES:
            return text.encode("utf-8")
        if self.model == "llama":
            if typ == BYTE:
                return bytes([int(text[3:5], 16)]) if len(text) == 6 and text.startswith("<0x") else b""
            if typ == NORMAL:
                return text.replace("\u2581", " ").encode("utf-8")
            return b""
        if typ == NORMAL:
            out = bytearray()
            for c in text:
                b = _CHAR_TO_BYTE.get(c)
                if b is not None:
                    out.append(b)
                else:  # as llama.cpp marks a character outside the byte alphabet
                    u = c.encode("utf-8")
                    out += b"[UNK_BYTE_0x" + u.hex().encode() + text.encode("utf-8") + b"]"
            return bytes(out)
        return b""

    def token_to_piece(self, tid: int, special: bool = True) -> bytes:
        """The bytes token ``tid`` stands for (possibly part of a UTF-8 character).

        ``special=False`` renders control and unknown tokens as nothing, like llama.cpp.
        """
        if not 0 <= tid < len(self.tokens):
            raise ValueError(f"token id {tid} is outside the vocabulary of {len(self.tokens)}")
        if not special and self.token_types[tid] in (CONTROL, UNKNOWN):
            return b""
        return self._pieces[tid]

    def decode_bytes(self, ids: Iterable[int], special: bool = True) -> bytes:
        """The bytes of ``ids`` joined; for SentencePiece vocabularies the space put in front by
        ``add_space_prefix`` is taken off the first text token (after a leading BOS)."""
        ids = list(ids)
        out = b"".join(self.token_to_piece(t, special) for t in ids)
        if self.model == "llama" and self.add_space_prefix:
            first = 1 if ids and ids[0] == self.bos_id else 0
            if first < len(ids):
                head = b"".join(self.token_to_piece(t, special) for t in ids[:first])
                if out[len(head):len(head) + 1] == b" ":
                    out = head + out[len(head) + 1:]
        return out

    def decode(self, ids: Iterable[int], special: bool = True) -> str:
        """Text of ``ids``; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids, special).decode("utf-8", errors="replace")

    def decoder(self, special: bool = False, strip_leading_space: bool = False) -> IncrementalDecoder:
        """An :class:`IncrementalDecoder` for printing tokens as they are generated."""
        return IncrementalDecoder(self, special=special, strip_leading_space=strip_leading_space)

    incremental_decoder = decoder  # the name engine.py uses

    @property
    def eog_ids(self) -> frozenset[int]:
        """Same as ``eot_ids`` (llama.cpp's name: end-of-generation tokens)."""
        return self.eot_ids

    def decode_stream(self, ids: Iterable[int], special: bool = False) -> Iterator[str]:
        """Text pieces for ``ids`` as they arrive, each only once its UTF-8 characters are complete."""
        dec = self.decoder(special=special)
        for t in ids:
            s = dec.add(t)
            if s:
                yield s
        s = dec.flush()
        if s:
            yield s


class IncrementalDecoder:
    """Token ids in, text out, holding back a UTF-8 character until all its bytes have come.

    ``add(id)`` returns the text that became complete (often ``""``); ``flush()`` returns what is
    left at the end, with an unfinished character as U+FFFD. Invalid bytes become U+FFFD at once.
    """

    def __init__(self, tokenizer: Tokenizer, special: bool = False, strip_leading_space: bool = False):
        self._tok = tokenizer
        self._special = special
        self._strip = strip_leading_space
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, tid: int) -> str:
        piece = self._tok.token_to_piece(tid, self._special)
        if self._strip and piece:
            self._strip = False
            if piece.startswith(b" "):
                piece = piece[1:]
        return self._utf8.decode(piece)

    push = add  # the name engine.py uses

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
