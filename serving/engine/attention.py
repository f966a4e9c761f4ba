"""Grouped-query attention over the KV cache for a flat step batch, with RoPE.

Shape legend:
  T  tokens in the step     D  decode rows (the first D tokens)     n  a span's tokens
  L  keys attended to       H  query heads     G  key/value heads     Dh  head size

The decode rows attend together. On a CPU in float32, one C++ call (experts/cpu_kernels.py
`decode_attention`) reads each row's own live keys in place in the cache, whatever its slot and
length: no gather, no mask (measured 0.52 -> 0.38 ms a layer for 16 rows of 128 keys from memory,
BENCHMARKS.md). Elsewhere their keys are gathered from the cache by slot, [D, G, L, Dh] (a view
when their slots are consecutive, as the scheduler's packing often makes them), up to the longest
row, with a mask only when rows sit at different positions or the sliding window cuts (a mask
takes SDPA off its fastest path). Each prompt chunk attends alone, to its own slot's keys (a
view, no copy), causally from its start.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from experts import cpu_kernels
from serving.engine.kv_cache import KVCache
from serving.engine.step_batch import Span, StepBatch


def rope(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """positions [T] -> cos, sin [T, 1, Dh] (halves repeated, the rotate_half convention)."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    )
    freqs = positions[:, None].float() * inv_freq  # [T, Dh/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [T, 1, Dh]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, Dh] rotated by its token's position."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attend(
    layer: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: StepBatch,
    cache: KVCache,
    window: int | None,
) -> torch.Tensor:
    """q [T, H, Dh], k and v [T, G, Dh] (rotated) -> [T, H, Dh]; k and v go into the cache."""
    cache.write(layer, batch.slots, batch.positions, k, v)
    out = torch.empty_like(q)
    d = batch.decodes
    if d:
        out[:d] = _decode(layer, q[:d], batch, cache, window)
    for span in batch.spans:
        rows = slice(span.first, span.first + span.length)
        out[rows] = _span(layer, q[rows], span, cache, window)
    return out


def _decode(layer: int, q: torch.Tensor, batch: StepBatch, cache: KVCache, window: int | None):
    """The decode rows: q [D, H, Dh] -> [D, H, Dh]."""
    if _in_place(q, cache):
        k, v = cache.k[layer], cache.v[layer]  # [S, G, M, Dh]
        d = batch.decodes
        return cpu_kernels.decode_attention(q, k, v, batch.slots[:d], batch.positions[:d], window,
                                            q.shape[-1] ** -0.5)  # fmt: skip
    length = batch.decode_keys
    slots = batch.slots[: batch.decodes]
    k, v = cache.read_rows(layer, slots, length, batch.decode_first_slot)  # [D, G, L, Dh]
    mask = None
    if batch.decode_ragged or (window is not None and length > window):
        keys = torch.arange(length, device=q.device)
        pos = batch.positions[: batch.decodes, None, None, None]  # [D, 1, 1, 1]
        mask = keys <= pos if window is None else (keys <= pos) & (keys > pos - window)
    out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, enable_gqa=True)
    return out[:, :, 0]  # [D, H, Dh]


def _in_place(q: torch.Tensor, cache: KVCache) -> bool:
    """Whether the C++ decode attention serves: float32 on a CPU that built the kernels, for
    heads of whole vectors (all Mixtral sizes)."""
    return (
        q.device.type == "cpu"
        and q.dtype == torch.float32
        and cache.k.dtype == torch.float32
        and cpu_kernels.decode_attention_fits(q.shape[-1])
    )


def _span(layer: int, q: torch.Tensor, span: Span, cache: KVCache, window: int | None):
    """One prompt chunk: q [n, H, Dh] -> [n, H, Dh], causal from its start position."""
    length = span.start + span.length
    k, v = cache.read_slot(layer, span.slot, length)  # [1, G, L, Dh]
    q = q.transpose(0, 1)[None]  # [1, H, n, Dh]
    if span.start == 0 and (window is None or length <= window):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        keys = torch.arange(length, device=q.device)
        pos = torch.arange(span.start, length, device=q.device)[:, None]  # [n, 1]
        mask = keys <= pos if window is None else (keys <= pos) & (keys > pos - window)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return out[0].transpose(0, 1)  # [n, H, Dh]
