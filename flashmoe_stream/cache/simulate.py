"""Replay a routing trace through the runtime's eviction policies: hit rates, bytes read, distance to Belady.

The tiers are the runtime's own ``Tier`` objects driven by the runtime's own policy classes
(``make_policy``), the way ``ExpertCache.get`` drives them: one global byte budget over all layers; for
each get (one layer of one forward call) the experts asked for are pinned while it is served; resident
ones are hits (``on_access``), then every missing one is loaded (room made by the policy's ``victim``,
``on_insert``) and then used (``on_access``). Without prefetch this reproduces the runtime's device-tier
hits exactly (tested). Behind the first tier, optional lower tiers (``lower``: the RAM tier behind the
device tier) serve its misses; what the last tier misses is read from disk.

Belady's MIN (``belady``) gets the whole future access sequence (and sees it in trace order): it is the
offline optimum for a tier without prefetch and the yardstick of every ratio (with prefetch, Belady gets
the same prefetches). Predictors (``previous``: the experts the same layer used at the previous call;
``router``: the runtime's recorded next-layer gate look-ahead) are replayed as prefetches into the first
tier before each get, and scored by precision and recall.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..config import parse_size
from ..errors import FlashMoeError
from .policy import make_policy
from .tiers import Tier
from .trace import Trace

PREDICTORS = ("none", "previous", "router")


@dataclass
class Result:
    policy: str
    capacity: str
    capacity_bytes: int
    capacity_experts: int
    accesses: int = 0
    hits: int = 0
    bytes_read: int = 0  # from disk: misses of the last tier + prefetch reads
    prefetch: str = "none"
    prefetched: int = 0  # experts a prediction brought into the first tier
    prefetch_used: int = 0  # ... that the get they were predicted for asked for
    predicted_needed: int = 0  # experts asked for by gets that had a prediction
    predicted_hits: int = 0  # ... that the prediction named
    lower_hits: list[int] = field(default_factory=list)  # hits of each lower tier
    belady_hit_rate: float | None = None

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def ratio_to_belady(self) -> float | None:
        if self.belady_hit_rate is None:
            return None
        return self.hit_rate / self.belady_hit_rate if self.belady_hit_rate else 1.0

    @property
    def precision(self) -> float | None:
        return self.prefetch_used / self.prefetched if self.prefetched else None

    @property
    def recall(self) -> float | None:
        return self.predicted_hits / self.predicted_needed if self.predicted_needed else None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(hit_rate=self.hit_rate, ratio_to_belady=self.ratio_to_belady, precision=self.precision,
                 recall=self.recall)
        return d


def _predictor(trace: Trace, name: str, per_token: bool) -> Callable[[int, int, int], list[int] | None]:
    """(call index, step, layer) -> experts to prefetch for that get (None: no prediction)."""
    if name == "none":
        return lambda i, s, layer: None
    if name == "previous":
        last: dict[int, list[int]] = {}

        def previous(i: int, s: int, layer: int, _seen=last) -> list[int] | None:
            return _seen.get(layer)

        previous.last = last  # type: ignore[attr-defined]
        return previous
    if name == "router":
        preds = trace.predictions()
        if not preds:
            raise FlashMoeError("this trace has no recorded predictions (it was recorded with --no-prefetch): "
                                "use --prefetch previous or none")
        if per_token:  # a row's own prediction exists only where its forward call had that one row
            counts = np.bincount(trace.step - trace.step.min())
            single = {int(trace.step[r]): r for r in range(trace.n_rows) if counts[trace.step[r] - trace.step.min()] == 1}
            by_row = {(single[s], layer): ids for (s, layer), ids in preds.items() if s in single}
            return lambda i, s, layer: by_row.get((s, layer))
        return lambda i, s, layer: preds.get((s, layer))
    raise FlashMoeError(f"unknown predictor {name!r}: use one of {', '.join(PREDICTORS)}")


def simulate_one(trace: Trace, policy: str, capacity: str | int, lower: Sequence[str | int] = (),
                 prefetch: str = "none", per_token: bool = False,
                 accesses: list[tuple[int, int, list[int]]] | None = None) -> Result:
    """Replay ``trace`` through a tier of ``capacity`` (bytes, "8M", or "10%" of all expert bytes) with
    ``policy`` (a name or "module:Class"; "belady" gets the future), with ``lower`` tiers behind it."""
    acc = accesses if accesses is not None else list(trace.accesses(per_token))
    n_expert = int(trace.meta.get("n_expert", int(trace.ids.max()) + 1))
    total = sum(trace.expert_bytes(layer) * n_expert for layer in trace.layers.tolist())
    cap = parse_size(capacity, total)
    one = max(trace.expert_bytes(layer) for layer in trace.layers.tolist())
    k = trace.ids.shape[2]
    if cap < k * one:
        raise FlashMoeError(f"capacity {capacity} ({cap:,} bytes) cannot hold the {k} experts one token needs "
                            f"({k * one:,} bytes): give a larger capacity")
    # a get wider than the tier is served in groups, as models.common.run_experts does
    acc = [(s, layer, ids[i: i + cap // trace.expert_bytes(layer)]) for s, layer, ids in acc
           for i in range(0, len(ids), cap // trace.expert_bytes(layer))]
    future = [(layer, e) for _, layer, ids in acc for e in ids]

    def new_policy():
        return make_policy(policy, future=future) if policy.strip().lower() == "belady" else make_policy(policy)

    tiers = [Tier("sim", cap, new_policy())]
    for c in lower:
        tiers.append(Tier(f"lower{len(tiers)}", parse_size(c, total), new_policy()))
    res = Result(policy, str(capacity), cap, cap // one, prefetch=prefetch, lower_hits=[0] * (len(tiers) - 1))
    predict = _predictor(trace, prefetch, per_token)
    in_order = policy.strip().lower() == "belady"  # MIN consumes the future in trace order
    first = tiers[0]
    pending: set = set()  # prefetched into the first tier, not asked for yet
    for i, (s, layer, ids) in enumerate(acc):
        nb = trace.expert_bytes(layer)
        keys = [(layer, e) for e in ids]
        for k in keys:
            first.pin(k)
        pred = predict(i, s, layer)
        if pred is not None:
            res.predicted_needed += len(ids)
            res.predicted_hits += len(set(ids) & set(pred))
            for e in pred:
                k = (layer, e)
                if k in first or not first.make_room(nb):
                    continue
                _fetch_below(tiers, k, nb, res)
                first.insert(k, None, nb)
                res.prefetched += 1
                pending.add(k)
        missed = []
        for k in keys:
            res.accesses += 1
            if k in pending:
                pending.discard(k)
                res.prefetch_used += k in first
            if k in first:
                res.hits += 1
                first.access(k)
            elif in_order:
                first.make_room(nb)
                _fetch_below(tiers, k, nb, res)
                first.insert(k, None, nb)
                first.access(k)
            else:
                missed.append(k)
        for k in missed:  # as ExpertCache.get: hits are used first, then every miss is loaded, then used
            first.make_room(nb)
            _fetch_below(tiers, k, nb, res)
            first.insert(k, None, nb)
        for k in missed:
            first.access(k)
        for k in keys:
            first.unpin(k)
        if prefetch == "previous":
            predict.last[layer] = list(ids)  # type: ignore[attr-defined]
    return res


def _fetch_below(tiers: list[Tier], key, nb: int, res: Result) -> None:
    """A first-tier miss: served by the first lower tier that holds ``key``, else read from disk (and kept
    in every lower tier on the way up)."""
    for j, t in enumerate(tiers[1:]):
        if key in t:
            t.access(key)
            res.lower_hits[j] += 1
            return
    res.bytes_read += nb
    for t in tiers[1:]:
        if t.make_room(nb):
            t.insert(key, None, nb)
            t.access(key)


def simulate(trace: Trace, policies: Sequence[str], capacities: Sequence[str | int], lower: Sequence[str | int] = (),
             prefetch: str = "none", per_token: bool = False, progress: bool = False) -> list[Result]:
    """Every policy at every capacity, each with its ratio to Belady's MIN at the same capacity (and the same
    prefetches, so the ratio measures the eviction choice alone)."""
    from tqdm import tqdm

    for p in policies:  # a bad name fails before any work
        if p.strip().lower() != "belady":
            make_policy(p)
    n_expert = int(trace.meta.get("n_expert", int(trace.ids.max()) + 1))
    total = sum(trace.expert_bytes(layer) * n_expert for layer in trace.layers.tolist())
    for c in [*capacities, *lower]:
        parse_size(c, total)
    _predictor(trace, prefetch, per_token)
    acc = list(trace.accesses(per_token))
    out = []
    with tqdm(total=len(policies) * len(capacities), desc="simulate", disable=not progress) as bar:
        for cap in capacities:
            bel = simulate_one(trace, "belady", cap, lower, prefetch, per_token, acc)
            for p in policies:
                r = bel if p.strip().lower() == "belady" else simulate_one(trace, p, cap, lower, prefetch, per_token, acc)
                r.belady_hit_rate = bel.hit_rate
                out.append(r)
                bar.update()
    return out


def plot(results: Sequence[Result], path: str) -> None:
    """Hit rate vs capacity, one line per policy (matplotlib, the ``plot`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FlashMoeError("--plot needs matplotlib: pip install 'flashmoe-stream[plot]' (or pip install "
                            "matplotlib)") from None
    fig, ax = plt.subplots(figsize=(6, 4))
    for pol in dict.fromkeys(r.policy for r in results):
        rs = sorted((r for r in results if r.policy == pol), key=lambda r: r.capacity_bytes)
        ax.plot([r.capacity_experts for r in rs], [100 * r.hit_rate for r in rs], marker="o", label=pol)
    ax.set_xlabel("capacity (experts)")
    ax.set_ylabel("hit rate (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def trace_stats(trace: Trace) -> dict[str, Any]:
    """Per layer: how skewed expert popularity is and how soon an expert is used again, token by token.

    ``top10_share``: share of the layer's routings that go to its most used 10 % of experts (uniform = 0.10);
    ``entropy``: of the popularity, in bits (uniform = log2 n_expert); ``reuse_le_d``: share of routings whose
    expert was also routed at this layer within the previous d tokens of the same sequence; ``mean_overlap``:
    experts shared with the previous token at this layer, out of k.
    """
    n_expert = int(trace.meta.get("n_expert", int(trace.ids.max()) + 1))
    k = trace.ids.shape[2]
    rows = []
    for j, layer in enumerate(trace.layers.tolist()):
        ids = trace.ids[:, j].astype(np.int64)  # [N, k]
        counts = np.bincount(ids.reshape(-1), minlength=n_expert).astype(np.float64)
        p = counts / counts.sum()
        top = np.sort(p)[::-1][: max(1, n_expert // 10)].sum()
        ent = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
        last = np.full(n_expert, -(10 ** 9), np.int64)
        dists = []
        overlap = []
        prev_seq = None
        for n in range(ids.shape[0]):
            if trace.seq[n] != prev_seq:
                last[:] = -(10 ** 9)
                prev_seq = trace.seq[n]
            else:
                overlap.append(len(set(ids[n].tolist()) & set(ids[n - 1].tolist())))
            dists.extend((n - last[ids[n]]).tolist())
            last[ids[n]] = n
        d = np.asarray(dists)
        rows.append({"layer": layer, "top10_share": float(top), "entropy_bits": ent,
                     "reuse_le_1": float((d <= 1).mean()), "reuse_le_4": float((d <= 4).mean()),
                     "reuse_le_16": float((d <= 16).mean()),
                     "mean_overlap": float(np.mean(overlap)) if overlap else 0.0})
    return {"n_expert": n_expert, "k": k, "uniform_entropy_bits": float(np.log2(n_expert)), "layers": rows}
