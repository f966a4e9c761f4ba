"""The tokens one forward pass runs, flat: every decoding sequence's next token and every prompt
chunk of the step go through the model together, so a step reads the weights once.

Shape legend: T tokens in the step, R rows whose logits are wanted.

Order: first `decodes` single-token rows (one per decoding sequence, contiguous so that their
attention runs as one batch), then each prompt chunk's tokens as a span. Everything a layer needs
that would otherwise cost a device sync per layer (the longest key length of the decode rows,
whether their positions differ) is worked out here, once, from host integers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Span:
    """A prompt chunk: tokens first..first+length-1 of the step, cache positions start.. in slot."""

    first: int
    length: int
    slot: int
    start: int


@dataclass(frozen=True)
class StepBatch:
    """ids, positions, slots [T]: each token, its cache position and slot; logit_rows [R]."""

    ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    decodes: int  # the first `decodes` tokens are single-token rows
    decode_keys: int  # keys the longest decode row attends to (its position + 1)
    decode_ragged: bool  # the decode rows sit at different positions (their keys need a mask)
    spans: tuple[Span, ...]
    logit_rows: torch.Tensor
    # The decode rows' slots are decode_first_slot, +1, +2, ...: their keys are one block of the
    # cache, read as a view (None: they are not, a gather).
    decode_first_slot: int | None = None

    @property
    def tokens(self) -> int:
        return int(self.ids.numel())


def consecutive_from(slots: Sequence[int]) -> int | None:
    """The first slot when `slots` are first, first+1, ... (and not empty), else None."""
    if not slots or list(slots) != list(range(slots[0], slots[0] + len(slots))):
        return None
    return slots[0]


def step_batch(
    decodes: Sequence[tuple[int, int, int]],
    chunks: Sequence[tuple[Sequence[int], int, int, bool]],
    device: torch.device | str = "cpu",
) -> StepBatch:
    """decodes: (token, slot, position) per decoding sequence, each wanting its logits;
    chunks: (tokens, slot, start position, wants the last token's logits) per prompt chunk."""
    ids = [token for token, _, _ in decodes]
    slots = [slot for _, slot, _ in decodes]
    positions = [pos for _, _, pos in decodes]
    logit_rows = list(range(len(decodes)))
    spans = []
    for tokens, slot, start, wants_logits in chunks:
        spans.append(Span(len(ids), len(tokens), slot, start))
        ids += list(tokens)
        slots += [slot] * len(tokens)
        positions += range(start, start + len(tokens))
        if wants_logits:
            logit_rows.append(len(ids) - 1)
    decode_positions = positions[: len(decodes)]

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return StepBatch(
        ids=tensor(ids),
        positions=tensor(positions),
        slots=tensor(slots),
        decodes=len(decodes),
        decode_keys=max(decode_positions, default=-1) + 1,
        decode_ragged=len(set(decode_positions)) > 1,
        spans=tuple(spans),
        logit_rows=tensor(logit_rows),
        decode_first_slot=consecutive_from(slots[: len(decodes)]),
    )


def rows_batch(
    input_ids: torch.Tensor, start: Sequence[int], slots: Sequence[int], last_only: bool
) -> StepBatch:
    """The batch of `model(input_ids [B, S], start_pos, slots)`: B rows of S tokens; one token per
    row is a decode step, more are prompt chunks. Logits of every token, or of each row's last."""
    b, s = input_ids.shape
    rows = input_ids.tolist()
    if s == 1:
        return step_batch([(r[0], slot, p) for r, slot, p in zip(rows, slots, start, strict=True)],
                          [], input_ids.device)  # fmt: skip
    chunks = [(r, slot, p, True) for r, slot, p in zip(rows, slots, start, strict=True)]
    batch = step_batch([], chunks, input_ids.device)
    if last_only:
        return batch
    return replace(batch, logit_rows=torch.arange(b * s, device=input_ids.device))


@dataclass(frozen=True)
class Half:
    """One of two micro-batches of a step: its batch, and where its logits go in the step's."""

    batch: StepBatch
    rows: torch.Tensor  # [R_half] positions of its logit rows among the step's R


def halves(batch: StepBatch) -> tuple[Half, Half]:
    """Split a step into two micro-batches of whole sequences with about half the tokens each:
    half the decode rows each, and each prompt chunk to the lighter half."""
    d = batch.decodes
    parts: list[list[range]] = [[range(0, (d + 1) // 2)], [range((d + 1) // 2, d)]]
    sizes = [(d + 1) // 2, d // 2]
    spans: list[list[Span]] = [[], []]
    for span in batch.spans:
        i = 0 if sizes[0] <= sizes[1] else 1
        parts[i].append(range(span.first, span.first + span.length))
        spans[i].append(span)
        sizes[i] += span.length
    wanted = {row: j for j, row in enumerate(batch.logit_rows.tolist())}
    host = batch.positions.tolist(), batch.slots.tolist()
    return tuple(
        _half(batch, [t for r in parts[i] for t in r], spans[i], wanted, host) for i in (0, 1)
    )


def _half(batch: StepBatch, tokens: list[int], spans: list[Span], wanted: dict,
          host: tuple[list[int], list[int]]) -> Half:  # fmt: skip
    positions, slots = host
    decodes = sum(1 for t in tokens if t < batch.decodes)
    local = {t: i for i, t in enumerate(tokens)}
    first, rebased = decodes, []
    for span in spans:
        rebased.append(Span(first, span.length, span.slot, span.start))
        first += span.length
    device = batch.ids.device
    index = torch.tensor(tokens, dtype=torch.long, device=device)
    logits = [(wanted[t], local[t]) for t in tokens if t in wanted]
    decode_positions = [positions[t] for t in tokens[:decodes]]
    sub = StepBatch(
        ids=batch.ids[index],
        positions=batch.positions[index],
        slots=batch.slots[index],
        decodes=decodes,
        decode_keys=max(decode_positions, default=-1) + 1,
        decode_ragged=len(set(decode_positions)) > 1,
        spans=tuple(rebased),
        logit_rows=torch.tensor([i for _, i in logits], dtype=torch.long, device=device),
        decode_first_slot=consecutive_from([slots[t] for t in tokens[:decodes]]),
    )
    return Half(sub, torch.tensor([j for j, _ in logits], dtype=torch.long, device=device))
