"""`flashmoe serve` and `flashmoe bench serve` from the command line."""

import json
import signal
import socket
import subprocess
import sys
import time

import pytest

from flashmoe_stream.errors import FlashMoeError
from flashmoe_stream.server import bench_serve
from flashmoe_stream.server.bench import _check_loopback



def flashmoe(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "flashmoe_stream", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_answers_then_stops_on_a_signal(tiny, sig):
    port = free_port()
    p = flashmoe("serve", "-m", tiny, "--port", port, "-np", "2", "-c", "256", "--temp", "0", "--alias", "tiny")
    try:
        from openai import OpenAI

        api = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=30)
        deadline = time.monotonic() + 60
        while True:
            try:
                models = api.models.list()
                break
            except Exception:
                assert p.poll() is None, p.stderr.read()
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
        assert [m.id for m in models.data] == ["tiny"]
        a = api.completions.create(model="tiny", prompt="hi", max_tokens=6).choices[0].text
        b = api.completions.create(model="tiny", prompt="hi", max_tokens=6).choices[0].text
        assert a == b  # --temp 0 is the server's default for requests that set none
    finally:
        p.send_signal(sig)
        out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert f"on http://127.0.0.1:{port}/v1 (2 slots of 128 tokens" in err and "Traceback" not in err
    assert err.endswith("flashmoe serve: stopped\n")


def test_serve_errors_are_one_line(tiny, tmp_path):
    p = flashmoe("serve", "-m", tmp_path / "missing.gguf", "--port", free_port())
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1 and err.count("\n") == 1 and err.startswith("flashmoe: error:")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        p = flashmoe("serve", "-m", tiny, "--port", busy.getsockname()[1])
        _, err = p.communicate(timeout=60)
    assert p.returncode == 1 and "is in use" in err and err.count("\n") == 1
    p = flashmoe("serve", "-m", tiny, "--port", free_port(), "-np", "4", "-c", "4")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1 and "raise -c" in err and err.count("\n") == 1


def test_bench_serve_reports_latency_without_errors(server):
    out = bench_serve(server.url, clients=4, seconds=2, max_tokens=8, progress=False)
    assert out["errors"] == 0 and out["requests"] >= 4
    assert out["completion_tokens"] > 0 and out["tokens_per_s"] > 0
    assert 0 < out["latency_s"]["p50"] <= out["latency_s"]["p99"] <= out["latency_s"]["max"]
    assert out["server"]["batched_steps_total"] > 0


def test_bench_serve_cli_json(tiny):
    p = flashmoe("bench", "serve", "-m", tiny, "-np", "1", "-c", "256", "--seconds", "1", "--max-tokens", "4",
                 "--json")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    r = json.loads(out)
    assert r["clients"] == 2 and r["errors"] == 0 and r["requests"] > 0 and r["slots"] == 1


@pytest.mark.parametrize("url", ["http://10.1.2.3:8080", "http://8.8.8.8", "nonsense"])
def test_bench_serve_stays_on_loopback(url):
    with pytest.raises(FlashMoeError):
        _check_loopback(url)
    _check_loopback("http://127.0.0.1:8080")
    _check_loopback("http://[::1]:8080")
