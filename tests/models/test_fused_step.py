"""The Triton kernels of the CUDA-graph decode step (models/_fused.py) against the eager path's torch code."""

import math

import pytest
import torch

from flashmoe_stream.models.common import rms_norm, rope_angles, rotate, route

# interp: the test also runs under Triton's interpreter on the CPU (conftest). Not the add+norm and RoPE tests:
# they compare bf16 bit for bit, and the interpreter rounds float32 to bf16 toward zero, the GPU to nearest.
pytestmark = pytest.mark.gpu
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _K():
    from flashmoe_stream.models import _fused

    return _fused


def test_add_norm_adds_the_weighted_rows_then_norms():
    g = torch.Generator(device=DEV).manual_seed(0)
    E = 4096
    x, d = torch.randn(E, device=DEV, generator=g), torch.randn(8, E, device=DEV, generator=g)
    dw, nw = torch.rand(8, device=DEV, generator=g), torch.rand(E, device=DEV, generator=g)
    h, hf = torch.empty(E, dtype=torch.bfloat16, device=DEV), torch.empty(E, device=DEV)
    want_x = x + (d * dw[:, None]).sum(0)
    _K().add_norm(x, d, dw, nw, 1e-6, h, hf)
    assert torch.allclose(x, want_x, atol=1e-5, rtol=1e-5)
    assert torch.allclose(hf, rms_norm(want_x, nw, 1e-6), atol=1e-5, rtol=1e-5)
    assert torch.equal(h, hf.bfloat16())
    before = x.clone()
    _K().add_norm(x, None, None, nw, 1e-6, h)  # no add: the norm alone
    assert torch.equal(x, before) and torch.allclose(h.float(), rms_norm(x, nw, 1e-6), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("qk_norm", [True, False])
def test_qk_rope_rotates_and_writes_the_cache_at_pos(neox, qk_norm):
    g = torch.Generator(device=DEV).manual_seed(1)
    H, HKV, D, n_ctx, p = 8, 2, 128, 16, 11
    q, k, v = (torch.randn(n * D, device=DEV, generator=g) for n in (H, HKV, HKV))
    qn, kn = (torch.rand(D, device=DEV, generator=g) for _ in range(2))
    cos, sin = rope_angles(torch.arange(n_ctx, device=DEV), D, 1e6)
    kc = torch.randn(n_ctx, HKV, D, device=DEV, generator=g).bfloat16()
    vc = torch.randn(n_ctx, HKV, D, device=DEV, generator=g).bfloat16()
    k0, v0 = kc.clone(), vc.clone()
    qo = torch.empty(H * D, device=DEV)
    _K().qk_rope(q, k, v, qn if qk_norm else None, kn if qk_norm else None, cos[:, 0].contiguous(),
                 sin[:, 0].contiguous(), torch.tensor([p], device=DEV), kc, vc, qo, 1e-6, neox)
    qq, kk = q.view(1, H, D), k.view(1, HKV, D)
    if qk_norm:
        qq, kk = rms_norm(qq, qn, 1e-6), rms_norm(kk, kn, 1e-6)
    assert torch.allclose(qo, rotate(qq, cos[p:p + 1], sin[p:p + 1], neox).view(-1), atol=1e-5, rtol=1e-5)
    assert torch.equal(kc[p], rotate(kk, cos[p:p + 1], sin[p:p + 1], neox)[0].bfloat16())
    assert torch.equal(vc[p], v.view(HKV, D).bfloat16())
    others = torch.arange(n_ctx, device=DEV) != p
    assert torch.equal(kc[others], k0[others]) and torch.equal(vc[others], v0[others])


@pytest.mark.interp
@pytest.mark.parametrize("p", [0, 37, 200])
def test_attend_is_softmax_attention_over_positions_up_to_pos(p):
    g = torch.Generator(device=DEV).manual_seed(2)
    H, HKV, D, n_ctx = 16, 4, 128, 256
    q = torch.randn(H * D, device=DEV, generator=g)
    kc = torch.randn(n_ctx, HKV, D, device=DEV, generator=g).bfloat16()
    vc = torch.randn(n_ctx, HKV, D, device=DEV, generator=g).bfloat16()
    out = torch.empty(H * D, device=DEV)
    _K().attend(q, kc, vc, torch.tensor([p], device=DEV), out)
    rep = H // HKV
    kk, vv = kc[:p + 1].float().repeat_interleave(rep, 1), vc[:p + 1].float().repeat_interleave(rep, 1)
    att = torch.einsum("hd,shd->hs", q.view(H, D), kk) / math.sqrt(D)
    want = torch.einsum("hs,shd->hd", att.softmax(-1), vv).reshape(-1)
    assert torch.allclose(out, want, atol=1e-4, rtol=1e-4)


@pytest.mark.interp
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("NE, k", [(128, 8), (60, 6)])  # k below a power of two: a padded vector
def test_route_topk_picks_what_route_picks_and_looks_up_offsets(norm, NE, k):
    g = torch.Generator(device=DEV).manual_seed(3)
    logits = torch.randn(NE, device=DEV, generator=g) * 3
    table = torch.randint(-1 << 40, 1 << 40, (3, NE), device=DEV, generator=g)
    ids, w = torch.empty(k, dtype=torch.int64, device=DEV), torch.empty(k, device=DEV)
    offs = torch.empty(3 * k, dtype=torch.int64, device=DEV)
    _K().route_topk(logits, table, k, norm, ids, w, offs)
    want_w, want_ids = route(logits.view(1, -1), torch.eye(NE, device=DEV), k, norm)
    assert torch.equal(ids, want_ids[0])
    assert torch.allclose(w, want_w[0], rtol=1e-5, atol=1e-7)
    assert torch.equal(offs, table[:, ids].reshape(-1))


@pytest.mark.interp
def test_silu_mul():
    g = torch.Generator(device=DEV).manual_seed(4)
    gu = torch.randn(16, 1536, device=DEV, generator=g)
    out = torch.empty(8, 1536, dtype=torch.bfloat16, device=DEV)
    _K().silu_mul(gu, out)
    assert torch.allclose(out.float(), (torch.nn.functional.silu(gu[:8]) * gu[8:]).bfloat16().float(), rtol=1e-2,
                          atol=1e-2)


def _q8():
    from flashmoe_stream.quant import _triton

    return _triton


def _assert_same_q8(x8, want):
    """x8 as the fusing kernel filled it equals quantize_q8 of the tensor it wrote."""
    for got, w in zip(x8, want):
        assert torch.equal(got.view_as(w), w)


@pytest.mark.interp
def test_kernels_that_write_an_input_also_round_it_to_8_bits():
    g = torch.Generator(device=DEV).manual_seed(5)
    T, E = _q8(), 4096
    x, nw = torch.randn(E, device=DEV, generator=g), torch.rand(E, device=DEV, generator=g)
    h = torch.empty(E, dtype=torch.bfloat16, device=DEV)
    x8 = T.q8_buffers(1, E, DEV)
    _K().add_norm(x, torch.randn(2, E, device=DEV, generator=g), None, nw, 1e-6, h, x8=x8)
    _assert_same_q8(x8, T.quantize_q8(h.view(1, -1)))
    assert x8[0].abs().max() == 127  # a rounding that happened: each group's largest value maps to 127
    H, HKV, D = 8, 2, 128
    q = torch.randn(H * D, device=DEV, generator=g)
    kc = torch.randn(16, HKV, D, device=DEV, generator=g).bfloat16()
    vc = torch.randn(16, HKV, D, device=DEV, generator=g).bfloat16()
    out, a8 = torch.empty(H * D, dtype=torch.bfloat16, device=DEV), T.q8_buffers(1, H * D, DEV)
    _K().attend(q, kc, vc, torch.tensor([9], device=DEV), out, x8=a8)
    _assert_same_q8(a8, T.quantize_q8(out.view(1, -1)))
    gu = torch.randn(8, 1536, device=DEV, generator=g)  # F not a multiple of the kernel's 1024
    act, s8 = torch.empty(4, 1536, dtype=torch.bfloat16, device=DEV), T.q8_buffers(4, 1536, DEV)
    _K().silu_mul(gu, act, x8=s8)
    _assert_same_q8(s8, T.quantize_q8(act))


@pytest.mark.interp
def test_router_logits_is_the_router_gemv():
    g = torch.Generator(device=DEV).manual_seed(6)
    for NE, E in ((128, 4096), (60, 2048), (8, 5000)):
        h, w = torch.randn(E, device=DEV, generator=g), torch.randn(NE, E, device=DEV, generator=g)
        out = torch.empty(NE, device=DEV)
        assert _K().router_logits(h, w, out) is out
        assert torch.allclose(out, (w.double() @ h.double()).float(), rtol=1e-5, atol=1e-4)
