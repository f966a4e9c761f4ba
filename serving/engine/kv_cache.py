"""The KV cache: keys and values of a fixed number of sequence slots.

Shape legend:
  B  sequences in the batch     S  new tokens per sequence     L  key length attended to
  M  KV cache capacity per sequence (tokens)     G  key/value heads   Dh  head size
"""

from __future__ import annotations

import torch

from experts.checkpoint import MixtralConfig


class KVCache:
    """Keys and values for `batch` sequence slots of up to `max_len` tokens each.

    k, v: [layers, batch, G, M, Dh]. A forward pass names the slots it uses and where each
    sequence starts, so sequences of different lengths can share one decode step.
    """

    def __init__(
        self,
        config: MixtralConfig,
        batch: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (
            config.num_hidden_layers,
            batch,
            config.num_key_value_heads,
            max_len,
            config.head_dim,
        )
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def write(self, layer: int, slots: torch.Tensor | None, positions: torch.Tensor, k, v) -> None:
        """k, v [B, G, S, Dh] at positions [B, S] of the given slots (None: slots 0..B-1)."""
        rows = torch.arange(k.shape[0], device=k.device) if slots is None else slots
        # Advanced indices split by a slice put their broadcast shape first: [B, S, G, Dh].
        self.k[layer][rows[:, None], :, positions] = k.transpose(1, 2)
        self.v[layer][rows[:, None], :, positions] = v.transpose(1, 2)

    def read(self, layer: int, slots: torch.Tensor | None, batch: int, length: int):
        """Keys and values [B, G, L, Dh] of the first `length` positions."""
        if slots is None:
            return self.k[layer, :batch, :, :length], self.v[layer, :batch, :, :length]
        return self.k[layer][slots, :, :length], self.v[layer][slots, :, :length]
