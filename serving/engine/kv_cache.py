"""The KV cache: keys and values of a fixed number of sequence slots.

Shape legend:
  B  sequences in the batch     S  new tokens per sequence     L  key length attended to
  M  KV cache capacity per sequence (tokens)     G  key/value heads   Dh  head size
"""

from __future__ import annotations

import torch

from experts import cpu_kernels
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
        if dtype == torch.float32 and device.type == "cpu" and cpu_kernels.available():
            # On 2 MiB pages: each decode row reads its slot's keys, a page boundary fewer
            # every 4 KiB (experts/cpu_kernels.py `zeros`).
            self.k, self.v = cpu_kernels.zeros(shape), cpu_kernels.zeros(shape)
        else:
            self.k = torch.zeros(shape, dtype=dtype, device=device)
            self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k, v) -> None:
        """k, v [T, G, Dh]: token t's at position positions[t] of slot slots[t]."""
        if cpu_kernels.fits(self.k, k, v):  # a copy per row, no index tensors built
            cpu_kernels.kv_write(self.k[layer], slots, positions, k)
            cpu_kernels.kv_write(self.v[layer], slots, positions, v)
            return
        # Advanced indices split by a slice put their broadcast shape first: [T, G, Dh].
        self.k[layer][slots, :, positions] = k
        self.v[layer][slots, :, positions] = v

    def read_rows(self, layer: int, slots: torch.Tensor, length: int, first: int | None = None):
        """Keys and values [B, G, L, Dh] of the first `length` positions of each slot. With
        `first` (the slots are first, first+1, ...: the caller knows it without a device sync) a
        view; else a copy (index_select measured ~40% faster than advanced indexing for it)."""
        k, v = self.k[layer, :, :, :length], self.v[layer, :, :, :length]
        if first is not None:
            return k[first : first + len(slots)], v[first : first + len(slots)]
        return k.index_select(0, slots), v.index_select(0, slots)

    def read_slot(self, layer: int, slot: int, length: int):
        """Keys and values [1, G, L, Dh] of one slot's first `length` positions (a view)."""
        k = self.k[layer, slot : slot + 1, :, :length]
        return k, self.v[layer, slot : slot + 1, :, :length]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot src's first `length` positions to slot dst, every layer (src is then free)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]
