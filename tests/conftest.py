import os

import pytest
import torch

from flashmoe_stream.synth import synth


def _interpreting() -> bool:
    """Triton's interpreter is on (TRITON_INTERPRET=1) and Triton imports: the tests marked ``interp`` run
    their kernels on the CPU (e.g. ``TRITON_INTERPRET=1 PYTHONPATH=<triton 3.8> pytest -m interp``)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device (run on the accelerator machine: pytest -m gpu)")
        interp = _interpreting()
        for item in items:
            if "gpu" in item.keywords and not (interp and "interp" in item.keywords):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def make_model(tmp_path_factory):
    """make_model(arch, qtype, **kw) -> path of a synthetic model, made once per session per arguments."""
    cache = {}
    root = tmp_path_factory.mktemp("models")

    def make(arch="qwen3moe", qtype="Q8_0", preset="tiny", **kw):
        key = (arch, qtype, preset, tuple(sorted(kw.items())))
        if key not in cache:
            name = "-".join([arch, qtype, preset] + [f"{k}{v}" for k, v in sorted(kw.items())]) + ".gguf"
            cache[key] = synth(root / name, arch=arch, preset=preset, qtype=qtype, **kw).paths[0]
        return cache[key]

    return make


@pytest.fixture(scope="session")
def llama_cpp():
    """llama-cpp-python, the numeric reference. CI sets FLASHMOE_REQUIRE_LLAMA_CPP=1 so it is never skipped there."""
    try:
        import llama_cpp
    except ImportError:
        if os.environ.get("FLASHMOE_REQUIRE_LLAMA_CPP"):
            raise
        pytest.skip("llama-cpp-python is not installed (pip install -e '.[dev]')")
    low = llama_cpp.llama_cpp
    if not getattr(low, "_flashmoe_no_repack", False):
        # no CPU weight repacking (llama-cli's --no-repack): on CPUs with AMX, llama.cpp moves Q8_0 and other
        # weights into an AMX buffer type whose ops do not cover every graph (deepseek2 aborts in its scheduler)
        default = low.llama_model_default_params

        def no_repack():
            params = default()
            params.use_extra_bufts = False
            return params

        low.llama_model_default_params, low._flashmoe_no_repack = no_repack, True
    return llama_cpp


@pytest.fixture
def gated_reads(monkeypatch):
    """Every io.Reader read waits for ``.gate`` (set it to let them through); ``.started`` is set once one
    has begun, and ``.order`` lists the experts in the order their reads began."""
    import threading
    from types import SimpleNamespace

    from flashmoe_stream.io import Reader

    g = SimpleNamespace(gate=threading.Event(), started=threading.Event(), order=[])
    real = Reader._read

    def gated(self, lay, out):
        g.order.append(lay.expert)
        g.started.set()
        assert g.gate.wait(30)
        return real(self, lay, out)

    monkeypatch.setattr(Reader, "_read", gated)
    return g
