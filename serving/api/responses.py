"""The engine's events turned into OpenAI responses: one JSON body, or server-sent events as
OpenAI streams them; a backend failure becomes OpenAI's error object (503 with Retry-After when it
is transient, else 500)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from serving.api import protocol as p
from serving.api.model_info import ModelInfo
from serving.engine.requests import Event


def retry_later(message: str, code: str, retry_after_s: int) -> p.ApiError:
    """503 with Retry-After: a transient refusal the client should retry."""
    retry = str(retry_after_s)
    return p.ApiError(
        503,
        f"{message}; retry after {retry} s",
        "server_overloaded",
        code=code,
        headers={"Retry-After": retry},
    )


async def close(events: AsyncIterator) -> None:
    """Close a backend stream early (its request is then cancelled)."""
    for name in ("aclose", "cancel"):
        method = getattr(events, name, None)
        if method is not None:
            result = method()
            if hasattr(result, "__await__"):
                await result
            return


class ClosingStream(StreamingResponse):
    """Server-sent events whose source is closed the moment the response ends, however it ends.

    When the client goes away, Starlette cancels the writer; if that lands while it is sending a
    chunk (not awaiting the next), it leaves our generator suspended, and only the garbage
    collector would close it, some time later: until then the engine goes on generating for
    nobody. Closing it here cancels the request at once."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:  # shielded: a second cancellation must not cut the close chain short
            await asyncio.shield(close(self.body_iterator))


class Output:
    """Accumulates one request's events into text, logprobs, finish reason and usage."""

    def __init__(
        self, info: ModelInfo, prompt_tokens: int, echo: str = "", retry_after_s: int = 1
    ) -> None:
        self.info, self.prompt_tokens, self.echo = info, prompt_tokens, echo
        self.retry_after_s = retry_after_s
        self.text, self.finish = "", None
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.tops: list[dict[int, float]] = []

    @property
    def usage(self) -> dict:
        return p.usage(self.prompt_tokens, len(self.tokens))

    def add(self, event: Event) -> str:
        """Record one event; returns its new text. A backend failure raises ApiError: 503 with
        Retry-After when it is transient (an expert shard being replaced), else 500."""
        if event.error:
            if event.retryable:
                why = f"temporarily unavailable ({event.error})"
                raise retry_later(why, "expert_unavailable", self.retry_after_s)
            raise p.ApiError(500, f"generation failed: {event.error}", "server_error")
        if event.token is not None:
            self.tokens.append(event.token)
            if event.logprob is not None:
                self.logprobs.append(event.logprob)
                self.tops.append(event.top_logprobs or {})
        self.text += event.text
        self.finish = event.finish_reason
        return event.text

    async def collect(self, batches: AsyncIterator[list[Event]]) -> None:
        try:
            async for batch in batches:
                for event in batch:
                    self.add(event)
        finally:
            await close(batches)

    def completion_logprobs(self, start: int = 0, offset: int = 0) -> dict:
        return p.completion_logprobs(
            self.tokens[start:],
            self.logprobs[start:],
            self.tops[start:],
            self.info.token_text,
            offset,
        )

    def chat_logprobs(self, start: int = 0) -> dict:
        return p.chat_logprobs(
            self.tokens[start:], self.logprobs[start:], self.tops[start:], self.info.token_text
        )

    def completion_stream(
        self, events: AsyncIterator[list[Event]], rid: str, include_usage: bool
    ) -> AsyncIterator[bytes]:
        return self._framed(self._completion_chunks(events, rid), events, rid,
                            "text_completion", include_usage)  # fmt: skip

    def chat_stream(
        self, events: AsyncIterator[list[Event]], rid: str, include_usage: bool
    ) -> AsyncIterator[bytes]:
        return self._framed(self._chat_chunks(events, rid), events, rid,
                            "chat.completion.chunk", include_usage)  # fmt: skip

    async def _framed(self, chunks: AsyncIterator[bytes], events: AsyncIterator, rid: str,
                      kind: str, include_usage: bool) -> AsyncIterator[bytes]:  # fmt: skip
        """A stream's chunks, then the usage chunk if asked for, an error object if the backend
        failed mid-stream, and always `data: [DONE]`; the backend stream is closed either way."""
        try:
            async for chunk in chunks:
                yield chunk
            if include_usage:
                yield p.sse(p.usage_chunk(rid, self.info.name, kind, self.usage))
        except p.ApiError as exc:
            yield p.sse(exc.body())
        finally:
            await close(events)
        yield p.SSE_DONE

    async def _completion_chunks(
        self, events: AsyncIterator[list[Event]], rid: str
    ) -> AsyncIterator[bytes]:
        name = self.info.name
        if self.echo:
            yield p.sse(p.completion_chunk(rid, name, self.echo))
        async for batch in events:
            # One SSE event per token as OpenAI sends them, written in one go per batch.
            out = b""
            for event in batch:
                n, offset = len(self.tokens), len(self.echo) + len(self.text)
                text = self.add(event)
                lp = self.completion_logprobs(n, offset) if self.logprobs else None
                out += p.sse(p.completion_chunk(rid, name, text, self.finish, lp))
            yield out

    async def _chat_chunks(
        self, events: AsyncIterator[list[Event]], rid: str
    ) -> AsyncIterator[bytes]:
        name = self.info.name
        # OpenAI's first chunk carries the role and empty content.
        yield p.sse(p.chat_chunk(rid, name, {"role": "assistant", "content": ""}))
        async for batch in events:
            out = b""
            for event in batch:
                n = len(self.tokens)
                text = self.add(event)
                lp = self.chat_logprobs(n) if self.logprobs else None
                if text or lp:
                    out += p.sse(p.chat_chunk(rid, name, {"content": text}, None, lp))
                if self.finish is not None:
                    out += p.sse(p.chat_chunk(rid, name, {}, self.finish))
            if out:
                yield out
