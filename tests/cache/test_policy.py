
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashmoe_stream.cache import POLICIES, Policy, make_policy
from flashmoe_stream.errors import FlashMoeError

A, B, C, D = (0, 0), (0, 1), (0, 2), (0, 3)


def simulate(trace, capacity, policy):
    """Demand paging: hits of ``policy`` on ``trace`` with room for ``capacity`` keys."""
    resident, hits = set(), 0
    for k in trace:
        if k in resident:
            hits += 1
        else:
            if len(resident) >= capacity:
                v = policy.victim(frozenset(resident))
                assert v in resident
                resident.remove(v)
                policy.on_evict(v)
            resident.add(k)
            policy.on_insert(k)
        policy.on_access(k)
    return hits


def feed(policy, seq):
    """Insert (first time) and access each key of ``seq`` in order."""
    seen = set()
    for k in seq:
        if k not in seen:
            seen.add(k)
            policy.on_insert(k)
        policy.on_access(k)
    return seen


def test_registry_names():
    assert set(POLICIES) >= {"lru", "lfu", "lfru", "layer-aware", "belady"}
    for name in POLICIES:
        p = make_policy(name, future=[]) if name == "belady" else make_policy(name)
        assert isinstance(p, Policy)


def test_lru_evicts_least_recent():
    p = make_policy("lru")
    feed(p, [A, B, C, A])
    assert p.victim({A, B, C}) == B
    assert p.victim({A, C}) == C  # B pinned: the next least recent
    p.on_evict(B)
    p.on_insert(D)
    p.on_access(D)
    assert p.victim({A, C, D}) == C


def test_lfu_evicts_least_frequent_ties_to_least_recent():
    p = make_policy("lfu")
    feed(p, [A, A, A, B, C, C])
    assert p.victim({A, B, C}) == B
    assert p.victim({A, C}) == C
    p.on_access(B)
    p.on_access(B)  # B: 3, C: 2
    assert p.victim({A, B, C}) == C
    q = make_policy("lfu")
    feed(q, [A, B])  # one use each: the older goes
    assert q.victim({A, B}) == A
    q.on_insert(C)  # a prefetched, never used key goes first
    assert q.victim({A, B, C}) == C


def test_lfru_scores_and_prefers_recent_frequent():
    # A at t=1,2,3; B at t=4; C at t=5.
    strong = make_policy("lfru", decay=0.5)
    feed(strong, [A, A, A, B, C])
    assert strong.score(A) == pytest.approx(0.5 ** 4 + 0.5 ** 3 + 0.5 ** 2)  # 0.4375
    assert strong.score(B) == pytest.approx(0.5)
    assert strong.score(C) == pytest.approx(1.0)
    assert strong.victim({A, B, C}) == A  # old uses have faded: unlike LFU, which would evict B
    weak = make_policy("lfru", decay=0.9)
    feed(weak, [A, A, A, B, C])
    assert weak.score(A) == pytest.approx(0.9 ** 4 + 0.9 ** 3 + 0.9 ** 2)  # 2.1951
    assert weak.victim({A, B, C}) == B  # frequent and fairly recent A stays: unlike LRU, which would evict A
    assert weak.victim({A, C}) == C  # C: 1.0 < A: 2.195
    # recent + frequent beats both recent-only and frequent-but-old
    p = make_policy("lfru", decay=0.8)
    feed(p, [A, A, A, A, B, C, C, C])
    assert p.victim({A, B, C}) == B
    assert p.victim({A, C}) == A
    with pytest.raises(FlashMoeError, match="decay"):
        make_policy("lfru", decay=1.0)


def test_layer_aware_prefers_the_layer_just_used():
    p = make_policy("layer-aware", n_layer=4)
    # two passes over layers 0..3 using expert 0 of each layer; then layer 1 again with expert 0
    for _ in range(2):
        for layer in range(4):
            feed(p, [(layer, 0)])
    feed(p, [(0, 0), (1, 0)])  # now at layer 1
    keys = {(layer, 0) for layer in range(4)}
    # equal frequencies: layer 1 was just used, so its next use is a whole pass away
    assert p.victim(keys) == (1, 0)
    assert p.victim(keys - {(1, 0)}) == (0, 0)  # then layer 0 (3 layers away), not layer 2 (next)
    # a rarely used expert of the next layer goes before a hot one of the layer just used
    p.on_insert((2, 5))
    assert p.victim(keys | {(2, 5)}) == (2, 5)
    assert p.expected_distance((2, 0)) < p.expected_distance((2, 5))


def test_belady_evicts_farthest_next_use():
    future = [A, B, C, B, A, D]
    p = make_policy("belady", future=future)
    feed(p, [A, B])
    # at C's miss: B is next used at 3, A at 4
    assert p.victim({A, B}) == A
    p.on_insert(D)  # prefetched, needed last
    assert p.victim({A, B, D}) == D
    q = make_policy("belady", future=[A, B, C, A])
    feed(q, [A, B])
    assert q.victim({A, B}) == B  # B never again
    with pytest.raises(FlashMoeError, match="future"):
        make_policy("belady")


def test_belady_hand_worked_hits():
    trace = [A, B, C, A, B, D, A, B, C, D]
    # capacity 3, MIN: A B C miss, A B hit, D miss (evict C: next use 8), A B hit, C miss (evict A or B), D hit
    assert simulate(trace, 3, make_policy("belady", future=trace)) == 5
    # LRU: A B C miss, A B hit, D miss (evicts C), A B hit, C miss (evicts D, the least recent), D miss
    assert simulate(trace, 3, make_policy("lru")) == 4


keys_st = st.tuples(st.integers(0, 2), st.integers(0, 3))


@settings(max_examples=60, deadline=None)
@given(trace=st.lists(keys_st, min_size=1, max_size=80), capacity=st.integers(1, 6))
def test_belady_is_never_beaten(trace, capacity):
    best = simulate(trace, capacity, make_policy("belady", future=trace))
    for name in POLICIES:
        if name == "belady":
            continue
        assert simulate(trace, capacity, make_policy(name)) <= best, name


class MostRecent:
    """A user policy (MRU): evicts the most recently used key."""

    def __init__(self, tag="x"):
        self.tag = tag
        self.order = []

    def on_access(self, key):
        if key in self.order:
            self.order.remove(key)
        self.order.append(key)

    def on_insert(self, key):
        self.on_access(key)

    def on_evict(self, key):
        self.order.remove(key)

    def victim(self, candidates):
        return next(k for k in reversed(self.order) if k in candidates)


class NotAPolicy:
    def victim(self, candidates):
        return None


@pytest.mark.parametrize("name", ["lfu", "lfru"])
def test_a_held_key_is_evicted_only_when_nothing_else_can_go(name):
    from flashmoe_stream.cache.tiers import Tier

    def tier(hold):
        t = Tier("t", 3, make_policy(name))
        for k in (A, B):
            t.insert(k, None, 1)
            t.access(k)
        t.insert(C, None, 1)  # never used: these policies' first victim
        if hold:
            t.hold(C)
        assert t.make_room(1)
        t.insert(D, None, 1)
        return t

    assert C not in tier(hold=False)
    t = tier(hold=True)
    assert C in t and len(t.entries) == 3
    t.pin(D)
    t.pin(next(k for k in (A, B) if k in t))
    assert t.make_room(1) and C not in t  # the last key that may go
    assert not t.held


def test_user_policy_from_module_colon_class():
    p = make_policy(f"{__name__}:MostRecent", tag="y")
    assert isinstance(p, MostRecent) and p.tag == "y"
    feed(p, [A, B, C])
    assert p.victim({A, B, C}) == C
    assert isinstance(make_policy(MostRecent), MostRecent)
    assert simulate([A, B, A, B, C, A], 2, make_policy(f"{__name__}:MostRecent")) >= 0


def test_bad_policy_names_are_clear_errors():
    with pytest.raises(FlashMoeError) as e:
        make_policy("fifo-ish")
    for name in POLICIES:
        assert name in str(e.value)
    with pytest.raises(FlashMoeError, match="cannot import"):
        make_policy("no_such_module_xyz:Policy")
    with pytest.raises(FlashMoeError, match="has no"):
        make_policy(f"{__name__}:Missing")
    with pytest.raises(FlashMoeError, match="on_access"):
        make_policy(f"{__name__}:NotAPolicy")


def test_policies_scale():
    """Thousands of keys, many operations (quick only if every operation is O(log n)): each victim is one
    of the candidates, and the resident set stays at its bound."""
    n = 4000
    for name in ("lru", "lfu", "lfru", "layer-aware", "predictive"):
        p = make_policy(name)
        resident, evicted = set(), 0
        for i in range(3 * n):
            k = (i % 40, (i // 40 * 7919) % 256)  # 10,240 keys, some reused
            if k not in resident:
                if len(resident) >= n // 2:
                    v = p.victim(resident)
                    assert v in resident
                    resident.remove(v)
                    p.on_evict(v)
                    evicted += 1
                resident.add(k)
                p.on_insert(k)
            p.on_access(k)
        assert len(resident) == n // 2 and evicted > n
