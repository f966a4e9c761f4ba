"""The OpenAI wire format: request models, response and stream-chunk builders, the error object.

Requests are validated strictly (a string is not a number, unknown fields are refused) so that a
client's mistake is a 400 that names the field rather than a silent surprise. Responses are plain
dicts shaped exactly as OpenAI sends them.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serving.config import error_path, validation_message

# The controller's report (GET): the running engine's breakdown, targets and last actions.
STATUS_PATH = "/v1/moe/status"


class ApiError(Exception):
    """An error answered with OpenAI's error object: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: Any = None
) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    include_usage: bool = False


def _stop_list(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise ValueError("must be a string or a list of strings")


class _Common(BaseModel):
    """Fields completions and chat share."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    model: str
    max_tokens: int | None = Field(None, gt=0)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = 1  # one choice per request (checked below): ask again for more
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0  # not implemented: only 0 is accepted (checked below)
    frequency_penalty: float = 0.0
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension, used by benchmarks for fixed output lengths

    @field_validator("stop", mode="plain")
    @classmethod
    def _stop(cls, value: Any) -> tuple[str, ...]:
        return _stop_list(value)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError(f"n={value} is not supported; only n=1 (send one request per choice)")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0.0:
            raise ValueError("penalties are not supported; only 0 is accepted")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: str | list[int]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("best_of is not supported; only 1")
        return value

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix (insertion) is not supported")
        return value

    @field_validator("prompt", mode="plain")
    @classmethod
    def _prompt(cls, value: Any) -> str | list[int]:
        # OpenAI also takes a batch (a list of prompts); a batch of one is the same request.
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
            value = value[0]
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(type(t) is int for t in value):
            return value
        if isinstance(value, list) and value and all(isinstance(p, str | list) for p in value):
            raise ValueError("only one prompt per request is supported; send one request each")
        raise ValueError("must be a string or a list of token ids (integers)")


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, gt=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def parse_request(body: bytes, model: type[BaseModel]) -> Any:
    """The request body -> a validated request; any problem is an ApiError 400 naming the field."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(error_path(err["loc"])) or None
        raise ApiError(400, validation_message(exc), param=param) from None


# -- responses --------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _envelope(rid: str, obj: str, model: str, choice: dict, use: dict | None) -> dict:
    """OpenAI's response object around one choice."""
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, **choice}],
        "usage": use,
    }


def completion_response(
    rid: str, model: str, text: str, finish: str | None, use: dict, logprobs: dict | None = None
) -> dict:
    choice = {"text": text, "logprobs": logprobs, "finish_reason": finish}
    return _envelope(rid, "text_completion", model, choice, use)


def completion_chunk(
    rid: str, model: str, text: str, finish: str | None = None, logprobs: dict | None = None
) -> dict:
    chunk = completion_response(rid, model, text, finish, {}, logprobs)
    chunk["usage"] = None
    return chunk


def chat_response(
    rid: str, model: str, text: str, finish: str | None, use: dict, logprobs: dict | None = None
) -> dict:
    message = {"role": "assistant", "content": text}
    choice = {"message": message, "logprobs": logprobs, "finish_reason": finish}
    return _envelope(rid, "chat.completion", model, choice, use)


def chat_chunk(
    rid: str, model: str, delta: dict, finish: str | None = None, logprobs: dict | None = None
) -> dict:
    choice = {"delta": delta, "logprobs": logprobs, "finish_reason": finish}
    return _envelope(rid, "chat.completion.chunk", model, choice, None)


def usage_chunk(rid: str, model: str, obj: str, use: dict) -> dict:
    """The last chunk when stream_options.include_usage is set: no choices, only usage."""
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": use,
    }


def sse(obj: dict) -> bytes:
    """One server-sent event, as OpenAI writes them."""
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


# -- logprobs ---------------------------------------------------------------------------------

TokenText = Callable[[int], str]


def completion_logprobs(
    tokens: list[int],
    logprobs: list[float],
    tops: list[dict[int, float]],
    token_text: TokenText,
    offset: int = 0,
) -> dict:
    """Completions' logprobs object: tokens, token_logprobs, top_logprobs, text_offset."""
    texts = [token_text(t) for t in tokens]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": texts,
        "token_logprobs": logprobs,
        "top_logprobs": [{token_text(t): v for t, v in top.items()} for top in tops],
        "text_offset": offsets,
    }


def chat_logprobs(
    tokens: list[int], logprobs: list[float], tops: list[dict[int, float]], token_text: TokenText
) -> dict:
    """Chat's logprobs object: {"content": [{token, logprob, bytes, top_logprobs}]}."""

    def entry(token: int, value: float) -> dict:
        text = token_text(token)
        return {"token": text, "logprob": value, "bytes": list(text.encode())}

    content = []
    for token, value, top in zip(tokens, logprobs, tops, strict=True):
        content.append(
            entry(token, value) | {"top_logprobs": [entry(t, v) for t, v in top.items()]}
        )
    return {"content": content}
