"""The OpenAI-compatible HTTP API (FastAPI) in front of a Scheduler.

Handlers never touch the model: they tokenize, submit to the scheduler and read its events from an
asyncio queue that the scheduler thread fills through ``loop.call_soon_threadsafe``. Errors are
OpenAI-style objects: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import (ChatTemplate, ChatTemplateError, Failed, Finished, NoChatTemplateError, Piece,
                      PromptTooLongError, QueueFullError, SamplingParams, Scheduler, Tokenizer)

# --- request bodies (unknown fields are ignored, wrong types are a 400) ---------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0)
    seed: int | None = Field(None, ge=-(2 ** 63), lt=2 ** 64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="only one choice per request")


class _Part(_Body):
    type: str
    text: str | None = None


class _Message(_Body):
    role: str
    content: str | list[_Part] | None = None


class ChatRequest(_Sampling):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    tools: list | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None


# --- errors ---------------------------------------------------------------------------------------


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return f"the body is not valid JSON ({e.get('ctx', {}).get('error', e.get('msg'))})", None
    param = loc[0] if loc else None  # the request's field (deeper parts name union members, list indices)
    return (f"{param}: {e.get('msg')}" if param else str(e.get("msg"))), param


# --- the app --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Defaults:
    """What a request gets for what it leaves out (the server's command-line sampling options)."""

    max_tokens: int = 512
    sampling: SamplingParams = SamplingParams()


def create_app(scheduler: Scheduler, tokenizer: Tokenizer, metadata: dict | None, model_id: str,
               cache_stats: Callable[[], dict] | None = None, defaults: Defaults = Defaults(),
               api_key: str | None = None) -> FastAPI:
    """The FastAPI app. ``cache_stats`` (optional) gives the expert cache's counters for /metrics."""
    app = FastAPI(title="flashmoe-stream", docs_url=None, redoc_url=None, openapi_url=None)
    try:
        template: ChatTemplate | None = ChatTemplate.from_metadata(metadata or {})
    except NoChatTemplateError:
        template = None
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_req: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return ApiError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, str(exc.detail), kind).response()

    @app.exception_handler(Exception)
    async def _internal(_req: Request, exc: Exception):
        return ApiError(500, f"internal error ({type(exc).__name__}: {exc})", "server_error").response()

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                           "authentication_error", code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    # --- plain endpoints ---

    @app.get("/health")
    async def health():
        s = scheduler.stats()
        return {"status": "ok", "slots_idle": s["slots"] - s["processing"], "slots_processing": s["processing"],
                "queued": s["queued"]}

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "flashmoe-stream",
                                            "meta": {"n_ctx_slot": scheduler.n_ctx_slot, "slots": scheduler.n_slots,
                                                     "n_vocab": len(tokenizer.tokens)}}]}

    @app.get("/metrics")
    async def metrics():
        cache = await run_in_threadpool(cache_stats) if cache_stats is not None else None
        return PlainTextResponse(prometheus_text(scheduler.stats(), cache),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    # --- generation ---

    @v1.post("/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        if template is None:
            raise ApiError(400, "this model has no chat template: use /v1/completions with a plain prompt",
                           param="messages")
        for name in ("logprobs", "tools"):
            if getattr(body, name):
                raise ApiError(400, f"{name} is not supported by this server", param=name)
        messages = []
        for m in body.messages:
            if isinstance(m.content, list):
                if any(p.type != "text" for p in m.content):
                    raise ApiError(400, "only text content parts are supported", param="messages")
                content = "".join(p.text or "" for p in m.content)
            else:
                content = m.content or ""
            messages.append({"role": m.role, "content": content})

        def prompt_ids() -> list[int]:
            try:
                text = template.render(messages)
            except ChatTemplateError as e:
                raise ApiError(400, str(e), param="messages") from None
            ids = tokenizer.encode(text)
            if len(ids) > 1 and ids[0] == ids[1] == tokenizer.bos_id:  # the template wrote BOS too
                ids = ids[1:]
            return ids

        ids = await run_in_threadpool(prompt_ids)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await _generate(request, body, ids, max_tokens, chat=True)

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        for name in ("echo", "logprobs", "suffix"):
            if getattr(body, name):
                raise ApiError(400, f"{name} is not supported by this server", param=name)
        p = body.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ApiError(400, "give one prompt per request (a list of several is not supported)", param="prompt")
            p = p[0]
        if isinstance(p, str):
            ids = await run_in_threadpool(tokenizer.encode, p)
        else:
            ids = list(p)
            bad = [t for t in ids if not 0 <= t < len(tokenizer.tokens)]
            if bad:
                raise ApiError(400, f"token id {bad[0]} is outside the vocabulary of {len(tokenizer.tokens)}",
                               param="prompt")
        return await _generate(request, body, ids, body.max_tokens, chat=False)

    app.include_router(v1)

    async def _generate(request: Request, body: _Sampling, ids: list[int], max_tokens: int | None, chat: bool):
        d = defaults.sampling
        params = SamplingParams(
            temperature=d.temperature if body.temperature is None else body.temperature,
            top_k=d.top_k if body.top_k is None else body.top_k,
            top_p=d.top_p if body.top_p is None else body.top_p,
            min_p=d.min_p if body.min_p is None else body.min_p,
            repeat_penalty=d.repeat_penalty if body.repeat_penalty is None else body.repeat_penalty,
            seed=d.seed if body.seed is None else body.seed)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        try:
            handle = scheduler.submit(ids, defaults.max_tokens if max_tokens is None else max_tokens, params,
                                      lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev), stop)
        except PromptTooLongError as e:
            raise ApiError(400, str(e), param="messages" if chat else "prompt", code="context_length_exceeded") \
                from None
        except QueueFullError as e:
            raise ApiError(503, str(e), "unavailable_error", headers={"Retry-After": str(_retry_after(scheduler))}) \
                from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        shape = _Shape(rid, model_id, int(time.time()), chat)
        if body.stream:
            usage_chunk = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(events, handle, shape, usage_chunk), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _collect(request, events, handle, shape)

    return app


def _retry_after(scheduler: Scheduler) -> int:
    s = scheduler.stats()
    done = s["requests_ok"] + s["requests_cancelled"] + s["requests_failed"]
    per_request = s["busy_seconds"] / done if done else 1.0
    return max(1, round(per_request * (s["queued"] + 1) / s["slots"]))


@dataclass(frozen=True)
class _Shape:
    """How one response's objects look (chat or text completion)."""

    id: str
    model: str
    created: int
    chat: bool

    def choice(self, text: str | None, finish: str | None, first: bool = False, whole: bool = False) -> dict:
        if not self.chat:
            return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        if whole:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                    "logprobs": None}
        delta = {"role": "assistant", "content": text or ""} if first else ({} if text is None else {"content": text})
        return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}

    def obj(self, choices: list, chunk: bool, usage: dict | None = None) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        out: dict[str, Any] = {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                               "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out


def _usage(f: Finished) -> dict:
    return {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
            "total_tokens": f.prompt_tokens + f.completion_tokens}


_GONE = object()  # put in a request's queue when its client disconnects


async def _collect(request: Request, events: asyncio.Queue, handle, shape: _Shape) -> JSONResponse:
    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        events.put_nowait(_GONE)

    watcher = asyncio.ensure_future(watch())
    parts: list[str] = []
    try:
        while True:
            ev = await events.get()
            if ev is _GONE:
                handle.cancel()
                return JSONResponse({}, status_code=499)  # nobody reads it
            if isinstance(ev, Piece):
                parts.append(ev.text)
            elif isinstance(ev, Failed):
                raise ApiError(500, ev.message, "server_error")
            elif isinstance(ev, Finished):
                if ev.reason == "cancelled":
                    raise ApiError(503, "the request was cancelled (the server is shutting down)", "unavailable_error")
                return JSONResponse(shape.obj([shape.choice("".join(parts), ev.reason, whole=True)], chunk=False,
                                              usage=_usage(ev)))
    finally:
        watcher.cancel()
        handle.cancel()  # a no-op once finished


def _data(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(events: asyncio.Queue, handle, shape: _Shape, usage_chunk: bool) -> AsyncIterator[str]:
    """OpenAI's stream: a first chunk (chat: the assistant role), one chunk per piece of text, a chunk
    with finish_reason (and usage), then — with stream_options.include_usage — a usage chunk with no
    choices, then ``[DONE]``. A disconnect cancels this generator, and with it the generation."""
    try:
        if shape.chat:
            yield _data(shape.obj([shape.choice("", None, first=True)], chunk=True))
        while True:
            ev = await events.get()
            if isinstance(ev, Piece):
                yield _data(shape.obj([shape.choice(ev.text, None)], chunk=True))
            elif isinstance(ev, Failed):
                yield _data(ApiError(500, ev.message, "server_error").body())
                return
            elif isinstance(ev, Finished):
                if ev.reason == "cancelled":
                    yield _data(ApiError(503, "the request was cancelled (the server is shutting down)",
                                         "unavailable_error").body())
                    return
                yield _data(shape.obj([shape.choice(None, ev.reason)], chunk=True, usage=_usage(ev)))
                if usage_chunk:
                    yield _data(shape.obj([], chunk=True, usage=_usage(ev)))
                yield _data("[DONE]")
                return
    finally:
        handle.cancel()


# --- /metrics -------------------------------------------------------------------------------------


def prometheus_text(s: dict, cache: dict | None) -> str:
    """Prometheus exposition text from the scheduler's stats and (optionally) the cache's."""
    lines: list[str] = []

    def metric(name: str, kind: Literal["counter", "gauge"], help: str, values) -> None:
        lines.append(f"# HELP flashmoe_{name} {help}")
        lines.append(f"# TYPE flashmoe_{name} {kind}")
        for labels, v in (values.items() if isinstance(values, dict) else [("", values)]):
            lines.append(f"flashmoe_{name}{labels} {float(v):.6g}" if isinstance(v, float) else
                         f"flashmoe_{name}{labels} {int(v)}")

    busy = s["busy_seconds"]
    metric("requests_total", "counter", "Requests by outcome.",
           {f'{{outcome="{k}"}}': s[f"requests_{k}"] for k in ("ok", "cancelled", "failed", "rejected")})
    metric("requests_processing", "gauge", "Requests in a slot now.", s["processing"])
    metric("requests_queued", "gauge", "Requests waiting for a slot (queue depth).", s["queued"])
    metric("slots", "gauge", "Parallel sequences (-np).", s["slots"])
    metric("slot_context_tokens", "gauge", "Context of one slot (-c / -np).", s["n_ctx_slot"])
    metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.", s["prompt_tokens"])
    metric("generated_tokens_total", "counter", "Tokens generated.", s["generated_tokens"])
    metric("busy_seconds_total", "counter", "Seconds spent in batched forward passes.", float(busy))
    metric("tokens_per_second", "gauge", "Generated tokens per busy second (all slots together).",
           float(s["generated_tokens"] / busy if busy else 0.0))
    metric("prompt_tokens_per_second", "gauge", "Prompt and generated tokens per busy second.",
           float((s["prompt_tokens"] + s["generated_tokens"]) / busy if busy else 0.0))
    metric("steps_total", "counter", "Batched forward passes.", s["steps"])
    metric("batched_steps_total", "counter", "Forward passes over more than one sequence.", s["batched_steps"])
    if cache is not None:
        t = cache["total"]
        tiers = ("device", "host")
        metric("cache_hits_total", "counter", "Expert lookups served by a tier.",
               {f'{{tier="{x}"}}': t.get(f"{x}_hits", 0) for x in tiers})
        metric("cache_misses_total", "counter", "Expert lookups a tier did not hold.",
               {f'{{tier="{x}"}}': t.get(f"{x}_misses", 0) for x in tiers})
        ratios = {}
        for x in tiers:
            n = t.get(f"{x}_hits", 0) + t.get(f"{x}_misses", 0)
            ratios[f'{{tier="{x}"}}'] = float(t.get(f"{x}_hits", 0) / n if n else 0.0)
        metric("cache_hit_ratio", "gauge", "Hits over lookups, per tier.", ratios)
        metric("cache_resident_bytes", "gauge", "Expert bytes a tier holds.",
               {f'{{tier="{x}"}}': cache.get(x, {}).get("resident", 0) for x in tiers})
        metric("cache_budget_bytes", "gauge", "A tier's byte budget.",
               {f'{{tier="{x}"}}': cache.get(x, {}).get("budget", 0) for x in tiers})
        metric("disk_read_bytes_total", "counter", "Expert bytes read from disk.", t.get("disk_bytes", 0))
        metric("host_to_device_bytes_total", "counter", "Expert bytes copied host to device.", t.get("h2d_bytes", 0))
        metric("io_wait_seconds_total", "counter", "Seconds the forward pass waited on expert I/O.",
               float(t.get("wait_s", 0.0)))
        metric("prefetch_precision", "gauge", "Prefetched experts that were used, over those prefetched.",
               float(t.get("prefetch_precision", 0.0)))
        metric("prefetch_recall", "gauge", "Expert requests a prefetch had served, over all requests.",
               float(t.get("prefetch_recall", 0.0)))
    return "\n".join(lines) + "\n"
