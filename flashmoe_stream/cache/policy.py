"""Eviction policies: small classes behind one protocol, registered by name.

A key is ``(layer, expert)``. A tier tells its policy what happens to its keys:

    on_insert(key)         key became resident (a demand load or a prefetch)
    on_access(key)         key was used (a get() of it; after on_insert when the use caused the load)
    on_evict(key)          key left the tier
    victim(candidates)     which key to evict now; ``candidates`` is a collection (``in`` and iteration)
                           of the resident keys that may go (neither pinned nor in use); never empty

Every built-in policy is O(log n) per operation (a heap with lazy deletion or an ordered dict), plus
the few pinned keys skipped in ``victim``; ``layer-aware`` and ``predictive`` add a pass over the layers in
``victim``.

``make_policy("lru")`` makes a built-in, ``make_policy("mypkg.mod:MyPolicy", **kw)`` a user class.
"""

from __future__ import annotations

import heapq
import importlib
import math
from bisect import bisect_left
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Collection, Hashable, Iterable
from typing import Any, Protocol, runtime_checkable

from ..errors import FlashMoeError

Key = tuple[int, int]


@runtime_checkable
class Policy(Protocol):
    """What a tier needs from an eviction policy (subclassing is optional: duck typing is enough)."""

    def on_access(self, key: Key) -> None: ...

    def on_insert(self, key: Key) -> None: ...

    def on_evict(self, key: Key) -> None: ...

    def victim(self, candidates: Collection[Key]) -> Key: ...


class _LazyHeap:
    """A min-heap of keys by a priority that changes: stale entries are skipped when they surface."""

    def __init__(self) -> None:
        self._heap: list[tuple[Any, int, Hashable]] = []
        self._prio: dict[Hashable, tuple[Any, int]] = {}
        self._seq = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._prio

    def __len__(self) -> int:
        return len(self._prio)

    def set(self, key: Hashable, prio: Any) -> None:
        self._seq += 1
        self._prio[key] = (prio, self._seq)
        heapq.heappush(self._heap, (prio, self._seq, key))
        if len(self._heap) > 2 * len(self._prio) + 64:  # too many stale entries: rebuild
            self._heap = [(p, s, k) for k, (p, s) in self._prio.items()]
            heapq.heapify(self._heap)

    def remove(self, key: Hashable) -> None:
        self._prio.pop(key, None)

    def first(self, candidates: Collection[Hashable]) -> Hashable | None:
        """The lowest-priority key that is in ``candidates`` (left in the heap), or None."""
        skipped = []
        found = None
        while self._heap:
            p, s, k = self._heap[0]
            if self._prio.get(k) != (p, s):
                heapq.heappop(self._heap)
                continue
            if k in candidates:
                found = k
                break
            skipped.append(heapq.heappop(self._heap))
        for e in skipped:
            heapq.heappush(self._heap, e)
        return found

    def prio(self, key: Hashable) -> Any:
        return self._prio[key][0]


def _none_left(candidates) -> FlashMoeError:
    return FlashMoeError(f"eviction asked for a victim among {len(candidates)} candidates, none of them resident")


class LRU:
    """Least recently used (inserts count as a use)."""

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()

    def on_access(self, key: Key) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    on_insert = on_access

    def on_evict(self, key: Key) -> None:
        self._order.pop(key, None)

    def victim(self, candidates: Collection[Key]) -> Key:
        for k in self._order:  # oldest first; only pinned keys are skipped
            if k in candidates:
                return k
        raise _none_left(candidates)


class _HeapPolicy:
    """A policy that ranks the resident keys in a _LazyHeap and evicts the lowest-ranked candidate."""

    def __init__(self) -> None:
        self._heap = _LazyHeap()

    def on_evict(self, key: Key) -> None:
        self._heap.remove(key)

    def victim(self, candidates: Collection[Key]) -> Key:
        k = self._heap.first(candidates)
        if k is None:
            raise _none_left(candidates)
        return k


class LFU(_HeapPolicy):
    """Least frequently used while resident; ties go to the least recently used. A prefetched key starts at 0."""

    def __init__(self) -> None:
        super().__init__()
        self._count: dict[Key, int] = {}
        self._clock = 0

    def on_access(self, key: Key) -> None:
        self._clock += 1
        self._count[key] = self._count.get(key, 0) + 1
        self._heap.set(key, (self._count[key], self._clock))

    def on_insert(self, key: Key) -> None:
        self._clock += 1
        self._count[key] = 0
        self._heap.set(key, (0, self._clock))

    def on_evict(self, key: Key) -> None:
        self._count.pop(key, None)
        super().on_evict(key)


class LFRU(_HeapPolicy):
    """Recency-weighted frequency: score = Σ decay^(now − t) over the key's accesses, time counted in accesses.

    The lowest score is evicted. ``decay`` near 1 behaves like LFU, near 0 like LRU; the default halves a
    use's weight after 1024 accesses (a few tokens of a large model). The ranking of two keys does not change
    between their accesses (ln score = ln S + t_last·ln(1/decay) − now·ln(1/decay)), so it is a heap.
    History is kept across evictions (an expert that comes back keeps its past).
    """

    def __init__(self, decay: float = 0.5 ** (1 / 1024)) -> None:
        if not 0.0 < decay < 1.0:
            raise FlashMoeError(f"lfru decay must be between 0 and 1 (exclusive), got {decay}")
        super().__init__()
        self._lam = -math.log(decay)
        self._hist: dict[Key, tuple[float, int]] = {}  # key -> (S at its last access, time of that access)
        self._now = 0

    def _log_score_rank(self, key: Key) -> float:
        s, t = self._hist.get(key, (0.0, self._now))
        return (math.log(s) if s > 0 else -math.inf) + self._lam * t

    def score(self, key: Key) -> float:
        """Σ decay^(now − t) over the accesses of ``key``."""
        s, t = self._hist.get(key, (0.0, self._now))
        return s * math.exp(-self._lam * (self._now - t))

    def on_access(self, key: Key) -> None:
        self._now += 1
        s, t = self._hist.get(key, (0.0, self._now))
        self._hist[key] = (s * math.exp(-self._lam * (self._now - t)) + 1.0, self._now)
        if key in self._heap:
            self._heap.set(key, (self._log_score_rank(key), self._now))

    def on_insert(self, key: Key) -> None:
        # a key never used sorts below every used one; among such keys the older insert goes first
        self._heap.set(key, (self._log_score_rank(key), self._now))


class _LayerDistance:
    """What ``layer-aware`` and ``predictive`` share: layers run 0..N−1, one pass per token, and after layer
    ``cur`` ran, an expert of layer ``l`` is needed first in ``d = (l − cur − 1) mod N + 1`` layers; one used
    in a pass with probability ``p(key)`` is expected in ``d + N·(1/p − 1)`` layers. A heap per layer (keys
    ranked so that each layer's head is its farthest); ``victim`` compares the layers' heads."""

    def __init__(self, n_layer: int | None) -> None:
        self._n_layer = n_layer
        self._max_layer = -1
        self._cur: int | None = None
        self._passes: dict[int, int] = defaultdict(int)
        self._heaps: dict[int, _LazyHeap] = defaultdict(_LazyHeap)

    def p(self, key: Key) -> float:
        raise NotImplementedError

    def on_evict(self, key: Key) -> None:
        h = self._heaps.get(key[0])
        if h is not None:
            h.remove(key)

    def expected_distance(self, key: Key) -> float:
        """Expected layers until ``key`` is used again."""
        n = self._n_layer or self._max_layer + 1
        d = n if self._cur is None else (key[0] - self._cur - 1) % n + 1
        return d + n * (1.0 / max(self.p(key), 1e-12) - 1.0)

    def victim(self, candidates: Collection[Key]) -> Key:
        best, best_d = None, -1.0
        for heap in self._heaps.values():
            if not len(heap):
                continue
            k = heap.first(candidates)
            if k is None:
                continue
            d = self.expected_distance(k)
            if d > best_d:
                best, best_d = k, d
        if best is None:
            raise _none_left(candidates)
        return best


class LayerAware(_LayerDistance):
    """Predictive: evict the key whose next use is expected farthest away, in layers of the forward pass.

    Layers run in order 0..N−1, one pass per token. After layer ``cur`` ran, an expert of layer ``l`` can be
    needed first in ``d = (l − cur − 1) mod N + 1`` layers (the layer just used is a whole pass away), and,
    if it is used in a pass with probability ``p``, is expected next in ``d + N·(1/p − 1)`` layers.
    ``p`` = (uses of the key + ½) / (passes of its layer + 1), counted over the whole run (history survives
    eviction). ``n_layer`` defaults to the highest layer seen + 1. Within a layer the lowest count goes first
    (a heap per layer); ``victim`` compares the layers' heads.
    """

    def __init__(self, n_layer: int | None = None) -> None:
        super().__init__(n_layer)
        self._count: dict[Key, int] = defaultdict(int)
        self._clock = 0

    def _see(self, key: Key) -> None:
        self._max_layer = max(self._max_layer, key[0])

    def on_access(self, key: Key) -> None:
        self._see(key)
        layer = key[0]
        if layer != self._cur:
            self._passes[layer] += 1
            self._cur = layer
        self._count[key] += 1
        self._clock += 1
        if key in self._heaps[layer]:
            self._heaps[layer].set(key, (self._count[key], self._clock))

    def on_insert(self, key: Key) -> None:
        self._see(key)
        self._clock += 1
        self._heaps[key[0]].set(key, (self._count.get(key, 0), self._clock))

    def p(self, key: Key) -> float:
        return min(1.0, (self._count.get(key, 0) + 0.5) / (self._passes.get(key[0], 0) + 1))


class Predictive(_LayerDistance):
    """Predictive: evict the key expected to be needed last, from a recency-weighted use probability per key.

    Like ``layer-aware`` it counts in layers of the forward pass (layers run 0..N−1, one pass per token): an
    expert of layer ``l`` is needed first in ``d = (l − cur − 1) mod N + 1`` layers after layer ``cur`` ran, and
    one used in a pass with probability ``p`` is expected in ``d + N·(1/p − 1)`` layers. Here ``p`` is an
    exponential moving average over the passes of its layer (weight ``alpha`` for the latest pass; a key never
    used starts at ``prior``), so it follows what the text is about now rather than over the whole run; and a
    key inserted but not used yet (a prefetch: the model predicted it for its layer's next turn) counts as
    certain (``p = 1``) until its first use or the end of that turn, whichever comes first. History survives
    eviction. Within a layer the ranking of two keys does not change between their uses (the decay is common to the
    layer), so each layer keeps a heap and ``victim`` compares the layers' heads: O(N + log n).
    """

    def __init__(self, n_layer: int | None = None, alpha: float = 0.3, prior: float = 0.1) -> None:
        if not 0.0 < alpha < 1.0 or not 0.0 < prior <= 1.0:
            raise FlashMoeError(f"predictive policy: alpha must be in (0, 1) and prior in (0, 1], got {alpha}, {prior}")
        super().__init__(n_layer)
        self._lb = math.log1p(-alpha)  # log of the per-pass decay (< 0)
        self._alpha, self._prior = alpha, prior
        self._hist: dict[Key, tuple[float, int]] = {}  # key -> (p just after its last use, pass of that use)
        self._fresh: dict[int, dict[Key, int]] = defaultdict(dict)  # layer -> {inserted, unused key: pass then}

    def _rank(self, key: Key) -> float:
        """log p(now) minus the layer's common decay: constant between uses of ``key``."""
        if key in self._fresh[key[0]]:
            return math.inf
        p, t = self._hist.get(key, (self._prior, self._passes.get(key[0], 0)))
        return math.log(p) - t * self._lb

    def p(self, key: Key) -> float:
        """The current estimate that ``key`` is used in a pass of its layer."""
        if key in self._fresh[key[0]]:
            return 1.0
        p, t = self._hist.get(key, (self._prior, self._passes.get(key[0], 0)))
        return p * math.exp((self._passes.get(key[0], 0) - t) * self._lb)

    def on_access(self, key: Key) -> None:
        layer = key[0]
        self._max_layer = max(self._max_layer, layer)
        if layer != self._cur:
            if self._cur is not None:
                self._expire(self._cur)
            self._passes[layer] += 1
            self._cur = layer
        now = self._passes[layer]
        p, t = self._hist.get(key, (self._prior, now - 1))
        if t != now:  # once per pass
            self._hist[key] = (p * math.exp((now - t) * self._lb) + self._alpha, now)
        self._fresh[layer].pop(key, None)
        if key in self._heaps[layer]:
            self._heaps[layer].set(key, self._rank(key))

    def _expire(self, layer: int) -> None:
        """Layer ``layer``'s pass ended: keys inserted before it and not used in it were mispredicted."""
        fresh = self._fresh.get(layer)
        if not fresh:
            return
        now = self._passes[layer]
        for key in [k for k, t in fresh.items() if t < now]:
            del fresh[key]
            if key in self._heaps[layer]:
                self._heaps[layer].set(key, self._rank(key))

    def on_insert(self, key: Key) -> None:
        self._max_layer = max(self._max_layer, key[0])
        self._fresh[key[0]][key] = self._passes.get(key[0], 0)
        self._heaps[key[0]].set(key, self._rank(key))

    def on_evict(self, key: Key) -> None:
        self._fresh[key[0]].pop(key, None)
        super().on_evict(key)


class Belady(_HeapPolicy):
    """Offline optimal (MIN): evict the key whose next use in the known ``future`` is farthest (never = ∞).

    ``future`` is the whole sequence of keys that will be accessed. Each ``on_access(key)`` consumes the
    next occurrence of ``key`` at or after the current position (the accesses are expected to follow it).
    """

    def __init__(self, future: Iterable[Key] | None = None) -> None:
        if future is None:
            raise FlashMoeError("the belady policy needs the future trace: make_policy('belady', future=[(layer, "
                                "expert), ...]); it is for the simulator, not for a live run")
        self._pos: dict[Key, list[int]] = defaultdict(list)
        for i, k in enumerate(future):
            self._pos[tuple(k)].append(i)
        self._idx: dict[Key, int] = {}  # key -> index into _pos[key] of its next use
        self._t = 0
        super().__init__()  # heap priority: −next use

    def _next_use(self, key: Key) -> float:
        pos = self._pos.get(key, ())
        i = bisect_left(pos, self._t)
        self._idx[key] = i
        return pos[i] if i < len(pos) else math.inf

    def on_access(self, key: Key) -> None:
        pos = self._pos.get(key, ())
        i = bisect_left(pos, self._t)
        if i < len(pos):
            self._t = pos[i] + 1
        if key in self._heap:
            self._heap.set(key, -self._next_use(key))

    def on_insert(self, key: Key) -> None:
        self._heap.set(key, -self._next_use(key))


_BUILTIN: dict[str, Callable[..., Any]] = {
    "lru": LRU,
    "lfu": LFU,
    "lfru": LFRU,
    "layer-aware": LayerAware,
    "predictive": Predictive,
    "belady": Belady,
}
POLICIES: tuple[str, ...] = tuple(_BUILTIN)

_METHODS = ("on_access", "on_insert", "on_evict", "victim")


def _check(obj: Any, spec: str) -> Any:
    missing = [m for m in _METHODS if not callable(getattr(obj, m, None))]
    if missing:
        raise FlashMoeError(f"policy {spec!r} lacks {', '.join(missing)}: a policy needs the methods "
                            f"{', '.join(_METHODS)} (see flashmoe_stream.cache.Policy)")
    return obj


def make_policy(spec: str | type | Callable[..., Any], **kwargs: Any) -> Policy:
    """A new policy: a built-in name (``POLICIES``), ``"package.module:Class"``, or a class/factory."""
    if callable(spec) and not isinstance(spec, str):
        return _check(spec(**kwargs), getattr(spec, "__name__", repr(spec)))
    if not isinstance(spec, str):
        raise FlashMoeError(f"policy must be a name, 'module:Class' or a class, got {type(spec).__name__}")
    name = spec.strip().lower()
    if name in _BUILTIN:
        return _BUILTIN[name](**kwargs)
    if ":" in spec:
        mod_name, _, cls_name = spec.strip().partition(":")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise FlashMoeError(f"policy {spec!r}: cannot import module {mod_name!r} ({e}); check the name and "
                                f"that it is on PYTHONPATH") from None
        cls = mod
        for part in cls_name.split("."):
            cls = getattr(cls, part, None)
            if cls is None:
                raise FlashMoeError(f"policy {spec!r}: module {mod_name!r} has no {cls_name!r}")
        return _check(cls(**kwargs), spec)
    raise FlashMoeError(f"unknown eviction policy {spec!r}: use one of {', '.join(POLICIES)} "
                        f"or 'package.module:Class' for your own")
