"""In-process generation of one prompt with a KV cache: the reference decode loop that the
scheduler's continuous batching must match token for token."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from serving.engine.model import MixtralModel
from serving.engine.sampling import SamplingParams, check_context, sample
from serving.errors import UserError


def generate(model: MixtralModel, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
    """Yield new token ids for one prompt until max_tokens or a stop token (which is yielded)."""
    if not prompt_ids:
        raise UserError("the prompt is empty")
    check_context(len(prompt_ids), params.max_tokens, model.config.max_position_embeddings)
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
