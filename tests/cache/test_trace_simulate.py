"""Routing traces (record, save, load) and the policy simulator on traces whose hit counts are known by hand."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import flashmoe_stream as fms
from flashmoe_stream.cache.simulate import simulate, simulate_one, trace_stats
from flashmoe_stream.cache.trace import Trace, TraceRecorder
from flashmoe_stream.errors import BadFileError, FlashMoeError


def _hand_trace(tmp_path, experts, layers=1, meta=None):
    """One token per forward call; token t routes to experts[t] (one expert, k = 1) at every layer."""
    rec = TraceRecorder(meta or {"n_expert": 4})
    for e in experts:
        for layer in range(layers):
            rec.on_route(layer, torch.tensor([[e]]), torch.tensor([[1.0]]))
    rec.end_sequence(list(range(len(experts))), n_prompt=1)
    return Trace.load(rec.save(tmp_path / "hand.npz"))


def test_lru_and_belady_hit_counts_computed_by_hand(tmp_path):
    # capacity 2 (bytes = experts: the trace gives no sizes), cyclic 0 1 2 0 1 2:
    # LRU always evicts the expert needed next: 0 hits. Belady: 0m 1m 2m(evicts 1) 0h 1m(evicts 0) 2h: 2 hits.
    t = _hand_trace(tmp_path, [0, 1, 2, 0, 1, 2])
    assert simulate_one(t, "lru", 2).hits == 0
    b = simulate_one(t, "belady", 2)
    assert (b.hits, b.accesses, b.bytes_read) == (2, 6, 4)
    # 0 1 0 2 0 1 with capacity 2: LRU 0m 1m 0h 2m(evicts 1) 0h 1m -> 2 hits; Belady the same 2
    t = _hand_trace(tmp_path, [0, 1, 0, 2, 0, 1])
    assert simulate_one(t, "lru", 2).hits == 2
    assert simulate_one(t, "belady", 2).hits == 2
    # everything fits: only the 3 first uses miss
    assert simulate_one(t, "lfu", 3).hits == 3


def test_capacity_shares_one_budget_over_layers(tmp_path):
    # two layers, the same expert each token: 2 distinct keys; capacity 2 holds both, 1 cannot (k = 1 needs 1)
    t = _hand_trace(tmp_path, [3, 3, 3], layers=2)
    assert simulate_one(t, "lru", 2).hits == 4
    assert simulate_one(t, "lru", 1).hits == 0
    assert simulate_one(t, "lru", "50%").capacity_experts == 4  # 50 % of 2 layers × 4 experts


def test_simulate_reports_ratio_to_belady_and_never_beats_it(tmp_path):
    rng = np.random.default_rng(0)
    t = _hand_trace(tmp_path, rng.integers(0, 4, 200).tolist(), layers=2)
    res = simulate(t, ["lru", "lfu", "lfru", "layer-aware", "belady"], ["25%", "50%"])
    for r in res:
        assert 0 < r.belady_hit_rate <= 1 and r.hit_rate <= r.belady_hit_rate + 1e-12
        assert r.ratio_to_belady == pytest.approx(r.hit_rate / r.belady_hit_rate)
    assert [r.ratio_to_belady for r in res if r.policy == "belady"] == [1.0, 1.0]


def test_user_policy_from_module_colon_class(tmp_path):
    t = _hand_trace(tmp_path, [0, 1, 2, 0, 1, 2])
    r = simulate_one(t, "flashmoe_stream.cache.policy:LRU", 2)
    assert r.hits == simulate_one(t, "lru", 2).hits
    with pytest.raises(FlashMoeError, match="unknown eviction policy"):
        simulate_one(t, "nope", 2)


def test_previous_predictor_precision_and_recall(tmp_path):
    # the same expert every token: from the second token on the previous one predicts it exactly
    t = _hand_trace(tmp_path, [1, 1, 1, 2])
    r = simulate_one(t, "lru", 2, prefetch="previous")
    assert (r.predicted_needed, r.predicted_hits) == (3, 2)  # tokens 2, 3, 4 had a prediction; 4 was wrong
    assert r.recall == pytest.approx(2 / 3)


def test_trace_stats_by_hand(tmp_path):
    t = _hand_trace(tmp_path, [0, 0, 1, 0])
    row = trace_stats(t)["layers"][0]
    assert row["top10_share"] == pytest.approx(0.75)  # n_expert 4: the top 10 % is 1 expert, 3 of the 4 uses
    assert row["reuse_le_1"] == pytest.approx(1 / 4)  # only token 2 reuses the previous token's expert
    assert row["reuse_le_4"] == pytest.approx(2 / 4)  # token 4 reuses expert 0 from 2 tokens back


def test_trace_of_a_run_round_trips(make_model, tmp_path):
    path = make_model("qwen3moe", "Q8_0")
    with fms.Engine.open(path, ram_cache="30%") as eng:
        rec = TraceRecorder({"n_expert": eng.config.n_expert})
        eng.model.experts = rec.wrap(eng.model.experts)
        text = eng.generate("What's AI? The quick brown fox", max_tokens=6, temperature=0, stream=False,
                            record_routes=True, on_route=rec.on_route)
        rec.end_sequence(eng.last.tokens, eng.last.prompt_tokens)
        routes = eng.last.routes
        n_prompt, n_layer, k = eng.last.prompt_tokens, eng.config.n_layer, eng.config.n_expert_used
        tokens = list(eng.last.tokens)
    assert text
    t = Trace.load(rec.save(tmp_path / "run.npz"))
    n_rows = sum(r[1].shape[0] for r in routes) // n_layer
    assert t.ids.shape == (n_rows, n_layer, k) and t.ids.dtype == np.int16
    want = torch.cat([torch.stack([r[1] for r in routes[i: i + n_layer]], 1) for i in range(0, len(routes), n_layer)])
    assert np.array_equal(t.ids, want.numpy())
    assert np.allclose(t.weights.astype(np.float32).sum(-1), 1.0, atol=2e-3)
    assert (t.step[:n_prompt] == 0).all() and (t.step[n_prompt:] == np.arange(1, n_rows - n_prompt + 1)).all()
    assert not t.generated[:n_prompt].any() and t.generated[n_prompt:].all()
    assert t.tokens[:n_rows].tolist() == tokens[:n_rows]
    preds = t.predictions()  # the runtime predicted layers 1.. of every forward call
    assert set(preds) == {(s, layer) for s in range(t.step.max() + 1) for layer in range(1, n_layer)}
    # numpy alone reads it
    with np.load(tmp_path / "run.npz", allow_pickle=False) as z:
        assert json.loads(str(z["meta"]))["n_expert"] == 8 and int(z["version"]) == 1


def test_load_errors(tmp_path):
    with pytest.raises(BadFileError, match="not found"):
        Trace.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(BadFileError, match="not a flashmoe trace"):
        Trace.load(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(BadFileError, match="not a readable trace"):
        Trace.load(tmp_path / "junk.npz")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "flashmoe_stream", *map(str, args)], capture_output=True, text=True, check=False)


def test_cli_run_trace_then_simulate(make_model, tmp_path):
    trace = tmp_path / "t.npz"
    r = _cli("run", "-m", make_model("qwen3moe", "Q8_0"), "-no-cnv", "-p", "What's AI?", "-n", "5", "--temp", "0",
             "--ram-cache", "50%", "--trace", trace)
    assert r.returncode == 0, r.stderr
    r = _cli("simulate", trace, "--policy", "lru,belady", "--capacity", "50%,100%", "--prefetch", "router", "--json",
             "--stats")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [(x["policy"], x["capacity"]) for x in out["results"]] == [
        ("lru", "50%"), ("belady", "50%"), ("lru", "100%"), ("belady", "100%")]
    full = [x for x in out["results"] if x["capacity"] == "100%"]
    t = Trace.load(trace)
    used = {(j, e) for j in range(4) for e in t.ids[:, j].reshape(-1).tolist()}
    predicted = {(layer, e) for (_, layer), ids in t.predictions().items() for e in ids}
    for x in full:  # everything fits: each expert used or predicted is read exactly once
        assert x["bytes_read"] == len(used | predicted) * t.expert_bytes(0)
        assert x["accesses"] - x["hits"] + x["prefetched"] == len(used | predicted)
    assert len(out["stats"]["layers"]) == 4


@pytest.mark.parametrize("args,msg", [
    (["simulate", "{tmp}/missing.npz"], "not found: record one with"),
    (["simulate", "{trace}", "--policy", "lru,bogus"], "unknown eviction policy 'bogus'"),
    (["simulate", "{trace}", "--policy", "nosuchmod:X"], "cannot import module 'nosuchmod'"),
    (["simulate", "{trace}", "--capacity", "lots"], "not understood"),
])
def test_cli_simulate_errors_are_one_line(tmp_path, args, msg):
    trace = _hand_trace(tmp_path, [0, 1, 2])
    del trace
    r = _cli(*[a.format(tmp=tmp_path, trace=tmp_path / "hand.npz") for a in args])
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and msg in r.stderr, r.stderr


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    from flashmoe_stream.cache.simulate import plot

    t = _hand_trace(tmp_path, [0, 1, 2, 0])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(FlashMoeError, match=r"pip install 'flashmoe-stream\[plot\]'"):
        plot(simulate(t, ["lru"], ["50%"]), str(tmp_path / "x.png"))


@pytest.mark.parametrize("policy", ["lru", "lfu", "lfru", "layer-aware", "predictive"])
def test_simulator_reproduces_the_runtime_cache_exactly(make_model, tmp_path, policy):
    """Same policy classes, same tier, same order of calls: without prefetch the simulated hits and misses
    are the runtime's device-tier hits and misses, token for token."""
    path = make_model("qwen3moe", "Q8_0", n_expert=16)
    with fms.Engine.open(path, ram_cache="40%", policy=policy, prefetch=False) as eng:
        rec = TraceRecorder({"n_expert": 16, "expert_bytes": {str(layer): eng.store.expert_nbytes(layer)
                                                              for layer in eng.store.layers}})
        eng.generate("What's AI? The quick brown fox jumps", max_tokens=12, temperature=0, stream=False,
                     on_route=rec.on_route)
        rec.end_sequence(eng.last.tokens, eng.last.prompt_tokens)
        s = eng.stats()["total"]
    r = simulate_one(Trace.load(rec.save(tmp_path / "t.npz")), policy, "40%")
    assert s["device_misses"] > 0 and s["device_hits"] > 0
    assert (r.hits, r.accesses - r.hits) == (s["device_hits"], s["device_misses"])


def test_cli_chat_trace_has_a_row_per_computed_token(make_model, tmp_path):
    """A chat's second turn keeps the first turn's keys and values, so only its new tokens are routed; the
    trace's second sequence holds exactly those rows, with their token ids."""
    trace = tmp_path / "chat.npz"
    r = subprocess.run([sys.executable, "-m", "flashmoe_stream", "run", "-m", str(make_model("qwen3moe", "Q8_0")),
                        "-n", "4", "--temp", "0", "--trace", str(trace)],
                       input="hello there\nand again\n", capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert "kept from the last turn" in r.stderr
    import re

    turns = re.findall(r"prompt (\d+) tok(?: \((\d+) kept from the last turn\))? at .*? decode (\d+) tok", r.stderr)
    (n1, k1, d1), (n2, k2, d2) = [(int(n), int(k or 0), int(d)) for n, k, d in turns]
    assert k1 == 0 and k2 > 0
    t = Trace.load(trace)
    assert set(t.seq.tolist()) == {0, 1}
    assert (t.seq == 0).sum() == n1 + d1 and (t.seq == 1).sum() == n2 - k2 + d2  # one row per token run
    assert (t.tokens >= 0).all()
