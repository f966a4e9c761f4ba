"""How the next token is chosen, and the one check that a request fits the context.

Shape legend: B sequences, V vocabulary.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from experts import cpu_kernels
from serving.errors import UserError


class SamplingParams(BaseModel):
    """How to pick the next token. temperature 0 is greedy and deterministic."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_tokens: int = Field(16, gt=0)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()


class ContextTooLong(UserError):
    """A request that does not fit the context; `param` names what to change."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def check_context(prompt_tokens: int, max_tokens: int, context: int) -> None:
    """Raise ContextTooLong unless prompt + max_tokens fits `context` tokens (the prompt needs
    room for at least one new token)."""
    if prompt_tokens >= context:
        raise ContextTooLong(
            f"the prompt has {prompt_tokens} tokens; the context is {context} tokens "
            "(prompt + output): shorten it",
            "prompt",
        )
    if prompt_tokens + max_tokens > context:
        raise ContextTooLong(
            f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the context of "
            f"{context} tokens: lower max_tokens to at most {context - prompt_tokens}",
            "max_tokens",
        )


def most_likely(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> the most likely token of each row [B], the first on a tie (as argmax;
    a NaN wins at its first place). Every decode step runs it over all its rows: on a CPU in
    float32 a C++ pass (experts/cpu_kernels.py `first_max`: 0.38 against 0.74 ms for [16, 32000]
    from memory, one thread); elsewhere `max`, which finds it ~3x faster than `argmax`."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2:
        if logits.shape[1] and cpu_kernels.available():
            return cpu_kernels.first_max(logits)
    return logits.max(dim=-1).indices


def sample(
    logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None
) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. Greedy at temperature 0; otherwise top-p (nucleus) sampling."""
    if params.temperature == 0.0:
        return most_likely(logits)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)  # [B, V]
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        outside = sorted_p.cumsum(-1) - sorted_p >= params.top_p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    if gen is not None and gen.device != probs.device:
        # A seeded request's generator lives on the CPU (reproducible on any device): sample there.
        return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def token_logprobs(
    logits: torch.Tensor, token: int, top: int | None
) -> tuple[float | None, dict[int, float] | None]:
    """logits [V]: the chosen token's log-probability under the model (before temperature) and
    the `top` most likely alternatives; (None, None) when no logprobs were asked for."""
    if top is None:
        return None, None
    lp = torch.log_softmax(logits.float(), dim=-1)  # [V]
    best = lp.topk(top) if top > 0 else None
    alternatives = (
        {int(i): float(v) for v, i in zip(best.values, best.indices, strict=True)} if best else {}
    )
    return float(lp[token]), alternatives
