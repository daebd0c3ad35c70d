"""Synthetic real-architecture GGUF models: llama.cpp's tensor names, shapes and metadata, random weights.

Quantised tensors are written as valid random blocks (``quant.random_blocks``), never quantised from
floats, so tens of GB go out at disk speed. The weights are zero-mean and scaled so activations stay
in range through every layer and routing varies from token to token.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q, GGUFWriter, LlamaFileType, TokenType

from . import quant
from .engine.tokenizer import byte_alphabet, merge_pair
from .io.writer import AppendWriter, fsync_path
from .errors import UnsupportedError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_vocab: int
    n_ctx: int
    rope_theta: float
    rms_eps: float
    # deepseek2 (MLA, leading dense blocks, shared experts, grouped sigmoid routing, YaRN); unused elsewhere
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_rope_dim: int = 0
    v_head_dim: int = 0
    n_dense_lead: int = 0
    n_ff: int = 0
    n_shared: int = 0
    n_groups: int = 0
    n_group_used: int = 0
    gating: str = "softmax"
    weights_scale: float = 1.0
    weights_norm: bool = True
    yarn_factor: float = 0.0  # 0: no RoPE scaling
    yarn_orig_ctx: int = 0
    yarn_mscale_all_dim: float = 0.0
    mla_split: bool = True  # split attn_k_b/attn_v_b (current converters) or the legacy attn_kv_b
    out_scale: float = 0.5  # std of the blocks' output projections (x fan-in^-0.5): how much a layer moves the residual


# Real dimensions of the published models (from their config.json); `tiny` is a few MB.
PRESETS: dict[str, Preset] = {
    "tiny": Preset(4, 256, 4, 2, 64, 8, 2, 256, 512, 4096, 1e6, 1e-6),
    "qwen3-30b-a3b": Preset(48, 2048, 32, 4, 128, 128, 8, 768, 151936, 40960, 1e6, 1e-6),
    "qwen3-235b-a22b": Preset(94, 4096, 64, 4, 128, 128, 8, 1536, 151936, 40960, 1e6, 1e-6),
    "mixtral-8x7b": Preset(32, 4096, 32, 8, 128, 8, 2, 14336, 32000, 32768, 1e6, 1e-5),
}
# deepseek2: head_dim is the MLA q/k head (qk_nope + qk_rope). `tiny` is V3-shaped (q_lora, sigmoid routing
# with selection bias, expert groups, weight scale, a leading dense block), `tiny-lite` V2-Lite-shaped. The
# tiny ones move the residual less per layer (out_scale 0.15): with 8-bit activation rounding a random model
# amplifies float noise, and a calmer one keeps llama.cpp comparisons above that noise floor.
DEEPSEEK2_PRESETS: dict[str, Preset] = {
    "tiny": Preset(4, 256, 4, 1, 96, 16, 4, 256, 512, 4096, 10000.0, 1e-6, q_lora_rank=256, kv_lora_rank=256,
                   qk_rope_dim=32, v_head_dim=64, n_dense_lead=1, n_ff=512, n_shared=1, n_groups=4, n_group_used=2,
                   gating="sigmoid", weights_scale=2.5, weights_norm=True, yarn_factor=4.0, yarn_orig_ctx=256,
                   yarn_mscale_all_dim=1.0, out_scale=0.15),
    "tiny-lite": Preset(4, 256, 4, 1, 96, 8, 2, 256, 512, 4096, 10000.0, 1e-6, q_lora_rank=0, kv_lora_rank=256,
                        qk_rope_dim=32, v_head_dim=64, n_dense_lead=1, n_ff=512, n_shared=2, gating="softmax",
                        weights_norm=False, yarn_factor=4.0, yarn_orig_ctx=256, yarn_mscale_all_dim=0.707,
                        out_scale=0.15),
    "deepseek-v2-lite": Preset(27, 2048, 16, 1, 192, 64, 6, 1408, 102400, 163840, 10000.0, 1e-6, q_lora_rank=0,
                               kv_lora_rank=512, qk_rope_dim=64, v_head_dim=128, n_dense_lead=1, n_ff=10944,
                               n_shared=2, n_groups=1, n_group_used=1, gating="softmax", weights_norm=False,
                               yarn_factor=40.0, yarn_orig_ctx=4096, yarn_mscale_all_dim=0.707),
    "deepseek-v3": Preset(61, 7168, 128, 1, 192, 256, 8, 2048, 129280, 163840, 10000.0, 1e-6, q_lora_rank=1536,
                          kv_lora_rank=512, qk_rope_dim=64, v_head_dim=128, n_dense_lead=3, n_ff=18432, n_shared=1,
                          n_groups=8, n_group_used=4, gating="sigmoid", weights_scale=2.5, weights_norm=True,
                          yarn_factor=40.0, yarn_orig_ctx=4096, yarn_mscale_all_dim=1.0),
}
ARCHS = ("qwen3moe", "llama", "deepseek2")


def presets_for(arch: str) -> dict[str, Preset]:
    return DEEPSEEK2_PRESETS if arch == "deepseek2" else PRESETS



@dataclass(frozen=True)
class _Mix:
    """Which ggml type each kind of matrix gets (norms and routers are always F32)."""

    dense: Q  # attention, embeddings
    experts: Q  # routed experts' gate and up
    down: Q  # ffn_down (experts too)
    output: Q
    ftype: LlamaFileType


# --qtype: a single ggml type for every matrix, or one of llama.cpp's mixes.
MIXES: dict[str, _Mix] = {
    "Q4_K_M": _Mix(Q.Q4_K, Q.Q4_K, Q.Q6_K, Q.Q6_K, LlamaFileType.MOSTLY_Q4_K_M),
    "Q5_K_M": _Mix(Q.Q5_K, Q.Q5_K, Q.Q6_K, Q.Q6_K, LlamaFileType.MOSTLY_Q5_K_M),
    # llama.cpp's MXFP4_MOE: MXFP4 routed experts, Q8_0 for everything else
    "MXFP4": _Mix(Q.Q8_0, Q.MXFP4, Q.MXFP4, Q.Q8_0, LlamaFileType.MOSTLY_MXFP4_MOE),
}
_FTYPE_OF = {
    Q.F32: LlamaFileType.ALL_F32, Q.F16: LlamaFileType.MOSTLY_F16, Q.BF16: LlamaFileType.MOSTLY_BF16,
    Q.Q8_0: LlamaFileType.MOSTLY_Q8_0, Q.Q4_0: LlamaFileType.MOSTLY_Q4_0, Q.Q4_1: LlamaFileType.MOSTLY_Q4_1,
    Q.Q5_0: LlamaFileType.MOSTLY_Q5_0, Q.Q5_1: LlamaFileType.MOSTLY_Q5_1, Q.Q2_K: LlamaFileType.MOSTLY_Q2_K,
    Q.Q3_K: LlamaFileType.MOSTLY_Q3_K_M, Q.Q4_K: LlamaFileType.MOSTLY_Q4_K_S, Q.Q5_K: LlamaFileType.MOSTLY_Q5_K_S,
    Q.Q6_K: LlamaFileType.MOSTLY_Q6_K, Q.IQ4_NL: LlamaFileType.MOSTLY_IQ4_NL, Q.IQ4_XS: LlamaFileType.MOSTLY_IQ4_XS,
}
QTYPES = tuple(MIXES) + tuple(t.name for t in _FTYPE_OF)


def _type_plan(qtype: str) -> _Mix:
    if qtype in MIXES:
        return MIXES[qtype]
    try:
        t = Q[qtype]
    except KeyError:
        raise UnsupportedError(f"unknown --qtype {qtype!r} (choose from {', '.join(QTYPES)})") from None
    if t not in _FTYPE_OF:
        raise UnsupportedError(f"--qtype {qtype} is not supported by synth (choose from {', '.join(QTYPES)})")
    return _Mix(t, t, t, t, _FTYPE_OF[t])


# ---------------------------------------------------------------------------------------------
# A small byte-level BPE tokenizer (GPT-2 byte alphabet), trained on a built-in paragraph.

_CORPUS = """\
Mixture-of-experts language models route every token to a few experts out of many, so only a small
part of the weights is needed for each token. The rest can stay on a fast disk and be streamed in
when the router asks for it. A good cache keeps the experts that will be used again soon, and a good
prefetcher reads the next layer's experts while the current layer computes. What's AI? It is the
study of programs that learn from data. The quick brown fox jumps over the lazy dog. def main():
    return sum(x * x for x in range(10))
In 2024 and 2025 the largest open models had hundreds of billions of parameters.
"""
_PRETOKENIZE = re.compile(r"'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]+| ?[0-9]{1,3}| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_bpe(text: str, n_merges: int, split: Callable[[str], Iterable[str]] | None = None
              ) -> tuple[list[str], list[str]]:
    """Byte-level BPE: returns (tokens, merges); tokens are the 256 bytes then one per merge.

    ``split`` cuts the text into words (default: a GPT-2 style regex); merges never cross words. Each step
    merges the most frequent adjacent pair (ties: the larger pair); pair counts are kept up to date
    incrementally, so only the words that contain the merged pair are revisited.
    """
    alpha = byte_alphabet()
    words = Counter(tuple(alpha[b] for b in w.encode()) for w in (split or _PRETOKENIZE.findall)(text))
    syms = [list(w) for w in words]
    counts = list(words.values())
    pairs: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for i, w in enumerate(syms):
        for pair in zip(w, w[1:]):
            pairs[pair] += counts[i]
            where.setdefault(pair, set()).add(i)
    tokens, merges = list(alpha.values()), []
    for _ in range(n_merges):
        if not pairs:
            break
        (a, b), _count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append(f"{a} {b}")
        tokens.append(a + b)
        for i in where.pop((a, b), ()):
            w, n = syms[i], counts[i]
            for pair in zip(w, w[1:]):
                pairs[pair] -= n
                if pairs[pair] <= 0:
                    del pairs[pair]
            w = syms[i] = merge_pair(w, a, b)
            for pair in zip(w, w[1:]):
                pairs[pair] += n
                where.setdefault(pair, set()).add(i)
    return tokens, merges


def _add_tokenizer(w: GGUFWriter, arch: str, n_vocab: int, bpe: tuple[list[str], list[str]] | None = None) -> None:
    """The tokenizer: ``bpe`` = (tokens, merges) from train_bpe, or one trained on the built-in paragraph."""
    if bpe is None:
        bpe = train_bpe(_CORPUS, max(0, min(n_vocab - 256 - len(SPECIAL_TOKENS), 256)))
    tokens, merges = list(bpe[0]), list(bpe[1])
    types = [TokenType.NORMAL] * len(tokens)
    special_ids = {}
    for s in SPECIAL_TOKENS:
        special_ids[s] = len(tokens)
        tokens.append(s)
        types.append(TokenType.CONTROL)
    if len(tokens) > n_vocab:
        raise UnsupportedError(f"vocabulary of {n_vocab} is too small for the byte-level tokenizer (needs {len(tokens)})")
    for i in range(n_vocab - len(tokens)):  # as llama.cpp's converter pads a vocab to the embedding rows
        tokens.append(f"[PAD{i}]")
        types.append(TokenType.UNUSED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if arch == "qwen3moe" else "llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(special_ids["<|endoftext|>"])
    w.add_eos_token_id(special_ids["<|im_end|>"])
    w.add_pad_token_id(special_ids["<|endoftext|>"])
    w.add_add_bos_token(arch != "qwen3moe")
    w.add_chat_template(CHAT_TEMPLATE)


# ---------------------------------------------------------------------------------------------
# Tensors


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]  # torch order
    qtype: Q
    std: float  # 0 → a norm weight (ones)


def _tensor_plan(arch: str, p: Preset, mix: _Mix) -> list[_Tensor]:
    e, hd, ff = p.n_embd, p.head_dim, p.n_ff_exp
    qd, kvd = p.n_head * hd, p.n_head_kv * hd

    def mat(name: str, shape: tuple[int, ...], qtype: Q, std: float) -> _Tensor:
        return _Tensor(name, shape, _fit(qtype, shape[-1]), std)

    main = mix.dense
    out = [mat("token_embd.weight", (p.n_vocab, e), main, 1.0)]
    if arch == "deepseek2":
        return out + _deepseek2_layers(p, mix, mat) + [
            _Tensor("output_norm.weight", (e,), Q.F32, 0.0), mat("output.weight", (p.n_vocab, e), mix.output, e ** -0.5)]
    for i in range(p.n_layer):
        b = f"blk.{i}."
        out += [
            _Tensor(b + "attn_norm.weight", (e,), Q.F32, 0.0),
            mat(b + "attn_q.weight", (qd, e), main, e ** -0.5),
            mat(b + "attn_k.weight", (kvd, e), main, e ** -0.5),
            mat(b + "attn_v.weight", (kvd, e), main, e ** -0.5),
            mat(b + "attn_output.weight", (e, qd), main, 0.5 * qd ** -0.5),
        ]
        if arch == "qwen3moe":
            out += [_Tensor(b + "attn_q_norm.weight", (hd,), Q.F32, 0.0), _Tensor(b + "attn_k_norm.weight", (hd,), Q.F32, 0.0)]
        out += [
            _Tensor(b + "ffn_norm.weight", (e,), Q.F32, 0.0),
            _Tensor(b + "ffn_gate_inp.weight", (p.n_expert, e), Q.F32, 2.0 * e ** -0.5),
            mat(b + "ffn_gate_exps.weight", (p.n_expert, ff, e), mix.experts, e ** -0.5),
            mat(b + "ffn_up_exps.weight", (p.n_expert, ff, e), mix.experts, e ** -0.5),
            mat(b + "ffn_down_exps.weight", (p.n_expert, e, ff), mix.down, ff ** -0.5),
        ]
    out += [_Tensor("output_norm.weight", (e,), Q.F32, 0.0), mat("output.weight", (p.n_vocab, e), mix.output, e ** -0.5)]
    return out


def _deepseek2_layers(p: Preset, mix: _Mix, mat) -> list[_Tensor]:
    """llama.cpp's deepseek2 tensors (llama_model_deepseek2::load_arch_tensors), in torch order."""
    e, H, hd, r, rope, v = p.n_embd, p.n_head, p.head_dim, p.kv_lora_rank, p.qk_rope_dim, p.v_head_dim
    nope, ff, main = hd - rope, p.n_ff_exp, mix.dense
    out: list[_Tensor] = []
    for i in range(p.n_layer):
        b = f"blk.{i}."
        out.append(_Tensor(b + "attn_norm.weight", (e,), Q.F32, 0.0))
        if p.q_lora_rank:
            out += [mat(b + "attn_q_a.weight", (p.q_lora_rank, e), main, e ** -0.5),
                    _Tensor(b + "attn_q_a_norm.weight", (p.q_lora_rank,), Q.F32, 0.0),
                    mat(b + "attn_q_b.weight", (H * hd, p.q_lora_rank), main, p.q_lora_rank ** -0.5)]
        else:
            out.append(mat(b + "attn_q.weight", (H * hd, e), main, e ** -0.5))
        out += [mat(b + "attn_kv_a_mqa.weight", (r + rope, e), main, e ** -0.5),
                _Tensor(b + "attn_kv_a_norm.weight", (r,), Q.F32, 0.0)]
        if p.mla_split:  # ggml {nope, r, H} and {r, v, H}: per head, latent → k_nope transposed, latent → v
            out += [mat(b + "attn_k_b.weight", (H, r, nope), main, r ** -0.5),
                    mat(b + "attn_v_b.weight", (H, v, r), main, r ** -0.5)]
        else:
            out.append(mat(b + "attn_kv_b.weight", (H * (nope + v), r), main, r ** -0.5))
        out += [mat(b + "attn_output.weight", (e, H * v), main, p.out_scale * (H * v) ** -0.5),
                _Tensor(b + "ffn_norm.weight", (e,), Q.F32, 0.0)]
        if i < p.n_dense_lead:
            out += [mat(b + "ffn_gate.weight", (p.n_ff, e), mix.experts, e ** -0.5),
                    mat(b + "ffn_up.weight", (p.n_ff, e), mix.experts, e ** -0.5),
                    mat(b + "ffn_down.weight", (e, p.n_ff), mix.down, p.out_scale * p.n_ff ** -0.5)]
            continue
        # sigmoid scores saturate: a smaller router spread keeps the choice clear of near-ties
        router_std = (1.0 if p.gating == "sigmoid" else 2.0) * e ** -0.5
        out.append(_Tensor(b + "ffn_gate_inp.weight", (p.n_expert, e), Q.F32, router_std))
        if p.gating == "sigmoid":
            out.append(_Tensor(b + "exp_probs_b.bias", (p.n_expert,), Q.F32, 0.05))
        out += [mat(b + "ffn_gate_exps.weight", (p.n_expert, ff, e), mix.experts, e ** -0.5),
                mat(b + "ffn_up_exps.weight", (p.n_expert, ff, e), mix.experts, e ** -0.5),
                mat(b + "ffn_down_exps.weight", (p.n_expert, e, ff), mix.down, p.out_scale * ff ** -0.5)]
        if p.n_shared:
            fs = ff * p.n_shared
            out += [mat(b + "ffn_gate_shexp.weight", (fs, e), mix.experts, e ** -0.5),
                    mat(b + "ffn_up_shexp.weight", (fs, e), mix.experts, e ** -0.5),
                    mat(b + "ffn_down_shexp.weight", (e, fs), mix.down, p.out_scale * fs ** -0.5)]
    return out


def _fit(qtype: Q, row: int) -> Q:
    """llama.cpp's fallback when a row is not a whole number of blocks of the asked type."""
    for t in (qtype, Q.Q8_0, Q.F16):
        if row % quant.block_size(t)[0] == 0:
            if t != qtype:
                log.info("rows of %d elements do not fit %s blocks: using %s", row, qtype.name, t.name)
            return t
    return Q.F32


def _chunk_jobs(t: _Tensor, seed: int, index: int, chunk_bytes: int):
    """Functions that each make one piece (about ``chunk_bytes``) of the tensor's bytes.

    Each piece has its own random stream (seed, tensor, piece), so pieces can be made in parallel
    and the file is the same whatever the order they are made in.
    """
    if t.std == 0.0:
        return [lambda: np.ones(t.shape, np.float32).view(np.uint8).reshape(-1)]
    if t.qtype == Q.F32:
        rng = np.random.default_rng([seed, index])
        return [lambda: rng.normal(0.0, t.std, size=t.shape).astype(np.float32).view(np.uint8).reshape(-1)]
    row = t.shape[-1]
    n_rows = int(np.prod(t.shape[:-1], dtype=np.int64))
    step = max(1, chunk_bytes // quant.nbytes(t.qtype, (row,)))

    def job(no: int, rows: int):
        return lambda: quant.random_blocks(t.qtype, rows * row, t.std, np.random.default_rng([seed, index, no]))

    return [job(no, min(step, n_rows - start)) for no, start in enumerate(range(0, n_rows, step))]


# ---------------------------------------------------------------------------------------------


@dataclass
class SynthResult:
    paths: list[Path]
    nbytes: int
    seconds: float

    @property
    def gb_per_s(self) -> float:
        return self.nbytes / max(self.seconds, 1e-9) / 1e9


def synth(out: str | os.PathLike, arch: str = "qwen3moe", preset: str = "tiny", qtype: str = "Q8_0",
          layers: int | None = None, split_size: int = 0, seed: int = 0, progress: bool = False,
          metadata_only: bool = False, **overrides) -> SynthResult:
    """Write a synthetic model to ``out`` (split into ``-0000k-of-0000n`` files when ``split_size`` > 0).

    Files appear under their final names only once complete (written under a temporary folder beside
    them, fsynced, then renamed). ``overrides`` replace preset fields (e.g. ``n_expert=16``).
    ``metadata_only``: the header (metadata and tensor infos with real shapes and types) and a sparse,
    all-zero data section — full-size models for the planner (``flashmoe inspect``) in no disk space.
    """
    if arch not in ARCHS:
        raise UnsupportedError(f"synth cannot write architecture {arch!r} (choose from {', '.join(ARCHS)})")
    presets = presets_for(arch)
    if preset not in presets:
        raise UnsupportedError(f"unknown preset {preset!r} for {arch} (choose from {', '.join(presets)})")
    p = replace(presets[preset], **({"n_layer": layers} if layers else {}), **overrides)
    if arch == "deepseek2" and p.n_dense_lead >= p.n_layer:
        raise UnsupportedError(f"--layers {p.n_layer}: a {preset} model needs more than its {p.n_dense_lead} "
                               "leading dense layers to have routed experts")
    mix = _type_plan(qtype)
    out = Path(out)
    tensors = _tensor_plan(arch, p, mix)

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        w = GGUFWriter(tmp / out.name, arch, split_max_size=split_size)
        _add_metadata(w, arch, p, mix.ftype, f"synthetic {arch} {preset} {qtype}")
        for t in tensors:
            # a non-uint8 dtype tells gguf that the shape counts elements, not bytes
            w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), quant.nbytes(t.qtype, t.shape), raw_dtype=t.qtype)
        total = sum(quant.nbytes(t.qtype, t.shape) for t in tensors)
        t0 = time.perf_counter()
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        files = [Path(f.name) for f in w.fout]
        starts = []
        for f in w.fout:  # gguf wrote the headers; the data goes through our page-aligned writer
            f.flush()
            starts.append(f.tell())
            f.close()
        if metadata_only:
            _write_sparse(files, starts, w, {t.name: t for t in tensors})
        else:
            _write_data(files, starts, w, {t.name: (i, t) for i, t in enumerate(tensors)}, seed, total, progress)
        seconds = time.perf_counter() - t0
        finals = [out.parent / f.name for f in files]
        for f, final in reversed(list(zip(files, finals))):  # the first shard appears last
            os.replace(f, final)
        fsync_path(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return SynthResult(finals, total, seconds)


def _add_metadata(w: GGUFWriter, arch: str, p: Preset, ftype: LlamaFileType, name: str,
                  bpe: tuple[list[str], list[str]] | None = None) -> None:
    w.add_name(name)
    w.add_file_type(ftype)
    w.add_quantization_version(2)
    w.add_context_length(p.n_ctx)
    w.add_embedding_length(p.n_embd)
    w.add_block_count(p.n_layer)
    w.add_head_count(p.n_head)
    # legacy deepseek2 files (attn_kv_b) are plain MHA: one KV head per head; the split layout is MQA over the latent
    w.add_head_count_kv(p.n_head if arch == "deepseek2" and not p.mla_split else p.n_head_kv)
    w.add_rope_freq_base(p.rope_theta)
    w.add_layer_norm_rms_eps(p.rms_eps)
    w.add_expert_count(p.n_expert)
    w.add_expert_used_count(p.n_expert_used)
    if arch == "deepseek2":
        _add_deepseek2_metadata(w, p)
    elif arch == "qwen3moe":
        w.add_key_length(p.head_dim)
        w.add_value_length(p.head_dim)
        w.add_expert_feed_forward_length(p.n_ff_exp)
        w.add_feed_forward_length(p.n_ff_exp * p.n_expert_used)
    else:
        w.add_vocab_size(p.n_vocab)
        w.add_rope_dimension_count(p.head_dim)
        w.add_feed_forward_length(p.n_ff_exp)
    _add_tokenizer(w, arch, p.n_vocab, bpe)


def _add_deepseek2_metadata(w: GGUFWriter, p: Preset) -> None:
    """As convert_hf_to_gguf.py's DeepseekV2Model writes them (MLA as MQA over the latent: one KV head)."""
    from gguf import ExpertGatingFuncType, RopeScalingType

    nope = p.head_dim - p.qk_rope_dim
    w.add_vocab_size(p.n_vocab)
    w.add_leading_dense_block_count(p.n_dense_lead)
    w.add_feed_forward_length(p.n_ff)
    # the converter omits q_lora_rank for V2-Lite (llama.cpp then spots "lite" by its 27 layers); 0 works at any depth
    w.add_q_lora_rank(p.q_lora_rank)
    w.add_kv_lora_rank(p.kv_lora_rank)
    if p.mla_split:
        w.add_key_length(p.kv_lora_rank + p.qk_rope_dim)
        w.add_value_length(p.kv_lora_rank)
        w.add_key_length_mla(nope + p.qk_rope_dim)
        w.add_value_length_mla(p.v_head_dim)
    else:  # the legacy layout (attn_kv_b): per-head K and V sizes
        w.add_key_length(nope + p.qk_rope_dim)
        w.add_value_length(p.v_head_dim)
    w.add_rope_dimension_count(p.qk_rope_dim)
    w.add_expert_feed_forward_length(p.n_ff_exp)
    w.add_expert_shared_count(p.n_shared)
    w.add_expert_weights_scale(p.weights_scale)
    if p.weights_norm:
        w.add_expert_weights_norm(True)
    w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID if p.gating == "sigmoid" else ExpertGatingFuncType.SOFTMAX)
    if p.n_groups:
        w.add_expert_group_count(p.n_groups)
        w.add_expert_group_used_count(p.n_group_used)
    if p.yarn_factor:
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(p.yarn_factor)
        w.add_rope_scaling_orig_ctx_len(p.yarn_orig_ctx)
        w.add_rope_scaling_yarn_log_mul(0.1 * p.yarn_mscale_all_dim)


def _write_sparse(files: list[Path], starts: list[int], w: GGUFWriter, plan: dict[str, _Tensor]) -> None:
    """Each shard extended to its full length without writing: the data reads as zeros, takes no space."""
    align = w.data_alignment
    for path, pos, shard in zip(files, starts, w.tensors):
        for name in shard:
            pos += -pos % align + quant.nbytes(plan[name].qtype, plan[name].shape)
        os.truncate(path, pos)


def _write_data(files: list[Path], starts: list[int], w: GGUFWriter, plan: dict[str, tuple[int, _Tensor]],
                seed: int, total: int, progress: bool) -> None:
    """Make pieces on a thread pool (numpy releases the GIL) while this thread writes them in order."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import ExitStack

    from tqdm import tqdm

    align = w.data_alignment
    jobs = []  # (file, padding before, job) in file order
    stack = ExitStack()
    for path, pos, shard in zip(files, starts, w.tensors):
        f = stack.enter_context(AppendWriter(path, pos))
        for name in shard:
            index, t = plan[name]
            pad = -pos % align
            for k, job in enumerate(_chunk_jobs(t, seed, index, 16 << 20)):
                jobs.append((f, pad if k == 0 else 0, job))
            pos += pad + quant.nbytes(t.qtype, t.shape)
    workers = max(1, min(4, os.cpu_count() or 1))
    with stack, ThreadPoolExecutor(workers, thread_name_prefix="synth") as pool, \
            tqdm(total=total, unit="B", unit_scale=True, desc="synth", disable=not progress) as bar:
        ahead: deque = deque()
        it = iter(jobs)
        for f, pad, job in it:
            ahead.append((f, pad, pool.submit(job)))
            if len(ahead) >= 2 * workers:
                break
        while ahead:
            f, pad, fut = ahead.popleft()
            nxt = next(it, None)
            if nxt is not None:
                ahead.append((nxt[0], nxt[1], pool.submit(nxt[2])))
            data = fut.result()
            f.write(b"\0" * pad)
            f.write(data)
            bar.update(data.nbytes)


# ---------------------------------------------------------------------------------------------
# Trained weights


def write_model(out: str | os.PathLike, p: Preset, weights: Mapping[str, np.ndarray], arch: str = "qwen3moe",
                qtype: str = "Q8_0", bpe: tuple[list[str], list[str]] | None = None, name: str | None = None,
                context_length: int | None = None) -> Path:
    """Write float ``weights`` (GGUF tensor names, torch-order shapes as synth makes them) quantised to ``qtype``.

    The same tensor names, types, metadata and tokenizer layout as ``synth`` (``bpe`` = (tokens, merges) from
    train_bpe); quantisation by gguf-py. The file appears under its name only once complete.
    """
    from gguf.quants import quantize

    if arch not in ARCHS:
        raise UnsupportedError(f"cannot write architecture {arch!r} (choose from {', '.join(ARCHS)})")
    plan = _tensor_plan(arch, p, _type_plan(qtype))
    missing = [t.name for t in plan if t.name not in weights]
    if missing:
        raise UnsupportedError(f"weights lack {len(missing)} tensors ({', '.join(missing[:3])}, ...)")
    out = Path(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        w = GGUFWriter(tmp, arch)
        _add_metadata(w, arch, replace(p, n_ctx=context_length or p.n_ctx), _type_plan(qtype).ftype,
                      name or f"{arch} {qtype}", bpe)
        for t in plan:
            arr = np.ascontiguousarray(weights[t.name], dtype=np.float32)
            if arr.shape != t.shape:
                raise UnsupportedError(f"{t.name}: shape {arr.shape}, expected {t.shape}")
            w.add_tensor(t.name, arr if t.qtype == Q.F32 else quantize(arr, t.qtype), raw_dtype=t.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
        fsync_path(out.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out
