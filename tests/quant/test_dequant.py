"""flashmoe_stream.quant against gguf-py's reference dequantisers (llama.cpp's, in numpy)."""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, quants
from hypothesis import given, settings, strategies as st

from flashmoe_stream import quant
from flashmoe_stream.errors import UnsupportedError

TYPES = quant.SUPPORTED_TYPES

# Byte offsets of the fp16 scale fields inside each block (ggml's block_* structs), so tests can make them finite.
F16_FIELDS = {
    Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.IQ4_NL: (0,), Q.IQ4_XS: (0,),
    Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
}


def random_bytes(qtype, shape, seed, finite=True):
    raw = np.random.default_rng(seed).integers(0, 256, quant.nbytes(qtype, shape), dtype=np.uint8)
    blocks = raw.reshape(-1, GGML_QUANT_SIZES[qtype][1])
    for at in F16_FIELDS.get(qtype, ()) if finite else ():
        f = blocks[:, at:at + 2].view(np.uint16)
        f[(f & 0x7C00) == 0x7C00] ^= 0x4000  # exponent all ones (inf/nan) -> a finite value
    return raw


def reference(raw, qtype, shape):
    per_block, block_bytes = GGML_QUANT_SIZES[qtype]
    byte_shape = (*shape[:-1], shape[-1] // per_block * block_bytes)
    with np.errstate(all="ignore"):  # nan/inf scales, MXFP4 overflow: compared like any other value
        return torch.from_numpy(np.array(quants.dequantize(raw.reshape(byte_shape), qtype), dtype=np.float32))


def assert_bit_identical(got, want):
    """Same shape, same NaN positions, and every other value identical to the bit (so -0.0 != 0.0)."""
    assert got.dtype == torch.float32 and got.shape == want.shape
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    diff = (got.view(torch.int32) != want.view(torch.int32)) & ~nan
    assert not diff.any(), f"{int(diff.sum())} values differ, first at {diff.nonzero()[0].tolist()}"


def shapes(qtype):
    """1-D rows, 2-D matrices and 3-D expert stacks [n_expert, rows, cols] of whole blocks."""
    per_block = GGML_QUANT_SIZES[qtype][0]
    cols = st.integers(1, 4 if per_block > 1 else 64).map(lambda k: k * per_block)
    return st.one_of(
        st.tuples(cols),
        st.tuples(st.integers(1, 5), cols),
        st.tuples(st.integers(1, 3), st.integers(1, 4), cols),
    )


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@settings(max_examples=40, deadline=None)
@given(data=st.data(), seed=st.integers(0, 2**32 - 1), finite=st.booleans())
def test_bit_identical_to_gguf_py(qtype, data, seed, finite):
    shape = data.draw(shapes(qtype))
    raw = random_bytes(qtype, shape, seed, finite)
    assert_bit_identical(quant.dequantize(torch.from_numpy(raw), qtype, shape), reference(raw, qtype, shape))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_bit_identical_on_many_blocks(qtype):
    """Thousands of blocks, so every byte value lands in every field."""
    shape = (8, 4096) if GGML_QUANT_SIZES[qtype][0] > 1 else (64, 512)
    raw = random_bytes(qtype, shape, seed=int(qtype))
    assert_bit_identical(quant.dequantize(torch.from_numpy(raw), qtype, shape), reference(raw, qtype, shape))


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_bit_identical_on_cuda(qtype):
    shape = (4, 8, 2048) if GGML_QUANT_SIZES[qtype][0] > 1 else (64, 512)
    raw = random_bytes(qtype, shape, seed=int(qtype))
    got = quant.dequantize(torch.from_numpy(raw).cuda(), qtype, shape)
    assert got.device.type == "cuda"
    assert_bit_identical(got.cpu(), reference(raw, qtype, shape))


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.IQ4_XS, Q.BF16, Q.F32], ids=lambda t: t.name)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_dtype_is_the_float32_result_cast(qtype, dtype):
    shape = (3, 512)
    raw = torch.from_numpy(random_bytes(qtype, shape, seed=1))
    f32 = quant.dequantize(raw, qtype, shape)
    got = quant.dequantize(raw, qtype, shape, dtype=dtype)
    assert got.dtype == dtype and got.shape == shape
    assert torch.equal(got.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       f32.to(dtype).view(torch.int16 if dtype != torch.float32 else torch.int32))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_unaligned_and_empty_inputs(qtype):
    shape = (2, GGML_QUANT_SIZES[qtype][0] * 2)
    raw = random_bytes(qtype, shape, seed=3)
    buf = torch.zeros(raw.size + 3, dtype=torch.uint8)
    for offset in range(4):  # bytes sliced out of a larger buffer at any offset
        buf[offset:offset + raw.size] = torch.from_numpy(raw)
        got = quant.dequantize(buf[offset:offset + raw.size], qtype, shape)
        assert_bit_identical(got, reference(raw, qtype, shape))
    assert quant.dequantize(torch.zeros(0, dtype=torch.uint8), qtype, (0, shape[1])).shape == (0, shape[1])


def test_result_does_not_alias_the_input():
    raw = torch.from_numpy(np.arange(8, dtype=np.float32).view(np.uint8).copy())
    out = quant.dequantize(raw, Q.F32, (8,))
    raw.zero_()
    assert out.tolist() == list(range(8))


def test_unsupported_type_is_named_with_the_supported_ones():
    raw = torch.zeros(quant.nbytes(Q.IQ2_XXS, (256,)), dtype=torch.uint8)
    with pytest.raises(UnsupportedError, match="IQ2_XXS") as e:
        quant.dequantize(raw, Q.IQ2_XXS, (256,))
    assert all(t.name in str(e.value) for t in TYPES)
    with pytest.raises(UnsupportedError, match="999"):
        quant.dequantize(raw, 999, (256,))


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K, Q.F16], ids=lambda t: t.name)
def test_wrong_byte_count(qtype):
    n = quant.nbytes(qtype, (2, 256))
    for bad in (n - 1, n + GGML_QUANT_SIZES[qtype][1], 0):
        with pytest.raises(ValueError, match=rf"{qtype.name}.*\(2, 256\).*{n} bytes, got {bad}"):
            quant.dequantize(torch.zeros(bad, dtype=torch.uint8), qtype, (2, 256))


def test_rows_must_be_whole_blocks():
    with pytest.raises(ValueError, match="multiple of 256"):
        quant.dequantize(torch.zeros(210, dtype=torch.uint8), Q.Q6_K, (2, 128))
    with pytest.raises(ValueError, match="uint8"):
        quant.dequantize(torch.zeros(34, dtype=torch.int8), Q.Q8_0, (32,))


def test_sizes_agree_with_gguf():
    assert set(TYPES) == {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K,
                          Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS, Q.MXFP4}
    for qtype in TYPES + (Q.IQ2_XXS,):  # sizes are known for unsupported types too (inspecting files)
        assert quant.block_size(qtype) == GGML_QUANT_SIZES[qtype]
        shape = (3, 2, 4 * GGML_QUANT_SIZES[qtype][0])
        assert quant.nbytes(qtype, shape) == int(np.prod(quants.quant_shape_to_byte_shape(shape, qtype)))
    with pytest.raises(ValueError):
        quant.nbytes(Q.Q4_K, (1, 100))
    with pytest.raises(UnsupportedError):
        quant.block_size(12345)


# --- random_blocks ----------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_random_blocks_are_zero_mean_with_the_asked_std(qtype):
    std, n = 0.02, 1 << 20
    raw = quant.random_blocks(qtype, n, std, np.random.default_rng(0))
    assert raw.dtype == np.uint8 and raw.shape == (quant.nbytes(qtype, (n,)),)
    w = quant.dequantize(torch.from_numpy(raw), qtype, (n,)).double()
    assert torch.isfinite(w).all()
    assert abs(w.mean().item()) < 0.05 * std
    assert w.std().item() == pytest.approx(std, rel=0.2)
    # offsets cancel inside blocks too (the mins of Q4_1/Q2_K/Q4_K/...), not only on average
    assert w.view(-1, 32).mean(-1).pow(2).mean().sqrt().item() < 0.4 * std
    assert (w != 0).float().mean() > 0.8


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K, Q.MXFP4, Q.F16], ids=lambda t: t.name)
def test_random_blocks_other_stds_and_determinism(qtype):
    for std in (1.0, 1e-3):
        w = quant.dequantize(torch.from_numpy(quant.random_blocks(qtype, 1 << 16, std, np.random.default_rng(1))),
                             qtype, (1 << 16,))
        assert w.std().item() == pytest.approx(std, rel=0.2)
    a = quant.random_blocks(qtype, 4096, 0.1, np.random.default_rng(7))
    b = quant.random_blocks(qtype, 4096, 0.1, np.random.default_rng(7))
    assert np.array_equal(a, b)
    zeros = quant.random_blocks(qtype, 256, 0.0, np.random.default_rng(7))
    assert not quant.dequantize(torch.from_numpy(zeros), qtype, (256,)).any()


def test_random_blocks_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(UnsupportedError, match="IQ2_XXS"):
        quant.random_blocks(Q.IQ2_XXS, 256, 0.1, rng)
    with pytest.raises(ValueError, match="multiple of 256"):
        quant.random_blocks(Q.Q4_K, 100, 0.1, rng)


def test_bench_runs():
    from flashmoe_stream.quant.bench import bench_dequant

    rows = bench_dequant("cpu", mib=1, repeat=1)
    assert [r["type"] for r in rows] == [t.name for t in TYPES]
    assert all(r["gb_per_s_in"] > 0 and r["gb_per_s_out"] > 0 for r in rows)
