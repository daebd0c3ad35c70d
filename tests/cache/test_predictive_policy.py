"""The `predictive` eviction policy: layer distance × recency-weighted use probability; prefetches protected."""

import pytest

from flashmoe_stream.cache import POLICIES, make_policy
from flashmoe_stream.errors import FlashMoeError


def use(p, keys):
    for k in keys:
        p.on_access(k)


def test_registered_and_validated():
    assert "predictive" in POLICIES
    with pytest.raises(FlashMoeError, match="alpha"):
        make_policy("predictive", alpha=1.5)


def test_prefers_evicting_the_layer_just_used():
    p = make_policy("predictive", n_layer=4)
    for layer in range(4):
        p.on_insert((layer, 0))
    for _ in range(3):  # three passes, expert 0 of every layer each time: the same estimate for all
        for layer in range(4):
            use(p, [(layer, 0)])
    keys = {(layer, 0) for layer in range(4)}
    assert len({round(p.p(k), 9) for k in keys}) == 1
    assert p.victim(keys) == (3, 0)  # just used: needed a whole pass from now
    assert p.victim(keys - {(3, 0)}) == (2, 0)  # then layer 2 (3 layers away), not layer 0 (next)


def test_recent_use_beats_old_frequency():
    # experts 1 and 2 of layer 0: 1 used in passes 1-6, 2 in passes 7-10 (layer 1 runs between passes)
    q = make_policy("predictive", n_layer=2, alpha=0.3)
    q.on_insert((0, 1))
    q.on_insert((0, 2))
    for i in range(10):
        use(q, [(0, 1)] if i < 6 else [(0, 2)])
        use(q, [(1, 0)])
    assert q.p((0, 2)) > q.p((0, 1))
    assert q.victim({(0, 1), (0, 2)}) == (0, 1)
    # layer-aware counts the whole run: expert 1 (6 uses) is kept over expert 2 (4 uses)
    la = make_policy("layer-aware", n_layer=2)
    la.on_insert((0, 1))
    la.on_insert((0, 2))
    for i in range(10):
        use(la, [(0, 1)] if i < 6 else [(0, 2)])
        use(la, [(1, 0)])
    assert la.victim({(0, 1), (0, 2)}) == (0, 2)


def test_a_prefetched_key_is_kept_until_used():
    p = make_policy("predictive", n_layer=2)
    for _ in range(3):
        use(p, [(0, 1), (1, 1)])
    p.on_insert((0, 1))
    p.on_insert((1, 7))  # prefetched for layer 1: never used before, yet kept
    use(p, [(0, 1)])
    assert p.p((1, 7)) == 1.0
    assert p.victim({(0, 1), (1, 7)}) == (0, 1)
    use(p, [(1, 7)])  # used once: now an ordinary key with a low estimate
    assert p.p((1, 7)) < 1.0
    # (1, 7) after one use vs (0, 1) used every pass: at layer 1 now, (0, 1) is needed next
    assert p.victim({(0, 1), (1, 7)}) == (1, 7)
