"""Batching slots: one forward pass per step over every active sequence, each sequence's greedy text
equal to its text alone, the context split across slots, a bounded queue, cancellation, stop strings."""

import queue
import threading

import pytest

import flashmoe_stream as fms
from flashmoe_stream.engine import (Failed, Finished, Piece, PromptTooLongError, QueueFullError, SamplingParams,
                                    Scheduler)
from flashmoe_stream.engine.slots import _StopScanner

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def eng(make_model):
    with fms.Engine.open(make_model("qwen3moe", "Q8_0"), llama_numerics=False) as e:
        yield e


class Recorder:
    def __init__(self):
        self.q = queue.Queue()
        self.started = threading.Event()  # the first event came

    def __call__(self, ev):
        self.q.put(ev)
        self.started.set()

    def result(self, timeout=60):
        text = []
        while True:
            ev = self.q.get(timeout=timeout)
            if isinstance(ev, Piece):
                text.append(ev.text)
            else:
                return "".join(text), ev


def count_forwards(model, monkeypatch):
    """Record the segment lengths of every forward_batch call, and the layers each asks the cache for, in
    order (one entry for a run of asks for the same layer: start() then a get() per expert is one fetch)."""
    calls, gets = [], []
    real_fb = model.forward_batch

    def fb(segments, *a, **kw):
        calls.append([int(t.shape[0]) for t, _ in segments])
        gets.append([])
        return real_fb(segments, *a, **kw)

    def recorded(real):
        def ask(layer, ids):
            if gets and (not gets[-1] or gets[-1][-1] != layer):
                gets[-1].append(layer)
            return real(layer, ids)
        return ask

    monkeypatch.setattr(model, "forward_batch", fb)
    for name in ("get", "start"):
        if hasattr(model.experts, name):
            monkeypatch.setattr(model.experts, name, recorded(getattr(model.experts, name)))
    return calls, gets


def test_sequences_decode_together_and_match_alone(eng, monkeypatch):
    prompts = [eng.tokenize(p) for p in ("What's AI?", "Hello there, how are", "The quick brown fox")]
    alone = [eng.generate(p, max_tokens=12, temperature=0, stream=False) for p in prompts]
    calls, gets = count_forwards(eng.model, monkeypatch)
    recs = [Recorder() for _ in prompts]
    sch = Scheduler(eng.model, eng.tokenizer, n_slots=3, n_ctx=3 * 64)  # not started: all three queue first
    for p, r in zip(prompts, recs):
        sch.submit(p, 12, GREEDY, r)
    with sch:
        results = [r.result() for r in recs]
    assert [t for t, _ in results] == alone
    assert all(f == Finished("length", len(p), 12) for (_, f), p in zip(results, prompts))
    assert calls[0] == [len(p) for p in prompts]  # the three prompts prefilled in one forward pass
    assert calls[1:] == [[1, 1, 1]] * 11  # then one token each, all in the same pass
    n_layer = eng.config.n_layer
    assert all(layers == list(range(n_layer)) for layers in gets)  # each layer's experts fetched once per step


def test_a_new_prompt_is_prefilled_beside_the_decoding_ones(eng, monkeypatch):
    calls, _ = count_forwards(eng.model, monkeypatch)
    first, second = Recorder(), Recorder()
    sch = Scheduler(eng.model, eng.tokenizer, n_slots=2, n_ctx=128)
    sch.submit(eng.tokenize("a long answer please"), 30, GREEDY, first)
    with sch:
        assert first.started.wait(60)  # the first has started decoding
        sch.submit(eng.tokenize("a second one"), 3, GREEDY, second)
        second.result()
        first.result()
    joined = [c for c in calls if len(c) == 2]
    assert joined and joined[0][0] == 1 and joined[0][1] == len(eng.tokenize("a second one"))


def test_long_prompts_are_prefilled_in_chunks_of_n_batch(eng, monkeypatch):
    prompts = [list(range(20, 30)), [7, 8, 9]]
    alone = [eng.generate(p, max_tokens=6, temperature=0, stream=False) for p in prompts]
    calls, _ = count_forwards(eng.model, monkeypatch)
    recs = [Recorder(), Recorder()]
    sch = Scheduler(eng.model, eng.tokenizer, n_slots=2, n_ctx=128, n_batch=4)
    for p, r in zip(prompts, recs):
        sch.submit(p, 6, GREEDY, r)
    with sch:
        results = [r.result() for r in recs]
    assert [t for t, _ in results] == alone
    assert [f.completion_tokens for _, f in results] == [6, 6]
    # 10 + 3 prompt tokens, 4 a step: [4], [4], [2 | 2], then the first decodes beside the last prompt token
    assert calls[:4] == [[4], [4], [2, 2], [1, 1]]
    assert sch.stats()["prompt_tokens"] == 13


def test_context_is_split_across_slots(eng):
    sch = Scheduler(eng.model, eng.tokenizer, n_slots=4, n_ctx=64)
    assert sch.n_ctx_slot == 16 and all(s.kv.n_ctx == 16 for s in sch._slots)
    with pytest.raises(PromptTooLongError, match="context is 16"):
        sch.submit(list(range(1, 17)), 4, GREEDY, Recorder())
    r = Recorder()
    sch.submit(list(range(1, 11)), 100, GREEDY, r)
    with sch:
        text, fin = r.result()
    assert fin == Finished("length", 10, 16 - 10 + 1)  # the last token needs no room in the cache


def test_queue_is_bounded_and_close_cancels_what_waits(eng):
    sch = Scheduler(eng.model, eng.tokenizer, n_slots=1, n_ctx=64, max_queue=1)
    a, b = Recorder(), Recorder()
    sch.submit([1, 2, 3], 4, GREEDY, a)  # takes the free slot at the next step
    sch.submit([1, 2, 3], 4, GREEDY, b)  # waits
    with pytest.raises(QueueFullError):
        sch.submit([1, 2, 3], 4, GREEDY, Recorder())
    assert sch.stats()["requests_rejected"] == 1 and sch.stats()["queued"] == 2
    sch.close()
    assert a.result()[1].reason == b.result()[1].reason == "cancelled"


def test_cancel_frees_the_slot_for_the_next_request(eng):
    sch = Scheduler(eng.model, eng.tokenizer, n_slots=1, n_ctx=256)
    long, short = Recorder(), Recorder()
    h = sch.submit([5, 6, 7], 200, SamplingParams(temperature=1.0, seed=1), long)
    sch.submit([5, 6, 7], 3, GREEDY, short)
    with sch:
        assert long.started.wait(60)
        h.cancel()
        _, fin = long.result()
        assert fin.reason == "cancelled" and fin.completion_tokens < 200
        assert short.result()[1] == Finished("length", 3, 3)
    assert sch.stats()["requests_cancelled"] == 1


def test_a_request_cancelled_while_it_waits_never_runs(eng):
    sch = Scheduler(eng.model, eng.tokenizer, n_slots=1, n_ctx=64)
    a, b = Recorder(), Recorder()
    sch.submit([1, 2, 3], 3, GREEDY, a)
    sch.submit([1, 2, 3], 3, GREEDY, b).cancel()
    with sch:
        assert a.result()[1] == Finished("length", 3, 3)
        assert b.result() == ("", Finished("cancelled", 3, 0))
    assert sch.stats()["requests_cancelled"] == 1 and sch.stats()["requests_ok"] == 1


def test_an_emit_that_raises_cancels_its_request_only(eng):
    def broken(ev):
        raise RuntimeError("receiver gone")

    ok = Recorder()
    sch = Scheduler(eng.model, eng.tokenizer, n_slots=2, n_ctx=128)
    sch.submit([1, 2, 3], 50, GREEDY, broken)
    sch.submit([4, 5, 6], 5, GREEDY, ok)
    with sch:
        assert ok.result()[1] == Finished("length", 3, 5)
    assert sch.stats()["requests_cancelled"] == 1


def test_stop_scanner_holds_back_a_possible_start():
    s = _StopScanner(["bc", "xyz"])
    assert s.push("ab") == "a"  # "b" may start "bc"
    assert s.push("x") == "b"  # it did not; "x" may start "xyz"
    assert s.push("yq") == "xyq" and not s.hit
    assert s.push("zab") == "za"
    assert s.push("cdef") == "" and s.hit
    t = _StopScanner(["END"])
    assert t.push("abcEN") == "abc" and t.flush() == "EN"
    assert _StopScanner([]).push("anything") == "anything"


def test_failed_forward_reaches_every_sequence_in_the_step(eng, monkeypatch):
    def boom(*a, **kw):
        raise RuntimeError("injected")

    monkeypatch.setattr(eng.model, "forward_batch", boom)
    a, b = Recorder(), Recorder()
    sch = Scheduler(eng.model, eng.tokenizer, n_slots=2, n_ctx=128)
    sch.submit([1, 2], 5, GREEDY, a)
    sch.submit([3, 4], 5, GREEDY, b)
    with sch:
        for r in (a, b):
            _, ev = r.result()
            assert isinstance(ev, Failed) and "injected" in ev.message
    assert sch.stats()["requests_failed"] == 2


def test_a_sequence_that_breaks_the_batch_fails_alone(eng, monkeypatch):
    real = eng.model.forward_batch

    def poisoned(segments, *a, **kw):
        if any(t.tolist() == [11, 12, 13] for t, _ in segments):  # that prompt, prefilled
            raise RuntimeError("poison")
        return real(segments, *a, **kw)

    monkeypatch.setattr(eng.model, "forward_batch", poisoned)
    alone = eng.generate([4, 5, 6], max_tokens=5, temperature=0, stream=False)
    bad, good = Recorder(), Recorder()
    sch = Scheduler(eng.model, eng.tokenizer, n_slots=2, n_ctx=128)
    sch.submit([11, 12, 13], 5, GREEDY, bad)
    sch.submit([4, 5, 6], 5, GREEDY, good)
    with sch:
        _, ev = bad.result()
        assert isinstance(ev, Failed) and "poison" in ev.message
        assert good.result() == (alone, Finished("length", 3, 5))
    assert sch.stats()["requests_failed"] == 1 and sch.stats()["requests_ok"] == 1
