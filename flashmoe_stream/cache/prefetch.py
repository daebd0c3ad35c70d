"""When the cache prefetches: per layer, a gate on how often its recent prefetches were used.

Prefetch is cut to every PREFETCH_PROBE-th call for a layer whose recent prefetches (a window of about
1 / (1 - PREFETCH_DECAY) resolved ones, trusted from PREFETCH_TRUST_AFTER) were used less than
PREFETCH_MIN_PRECISION of the time: on a random router the next-layer prediction is right ~1 time in 4,
and its reads then cost more disk time than they save (docs/BENCHMARKS.md). The probes keep the layer's
precision measured, so a predictor that recovers is trusted again. What to prefetch is the model's
business (the next layer's router on the current hidden state, models/common.py: predict_next).
"""

from __future__ import annotations

from collections import defaultdict

PREFETCH_MIN_PRECISION = 0.5
PREFETCH_TRUST_AFTER = 32
PREFETCH_PROBE = 8
PREFETCH_DECAY = 0.99


class PrefetchGate:
    """Per layer: decayed counts of resolved prefetches (used, resolved) and of prefetch calls. Not
    thread-safe: the cache calls it under its lock."""

    def __init__(self):
        self._score: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
        self._calls: dict[int, int] = defaultdict(int)

    def worth_it(self, layer: int) -> bool:
        """Whether to prefetch for ``layer`` now (one call of prefetch): always, unless its recent prefetches
        were mostly wasted (a predictor that does not know this layer's routing); then every PREFETCH_PROBE-th
        call, while its reads stop taking the disk from the misses the model waits on."""
        used, resolved = self._score[layer]
        self._calls[layer] += 1
        if resolved < PREFETCH_TRUST_AFTER or used >= PREFETCH_MIN_PRECISION * resolved:
            return True
        return self._calls[layer] % PREFETCH_PROBE == 0

    def resolved(self, layer: int, useful: bool) -> None:
        """A prefetched expert of ``layer`` was asked for (useful) or left the cache unasked."""
        score = self._score[layer]
        score[0] = score[0] * PREFETCH_DECAY + useful
        score[1] = score[1] * PREFETCH_DECAY + 1
