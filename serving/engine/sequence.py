"""A request's state inside the scheduler, and what one step runs.

Shape legend: V vocabulary.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import torch

from serving.engine.detokenize import TextStream
from serving.engine.reports import RequestTiming
from serving.engine.requests import Event
from serving.engine.sampling import SamplingParams


@dataclass(eq=False)
class Sequence:
    """A request's state inside the scheduler."""

    id: int
    prompt: list[int]
    params: SamplingParams
    logprobs: int | None  # how many top alternatives to report; None: no logprobs
    text: TextStream | None
    gen: torch.Generator | None
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    slot: int | None = None
    cached: int = 0  # tokens written into the slot's cache
    output: list[int] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False
    submitted_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.prompt)

    def timing(self, now: float) -> RequestTiming:
        """The request's latencies, finishing at `now` (monotonic seconds)."""
        first = self.first_token_at if self.first_token_at is not None else now
        n = len(self.output)
        tpot = (now - first) / (n - 1) if n > 1 else None
        return RequestTiming(first - self.submitted_at, now - self.submitted_at, tpot)


@dataclass
class StepPlan:
    decodes: list[Sequence]
    prefills: list[tuple[Sequence, int]]  # (sequence, chunk length)

    @property
    def prefill_tokens(self) -> int:
        return sum(n for _, n in self.prefills)

    @property
    def tokens(self) -> int:
        """Decode rows + prompt tokens: what the step runs through the model."""
        return len(self.decodes) + self.prefill_tokens
