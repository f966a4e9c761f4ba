"""In-process generation with a KV cache: sampling and the decode loop.

Shape legend: B sequences, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field

from serving.errors import UserError
from serving.model import MixtralModel


class SamplingParams(BaseModel):
    """How to pick the next token. temperature 0 is greedy and deterministic."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_tokens: int = Field(16, gt=0)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()


def sample(
    logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None
) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. Greedy at temperature 0; otherwise top-p (nucleus) sampling."""
    if params.temperature == 0.0:
        return logits.argmax(dim=-1)
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


def generate(model: MixtralModel, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
    """Yield new token ids for one prompt until max_tokens or a stop token (which is yielded)."""
    context = model.config.max_position_embeddings
    if not prompt_ids:
        raise UserError("the prompt is empty")
    if len(prompt_ids) + params.max_tokens > context:
        raise UserError(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
            f"model's context of {context} tokens"
        )
    gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    cache = model.new_cache(1, len(prompt_ids) + params.max_tokens)
    ids = torch.tensor([prompt_ids], device=model.device)
    logits = model(ids, cache=cache, start_pos=0, last_only=True)[:, -1]
    pos = len(prompt_ids)
    for _ in range(params.max_tokens):
        token = sample(logits, params, gen)  # [1]
        value = int(token)
        yield value
        if value in params.stop_token_ids:
            return
        logits = model(token[:, None], cache=cache, start_pos=pos, last_only=True)[:, -1]
        pos += 1
