"""Batching slots: several sequences decoded together by ONE scheduler thread.

    sched = Scheduler(engine.model, engine.tokenizer, n_slots=2, n_ctx=4096)   # 2048 tokens per slot
    sched.start()
    handle = sched.submit(prompt_ids, max_tokens=64, params=SamplingParams(...), stop=["\\n\\n"], emit=callback)
    ...  callback(Piece(text)) ... callback(Finished("stop" | "length" | "cancelled", prompt_tokens, completion_tokens))
    handle.cancel()      # from any thread: the slot is freed before the next step
    sched.close()

Each step runs one ``model.forward_batch`` over every active sequence: the prompts just admitted as
their own segments (prefill, in chunks of at most ``n_batch`` tokens a step) and one token for each
sequence already decoding, so a layer's experts
are fetched once for the union of what all of them route to. ``n_ctx`` is split evenly across the
slots (as llama-server does); requests beyond the slots wait in a bounded queue. The model and the
cache are only ever driven from the scheduler thread; ``emit`` is called from it too and must not
block (hand the event to another thread's queue).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import FlashMoeError
from .sampling import Sampler, SamplingParams

log = logging.getLogger(__name__)


class QueueFullError(FlashMoeError):
    """Every slot is busy and the waiting queue is full: retry later."""


class PromptTooLongError(FlashMoeError):
    """The prompt does not fit one slot's context."""


# --- events sent to a request's ``emit`` ----------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    text: str


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (end-of-generation token or a stop string), "length", "cancelled"
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    message: str


Event = Piece | Finished | Failed


class Handle:
    """A submitted request, as its submitter sees it."""

    def __init__(self) -> None:
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop generating (safe from any thread, at any time, more than once)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass
class _Request:
    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    stop: tuple[str, ...]
    emit: Callable[[Event], None]
    handle: Handle
    queued_at: float = field(default_factory=time.perf_counter)


class _StopScanner:
    """Text in, text out, holding back what could be the start of a stop string; ``hit`` once one appears
    (the stop string and everything after it are dropped, as in OpenAI's API)."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.pending = ""
        self.hit = False

    def push(self, text: str) -> str:
        if not self.stop:
            return text
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending, self.hit = self.pending[:cut], "", True
            return out
        keep = 0  # the longest tail of pending that is a prefix of some stop string
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(s[:n]):
                    keep = n
                    break
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class _Slot:
    def __init__(self, index: int, kv) -> None:
        self.index, self.kv = index, kv
        self.req: _Request | None = None

    def begin(self, req: _Request, tokenizer) -> None:
        self.req = req
        self.kv.reset()
        self.sampler = Sampler(req.params)
        self.history = list(req.prompt)
        self.decoder = tokenizer.incremental_decoder()
        self.stops = _StopScanner(req.stop)
        self.generated = 0
        self.prefilled = 0  # prompt tokens in the cache so far (the prompt goes in chunks of at most n_batch)
        self.next_input: list[int] = []  # after the prompt: the token sampled last, fed at the next step

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.req.prompt)

    def free(self) -> None:
        self.req = None


class Scheduler:
    """The slots and the one thread that drives the model. Thread-safe: ``submit``, ``stats``,
    ``Handle.cancel`` and ``close`` may be called from any thread."""

    def __init__(self, model, tokenizer, n_slots: int = 1, n_ctx: int = 4096, max_queue: int = 16,
                 n_batch: int = 512):
        """``n_batch``: tokens one step feeds at most (prompts are prefilled in chunks so that one long
        prompt does not stall the slots that are decoding; each decoding slot always gets its token)."""
        if n_slots < 1:
            raise FlashMoeError(f"-np {n_slots}: need at least one slot")
        if n_ctx // n_slots < 2:
            raise FlashMoeError(f"-c {n_ctx} split across {n_slots} slots leaves {n_ctx // n_slots} tokens each: "
                                "raise -c")
        if max_queue < 0:
            raise FlashMoeError(f"a queue of {max_queue} requests: give 0 or more")
        self.model, self.tokenizer = model, tokenizer
        if n_batch < 1:
            raise FlashMoeError(f"-b {n_batch}: give at least 1 token per step")
        self.n_slots, self.n_ctx_slot, self.max_queue, self.n_batch = n_slots, n_ctx // n_slots, max_queue, n_batch
        self._slots = [_Slot(i, model.new_kv_cache(self.n_ctx_slot)) for i in range(n_slots)]
        self._waiting: collections.deque[_Request] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._counts = dict.fromkeys(("requests_ok", "requests_cancelled", "requests_failed", "requests_rejected",
                                      "prompt_tokens", "generated_tokens", "steps", "batched_steps"), 0)
        self._busy_s = 0.0
        self._max_rows = 0

    # --- from any thread ----------------------------------------------------------------------------

    def start(self) -> "Scheduler":
        with self._cond:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._loop, name="flashmoe-scheduler", daemon=True)
                self._thread.start()
        return self

    def submit(self, prompt: Sequence[int], max_tokens: int, params: SamplingParams,
               emit: Callable[[Event], None], stop: Sequence[str] = ()) -> Handle:
        """Queue a request; raises PromptTooLongError or QueueFullError (nothing queued then)."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise PromptTooLongError("the prompt is empty: give at least one token")
        if len(prompt) >= self.n_ctx_slot:
            raise PromptTooLongError(
                f"the prompt is {len(prompt)} tokens but a slot's context is {self.n_ctx_slot} "
                f"(-c / -np): shorten the prompt or restart the server with a larger -c or a smaller -np")
        req = _Request(prompt, max(0, int(max_tokens)), params, tuple(stop), emit, Handle())
        with self._cond:
            if self._closed:
                raise QueueFullError("the server is shutting down")
            busy = sum(s.req is not None for s in self._slots)
            if len(self._waiting) >= self.max_queue + (self.n_slots - busy):
                self._counts["requests_rejected"] += 1
                raise QueueFullError(f"all {self.n_slots} slots are busy and {len(self._waiting)} requests wait: "
                                     "retry later")
            self._waiting.append(req)
            self._cond.notify_all()
        return req.handle

    def stats(self) -> dict:
        with self._cond:
            busy = sum(s.req is not None for s in self._slots)
            return {"slots": self.n_slots, "n_ctx_slot": self.n_ctx_slot, "processing": busy,
                    "queued": len(self._waiting), "busy_seconds": self._busy_s, "max_rows": self._max_rows,
                    **self._counts}

    def close(self) -> None:
        """Cancel everything, stop the thread and wait for it."""
        with self._cond:
            self._closed = True
            for req in self._waiting:
                req.handle.cancel()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        for req in self._drain_waiting():
            self._send(req, Finished("cancelled", len(req.prompt), 0))

    def __enter__(self) -> "Scheduler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the scheduler thread -----------------------------------------------------------------------

    def _drain_waiting(self) -> list[_Request]:
        with self._cond:
            out = list(self._waiting)
            self._waiting.clear()
        return out

    def _send(self, req: _Request, event: Event) -> None:
        try:
            req.emit(event)
        except Exception:  # the receiver is gone (its event loop closed, ...): stop its generation
            log.debug("emit failed; cancelling the request", exc_info=True)
            req.handle.cancel()

    def _finish(self, slot: _Slot, reason: str) -> None:
        req = slot.req
        tail = slot.decoder.flush()
        text = slot.stops.push(tail) if tail and not slot.stops.hit else ""
        if not slot.stops.hit:
            text += slot.stops.flush()
        if text and reason != "cancelled":
            self._send(req, Piece(text))
        self._send(req, Finished(reason, len(req.prompt), slot.generated))
        with self._cond:
            self._counts["requests_cancelled" if reason == "cancelled" else "requests_ok"] += 1
        slot.free()

    def _fail(self, slot: _Slot, message: str) -> None:
        self._send(slot.req, Failed(message))
        with self._cond:
            self._counts["requests_failed"] += 1
        slot.free()

    def _loop(self) -> None:
        while True:
            dropped, failed = [], []  # cancelled while they waited; could not start
            with self._cond:
                while not self._closed and not self._waiting and all(s.req is None for s in self._slots):
                    self._cond.wait()
                if self._closed:
                    break
                for slot in self._slots:
                    if slot.req is None:
                        while self._waiting:
                            req = self._waiting.popleft()
                            if req.handle.cancelled:
                                self._counts["requests_cancelled"] += 1
                                dropped.append(req)
                                continue
                            try:
                                slot.begin(req, self.tokenizer)
                            except Exception as e:
                                slot.req = None
                                failed.append((req, f"the request could not start ({type(e).__name__}: {e})"))
                                continue
                            break
            for req in dropped:
                self._send(req, Finished("cancelled", len(req.prompt), 0))
            for req, message in failed:
                self._send(req, Failed(message))
                with self._cond:
                    self._counts["requests_failed"] += 1
            try:
                self._step()
            except Exception as e:  # never let one step take the thread down, nor spin on a broken request
                log.exception("scheduler step failed")
                for slot in self._slots:
                    if slot.req is not None:
                        self._fail(slot, f"internal error ({type(e).__name__}: {e})")
        for slot in self._slots:
            if slot.req is not None:
                self._finish(slot, "cancelled")

    def _step(self) -> None:
        for slot in self._slots:
            if slot.req is not None and slot.req.handle.cancelled:
                self._finish(slot, "cancelled")
        active = [s for s in self._slots if s.req is not None]
        for slot in active:
            if slot.req.max_tokens == 0:
                self._finish(slot, "length")
        active = [s for s in active if s.req is not None]
        if not active:
            return
        feed = {}
        for s in active:
            if not s.prefilling:
                feed[s.index] = s.next_input
        budget = max(1, self.n_batch - len(feed))
        for s in active:
            if s.prefilling and budget > 0:
                feed[s.index] = s.req.prompt[s.prefilled: s.prefilled + budget]
                budget -= len(feed[s.index])
        active = [s for s in active if s.index in feed]
        segments = [(torch.tensor(feed[s.index], dtype=torch.long), s.kv) for s in active]
        t0 = time.perf_counter()
        try:
            logits = self.model.forward_batch(segments)
        except Exception as e:
            # the caches only advance once a pass completes, so each sequence can be retried alone:
            # the ones that fail again fail, the others go on
            log.warning("a forward pass over %d sequences failed (%s: %s)", len(active), type(e).__name__, e)
            if len(active) == 1:
                self._fail(active[0], f"the forward pass failed ({type(e).__name__}: {e})")
                return
            logits, ok = [], []
            for slot, seg in zip(active, segments):
                try:
                    logits.append(self.model.forward_batch([seg])[0])
                    ok.append(slot)
                except Exception as e1:
                    self._fail(slot, f"the forward pass failed ({type(e1).__name__}: {e1})")
            active = ok
        rows = sum(len(feed[s.index]) for s in active)
        prompt_rows = sum(len(feed[s.index]) for s in active if s.prefilling)
        with self._cond:
            self._busy_s += time.perf_counter() - t0
            self._counts["steps"] += 1
            self._counts["batched_steps"] += len(active) > 1
            self._counts["prompt_tokens"] += prompt_rows
            self._max_rows = max(self._max_rows, rows)
        for slot, out in zip(active, logits):
            if slot.prefilling:
                slot.prefilled += len(feed[slot.index])
                if slot.prefilling:
                    continue  # more of the prompt to go before the first token
            try:
                self._advance(slot, out[-1])
            except Exception as e:
                log.exception("sampling failed")
                self._fail(slot, f"sampling failed ({type(e).__name__}: {e})")

    def _advance(self, slot: _Slot, logits: torch.Tensor) -> None:
        req = slot.req
        tok = slot.sampler(logits, slot.history)
        if tok in self.tokenizer.eog_ids:
            self._finish(slot, "stop")
            return
        slot.history.append(tok)
        slot.generated += 1
        with self._cond:
            self._counts["generated_tokens"] += 1
        text = slot.stops.push(slot.decoder.push(tok))
        if text:
            self._send(req, Piece(text))
        if slot.stops.hit:
            self._finish(slot, "stop")
        elif slot.generated >= req.max_tokens or slot.kv.length >= slot.kv.n_ctx:
            self._finish(slot, "length")
        else:
            slot.next_input = [tok]
