"""The OpenAI-compatible HTTP API (FastAPI): auth, body limit, validation, tokenization, streaming.

The ingress turns a request into a job (prompt token ids + sampling parameters) for a backend (the
engine deployment, or a scheduler in-process) and turns the backend's events back into OpenAI
responses or server-sent events. Every client mistake is a 4xx with OpenAI's error object; a full
queue, or an expert with no live copy, is a prompt 503 with Retry-After (an error event mid-stream).

Admission is checked twice. The ingress counts the requests it has in flight and refuses, at once,
one more than the scheduler's capacity (batch slots + queue): asking the engine made a refusal wait
for the engine's process, busy running the model (measured in RELIABILITY.md). The engine's own
check stays authoritative (several ingress replicas each see only their share; the controller may
lower the slot limit). Responses are written in serving/api/responses.py.
"""

from __future__ import annotations

import hmac
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from serving.api import protocol as p
from serving.api.model_info import ModelInfo
from serving.api.responses import ClosingStream, Output, close, retry_later
from serving.config import ServeConfig
from serving.engine.requests import Admission, Event, Job
from serving.engine.sampling import ContextTooLong, SamplingParams, check_context
from serving.errors import UserError

# generate(job, streamed) -> an Admission, then batches of events (streamed: the client sees
# them as they come; else only the whole answer); stats() -> scheduler numbers.
Generate = Callable[[Job, bool], AsyncIterator[Admission | list[Event]]]
Stats = Callable[[], Awaitable[dict]]


def error_response(err: p.ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def build_api(
    generate: Generate,
    stats: Stats,
    info: ModelInfo,
    config: ServeConfig,
    status: Stats | None = None,
) -> FastAPI:
    """The FastAPI app: /v1/completions, /v1/chat/completions, /v1/models, /health, and, given
    `status` (the controller's report), GET /v1/moe/status."""
    api = FastAPI(title="moe-serve", docs_url=None, redoc_url=None, openapi_url=None)
    ctx = _Context(generate, info, config)

    @api.exception_handler(p.ApiError)
    async def _api_error(_: Request, exc: p.ApiError) -> JSONResponse:
        return error_response(exc)

    @api.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(p.ApiError(exc.status_code, str(exc.detail), kind))

    @api.get("/health")
    async def health() -> dict:
        detail = await stats()
        return {"status": "draining" if detail.get("draining") else "ok", "scheduler": detail}

    @api.get("/v1/models")
    async def models(request: Request) -> dict:
        ctx.authorize(request)
        card = {"id": info.name, "object": "model", "created": 0, "owned_by": "moe-serve"}
        extra = {"max_model_len": info.context, "vocab_size": info.vocab_size}
        return {"object": "list", "data": [card | extra]}

    if status is not None:

        @api.get(p.STATUS_PATH)
        async def moe_status(request: Request) -> dict:
            ctx.authorize(request)
            return await status()

    @api.post("/v1/completions")
    async def completions(request: Request) -> Response:
        ctx.authorize(request)
        req = p.parse_request(await ctx.read_body(request), p.CompletionRequest)
        return await ctx.complete(req)

    @api.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        ctx.authorize(request)
        req = p.parse_request(await ctx.read_body(request), p.ChatCompletionRequest)
        return await ctx.chat(req)

    return api


class _Context:
    """The request handling the routes share."""

    def __init__(self, generate: Generate, info: ModelInfo, config: ServeConfig) -> None:
        self.generate, self.info, self.config = generate, info, config
        self.in_flight = 0  # requests admitted here whose events are not yet finished
        self.capacity = config.scheduler.max_batch_slots + config.scheduler.max_queue

    # -- checks before any work ------------------------------------------------------------------

    def authorize(self, request: Request) -> None:
        key = self.config.api_key
        if not key:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise p.ApiError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                "invalid_request_error",
                code="invalid_api_key",
            )

    async def read_body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it passes the limit (before any parsing)."""
        limit = self.config.limits.max_body_bytes
        too_large = p.ApiError(
            413, f"the request body exceeds {limit} bytes", code="request_too_large"
        )
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        return bytes(body)

    def check_model(self, name: str) -> None:
        if name not in (self.info.name, self.info.path):
            raise p.ApiError(
                404,
                f"model '{name}' is not served here; this server serves '{self.info.name}'",
                "invalid_request_error",
                param="model",
                code="model_not_found",
            )

    # -- the two endpoints -----------------------------------------------------------------------

    async def complete(self, req: p.CompletionRequest) -> Response:
        self.check_model(req.model)
        if isinstance(req.prompt, str):
            ids, prompt_text = self.info.tokenizer.encode(req.prompt), req.prompt
        else:
            ids, prompt_text = self._check_ids(req.prompt), None
        if req.echo and req.logprobs is not None:
            raise p.ApiError(400, "echo with logprobs is not supported", param="echo")
        job = self._job(req, ids, req.max_tokens or 16, "prompt", req.logprobs)
        events = await self._admit(job, req.stream)
        rid = p.new_id("cmpl")
        echo = (prompt_text if prompt_text is not None else self._decode(ids)) if req.echo else ""
        out = Output(self.info, len(ids), echo, self.config.limits.retry_after_s)
        if req.stream:
            return self._sse(out.completion_stream(events, rid, req.include_usage))
        await out.collect(events)
        lp = out.completion_logprobs() if req.logprobs is not None else None
        return JSONResponse(
            p.completion_response(rid, self.info.name, echo + out.text, out.finish, out.usage, lp)
        )

    async def chat(self, req: p.ChatCompletionRequest) -> Response:
        self.check_model(req.model)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            ids = self.info.tokenizer.encode_chat(messages)
        except UserError as exc:
            raise p.ApiError(400, str(exc), param="messages") from None
        limit = req.token_limit or max(1, self.info.context - len(ids))
        top = (req.top_logprobs or 0) if req.logprobs else None
        job = self._job(req, ids, limit, "messages", top)
        events = await self._admit(job, req.stream)
        rid = p.new_id("chatcmpl")
        out = Output(self.info, len(ids), retry_after_s=self.config.limits.retry_after_s)
        if req.stream:
            return self._sse(out.chat_stream(events, rid, req.include_usage))
        await out.collect(events)
        lp = out.chat_logprobs() if req.logprobs else None
        return JSONResponse(
            p.chat_response(rid, self.info.name, out.text, out.finish, out.usage, lp)
        )

    # -- helpers ---------------------------------------------------------------------------------

    def _check_ids(self, ids: list[int]) -> list[int]:
        bad = [t for t in ids if not 0 <= t < self.info.vocab_size]
        if bad:
            raise p.ApiError(
                400,
                f"token id {bad[0]} is outside the vocabulary (0..{self.info.vocab_size - 1})",
                param="prompt",
            )
        return ids

    def _decode(self, ids: list[int]) -> str:
        return self.info.tokenizer.decode(ids)

    def _job(self, req: Any, ids: list[int], max_tokens: int, where: str, logprobs) -> Job:
        """Check lengths and stop strings; the job the backend runs."""
        if not ids:
            raise p.ApiError(400, "the prompt is empty", param=where)
        try:
            check_context(len(ids), max_tokens, self.info.context)
        except ContextTooLong as exc:
            param = where if exc.param == "prompt" else exc.param
            raise p.ApiError(400, str(exc), param=param, code="context_length_exceeded") from None
        if len(req.stop) > self.config.limits.max_stop_strings:
            raise p.ApiError(
                400, f"at most {self.config.limits.max_stop_strings} stop strings", param="stop"
            )
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed,
            stop_token_ids=() if req.ignore_eos else self.info.eos_ids,
        )
        return Job(tuple(ids), params, tuple(req.stop), logprobs)

    async def _admit(self, job: Job, streamed: bool) -> AsyncIterator[list[Event]]:
        """Start the job; a full queue answers 503 with Retry-After before anything is sent."""
        if self.in_flight >= self.capacity:
            raise self._busy(f"{self.in_flight} requests in flight, the queue is full")
        lease = _Lease(self)
        try:
            events = aiter(self.generate(job, streamed))
            first = await anext(events)
        except BaseException:
            lease.release()
            raise
        if not first.admitted:
            lease.release()
            await close(events)
            raise self._busy(first.reason)
        counted = _counted(events, lease)
        weakref.finalize(counted, lease.release)  # a stream dropped unread still frees its place
        return counted

    def _busy(self, why: str) -> p.ApiError:
        why = f"the server is busy ({why})"
        return retry_later(why, "queue_full", self.config.limits.retry_after_s)

    @staticmethod
    def _sse(chunks: AsyncIterator[bytes]) -> ClosingStream:
        return ClosingStream(
            chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )


class _Lease:
    """One admitted request's place in the ingress's count; released exactly once."""

    def __init__(self, context: _Context) -> None:
        self._context: _Context | None = context
        context.in_flight += 1

    def release(self) -> None:
        if self._context is not None:
            self._context.in_flight -= 1
            self._context = None


async def _counted(events: AsyncIterator[list[Event]], lease: _Lease) -> AsyncIterator[list[Event]]:
    """The backend's events; the lease ends with them (finished, failed or closed early)."""
    try:
        async for event in events:
            yield event
    finally:
        lease.release()
        await close(events)
