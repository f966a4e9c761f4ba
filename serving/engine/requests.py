"""The request path's contracts: what the ingress hands the engine (a Job) and what comes back
(an Admission, then batches of Events). Frozen dataclasses: they cross Ray Serve as they are."""

from __future__ import annotations

from dataclasses import dataclass

from serving.engine.sampling import SamplingParams


@dataclass(frozen=True)
class Job:
    """One request as the engine runs it."""

    prompt: tuple[int, ...]  # token ids
    params: SamplingParams
    stop: tuple[str, ...] = ()  # stop strings
    logprobs: int | None = None  # top alternatives to report per token; None: no logprobs


@dataclass(frozen=True)
class Admission:
    """The first answer to a Job: admitted, or refused (the queue is full) and why. It comes
    before any token, so the ingress can answer 503 before it sends a response header."""

    admitted: bool
    reason: str = ""
    draining: bool = False  # refused because the engine is shutting down (it takes no more)


@dataclass(frozen=True)
class Event:
    """One streamed update of a request: a new token, and/or the reason it finished."""

    token: int | None = None
    text: str = ""  # text now final (needs a decode function; see detokenize.TextStream)
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "error"
    error: str | None = None
    # The error is transient (an expert shard is down and being replaced): the ingress answers
    # 503 with Retry-After rather than 500, as retrying shortly will succeed.
    retryable: bool = False
