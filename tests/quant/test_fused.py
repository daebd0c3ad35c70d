"""The fused dequantise-multiply GPU kernels (quant._triton) and QTensor against dequantize + float64 matmul."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from flashmoe_stream import quant

from .test_dequant import F16_FIELDS, random_bytes

FUSED = [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0]


Q8_ACTS = {Q.Q4_K, Q.Q5_K, Q.Q6_K}  # these kernels multiply 8-bit activations (Q4_K/Q5_K: on 16-byte aligned weights)


def _ref(x, raw, qtype, shape, fused=True):
    """float64 reference: x (rounded to 8 bits per 32 values where a fused kernel rounds it) @ dequantize(raw).T"""
    w = quant.dequantize(raw, qtype, shape).double()
    if fused and qtype in Q8_ACTS and x.is_cuda:
        x = _q8_values(x)
    return x.double() @ w.T


def _q8_values(x):
    from flashmoe_stream.quant import _triton

    xq, dx, _ = _triton.quantize_q8(x)
    return (xq.double().view(x.shape[0], -1, 32) * dx.double()[..., None]).view(x.shape)


@pytest.mark.gpu
def test_activations_round_to_8_bits_per_32_values():
    """quantize_q8: the scale is the group's largest magnitude / 127, each value is within half a step of
    q * scale (the largest exactly +-127), and the sums per 16 are the int8 values' sums."""
    from flashmoe_stream.quant import _triton

    x = torch.randn(3, 1024, device="cuda") * torch.logspace(-3, 2, 1024, device="cuda")
    x[1, :32] = 0  # an all-zero group: scale 0, q 0
    xq, dx, xs = _triton.quantize_q8(x)
    g = x.double().view(3, -1, 32)
    amax = g.abs().amax(-1)
    assert torch.allclose(dx.double(), amax / 127, rtol=1e-6, atol=0)
    step = dx.double()[..., None]
    err = (xq.double().view(3, -1, 32) * step - g).abs()
    assert (err <= 0.5 * step * (1 + 1e-5)).all()
    assert xq[1, :32].eq(0).all() and dx[1, 0] == 0
    assert (xq.view(3, -1, 32).abs().amax(-1) == 127)[amax > 0].all()
    assert torch.equal(xs, xq.float().view(3, -1, 16).sum(-1))


def _blocks(qtype, shape, seed):
    """Random blocks with moderate fp16 scales (random bits reach 65504, and sums of such are all rounding)."""
    raw = random_bytes(qtype, shape, seed)
    blocks = raw.reshape(-1, quant.block_size(qtype)[1])
    rng = np.random.default_rng(seed)
    for at in F16_FIELDS[qtype]:
        d = rng.uniform(-0.05, 0.05, len(blocks)).astype(np.float16)
        blocks[:, at:at + 2] = d.view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(raw)


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", FUSED)
@pytest.mark.parametrize("shape", [(48, 512), (300, 768), (1536, 4096)])
def test_fused_pairs_equal_dequantize_then_matmul(qtype, shape):
    dev = torch.device("cuda")
    assert quant.fused_supported(qtype, dev)
    rng = np.random.default_rng(shape[0] + int(qtype))
    # three different weights, used by pairs in a scrambled order
    weights = [_blocks(qtype, shape, seed + 7 * shape[1]).to(dev) for seed in range(3)]
    x = torch.from_numpy(rng.standard_normal((4, shape[1])).astype(np.float32)).to(dev)
    which = [2, 0, 1, 1, 0]
    rows = [3, 0, 1, 3, 2]
    base = weights[1]  # offsets from any weight on the device, negative too
    offs = torch.tensor([weights[w].data_ptr() - base.data_ptr() for w in which], dtype=torch.int64, device=dev)
    y = quant.fused_gemv_pairs(x, base, offs, torch.tensor(rows, device=dev), qtype, shape)
    torch.cuda.synchronize()
    assert y.shape == (len(which), shape[0]) and y.dtype == torch.float32
    for p, (w, r) in enumerate(zip(which, rows)):
        want = _ref(x[r: r + 1], weights[w], qtype, shape)[0]
        err = (y[p].double() - want).norm() / want.norm()
        assert err < 1e-5, (p, float(err))
    if qtype in Q8_ACTS:  # float activations (as Q4_K/Q5_K weights at 2-byte alignment take them)
        yf = quant.fused_gemv_pairs(x, base, offs, torch.tensor(rows, device=dev), qtype, shape, q8=False)
        for p, (w, r) in enumerate(zip(which, rows)):
            want = quant.dequantize(weights[w], qtype, shape).double() @ x[r].double()
            assert (yf[p].double() - want).norm() / want.norm() < 1e-5
            assert 1e-5 < (y[p].double() - want).norm() / want.norm() < 0.02  # 8-bit activations: close, not equal


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K])
@pytest.mark.parametrize("tune", [(2, 1, 1, 16), (8, 4, 1, 16), (16, 1, 1, 2), (4, 1, 1, 8)])
@pytest.mark.parametrize("shape", [(40, 4096), (300, 768), (36, 1536)])
def test_one_superblock_a_thread_kernels_equal_dequantize_then_matmul(qtype, tune, shape):
    """The kernels that give each thread one superblock (a tune's 4th number), also where that many
    superblocks do not divide a row (768: 3; 1536: 6; the threads past a row's end take no part), and on
    weights at odd offsets (Q6_K blocks start mid-word in every other block; here whole weights do too)."""
    from flashmoe_stream.quant import _triton

    dev = torch.device("cuda")
    n = quant.nbytes(qtype, shape)
    align = 2 if qtype == Q.Q6_K else 16
    weights = [_blocks(qtype, shape, seed) for seed in range(2)]
    pool = torch.zeros(align + 2 * n, dtype=torch.uint8)
    pool[align:align + n], pool[align + n:] = weights
    pool = pool.to(dev)
    x = torch.randn(3, shape[1], device=dev)
    offs = torch.tensor([align + n, align, align + n], dtype=torch.int64, device=dev)
    rows = torch.tensor([2, 0, 1], device=dev)
    y = _triton.gemv_pairs(x, pool, offs, rows, qtype, shape, tune=tune)
    for p, (w, r) in enumerate(zip([1, 0, 1], [2, 0, 1])):
        want = _ref(x[r: r + 1], weights[w].to(dev), qtype, shape)[0]
        assert (y[p].double() - want).norm() / want.norm() < 1e-5, p


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_planar_layout_puts_piece_j_of_every_superblock_in_plane_j(qtype):
    """to_planar: byte b of 16-byte piece j of superblock i lands at 16 (j n + i) + b (n superblocks); Q6_K's
    last two bytes (d) after the 13 planes, 2 i on; from_planar gives the blocks back."""
    from flashmoe_stream.quant import _triton

    shape = (6, 768)
    raw = _blocks(qtype, shape, 3)
    block = quant.block_size(qtype)[1]
    n = raw.numel() // block
    got = _triton.to_planar(raw, qtype, shape)
    assert got.shape == raw.shape
    blocks = raw.view(n, block)
    for i in (0, 1, n - 1):
        for j in range(block // 16):
            assert torch.equal(got[16 * (j * n + i):16 * (j * n + i) + 16], blocks[i, 16 * j:16 * j + 16])
        if block % 16:
            at = block // 16 * 16 * n + 2 * i
            assert torch.equal(got[at:at + 2], blocks[i, -2:])
    assert torch.equal(_triton.from_planar(got, qtype, shape), raw)
    ids = torch.tensor([4, 0, 4, 5])
    assert torch.equal(_triton.planar_rows(got, qtype, shape, ids), raw.view(shape[0], -1)[ids])
    with pytest.raises(ValueError):
        _triton.to_planar(raw[:-16], qtype, shape)
    with pytest.raises(ValueError):
        _triton.to_planar(raw, Q.Q8_0, shape)
    with pytest.raises(ValueError):
        _triton.to_planar(raw, qtype, shape, chunk=4)  # chunks must divide the rows


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K])
def test_planar_chunks_are_planar_weights_one_after_another(qtype):
    """to_planar(chunk=c): rows c*i.. are the planar layout of that [c, K] weight, the chunks one after
    another; from_planar and planar_rows undo it."""
    from flashmoe_stream.quant import _triton

    shape, chunk = (6, 768), 2
    raw = _blocks(qtype, shape, 4)
    got = _triton.to_planar(raw, qtype, shape, chunk)
    step = raw.numel() // 3
    for c in range(3):
        assert torch.equal(got[c * step:(c + 1) * step],
                           _triton.to_planar(raw[c * step:(c + 1) * step], qtype, (chunk, shape[1])))
    assert not torch.equal(got, _triton.to_planar(raw, qtype, shape))
    assert torch.equal(_triton.from_planar(got, qtype, shape, chunk), raw)
    ids = torch.tensor([5, 0, 3, 2, 5])
    assert torch.equal(_triton.planar_rows(got, qtype, shape, ids, chunk), raw.view(shape[0], -1)[ids])


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K])
@pytest.mark.parametrize("tune", [(2, 1, 1, 16), (8, 4, 1, 16), (16, 1, 1, 2), (4, 1, 1, 8)])
@pytest.mark.parametrize("shape", [(40, 4096), (300, 768), (36, 1536)])
@pytest.mark.parametrize("early", [False, True])
def test_planar_kernels_equal_dequantize_then_matmul(qtype, tune, shape, early):
    """The kernels on to_planar's layout, two weights at two 16-byte aligned offsets of one pool, each pair
    against its own input row; ``early``: (on GPUs that launch with PDL) the weights prefetched before the
    kernel waits for the one before."""
    from flashmoe_stream.quant import _triton

    dev = torch.device("cuda")
    n = quant.nbytes(qtype, shape)
    weights = [_blocks(qtype, shape, seed) for seed in range(2)]
    at = [16, 16 + n + (-n) % 16]
    pool = torch.zeros(at[1] + n, dtype=torch.uint8)
    for a, w in zip(at, weights):
        pool[a:a + n] = _triton.to_planar(w, qtype, shape)
    pool = pool.to(dev)
    x = torch.randn(3, shape[1], device=dev)
    offs = torch.tensor([at[1], at[0], at[1]], dtype=torch.int64, device=dev)
    rows = torch.tensor([2, 0, 1], device=dev)
    y = _triton.gemv_pairs(x, pool, offs, rows, qtype, shape, tune=tune, planar=True, early=early)
    for p, (w, r) in enumerate(zip([1, 0, 1], [2, 0, 1])):
        want = _ref(x[r: r + 1], weights[w].to(dev), qtype, shape)[0]
        assert (y[p].double() - want).norm() / want.norm() < 1e-5, p


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", FUSED)
@pytest.mark.parametrize("T", [1, 5, 40])  # fused rows, and a prompt (dequantised on use)
@pytest.mark.parametrize("chunk", [None, 64])
def test_qtensor_matmul_and_rows(qtype, T, chunk):
    """QTensor on the GPU, its planar K-quants whole or in chunks of 64 rows (one pair of a launch each)."""
    dev = torch.device("cuda")
    shape = (256, 1024)
    raw = _blocks(qtype, shape, 3).to(dev)
    qt = quant.QTensor(raw, qtype, shape, torch.float32, chunk=chunk)
    assert qt.fused and qt.chunk == (chunk if qt.planar and chunk else shape[0])
    assert torch.equal(qt.blocks(), raw)
    x = torch.randn(T, shape[1], device=dev)
    got = qt.matmul(x)
    want = _ref(x, raw, qtype, shape, fused=T <= 8)
    assert got.shape == (T, shape[0]) and got.dtype == torch.float32
    assert (got.double() - want).norm() / want.norm() < 1e-4
    ids = torch.tensor([[5, 0], [255, 5]], device=dev)
    assert torch.equal(qt.rows(ids), quant.dequantize(raw, qtype, shape)[ids])


def test_qtensor_rejects_a_wrong_size():
    with pytest.raises(ValueError):
        quant.QTensor(torch.zeros(100, dtype=torch.uint8), Q.Q8_0, (4, 64), torch.float32)


def test_no_fused_kernels_on_the_cpu():
    assert not quant.fused_supported(Q.Q4_K, torch.device("cpu"))
    raw = _blocks(Q.Q8_0, (8, 64), 1)  # moderate scales: random fp16 bits make the sums all cancellation
    qt = quant.QTensor(raw, Q.Q8_0, (8, 64), torch.float32)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    assert not qt.fused
    got, want = qt.matmul(x), _ref(x, raw, Q.Q8_0, (8, 64))
    assert got.shape == (2, 8) and (got.double() - want).norm() / want.norm() < 1e-5
