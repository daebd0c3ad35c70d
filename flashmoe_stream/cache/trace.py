"""Routing traces: the experts every token was routed to, per layer, recorded from a live run.

A trace is one ``.npz`` file (``numpy.load(path)`` reads it; no pickle). Schema, version 1 — N rows (one per
prompt or generated token, in the order the model ran them), L = layers with routed experts, k = experts
per token:

    version      int32 []          1
    meta         str   []          JSON: model, arch, n_layer, n_expert, n_expert_used, expert_bytes
                                   ({layer: bytes of one expert}), and what was run
    layers       int32 [L]         the MoE layers, in forward order
    ids          int16 [N, L, k]   expert ids of row n at layers[j], in the router's order (highest weight first)
    weights      float16 [N, L, k] their router weights, as the model uses them (normalised over the k)
    step         int32 [N]         the forward call the row was part of; the rows of one call are fetched
                                   together (the union of their experts, once per layer)
    seq          int32 [N]         the sequence (prompt, or chat turn) the row belongs to
    generated    bool  [N]         True: a generated token's row; False: a prompt token's
    tokens       int32 [N]         the row's token id
    pred_step    int32 [P]         the runtime's prefetch predictions: before the forward call pred_step[p]
    pred_layer   int32 [P]         reached layer pred_layer[p], it predicted (and prefetched) the experts
    pred_ids     int16 [P, m]      pred_ids[p] (-1 pads the row)

``TraceRecorder`` builds one from the model's ``on_route`` hook and the prefetch calls it sees (wrap the
expert source with :meth:`TraceRecorder.wrap`); ``Trace.load`` reads one back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadFileError

VERSION = 1
_FIELDS = ("version", "meta", "layers", "ids", "weights", "step", "seq", "generated", "tokens", "pred_step",
           "pred_layer", "pred_ids")


class TraceRecorder:
    """Collects routes (``on_route``) and prefetch predictions (through ``wrap(source)``) of a run.

    Call ``end_sequence(tokens, n_prompt)`` after each generation (``tokens``: the ids of the rows the
    model ran, prompt first); ``save(path)`` writes the trace.
    """

    def __init__(self, meta: dict[str, Any] | None = None):
        self.meta = dict(meta or {})
        self._events: list[tuple] = []  # ("route", layer, ids, weights) | ("pred", layer, ids), in call order
        self._rows: list[dict[str, np.ndarray]] = []  # per finished sequence
        self._n_steps = 0

    # --- hooks ---------------------------------------------------------------------------------
    def on_route(self, layer: int, ids, weights) -> None:
        self._events.append(("route", int(layer), _np(ids).astype(np.int16), _np(weights).astype(np.float16)))

    def on_prefetch(self, layer: int, ids) -> None:
        self._events.append(("pred", int(layer), np.asarray(list(ids), dtype=np.int16)))

    def wrap(self, source: Any) -> _RecordingSource:
        """An expert source that forwards to ``source`` and records its ``prefetch`` calls."""
        return _RecordingSource(source, self)

    # --- sequences -----------------------------------------------------------------------------
    def end_sequence(self, tokens: Sequence[int], n_prompt: int) -> None:
        """Close the sequence whose routes came in since the last call; ``tokens`` are its rows' ids."""
        steps: list[list[tuple]] = []
        preds: list[tuple[int, int, np.ndarray]] = []
        pending: list[tuple[int, np.ndarray]] = []
        last = None
        for ev in self._events:
            if ev[0] == "pred":
                pending.append((ev[1], ev[2]))
                continue
            if last is None or ev[1] <= last:
                steps.append([])
            last = ev[1]
            steps[-1].append(ev)
            # a prediction for layer l is made while the layer before it runs: it belongs to this step
            preds += [(self._n_steps + len(steps) - 1, lay, ids) for lay, ids in pending]
            pending = []
        self._events = []
        if not steps:
            return
        layers = [ev[1] for ev in steps[0]]
        ids, weights, step = [], [], []
        for s, evs in enumerate(steps):
            if [ev[1] for ev in evs] != layers:
                raise BadFileError("a forward call routed a different set of layers than the first; cannot trace it")
            ids.append(np.stack([ev[2] for ev in evs], 1))  # [T, L, k]
            weights.append(np.stack([ev[3] for ev in evs], 1))
            step.append(np.full(ids[-1].shape[0], self._n_steps + s, np.int32))
        n = sum(len(x) for x in ids)
        toks = np.full(n, -1, np.int32)
        m = min(n, len(tokens))
        toks[:m] = np.asarray(list(tokens)[:m], np.int32)
        self._rows.append({"ids": np.concatenate(ids), "weights": np.concatenate(weights), "step": np.concatenate(step),
                           "seq": np.full(n, len(self._rows), np.int32), "generated": np.arange(n) >= n_prompt,
                           "tokens": toks, "layers": np.asarray(layers, np.int32), "preds": preds})
        self._n_steps += len(steps)

    def has_data(self) -> bool:
        return bool(self._rows)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the finished sequences (atomically: a temporary name, fsync, rename). Routes of a generation
        that was not closed by ``end_sequence`` (an interrupted one) are left out."""
        self._events = []
        if not self._rows:
            raise BadFileError("nothing was recorded: no routed tokens to write to the trace")
        layers = self._rows[0]["layers"]
        k = max(r["ids"].shape[2] for r in self._rows)
        preds = [p for r in self._rows for p in r["preds"]]
        width = max((len(p[2]) for p in preds), default=1)
        pred_ids = np.full((len(preds), width), -1, np.int16)
        for i, (_, _, ids) in enumerate(preds):
            pred_ids[i, : len(ids)] = ids
        arrays = {
            "version": np.int32(VERSION), "meta": np.str_(json.dumps(self.meta)), "layers": layers,
            "ids": np.concatenate([r["ids"] for r in self._rows]).reshape(-1, len(layers), k),
            "weights": np.concatenate([r["weights"] for r in self._rows]),
            "step": np.concatenate([r["step"] for r in self._rows]),
            "seq": np.concatenate([r["seq"] for r in self._rows]),
            "generated": np.concatenate([r["generated"] for r in self._rows]),
            "tokens": np.concatenate([r["tokens"] for r in self._rows]),
            "pred_step": np.asarray([p[0] for p in preds], np.int32),
            "pred_layer": np.asarray([p[1] for p in preds], np.int32), "pred_ids": pred_ids,
        }
        path = Path(path)
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path


class _RecordingSource:
    """Forwards get/prefetch/capacity/release to the real source; records prefetch predictions."""

    def __init__(self, source: Any, rec: TraceRecorder):
        self._source, self._rec = source, rec

    def get(self, layer: int, ids):
        return self._source.get(layer, ids)

    def prefetch(self, layer: int, ids) -> None:
        ids = list(ids)
        self._rec.on_prefetch(layer, ids)
        self._source.prefetch(layer, ids)

    def __getattr__(self, name: str):  # capacity(), release(), ... when the source has them
        return getattr(self._source, name)


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


@dataclass(frozen=True)
class Trace:
    meta: dict[str, Any]
    layers: np.ndarray
    ids: np.ndarray
    weights: np.ndarray
    step: np.ndarray
    seq: np.ndarray
    generated: np.ndarray
    tokens: np.ndarray
    pred_step: np.ndarray
    pred_layer: np.ndarray
    pred_ids: np.ndarray

    @classmethod
    def load(cls, path: str | os.PathLike) -> Trace:
        path = Path(path)
        if not path.is_file():
            raise BadFileError(f"trace {path} not found: record one with `flashmoe run -m MODEL ... --trace {path}`")
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [f for f in _FIELDS if f not in z.files]
                if missing:
                    raise BadFileError(f"{path} is not a flashmoe trace (it lacks {', '.join(missing)})")
                d = {f: z[f] for f in _FIELDS}
        except (ValueError, OSError, EOFError) as e:
            raise BadFileError(f"{path} is not a readable trace ({e}): record it again with flashmoe run --trace") \
                from None
        if int(d["version"]) != VERSION:
            raise BadFileError(f"{path}: trace version {int(d['version'])} is not supported (this flashmoe reads "
                               f"version {VERSION}); record it again")
        n, L = d["ids"].shape[:2]
        if L != len(d["layers"]) or any(len(d[f]) != n for f in ("weights", "step", "seq", "generated", "tokens")):
            raise BadFileError(f"{path}: inconsistent trace (array lengths differ); record it again")
        d.pop("version")
        d["meta"] = json.loads(str(d["meta"]))
        return cls(**d)

    @property
    def n_rows(self) -> int:
        return int(self.ids.shape[0])

    def expert_bytes(self, layer: int) -> int:
        """Bytes of one expert of ``layer`` (1 when the trace does not say: capacities then count experts)."""
        return int(self.meta.get("expert_bytes", {}).get(str(layer), 1))

    def accesses(self, per_token: bool = False) -> Iterator[tuple[int, int, list[int]]]:
        """(step, layer, expert ids) in the order the runtime asks the cache for them: per forward call, per
        layer, the union of the rows' experts (sorted, as ``torch.unique``). ``per_token``: every row as its own
        call (as if each token were decoded alone; a causal model routes a row the same either way)."""
        if per_token:
            groups = [(i, slice(i, i + 1)) for i in range(self.n_rows)]
        else:
            cuts = np.flatnonzero(np.diff(self.step)) + 1
            bounds = [0, *cuts.tolist(), self.n_rows]
            groups = [(int(self.step[a]), slice(a, b)) for a, b in zip(bounds, bounds[1:])]
        for s, rows in groups:
            for j, layer in enumerate(self.layers.tolist()):
                yield s, layer, np.unique(self.ids[rows, j]).tolist()

    def predictions(self) -> dict[tuple[int, int], list[int]]:
        """{(step, layer): the experts the runtime predicted and prefetched for that layer of that call}."""
        out: dict[tuple[int, int], list[int]] = {}
        for s, layer, ids in zip(self.pred_step.tolist(), self.pred_layer.tolist(), self.pred_ids):
            out.setdefault((s, layer), []).extend(int(e) for e in ids if e >= 0)
        return out
