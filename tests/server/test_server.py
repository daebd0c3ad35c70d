"""`flashmoe serve` against the official openai client on 127.0.0.1: plain, streamed, two at once,
sampling, stop strings, bad requests, disconnects, a full queue, a failing forward pass, the API key."""

import http.client
import json
import threading
import urllib.parse

import openai
import pytest

import flashmoe_stream as fms
from flashmoe_stream.engine import ChatTemplate
from flashmoe_stream.server import Server

from .conftest import client, metrics, request, wait_for

GREEDY = dict(temperature=0, max_tokens=24)


@pytest.fixture(scope="module")
def reference(tiny):
    """Engine.generate, one sequence alone, with the numerics the server uses."""
    with fms.Engine.open(tiny, llama_numerics=False) as eng:
        def generate(prompt, **kw):
            return eng.generate(prompt, stream=False, **{**GREEDY, **kw})

        generate.template = ChatTemplate.from_metadata(eng.metadata)
        yield generate


def test_models_health_and_metrics(server, tiny):
    models = client(server).models.list()
    assert [m.id for m in models.data] == [server.model_id] == [tiny.stem]  # the file name without .gguf
    status, _, health = request(server, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["slots_idle"] == 2
    m = metrics(server)
    for name in ("requests_queued", "tokens_per_second", 'cache_hit_ratio{tier="device"}',
                 'cache_hit_ratio{tier="host"}', "disk_read_bytes_total", 'requests_total{outcome="ok"}'):
        assert name in m
    assert m["slot_context_tokens"] == 256  # -c 512 split across -np 2


def test_greedy_completion_equals_the_engine_alone(server, reference):
    r = client(server).completions.create(model="x", prompt="What's AI?", **GREEDY)
    c = r.choices[0]
    assert c.text == reference("What's AI?") and len(c.text) > 0
    assert c.finish_reason == "length" and r.usage.completion_tokens == 24
    assert r.object == "text_completion" and r.model == server.model_id


def test_chat_uses_the_models_template(server, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]
    r = client(server).chat.completions.create(model="x", messages=messages, **GREEDY)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == reference(reference.template.render(messages))
    assert r.usage.prompt_tokens > 10 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


@pytest.mark.parametrize("chat", [True, False])
def test_streamed_equals_plain(server, chat):
    api = client(server)
    if chat:
        kw = dict(model="x", messages=[{"role": "user", "content": "Tell me about disks."}], **GREEDY)
        plain = api.chat.completions.create(**kw)
        chunks = list(api.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == plain.choices[0].message.content
    else:
        kw = dict(model="x", prompt="Tell me about disks.", **GREEDY)
        plain = api.completions.create(**kw)
        chunks = list(api.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == plain.choices[0].text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [plain.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens == 24
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_two_at_once_decode_together_and_match_alone(server, reference):
    prompts = ["The cache holds experts", "Disks are slow, memory is"]
    alone = [reference(p, max_tokens=32) for p in prompts]
    before = metrics(server)["batched_steps_total"]
    out = [None, None]
    barrier = threading.Barrier(2)

    def go(i):
        api = client(server)
        barrier.wait()
        if i == 0:
            out[i] = api.completions.create(model="x", prompt=prompts[i], temperature=0, max_tokens=32).choices[0].text
        else:  # one streamed beside one plain
            s = api.completions.create(model="x", prompt=prompts[i], temperature=0, max_tokens=32, stream=True)
            out[i] = "".join(c.choices[0].text for c in s if c.choices)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == alone
    assert metrics(server)["batched_steps_total"] > before  # they really shared forward passes


def test_stop_strings_end_the_text_before_them(server, reference):
    full = reference("What's AI?")
    stop = full[6:9]
    cut = full.find(stop)
    api = client(server)
    r = api.completions.create(model="x", prompt="What's AI?", stop=[stop, "never-appears"], **GREEDY)
    assert r.choices[0].text == full[:cut] and r.choices[0].finish_reason == "stop"
    s = api.completions.create(model="x", prompt="What's AI?", stop=stop, stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in s if c.choices) == full[:cut]


def test_sampling_parameters_and_seed(server):
    api = client(server)
    kw = dict(model="x", prompt="Once upon a time", max_tokens=16, temperature=1.2, top_p=0.9, seed=11,
              extra_body={"top_k": 50, "min_p": 0.01, "repeat_penalty": 1.1})
    a, b = (api.completions.create(**kw).choices[0].text for _ in range(2))
    c = api.completions.create(**{**kw, "seed": 12}).choices[0].text
    assert a == b and a != c
    greedy = api.completions.create(model="x", prompt="Once upon a time", max_tokens=16, temperature=0).choices[0].text
    assert a != greedy


def _error(body):
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("body,param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "hi", "n": 2}, "n"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [1, 100000]}, "prompt"),
    ({"max_tokens": 4}, "prompt"),
    ({"prompt": "hi", "seed": 2 ** 64}, "seed"),
    ({"prompt": "hi", "stop": 5}, "stop"),
    ({"prompt": "hi", "logprobs": 2}, "logprobs"),
    ({"prompt": "hi", "echo": True}, "echo"),
])
def test_bad_completion_requests_are_400(server, body, param):
    status, _, out = request(server, "POST", "/v1/completions", body)
    assert status == 400
    err = _error(out)
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_bad_chat_requests_are_400(server):
    for body in ({"messages": "hi"}, {"messages": []}, {"messages": [{"content": "no role"}]},
                 {"messages": [{"role": "user", "content": "hi"}], "stream": "perhaps"},
                 {"messages": [{"role": "user", "content": "hi"}], "logprobs": True},
                 {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}):
        status, _, out = request(server, "POST", "/v1/chat/completions", body)
        assert status == 400, body
        _error(out)
    status, _, out = request(server, "GET", "/v1/nothing-here")
    assert status == 404 and _error(out)["type"] == "not_found_error"


def test_a_prompt_longer_than_the_slot_is_400_and_says_so(server):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).completions.create(model="x", prompt="word " * 300, max_tokens=4)
    assert e.value.status_code == 400 and e.value.code == "context_length_exceeded"
    assert "context is 256" in e.value.message
    assert request(server, "GET", "/health")[2]["status"] == "ok"


@pytest.fixture
def one_slot(tiny):
    with Server(tiny, port=0, n_slots=1, n_ctx=512, max_queue=0) as srv:
        yield srv


def test_a_streaming_client_that_disconnects_frees_its_slot(one_slot):
    api = client(one_slot)
    stream = api.completions.create(model="x", prompt="Go on forever", max_tokens=400, temperature=0, stream=True)
    for _, _ in zip(range(3), stream):
        pass
    stream.close()
    wait_for(lambda: metrics(one_slot)['requests_total{outcome="cancelled"}'] == 1, what="the cancel")
    m = metrics(one_slot)
    assert m["requests_processing"] == 0 and m["generated_tokens_total"] < 200
    r = api.completions.create(model="x", prompt="next", max_tokens=4, temperature=0)  # the slot is free again
    assert r.usage.completion_tokens == 4


def test_a_plain_client_that_disconnects_frees_its_slot(one_slot):
    u = urllib.parse.urlparse(one_slot.url)
    conn = http.client.HTTPConnection(u.hostname, u.port)
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "Go", "max_tokens": 400, "temperature": 0}),
                 headers={"Content-Type": "application/json"})
    wait_for(lambda: metrics(one_slot)["requests_processing"] == 1, what="the request to start")
    conn.close()
    wait_for(lambda: metrics(one_slot)['requests_total{outcome="cancelled"}'] == 1, what="the cancel")
    assert metrics(one_slot)["generated_tokens_total"] < 200


def test_a_full_queue_answers_503_with_retry_after(one_slot):
    api = client(one_slot)
    stream = api.completions.create(model="x", prompt="Go on forever", max_tokens=400, temperature=0, stream=True)
    next(iter(stream))
    with pytest.raises(openai.APIStatusError) as e:
        api.completions.create(model="x", prompt="me too", max_tokens=4)
    assert e.value.status_code == 503 and int(e.value.response.headers["retry-after"]) >= 1
    assert e.value.body["type"] == "unavailable_error"
    stream.close()
    assert metrics(one_slot)['requests_total{outcome="rejected"}'] == 1


def test_a_failing_forward_pass_fails_its_request_not_the_server(one_slot):
    model = one_slot.scheduler.model
    real = model.forward_batch
    calls = []

    def broken(segments, *a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected fault")
        return real(segments, *a, **kw)

    model.forward_batch = broken
    try:
        api = client(one_slot)
        with pytest.raises(openai.InternalServerError) as e:
            api.completions.create(model="x", prompt="boom", max_tokens=4)
        assert "injected fault" in e.value.message
        with pytest.raises(openai.APIError, match="injected fault"):
            model.forward_batch = broken
            calls.clear()
            list(api.completions.create(model="x", prompt="boom", max_tokens=4, stream=True))
        r = api.completions.create(model="x", prompt="fine", max_tokens=4, temperature=0)
        assert r.usage.completion_tokens == 4
    finally:
        model.forward_batch = real
    assert metrics(one_slot)['requests_total{outcome="failed"}'] == 2


def test_api_key(tiny):
    with Server(tiny, port=0, n_slots=1, n_ctx=256, api_key="s3cret") as srv:
        with pytest.raises(openai.AuthenticationError):
            client(srv, api_key="wrong").models.list()
        status, _, out = request(srv, "POST", "/v1/completions", {"prompt": "hi"})
        assert status == 401 and _error(out)["code"] == "invalid_api_key"
        assert client(srv, api_key="s3cret").completions.create(model="x", prompt="hi", max_tokens=2).choices
        assert request(srv, "GET", "/health")[0] == 200  # health needs no key
