"""A live server on 127.0.0.1 (the tiny synthetic model) and small HTTP helpers for raw requests."""

import http.client
import json
import time
import urllib.parse

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")

from flashmoe_stream.server import Server  # noqa: E402


@pytest.fixture(scope="session")
def tiny(make_model):
    return make_model("qwen3moe", "Q8_0")


@pytest.fixture(scope="module")
def server(tiny):
    with Server(tiny, port=0, n_slots=2, n_ctx=512, max_queue=8) as srv:
        yield srv


def client(srv, **kw):
    from openai import OpenAI

    return OpenAI(base_url=srv.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, timeout=60, **kw)


def request(srv, method, path, body=None, headers=None):
    """(status, headers, parsed JSON or text) of one raw request; ``body`` bytes are sent as they are."""
    u = urllib.parse.urlparse(srv.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    try:
        return r.status, dict(r.getheaders()), json.loads(text)
    except json.JSONDecodeError:
        return r.status, dict(r.getheaders()), text


def metrics(srv) -> dict[str, float]:
    _, _, text = request(srv, "GET", "/metrics")
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name.removeprefix("flashmoe_")] = float(value)
    return out


def wait_for(cond, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
