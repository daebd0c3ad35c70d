"""deepseek2 (DeepSeek-V2/V3/R1): config, MLA decoder, routing, YaRN and the planner, checked against
llama.cpp on the same files and against hand arithmetic.

Fixtures: ``tiny`` is V3-shaped (q_lora, sigmoid routing with exp_probs_b, 4 expert groups of which 2
are used, weights scale 2.5, one leading dense block, YaRN), ``tiny-lite`` V2-Lite-shaped (direct
attn_q, softmax, no groups, two shared experts). ``mla_split=False`` writes the legacy attn_kv_b layout.
"""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import flashmoe_stream as fms
from flashmoe_stream.config import Deepseek2Config
from flashmoe_stream.errors import UnsupportedError
from flashmoe_stream.gguf_file import open_gguf
from flashmoe_stream.model_info import ModelInfo
from flashmoe_stream.models import build_model
from flashmoe_stream.models.common import plain
from flashmoe_stream.models.deepseek2 import Deepseek2Decoder, RouterWeights, Yarn
from flashmoe_stream.synth import DEEPSEEK2_PRESETS, synth

from ..reference import assert_argmax_but_at_ties, assert_within_but_at_near_ties, record_routing_margins
from .test_decoder import StoreExperts, dense_weights

TOKENS = np.random.default_rng(1).integers(0, 300, 48).tolist()
ARCH = "deepseek2"


def _llama_logits(llama_cpp, path, tokens=TOKENS):
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, n_batch=64, logits_all=True, verbose=False)
    llm.eval(tokens)
    return np.asarray(llm.scores[: len(tokens)])


# --- config ------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["tiny", "tiny-lite"])
@pytest.mark.parametrize("split", [True, False])
def test_config_reads_what_synth_writes(make_model, preset, split):
    cfg = open_gguf(make_model(ARCH, "Q8_0", preset=preset, mla_split=split)).config
    p = DEEPSEEK2_PRESETS[preset]
    assert type(cfg) is Deepseek2Config and cfg.mla_split == split
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.n_vocab) == (p.n_layer, p.n_embd, p.n_head,
                                                                                p.head_dim, p.n_vocab)
    assert (cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_dim, cfg.v_head_dim) == (
        p.q_lora_rank, p.kv_lora_rank, p.qk_rope_dim, p.v_head_dim)
    assert cfg.qk_nope_dim == p.head_dim - p.qk_rope_dim
    assert (cfg.n_expert, cfg.n_expert_used, cfg.n_ff_exp, cfg.n_expert_shared) == (
        p.n_expert, p.n_expert_used, p.n_ff_exp, p.n_shared)
    assert (cfg.n_layer_dense_lead, cfg.n_ff, cfg.expert_gating, cfg.expert_weights_norm) == (
        p.n_dense_lead, p.n_ff, p.gating, p.weights_norm)
    assert cfg.expert_weights_scale == pytest.approx(p.weights_scale)
    assert (cfg.n_expert_groups, cfg.n_group_used) == (p.n_groups, p.n_group_used)
    assert list(cfg.moe_layers) == list(range(p.n_dense_lead, p.n_layer))
    # YaRN: the file stores 0.1 x mscale_all_dim (llama.cpp's converter); the config undoes it
    assert cfg.rope_scaling_factor == p.yarn_factor and cfg.rope_orig_ctx == p.yarn_orig_ctx
    assert cfg.rope_yarn_log_mul == pytest.approx(p.yarn_mscale_all_dim, rel=1e-5)


def test_metadata_without_optional_keys_is_v2_style():
    """A DeepSeek-V2 file of the older converter: no q_lora_rank (lite), no gating func (softmax), no
    _mla keys (legacy layout), no scaling."""
    a = ARCH + "."
    md = {"general.architecture": ARCH, a + "block_count": 2, a + "embedding_length": 64, a + "context_length": 128,
          a + "attention.head_count": 2, a + "attention.head_count_kv": 2, a + "attention.key_length": 48,
          a + "attention.value_length": 32, a + "attention.kv_lora_rank": 32, a + "rope.dimension_count": 16,
          a + "attention.layer_norm_rms_epsilon": 1e-6, a + "expert_count": 4, a + "expert_used_count": 2,
          a + "expert_feed_forward_length": 32, a + "vocab_size": 100}
    from flashmoe_stream.config import config_from_metadata
    cfg = config_from_metadata(md)
    assert (cfg.q_lora_rank, cfg.expert_gating, cfg.mla_split, cfg.head_dim, cfg.v_head_dim) == (0, "softmax", False,
                                                                                               48, 32)
    assert (cfg.rope_scaling_factor, cfg.expert_weights_scale, cfg.n_layer_dense_lead) == (1.0, 1.0, 0)
    with pytest.raises(UnsupportedError, match="expert_gating_func=3"):
        config_from_metadata({**md, a + "expert_gating_func": 3})


# --- numerics against llama.cpp ------------------------------------------------------------------

@pytest.mark.parametrize("preset,split", [("tiny", True), ("tiny-lite", True), ("tiny", False)])
def test_float_weights_equal_llama_cpp(make_model, llama_cpp, preset, split):
    """With F32 weights nothing is rounded but the fp16 KV cache: MLA (both layouts), YaRN, grouped
    sigmoid routing with bias and scale, shared experts and the dense block agree to float noise."""
    path = make_model(ARCH, "F32", preset=preset, mla_split=split)
    ref = _llama_logits(llama_cpp, path)
    with fms.Engine.open(path, ram_cache="30%") as eng:
        ours = eng.logits(TOKENS).numpy()
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    assert np.abs(ours - ref).max() <= 0.002 * (ref.max() - ref.min())


# With quantised weights llama.cpp rounds activations to 8 bits before every matmul; we round the same
# way, but float32 results differ from llama.cpp's in the last bits (summation order, expf), and a
# last-bit change flips a few roundings: the logits then differ by ~0.3 % of their range, and where a
# routing choice or the top two logits are within that, the choice flips. Our own model shows exactly
# this spread against itself when its embeddings are perturbed by 1e-6 (test below), so it is the
# floor, not a missing piece. The strict bar holds on these fixtures (the V3-shaped one is synth seed
# 10: over seeds 0-18 its positions agree at 94-100 %, max error ≤ 2 % except at a flipped route).
STRICT = [("tiny", {"seed": 10}), ("tiny-lite", {})]


@pytest.mark.parametrize("preset,kw", STRICT, ids=[p for p, _ in STRICT])
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K_M"])
def test_quantized_logits_agree_with_llama_cpp(make_model, llama_cpp, monkeypatch, preset, kw, qtype):
    """llama.cpp's activation rounding (the default): no logit is further than 2 % of the reference's
    logit range, at a 10 % cache budget, but at a router's near-tie (of two experts, or of two expert
    groups) whose other side is within 2 % (the native CPU kernels' summation order, dense matmuls
    included, moves random routers' near-ties: V3-shaped Q8_0 position 32, a group margin of 0.03 %), and
    the argmax is llama.cpp's but at near-ties of llama.cpp's own top two (the native CPU expert kernels
    flipped one on V2-Lite at Q8_0: llama.cpp's top two 0.0014 apart, our difference there 0.016)."""
    path = make_model(ARCH, qtype, preset=preset, **kw)
    ref = _llama_logits(llama_cpp, path)
    with fms.Engine.open(path, ram_cache="10%") as eng:
        margins = record_routing_margins(eng)
        ours = eng.logits(TOKENS).numpy()
    assert_within_but_at_near_ties(monkeypatch, path, TOKENS, ours, ref, margins, max_off=0.1)
    assert_argmax_but_at_ties(ours, ref, min_decided=0.7)  # random logits: near-ties of the top two are common


def _llama_quantized(llama_cpp, make_model, tmp_path, preset, kw):
    """The F32 synth model quantised to Q4_K_M by llama.cpp's own quantiser (its mix, its rounding)."""
    import ctypes

    out = tmp_path / "llama-q4km.gguf"
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, 2
    src = make_model(ARCH, "F32", preset=preset, **kw)
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(p)) == 0
    return out


@pytest.mark.parametrize("preset,kw", STRICT, ids=[p for p, _ in STRICT])
def test_llama_cpp_made_q4_k_m_agrees_but_at_exact_ties(make_model, llama_cpp, tmp_path, preset, kw, monkeypatch):
    """A Q4_K_M made by llama.cpp (not synth's random blocks): every logit within 2 % of the range, but at
    a router's near-tie whose other side is within 2 % (one position of 48 on the tiny shape where llama.cpp
    runs without CPU weight repacking); the argmax is llama.cpp's wherever llama.cpp's own top two logits are
    further apart than our difference there (on the V2-Lite shape one position is a tie that close: see the
    comment above STRICT)."""
    path = _llama_quantized(llama_cpp, make_model, tmp_path, preset, kw)
    assert "Q4_K" in {t.qtype.name for t in open_gguf(path).tensors.values()}
    ref = _llama_logits(llama_cpp, path)
    with fms.Engine.open(path, ram_cache="10%") as eng:
        margins = record_routing_margins(eng)
        ours = eng.logits(TOKENS).numpy()
    assert_within_but_at_near_ties(monkeypatch, path, TOKENS, ours, ref, margins)
    top2 = np.sort(ref, -1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > 2 * np.abs(ours - ref).max(-1)
    assert decided.mean() >= 0.8
    assert (ours.argmax(-1) == ref.argmax(-1))[decided].all()


@pytest.mark.parametrize("preset,kw", [("tiny", {}), ("tiny", {"mla_split": False}), ("tiny-lite", {"seed": 2})])
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K_M"])
def test_quantized_logits_near_llama_cpp_on_any_seed(make_model, llama_cpp, preset, kw, qtype):
    """Without picking a fixture (and for the legacy layout, which llama.cpp decompresses instead):
    the typical position is well inside the bar, and at most a few sit on a near-tie."""
    path = make_model(ARCH, qtype, preset=preset, **kw)
    ref = _llama_logits(llama_cpp, path)
    with fms.Engine.open(path, ram_cache="10%") as eng:
        ours = eng.logits(TOKENS).numpy()
    per_pos = np.abs(ours - ref).max(-1) / (ref.max() - ref.min())
    assert np.median(per_pos) <= 0.01, np.round(per_pos, 3)
    assert (per_pos <= 0.02).mean() >= 0.9 and (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K_M"])
def test_the_noise_floor_is_our_own_under_a_1e6_perturbation(make_model, qtype):
    """Perturbing our own embeddings by 1e-6 (relative) moves the logits as far as llama.cpp's differ
    from ours: the quantised model amplifies last-bit noise to ~0.1-1 % of the logit range."""
    path = make_model(ARCH, qtype)
    with fms.Engine.open(path) as eng:
        a = eng.logits(TOKENS)
        g = torch.Generator().manual_seed(0)
        embd = plain(eng.model.embd)  # on the CPU the table stays in its GGML blocks
        eng.model.embd = embd * (1 + 1e-6 * torch.randn(embd.shape, generator=g))
        b = eng.logits(TOKENS)
    per_pos = (a - b).abs().max(-1).values / (a.max() - a.min())
    assert 1e-3 < float(per_pos.median()) < 0.01


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K_M"])
def test_logits_identical_at_10_and_100_percent_cache(make_model, qtype):
    path = make_model(ARCH, qtype)
    with fms.Engine.open(path, ram_cache="100%") as a, fms.Engine.open(path, ram_cache="10%") as b:
        full, tight = a.logits(TOKENS), b.logits(TOKENS)
        assert b.stats()["total"]["disk_bytes"] > a.stats()["total"]["disk_bytes"]
    assert torch.equal(full, tight)


# --- the decoder's pieces ----------------------------------------------------------------------

def _decoder(path, weights=None):
    m = open_gguf(path)
    experts = StoreExperts(path)
    return build_model(m.config, weights or dense_weights(m), experts, prefetch=True), experts


def test_kv_cache_holds_the_latent_not_k_and_v(make_model):
    path = make_model(ARCH, "Q8_0")
    dec, _ = _decoder(path)
    c = dec.cfg
    kv = dec.new_kv_cache(32)
    per_token = (kv.c.shape[-1] + kv.pe.shape[-1])
    assert per_token == c.kv_lora_rank + c.qk_rope_dim
    assert per_token < c.n_head * (c.head_dim + c.v_head_dim)  # what full K and V would take
    dec.forward(torch.tensor(TOKENS[:5]), kv)
    assert kv.length == 5 and kv.c[:, :5].abs().sum() > 0 and kv.c[:, 5:].abs().sum() == 0


def test_a_prompt_in_chunks_equals_it_whole(make_model):
    """The latent cache carries the context: prefill in pieces and token by token give the same logits."""
    dec, experts = _decoder(make_model(ARCH, "Q8_0"))
    whole = dec.forward(torch.tensor(TOKENS[:12]), dec.new_kv_cache(12))
    kv = dec.new_kv_cache(12)
    parts = [dec.forward(torch.tensor(TOKENS[a:b]), kv) for a, b in ((0, 5), (5, 6), (6, 12))]
    assert torch.allclose(torch.cat(parts), whole, atol=1e-4, rtol=1e-4)
    # dense layer 0 asks nothing of the cache; prefetch names only MoE layers
    assert {layer for layer, _ in experts.gets} == set(dec.cfg.moe_layers)
    assert {layer for layer, _ in experts.prefetches} <= set(dec.cfg.moe_layers)


def test_legacy_kv_b_layout_computes_what_the_split_one_does(make_model):
    """attn_kv_b is attn_k_b (transposed) and attn_v_b stacked per head: rebuild it from a split file
    and the decoder gives the same logits (float numerics: the layouts round differently in llama.cpp)."""
    path = make_model(ARCH, "Q8_0")
    m = open_gguf(path)
    w = dense_weights(m)
    legacy = dict(w)
    c = m.config
    for i in range(c.n_layer):
        k_b, v_b = legacy.pop(f"blk.{i}.attn_k_b.weight"), legacy.pop(f"blk.{i}.attn_v_b.weight")  # [H,r,nope] [H,v,r]
        legacy[f"blk.{i}.attn_kv_b.weight"] = torch.cat([k_b.transpose(1, 2), v_b], 1).reshape(-1, c.kv_lora_rank)
    a, _ = _decoder(path, w)
    b, _ = _decoder(path, legacy)
    x, y = a.forward(torch.tensor(TOKENS[:16]), a.new_kv_cache(16)), b.forward(torch.tensor(TOKENS[:16]),
                                                                                  b.new_kv_cache(16))
    assert torch.allclose(x, y, atol=1e-4, rtol=1e-4)


def test_a_chat_turn_reuses_the_latent_cache(make_model):
    """The engine keeps the last generation's cache; the next turn's reply equals a fresh engine's."""
    path = make_model(ARCH, "Q8_0")
    with fms.Engine.open(path) as eng:
        reply = eng.tokenize(eng.generate(TOKENS[:12], max_tokens=6, temperature=0, stream=False))
        second = TOKENS[:12] + reply + TOKENS[12:18]
        kept = eng.generate(second, max_tokens=8, temperature=0, stream=False)
        assert eng.last.prompt_cached >= 11
    with fms.Engine.open(path) as fresh:
        assert fresh.generate(second, max_tokens=8, temperature=0, stream=False) == kept


def _router_decoder(n_expert, k, groups, used, gating, scale, norm, bias=None):
    cfg = Deepseek2Config(n_layer=1, n_embd=n_expert, n_head=1, n_head_kv=1, head_dim=2, n_vocab=1, n_ctx_train=1,
                          n_expert=n_expert, n_expert_used=k, n_ff_exp=1, rope_theta=1.0, rms_eps=1e-6,
                          expert_gating=gating, expert_weights_norm=norm, expert_weights_scale=scale,
                          n_expert_groups=groups, n_group_used=used)
    dec = Deepseek2Decoder.__new__(Deepseek2Decoder)
    dec.cfg = cfg
    dec.router = {0: RouterWeights(torch.ones(n_expert), torch.eye(n_expert), bias)}
    return dec


def test_group_limited_routing_by_hand():
    """8 experts in 4 groups of 2, best 2 groups by the sum of their two scores, then top 2 experts
    inside them; weights are the unbiased sigmoid scores, normalised, times the scale."""
    logits = torch.tensor([[3.0, -3.0, 1.0, 1.0, 2.0, 1.9, -1.0, 2.9]])
    dec = _router_decoder(8, 2, 4, 2, "sigmoid", 2.5, True)
    s = torch.sigmoid(logits[0])
    # group sums: g0 = s(3)+s(-3) = 1.0, g1 = 2 s(1) = 1.46, g2 = s(2)+s(1.9) = 1.75, g3 = s(-1)+s(2.9) = 1.22
    # → groups 2 and 1; expert 0 (the best score) and expert 7 lie outside them
    w, ids = dec.route(0, logits)
    assert ids[0].tolist() == [4, 5]
    assert torch.allclose(w[0], torch.stack([s[4], s[5]]) / (s[4] + s[5]) * 2.5)
    # the bias moves the choice, not the weights: +1 on expert 2 picks it over 5 inside group 2 ∪ 1
    dec.router[0].bias = torch.tensor([0, 0, 1.0, 0, 0, 0, 0, 0])
    w, ids = dec.route(0, logits)
    assert sorted(ids[0].tolist()) == [2, 4]
    expect = torch.stack([s[2], s[4]]) / (s[2] + s[4]) * 2.5
    assert torch.allclose(w[0].sort().values, expect.sort().values)


def test_softmax_routing_without_norm_by_hand():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    dec = _router_decoder(4, 2, 0, 0, "softmax", 1.0, False)
    w, ids = dec.route(0, logits)
    p = torch.softmax(logits[0], -1)
    assert ids[0].tolist() == [3, 2] and torch.allclose(w[0], p[[3, 2]])


def test_yarn_scale_by_hand():
    """llama.cpp's deepseek2: RoPE magnitude 1 and kq_scale = (1 + 0.1 L ln f)^2 / sqrt(head) whenever
    the file has a YaRN log multiplier L (V3: 1.0, V2: 0.707)."""
    for preset, L in (("deepseek-v3", 1.0), ("deepseek-v2-lite", 0.707)):
        p = DEEPSEEK2_PRESETS[preset]
        cfg = Deepseek2Config(n_layer=1, n_embd=8, n_head=1, n_head_kv=1, head_dim=p.head_dim, n_vocab=1,
                              n_ctx_train=p.n_ctx, n_expert=2, n_expert_used=1, n_ff_exp=1, rope_theta=p.rope_theta,
                              rms_eps=1e-6, qk_rope_dim=p.qk_rope_dim, rope_scaling_factor=p.yarn_factor,
                              rope_orig_ctx=p.yarn_orig_ctx, rope_yarn_log_mul=L)
        y = Yarn.of(cfg)
        assert y.magnitude == 1.0 and y.freq_scale == pytest.approx(1 / 40)
        assert y.kq_scale == pytest.approx((1 + 0.1 * L * math.log(40)) ** 2 / math.sqrt(192))
        # the interpolation ramp: dims with fewer than beta_fast=32 turns over 4096 positions are interpolated
        assert 0 < y.corr[0] < y.corr[1] < p.qk_rope_dim / 2


# --- synth, store, planner -------------------------------------------------------------------------

def test_synth_refuses_layers_that_leave_no_experts(tmp_path):
    with pytest.raises(UnsupportedError, match="leading dense"):
        synth(tmp_path / "x.gguf", arch=ARCH, preset="deepseek-v3", layers=3)


def test_store_classifies_shared_experts_as_dense(make_model, tmp_path):
    from flashmoe_stream.io import repack
    from flashmoe_stream.model_info import expert_tensor_layer

    path = make_model(ARCH, "Q4_K_M")
    names = open_gguf(path).tensors
    assert all(expert_tensor_layer(n) is None for n in names if "shexp" in n or "exp_probs_b" in n)
    assert {expert_tensor_layer(n) for n in names if "_exps" in n} == {1, 2, 3}
    store = repack(path, tmp_path / "store", progress=False)
    with fms.Engine.open(path) as a, fms.Engine.open(store) as b:
        assert b.store.layers == [1, 2, 3]
        assert torch.equal(a.logits(TOKENS[:10]), b.logits(TOKENS[:10]))


@pytest.fixture(scope="module")
def v3_671b(tmp_path_factory):
    """Full DeepSeek-V3 at Q4_K_M: real header, sparse zero data (no disk space)."""
    return synth(tmp_path_factory.mktemp("v3") / "v3.gguf", arch=ARCH, preset="deepseek-v3", qtype="Q4_K_M",
                 metadata_only=True).paths[0]


def test_planner_for_deepseek_v3_671b_by_hand(v3_671b):
    info = ModelInfo.of(open_gguf(v3_671b))
    # one expert: gate and up [2048 rows x 7168] in Q4_K (144 bytes per 256), down [7168 x 2048] in Q6_K (210/256)
    gate_up = 2 * 2048 * (7168 // 256 * 144)
    down = 7168 * (2048 // 256 * 210)
    per_expert = gate_up + down
    assert per_expert == 28_557_312
    assert info.n_moe_layer == 61 - 3 and info.bytes_per_expert == per_expert
    assert info.bytes_experts == 58 * 256 * per_expert
    assert info.bytes_per_token_cold == 58 * 8 * per_expert
    assert info.bytes_dense == info.bytes_total - info.bytes_experts
    # parameters from the shapes alone agree with DeepSeek's published 671 B total / 37 B active
    assert 670e9 < info.params_total < 672e9 and 37e9 < info.params_active < 38e9
    plan = info.plan(3.0, 5.0)
    share = 1 - 3e9 / (5 * 58 * 8 * per_expert)
    assert plan["hit_rate_needed"] == pytest.approx(share)
    assert plan["expert_cache_bytes"] == round(share * 58 * 256 * per_expert)
    assert plan["memory_bytes"] == plan["expert_cache_bytes"] + info.bytes_dense
    assert plan["tok_s_at_0pct_hits"] == pytest.approx(3e9 / (58 * 8 * per_expert))
    assert plan["miss_bytes_per_token"] == pytest.approx(3e9 / 5, rel=1e-6)  # exactly what the disk gives
    assert info.plan(100.0, 1.0)["expert_cache_bytes"] == 0  # a fast enough disk needs no cache


def test_cli_inspect_plan(v3_671b):
    r = subprocess.run([sys.executable, "-m", "flashmoe_stream", "inspect", str(v3_671b), "--plan", "--disk-gbps", "3",
                        "--tok-s", "5", "--json"], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["arch"] == ARCH and d["plan"]["hit_rate_needed"] > 0.9
    r = subprocess.run([sys.executable, "-m", "flashmoe_stream", "inspect", str(v3_671b), "--plan"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "--disk-gbps" in r.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("split", [True, False])
def test_cuda_equals_cpu(make_model, split):
    """The same streaming forward on the GPU (float32 without llama.cpp's 8-bit rounding, which would
    amplify the devices' last-bit differences: equal to the CPU's; bf16: runs and mostly agrees)."""
    path = make_model(ARCH, "Q4_K_M", mla_split=split)
    with fms.Engine.open(path, ram_cache="30%", llama_numerics=False) as cpu:
        ref = cpu.logits(TOKENS)
    with fms.Engine.open(path, device="cuda", vram_cache="30%", ram_cache="50%", dtype=torch.float32,
                         llama_numerics=False) as gpu:
        got = gpu.logits(TOKENS)
        assert gpu.stats()["total"]["h2d_bytes"] > 0
    assert torch.allclose(got, ref, atol=1e-3, rtol=1e-3)
    with fms.Engine.open(path, device="cuda", vram_cache="30%", ram_cache="50%") as gpu:
        text = gpu.generate("What's AI?", max_tokens=8, seed=1, stream=False)
        bf = gpu.logits(TOKENS)
    assert text and (bf.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.5
