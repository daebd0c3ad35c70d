"""quant.qmatmul / quant.qbmm and the native CPU kernels (quant/_qdot.c) against dequantize + matmul.

The references are computed in float64 from the same float32 inputs: the native kernels must agree to
float32 summation rounding. With round_acts the activations are first rounded with models/common.py's
own functions (the rounding the model uses to match llama.cpp).
"""

import os

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from flashmoe_stream import quant
from flashmoe_stream.quant._acts import round_q8_0 as _round_q8_0, round_q8_k as _round_q8_k
from flashmoe_stream.quant import _cpu

from .test_dequant import random_bytes

NO_NATIVE = os.environ.get("FLASHMOE_NO_NATIVE", "0") == "1"
needs_native = pytest.mark.skipif(NO_NATIVE, reason="FLASHMOE_NO_NATIVE=1")

Q8_0_FAMILY = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)
K_QUANTS = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
NATIVE = Q8_0_FAMILY + K_QUANTS
NOT_NATIVE = (Q.IQ4_XS, Q.MXFP4, Q.IQ4_NL)
ROWS = (1, 3, 40)


def shapes(qtype):
    """(N, K): a whole number of 256-weight chunks, and (32-weight types) a ragged last chunk."""
    if GGML_QUANT_SIZES[qtype][0] == 256:
        return [(33, 256), (64, 768)]
    return [(33, 256), (20, 288), (7, 96)]


def weights(qtype, shape, seed, offset=0):
    """Random valid blocks of an [N, K] weight, as a view at byte ``offset`` of a larger buffer."""
    rng = np.random.default_rng(seed)
    raw = quant.random_blocks(qtype, shape[0] * shape[1], 0.05, rng)
    buf = torch.zeros(raw.size + offset + 5, dtype=torch.uint8)
    buf[offset:offset + raw.size] = torch.from_numpy(raw)
    return buf[offset:offset + raw.size]


def acts(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x[..., :7] *= 6  # a few outliers, as real activations have
    return x


def model_rounding(qtype):
    return _round_q8_0 if qtype in Q8_0_FAMILY + (Q.IQ4_NL, Q.MXFP4) else _round_q8_k


def reference(x, raw, qtype, shape, round_acts):
    """x @ W.T (x first rounded as models/common.py does, with round_acts), in float64."""
    if round_acts:
        x = model_rounding(qtype)(x)
    w = quant.dequantize(raw, qtype, shape)
    return x.double() @ w.double().T


def assert_close(got, want):
    assert got.dtype == torch.float32 and got.shape == want.shape
    err = ((got.double() - want).abs().max() / want.abs().max()).item()
    assert err < 1e-5, f"relative error {err:.3g}"


@needs_native
def test_native_kernels_are_built():
    assert _cpu.available(), "flashmoe_stream.quant._qdot is missing: run `pip install -e .` (needs a C compiler)"
    assert all(_cpu.supported(t) for t in NATIVE)
    assert not any(_cpu.supported(t) for t in NOT_NATIVE)


@needs_native
@pytest.mark.parametrize("round_acts", [False, True], ids=["float", "llama"])
@pytest.mark.parametrize("T", ROWS)
@pytest.mark.parametrize("qtype", NATIVE, ids=lambda t: t.name)
def test_native_matches_reference(qtype, T, round_acts, monkeypatch):
    monkeypatch.setattr(_cpu, "MAX_ROWS", 64)  # the kernel itself, even where the door would not use it
    for i, shape in enumerate(shapes(qtype)):
        raw = weights(qtype, shape, seed=i, offset=i)  # odd byte offsets: no alignment is needed
        x = acts((T, shape[1]), seed=10 * T + i)
        got = _cpu.qmatmul_cpu(x, raw, qtype, shape, round_acts=round_acts)
        assert got is not None
        assert_close(got, reference(x, raw, qtype, shape, round_acts))


@pytest.mark.parametrize("round_acts", [False, True], ids=["float", "llama"])
@pytest.mark.parametrize("T", ROWS)
@pytest.mark.parametrize("qtype", NATIVE + NOT_NATIVE, ids=lambda t: t.name)
def test_qmatmul(qtype, T, round_acts, monkeypatch):
    """The door: native where it serves the call (asserted, unless FLASHMOE_NO_NATIVE=1), else the fallback."""
    native = []
    real = _cpu.qmatmul_cpu

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        native.append(out is not None)
        return out

    monkeypatch.setattr(_cpu, "qmatmul_cpu", spy)
    shape = shapes(qtype)[-1]
    raw = weights(qtype, shape, seed=3, offset=1)
    x = acts((T, shape[1]), seed=T)
    assert_close(quant.qmatmul(x, raw, qtype, shape, round_acts), reference(x, raw, qtype, shape, round_acts))
    assert native == [not NO_NATIVE and qtype in NATIVE and T <= _cpu.MAX_ROWS]


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q8_0, Q.IQ4_XS], ids=lambda t: t.name)
@pytest.mark.parametrize("round_acts", [False, True], ids=["float", "llama"])
def test_qmatmul_leading_dims(qtype, round_acts):
    shape = (16, 256)
    raw = weights(qtype, shape, seed=5)
    x = acts((2, 3, 256), seed=1)
    got = quant.qmatmul(x, raw, qtype, shape, round_acts)
    assert got.shape == (2, 3, 16)
    assert_close(got, reference(x, raw, qtype, shape, round_acts))


@pytest.mark.parametrize("round_acts", [False, True], ids=["float", "llama"])
@pytest.mark.parametrize("shared_x", [False, True], ids=["own_x", "shared_x"])
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0, Q.IQ4_XS], ids=lambda t: t.name)
def test_qbmm(qtype, shared_x, round_acts):
    n, T, shape = 5, 2, (24, 512)
    raws = [weights(qtype, shape, seed=e, offset=e) for e in range(n)]
    x = acts((1, T, shape[1]), seed=2).expand(n, T, shape[1]) if shared_x else acts((n, T, shape[1]), seed=2)
    got = quant.qbmm(x, raws, qtype, shape, round_acts)
    assert got.shape == (n, T, shape[0])
    for e in range(n):
        assert_close(got[e], reference(x[e], raws[e], qtype, shape, round_acts))


@needs_native
@pytest.mark.parametrize("round_acts", [False, True], ids=["float", "llama"])
def test_threads_do_not_change_results(round_acts):
    qtype, shape = Q.Q4_K, (50, 768)
    raws = [weights(qtype, shape, seed=e) for e in range(3)]
    x = acts((3, 2, shape[1]), seed=0)
    one = _cpu.qbmm_cpu(x, raws, qtype, shape, round_acts, n_threads=1)
    for threads in (2, 3, 7):
        assert torch.equal(_cpu.qbmm_cpu(x, raws, qtype, shape, round_acts, n_threads=threads), one)


@pytest.mark.parametrize("round_acts", [False, True], ids=["float", "llama"])
def test_many_rows_dequantise_and_multiply(round_acts):
    qtype, shape = Q.Q4_K, (8, 256)
    raw = weights(qtype, shape, seed=1)
    x = acts((_cpu.MAX_ROWS + 1, 256), seed=0)
    assert_close(quant.qmatmul(x, raw, qtype, shape, round_acts), reference(x, raw, qtype, shape, round_acts))
    raws = [raw, weights(qtype, shape, seed=2)]
    xx = acts((2, _cpu.MAX_ROWS + 1, 256), seed=1)
    got = quant.qbmm(xx, raws, qtype, shape, round_acts)
    for e in range(2):
        assert_close(got[e], reference(xx[e], raws[e], qtype, shape, round_acts))


@needs_native
@pytest.mark.parametrize("round_acts", [False, True], ids=["float", "llama"])
def test_a_prompt_runs_in_native_chunks_each_row_as_alone(round_acts):
    """qmatmul of more rows than one native call takes: chunks of MAX_ROWS, each row bit-identical to the
    row multiplied alone (a prompt's logits do not depend on how its rows were grouped)."""
    qtype, shape = Q.Q4_K, (8, 256)
    raw = weights(qtype, shape, seed=3)
    x = acts((2 * _cpu.MAX_ROWS + 5, 256), seed=2)
    got = quant.qmatmul(x, raw, qtype, shape, round_acts)
    alone = torch.cat([quant.qmatmul(x[i: i + 1], raw, qtype, shape, round_acts) for i in range(x.shape[0])])
    assert torch.equal(got, alone)


@needs_native
def test_too_many_rows_is_left_to_the_caller():
    shape = (8, 256)
    x = acts((_cpu.MAX_ROWS + 1, 256), seed=0)
    assert _cpu.qmatmul_cpu(x, weights(Q.Q4_K, shape, 0), Q.Q4_K, shape) is None


def test_wrong_byte_count_raises():
    raw = weights(Q.Q4_K, (8, 256), 0)
    with pytest.raises(ValueError):
        quant.qmatmul(acts((1, 256), 0), raw[:-1], Q.Q4_K, (8, 256))


@needs_native
@pytest.mark.parametrize("qtype", NATIVE, ids=lambda t: t.name)
def test_native_dequantize_bit_identical(qtype):
    shape = (9, 512) if GGML_QUANT_SIZES[qtype][0] == 256 else (9, 288)
    raw = weights(qtype, shape, seed=7, offset=3)
    got = _cpu.dequantize_cpu(raw, qtype, shape[0] * shape[1])
    want = quant.dequantize(raw, qtype, shape).reshape(-1)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@needs_native
def test_concurrent_calls():
    """ctypes releases the GIL: calls from several Python threads at once run together and stay correct."""
    from concurrent.futures import ThreadPoolExecutor

    qtype, shape = Q.Q6_K, (64, 512)
    raws = [weights(qtype, shape, seed=e) for e in range(4)]
    xs = [acts((4, 1, shape[1]), seed=s) for s in range(8)]
    want = [_cpu.qbmm_cpu(x, raws, qtype, shape, round_acts=bool(i % 2)) for i, x in enumerate(xs)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda ix: _cpu.qbmm_cpu(ix[1], raws, qtype, shape, round_acts=bool(ix[0] % 2)),
                            enumerate(xs * 4)))
    for i, g in enumerate(got):
        assert torch.equal(g, want[i % len(xs)])


@needs_native
def test_a_forked_child_starts_its_own_threads():
    """The native calls keep a pool of parked threads; a child made by fork() has none of them, and its
    threaded calls must neither hang waiting for them nor go wrong."""
    import time

    qtype, shape = Q.Q4_K, (768, 2048)  # enough rows for 3 threads
    raws = [weights(qtype, shape, seed=e) for e in range(2)]
    x = acts((2, 1, shape[1]), seed=3)
    want = _cpu.qbmm_cpu(x, raws, qtype, shape, True, n_threads=3)  # the pool has two workers now
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if its threaded call gives the parent's result
        ok = torch.equal(_cpu.qbmm_cpu(x, raws, qtype, shape, True, n_threads=3), want)
        os._exit(0 if ok else 1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's native call hung")
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("round_acts", [False, True])
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q8_0])
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(qtype, round_acts):
    """Bit for bit: several rows at once equal each row alone (sequences batched together must equal each
    alone, and the logits must not depend on how the cache groups experts)."""
    shape = (64, 512)
    raws = [weights(qtype, shape, seed) for seed in range(2)]
    x = torch.randn(2, 5, 512, generator=torch.Generator().manual_seed(3))
    full = quant.qbmm(x, raws, qtype, shape, round_acts=round_acts)
    alone = torch.cat([quant.qbmm(x[:, i: i + 1], raws, qtype, shape, round_acts=round_acts) for i in range(5)], 1)
    assert torch.equal(full, alone)


def test_small_ops_on_one_thread_keeps_the_native_threads():
    """Within the context torch runs on one thread and the native calls get the count torch had; it nests,
    and torch's count comes back on leaving, also by an exception."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with quant.small_ops_on_one_thread():
            assert torch.get_num_threads() == 1
            assert _cpu._n_threads(None) == 3 and _cpu._n_threads(5) == 5
            with quant.small_ops_on_one_thread():
                assert torch.get_num_threads() == 1 and _cpu._n_threads(None) == 3
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 3 and _cpu._n_threads(None) == 3
        with pytest.raises(RuntimeError):
            with quant.small_ops_on_one_thread():
                raise RuntimeError("boom")
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_a_cpu_decode_step_runs_torch_on_one_thread(monkeypatch):
    """The layer loop on the CPU, for a step of few rows, runs inside small_ops_on_one_thread; a long
    prompt (dequantise + torch GEMMs) keeps torch's threads."""
    from flashmoe_stream.models import base

    seen = []
    monkeypatch.setattr(base.StreamingDecoder, "_layers",
                        lambda self, segments, sizes, on_route: seen.append(torch.get_num_threads()) or [])
    m = base.StreamingDecoder()
    m.device = torch.device("cpu")

    class KV:
        length, n_ctx = 0, 1000

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        m.forward_batch([(torch.zeros(1, dtype=torch.long), KV())])
        m.forward_batch([(torch.zeros(quant.NATIVE_ROWS + 1, dtype=torch.long), KV())])
        assert seen == [1, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("batched", [False, True])
def test_a_weight_the_native_kernels_do_not_take_gets_torchs_threads_back(monkeypatch, batched):
    """In a decode step (torch on one thread) a weight served by dequantise + torch matmul runs with the
    threads torch had; the step's other ops stay on one."""
    seen = []
    real = quant.dequantize
    monkeypatch.setattr(quant, "dequantize", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    monkeypatch.setattr(_cpu, "qmatmul_cpu", lambda *a, **k: None)  # as for a type without a native kernel
    monkeypatch.setattr(_cpu, "qbmm_cpu", lambda *a, **k: None)
    qtype, shape = Q.Q8_0, (8, 64)
    raw = torch.from_numpy(random_bytes(qtype, shape, 1))
    want = quant.qmatmul(torch.ones(1, 64), raw, qtype, shape)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with quant.small_ops_on_one_thread():
            if batched:
                got = quant.qbmm(torch.ones(1, 1, 64), [raw], qtype, shape)[0]
            else:
                got = quant.qmatmul(torch.ones(1, 64), raw, qtype, shape)
            assert torch.get_num_threads() == 1
        assert seen[-1] == 2 and torch.equal(got, want)
    finally:
        torch.set_num_threads(before)
