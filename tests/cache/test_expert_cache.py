import gc
import random
import threading
import weakref
from collections import Counter
from concurrent.futures import Future

import pytest
import torch

from flashmoe_stream import quant
from flashmoe_stream.cache import ExpertCache, ExpertWeights
from flashmoe_stream.errors import BudgetError, FlashMoeError, StoreError
from flashmoe_stream.io import ExpertStore, Reader, repack


@pytest.fixture(scope="module")
def store(make_model):
    return ExpertStore(make_model("qwen3moe", "Q8_0"))


def sizes(store):
    """(device bytes of one expert, host bytes of one expert, n_expert_used)."""
    dev = max(store.expert_nbytes(layer) for layer in store.layers)
    host = max(max(store.expert_nbytes(layer), store.expert_read_nbytes(layer, 0)) for layer in store.layers)
    return dev, host, store.config.n_expert_used


def assert_same(w: ExpertWeights, blob):
    assert isinstance(w, ExpertWeights)
    assert (w.layer, w.expert) == (blob.layer, blob.expert)
    assert list(w) == list(blob.blocks)
    for name, b in blob.blocks.items():
        got = w[name]
        assert got.data.dtype == torch.uint8 and got.data.dim() == 1
        # on GPUs the K-quant matrices are kept in the fused kernels' planar layout: the same bytes, moved
        assert got.planar == (len(b.shape) == 2 and quant.planar_for(b.qtype, got.data.device))
        data = quant.from_planar(got.data, b.qtype, b.shape) if got.planar else got.data
        assert data.cpu().numpy().tobytes() == bytes(memoryview(b.data)), name
        assert got.qtype == b.qtype and got.shape == tuple(b.shape)


def assert_consistent(s):
    for c in (*s["layers"].values(), s["total"]):
        assert c["device_hits"] + c["device_misses"] == c["requests"]
        assert c["prefetch_issued"] == c["prefetch_useful"] + c["prefetch_wasted"] + c["prefetch_pending"]
        assert 0.0 <= c["prefetch_precision"] <= 1.0 and 0.0 <= c["prefetch_recall"] <= 1.0
    for tier in ("device", "host"):
        assert s[tier]["resident"] + s[tier]["reserved"] <= s[tier]["budget"]
        assert s[tier]["peak"] <= s[tier]["budget"]


class GatedReader:
    """A fake Reader: counts submits; reads only once ``gate`` is set (on its own threads)."""

    def __init__(self, store, fail=None):
        self.store = store
        self.gate = threading.Event()
        self.submits = Counter()
        self.done = Counter()
        self.fail = fail
        self._threads = []
        self._lock = threading.Lock()

    def submit(self, layer, expert):
        with self._lock:
            self.submits[(layer, expert)] += 1
        fut = Future()

        def work():
            self.gate.wait()
            if self.fail is not None:
                fut.set_exception(self.fail)
                return
            blob = self.store.read(layer, expert)
            with self._lock:
                self.done[(layer, expert)] += 1
            fut.set_result(blob)

        t = threading.Thread(target=work, daemon=True)
        self._threads.append(t)
        t.start()
        return fut

    def close(self):
        self.gate.set()
        for t in self._threads:
            t.join()


class CountingReader(Reader):
    """The real Reader, counting submits."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.submits = Counter()

    def submit(self, layer, expert, *a, **kw):
        self.submits[(layer, expert)] += 1
        return super().submit(layer, expert, *a, **kw)


def test_get_returns_the_store_bytes_and_hits_the_second_time(store):
    dev, host, _used = sizes(store)
    with ExpertCache(store, device_budget=8 * dev, host_budget=8 * host, policy="lru") as cache:
        got = cache.get(1, [3, 5])
        assert [w.expert for w in got] == [3, 5]
        for w in got:
            assert_same(w, store.read(1, w.expert))
        s1 = cache.stats()
        assert s1["total"]["device_misses"] == 2 and s1["total"]["disk_bytes"] > 0
        again = cache.get(1, [5, 3, 5])  # order and repeats kept
        assert [w.expert for w in again] == [5, 3, 5]
        assert again[0] is got[1]
        s2 = cache.stats()
        assert s2["total"]["device_hits"] == 2
        assert s2["total"]["disk_bytes"] == s1["total"]["disk_bytes"]
        assert s2["layers"][1]["requests"] == 4
        assert_consistent(s2)


def test_start_then_one_get_per_expert_counts_as_one_get(store):
    """start() begins the reads of the missing experts and counts the layer as one get() would; the get()
    of each expert after it only waits for its own read and counts nothing again."""
    dev, host, _used = sizes(store)
    reader = GatedReader(store)
    cache = ExpertCache(store, device_budget=8 * dev, host_budget=8 * host, policy="lru", reader=reader)
    try:
        t = threading.Thread(target=cache.get, args=(1, [3]))
        t.start()
        reader.gate.set()
        t.join()
        reader.gate.clear()
        assert cache.start(1, [3, 5, 6]) == [5, 6]  # never blocks: the reads are held back
        assert cache.get(1, [3])[0].expert == 3  # resident: no wait
        assert set(reader.submits) == {(1, 3), (1, 5), (1, 6)}
        reader.gate.set()
        got = [cache.get(1, [e])[0] for e in (6, 5)]
        assert [w.expert for w in got] == [6, 5]
        for w in got:
            assert_same(w, store.read(1, w.expert))
        s = cache.stats()["layers"][1]
        assert (s["requests"], s["device_hits"], s["device_misses"]) == (4, 1, 3)  # [3] then [3, 5, 6]
        assert reader.submits == Counter({(1, 3): 1, (1, 5): 1, (1, 6): 1})
        assert_consistent(cache.stats())
    finally:
        cache.close()
        reader.close()


def test_host_tier_serves_what_the_device_tier_evicted(store):
    dev, host, used = sizes(store)
    with ExpertCache(store, device_budget=used * dev, host_budget=8 * host, policy="lfu") as cache:
        cache.get(0, [0, 1])
        cache.get(1, [0, 1])  # layer 0 is unpinned and evicted from the device tier
        assert cache.resident()["device"] == {(1, 0), (1, 1)}
        disk = cache.stats()["total"]["disk_bytes"]
        for w in cache.get(0, [0, 1]):
            assert_same(w, store.read(0, w.expert))
        s = cache.stats()
        assert s["total"]["disk_bytes"] == disk
        assert s["layers"][0]["host_hits"] == 2 and s["layers"][0]["device_misses"] == 4
        assert s["total"]["host_hits"] + s["total"]["host_misses"] == s["total"]["device_misses"]
        assert_consistent(s)


class _RecordingReader(Reader):
    """A Reader that keeps a weak reference to the buffer of every expert it has read."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.buffers: dict = {}

    def submit(self, layer, expert, *args, **kw):
        fut = super().submit(layer, expert, *args, **kw)
        if fut is not None:
            fut.add_done_callback(lambda f, k=(layer, expert): self.buffers.setdefault(k, weakref.ref(
                f.result().buffer)))
        return fut


def test_an_evicted_expert_frees_its_read_buffer_at_once(store):
    """Once both tiers have dropped an expert, its read buffer is freed by reference counting, not left to
    Python's cyclic GC (a read's future and its load referred to each other: the buffers of a whole token's
    reads stayed mapped until a collection, and the next reads page-faulted through fresh ones)."""
    dev, host, used = sizes(store)
    gc.collect()
    gc.disable()
    try:
        with _RecordingReader(store, threads=2) as r, \
                ExpertCache(store, device_budget=used * dev, host_budget=used * host, policy="lru", reader=r) as cache:
            cache.get(0, [0, 1])
            for layer in store.layers[1:]:  # layer 0 leaves both tiers
                cache.get(layer, [0, 1])
            cache.wait_idle()
            assert not {(0, 0), (0, 1)} & (cache.resident()["device"] | cache.resident()["host"])
            assert r.buffers[(0, 0)]() is None and r.buffers[(0, 1)]() is None
            assert r.buffers[(store.layers[-1], 0)]() is not None  # (still cached: the check can fail)
    finally:
        gc.enable()


@pytest.mark.parametrize("policy", ["lru", "lfu", "lfru", "layer-aware"])
def test_budgets_hold_on_a_random_access_sequence(store, policy):
    dev, host, used = sizes(store)
    rng = random.Random(policy)
    ref = {}
    with ExpertCache(store, device_budget=3 * dev + 100, host_budget=5 * host, policy=policy, threads=2) as cache:
        for step in range(60):
            layer = step % store.n_layer
            ids = rng.sample(range(store.n_expert), used)
            if rng.random() < 0.5:
                cache.prefetch((layer + 1) % store.n_layer, rng.sample(range(store.n_expert), 3))
                assert_consistent(cache.stats())
            got = cache.get(layer, ids)
            assert_consistent(cache.stats())
            for w in got:
                key = (w.layer, w.expert)
                if key not in ref:
                    ref[key] = store.read(*key)
                assert_same(w, ref[key])
        s = cache.stats()
        assert s["total"]["requests"] == 60 * used
        assert s["device"]["peak"] <= 3 * dev + 100 and s["host"]["peak"] <= 5 * host
        assert_consistent(s)


def test_inflight_key_is_read_once(store):
    dev, host, _used = sizes(store)
    reader = GatedReader(store)
    cache = ExpertCache(store, device_budget=8 * dev, host_budget=8 * host, reader=reader)
    try:
        cache.prefetch(2, [4, 6])
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("w", cache.get(2, [4, 6])))
        t.start()  # the get waits on the prefetch's loads
        reader.gate.set()
        t.join()
        assert [w.expert for w in out["w"]] == [4, 6]
        assert reader.submits == Counter({(2, 4): 1, (2, 6): 1})
        s = cache.stats()["layers"][2]
        assert s["prefetch_issued"] == 2 and s["prefetch_useful"] == 2
        assert s["prefetch_precision"] == 1.0 and s["prefetch_recall"] == 1.0
        cache.prefetch(2, [4, 6])  # resident: nothing to do
        assert cache.stats()["layers"][2]["prefetch_issued"] == 2
    finally:
        cache.close()
        reader.close()


def test_prefetch_then_get_with_the_real_reader_reads_once(store):
    dev, host, _used = sizes(store)
    reader = CountingReader(store, threads=2)
    with reader, ExpertCache(store, device_budget=8 * dev, host_budget=8 * host, reader=reader) as cache:
        for layer in store.layers:
            cache.prefetch(layer, [0, 1])
            cache.get(layer, [0, 1])
        assert set(reader.submits.values()) == {1} and len(reader.submits) == 2 * store.n_layer
        assert_consistent(cache.stats())


def test_prefetch_never_blocks(store):
    dev, host, _used = sizes(store)
    reader = GatedReader(store)
    cache = ExpertCache(store, device_budget=3 * dev, host_budget=3 * host, reader=reader)
    try:
        t = threading.Thread(target=lambda: [cache.prefetch(layer, range(store.n_expert)) for layer in store.layers])
        t.start()
        t.join(timeout=60)  # a deadlock guard, not a timing assertion: the reads cannot finish before the gate opens
        assert not t.is_alive(), "prefetch blocked on reads"
        assert sum(reader.done.values()) == 0
        s = cache.stats()["total"]
        assert s["prefetch_issued"] == store.n_layer * store.n_expert
        reader.gate.set()
        for w in cache.get(3, [1, 2]):
            assert_same(w, store.read(3, w.expert))
        assert_consistent(cache.stats())
    finally:
        cache.close()
        reader.close()
    s = cache.stats()["total"]
    assert s["prefetch_issued"] == s["prefetch_useful"] + s["prefetch_wasted"] + s["prefetch_pending"]


def test_useless_prefetch_is_counted_wasted(store):
    dev, host, used = sizes(store)
    with ExpertCache(store, device_budget=used * dev, host_budget=used * host, policy="lru") as cache:
        cache.prefetch(0, [7])
        assert cache.wait_idle()
        assert cache.stats()["layers"][0]["prefetch_pending"] == 1
        cache.get(0, [0, 1])  # pinned: (0, 7) cannot stay on the device beside them
        cache.get(1, [0, 1])
        cache.get(2, [0, 1])
        s = cache.stats()
        assert s["layers"][0]["prefetch_issued"] == 1
        assert s["layers"][0]["prefetch_wasted"] == 1 and s["layers"][0]["prefetch_useful"] == 0
        assert s["total"]["prefetch_precision"] == 0.0
        assert_consistent(s)


@pytest.mark.parametrize("policy", ["lfu", "lfru"])
def test_prefetched_experts_survive_the_reads_before_their_layer(store, policy):
    # the device holds two layers' worth; layer 2's prediction is in before layer 1's misses make room: a
    # never-used key is every one of these policies' first victim, so without the hold layer 1's misses
    # would evict layer 2's prefetch and its get would read it again
    dev, host, used = sizes(store)
    with ExpertCache(store, device_budget=2 * used * dev, host_budget=used * host, policy=policy) as cache:
        cache.get(0, range(used))
        cache.prefetch(2, range(used))
        assert cache.wait_idle()
        cache.get(1, range(used))
        before = cache.stats()["layers"][2]
        for w in cache.get(2, range(used)):
            assert_same(w, store.read(2, w.expert))
        s = cache.stats()
        assert s["layers"][2]["device_hits"] - before["device_hits"] == used
        assert s["layers"][2]["prefetch_useful"] == used and s["layers"][2]["prefetch_wasted"] == 0
        assert s["total"]["disk_bytes"] == 3 * used * store.expert_read_nbytes(0, 0)
        assert_consistent(s)


def test_a_prediction_its_layer_did_not_ask_for_is_wasted_and_let_go(store):
    dev, host, used = sizes(store)
    with ExpertCache(store, device_budget=2 * used * dev, host_budget=used * host, policy="lfru") as cache:
        cache.get(0, range(used))
        cache.prefetch(1, range(used, 2 * used))
        assert cache.wait_idle()
        cache.get(1, range(used, 2 * used - 1))  # all but one of the prediction
        assert cache.stats()["layers"][1]["prefetch_wasted"] == 0  # the gets of layer 1 may go on
        cache.get(2, range(used))  # layer 1 is over: the one it did not ask for was wasted
        s = cache.stats()
        assert s["layers"][1]["prefetch_useful"] == used - 1 and s["layers"][1]["prefetch_wasted"] == 1
        assert s["layers"][1]["prefetch_pending"] == 0
        assert_consistent(s)
        cache.get(3, range(used))  # ... and no longer held: the lowest-ranked key, evicted first
        assert (1, 2 * used - 1) not in cache.resident()["device"]


def test_budget_too_small_names_the_minimum(store):
    dev, host, used = sizes(store)
    with pytest.raises(BudgetError) as e:
        ExpertCache(store, device_budget=used * dev - 1, host_budget=8 * host)
    assert f"{used * dev:,}" in str(e.value) and "device_budget" in str(e.value)
    with pytest.raises(BudgetError) as e:
        ExpertCache(store, device_budget=8 * dev, host_budget=host)
    assert f"{used * host:,}" in str(e.value) and "host_budget" in str(e.value)
    with ExpertCache(store, device_budget=used * dev, host_budget=used * host) as cache:
        with pytest.raises(BudgetError, match="device_budget"):
            cache.get(0, range(used + 1))  # more experts at once than the device tier holds
        cache.get(0, range(used))


def test_errors_reach_the_caller(store):
    dev, host, _used = sizes(store)
    reader = GatedReader(store, fail=OSError(5, "Input/output error"))
    reader.gate.set()
    with ExpertCache(store, device_budget=8 * dev, host_budget=8 * host, reader=reader) as cache:
        cache.prefetch(0, [1])
        with pytest.raises(OSError, match="Input/output"):
            cache.get(0, [1])
        with pytest.raises(StoreError, match="no expert"):
            cache.get(0, [store.n_expert])
        with pytest.raises(StoreError, match="no expert"):
            cache.prefetch(9, [0])
        assert_consistent(cache.stats())
    reader.close()
    with pytest.raises(FlashMoeError, match="closed"):
        cache.get(0, [0])
    cache.prefetch(0, [0])  # after close: a no-op, never an error or a block


def test_compressed_store(make_model, tmp_path):
    pytest.importorskip("zstandard")
    path = repack(make_model("qwen3moe", "Q4_K_M"), tmp_path / "store", compress="zstd", progress=False)
    store = ExpertStore(path)
    dev, host, _used = sizes(store)
    with ExpertCache(store, device_budget=4 * dev, host_budget=6 * host + 8 * dev) as cache:
        for layer in store.layers:
            cache.prefetch(layer, [2, 3])
            for w in cache.get(layer, [2, 3]):
                assert_same(w, store.read(layer, w.expert))
        assert_consistent(cache.stats())


@pytest.mark.gpu
def test_cuda_tier(store):
    dev, host, _used = sizes(store)
    with ExpertCache(store, device="cuda", device_budget=4 * dev, host_budget=8 * host) as cache:
        for layer in store.layers:
            cache.prefetch((layer + 1) % store.n_layer, [0, 1])
            for w in cache.get(layer, [0, 1]):
                assert all(b.data.is_cuda for b in w.blocks.values())
                assert_same(w, store.read(layer, w.expert))
        s = cache.stats()
        assert s["total"]["h2d_bytes"] >= s["device"]["resident"] > 0
        assert_consistent(s)


def test_prefetch_of_a_layer_whose_prefetches_go_unused_is_cut_to_probes(store):
    """A layer whose prefetched experts keep leaving unused is prefetched only every PREFETCH_PROBE-th call
    once PREFETCH_TRUST_AFTER of them are resolved; a layer whose prefetches are used is prefetched always."""
    from flashmoe_stream.cache import prefetch as ec

    dev, host, used = sizes(store)
    n = store.n_expert
    calls = 4 * ec.PREFETCH_TRUST_AFTER
    with ExpertCache(store, device_budget=2 * used * dev, host_budget=2 * used * host, policy="lru") as cache:
        for t in range(calls):
            cache.prefetch(1, [t % n])  # asked for next
            assert cache.wait_idle()
            cache.get(1, [t % n])
            cache.prefetch(0, [2 + t % (n - 2)])  # never asked for
            assert cache.wait_idle()
            cache.get(0, [0, 1])
        s = cache.stats()["layers"]
        assert_consistent(cache.stats())
    assert s[1]["prefetch_issued"] >= calls - used and s[1]["prefetch_precision"] > 0.9
    assert s[0]["prefetch_useful"] == 0
    # trusted for the first PREFETCH_TRUST_AFTER (plus the few still in the caches), then one call in PROBE
    most = ec.PREFETCH_TRUST_AFTER + 2 * used + calls // ec.PREFETCH_PROBE
    assert ec.PREFETCH_TRUST_AFTER <= s[0]["prefetch_issued"] <= most, s[0]["prefetch_issued"]


def test_a_get_s_reads_start_before_queued_prefetches(store, gated_reads):
    """With the Reader busy, the misses a get() waits for, and a queued prefetch it comes to wait for, start
    before the prefetches queued earlier."""
    import time

    gate, order = gated_reads.gate, gated_reads.order
    dev, host, k = sizes(store)
    reader = Reader(store, threads=1, queue_depth=16)
    with ExpertCache(store, "cpu", device_budget=16 * dev, host_budget=16 * host, reader=reader) as c:
        c.prefetch(0, [0, 1, 2, 3])
        deadline = time.monotonic() + 30
        while reader.outstanding < 4 and time.monotonic() < deadline:  # 0 reading, 1-3 queued
            time.sleep(0.01)
        got = {}
        t = threading.Thread(target=lambda: got.update(w=c.get(0, [3, 5])))
        t.start()
        while reader.outstanding < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.set()
        t.join(30)
        assert [w.expert for w in got["w"]] == [3, 5]
        c.wait_idle(30)
    reader.close()
    assert order == [0, 3, 5, 1, 2]  # each read once: the promoted one is not read again


def test_ready_names_the_experts_a_get_would_not_wait_for(store):
    dev, host, _ = sizes(store)
    reader = GatedReader(store)
    with ExpertCache(store, device_budget=8 * dev, host_budget=8 * host, reader=reader) as cache:
        reader.gate.set()
        cache.get(0, [1])
        cache.release()
        reader.gate.clear()
        assert cache.start(0, [1, 2, 3]) == [2, 3]  # 1 is resident; 2 and 3 wait on the gate
        assert cache.ready(0, [3, 2, 1]) == [1]
        reader.gate.set()
        cache.get(0, [2, 3])
        assert cache.ready(0, [3, 2, 1, 4]) == [3, 2, 1]
    reader.close()
