"""The Mixtral transformer: embeddings, RMSNorm, RoPE, grouped-query attention over the KV cache
(serving/engine/kv_cache.py), the MoE layer (serving/engine/moe_layer.py), final norm and lm_head.

Shape legend:
  B  sequences in the batch     S  new tokens per sequence     T = B*S tokens
  L  key length attended to     M  KV cache capacity per sequence (tokens)
  D  hidden size   H  query heads   G  key/value heads   Dh  head size   V  vocabulary
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from experts.checkpoint import Checkpoint, MixtralConfig
from experts.gemm import linear
from experts.pool import ExpertPool
from serving.engine.kv_cache import KVCache
from serving.engine.moe_layer import moe_layer


@dataclass
class DenseLayer:
    """The dense weights of one decoder layer (everything but the experts)."""

    attn_norm: torch.Tensor  # [D]
    wqkv: torch.Tensor  # [(H + 2G) * Dh, D]: q, k, v projections fused into one GEMM
    wo: torch.Tensor  # [D, H * Dh]
    moe_norm: torch.Tensor  # [D]
    gate: torch.Tensor  # [E, D] router


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, as Mixtral does, then cast back before the scale."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """positions [B, S] -> cos, sin [B, 1, S, Dh] (halves repeated, the rotate_half convention)."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    )
    freqs = positions[..., None].float() * inv_freq  # [B, S, Dh/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, S, Dh]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class MixtralModel(nn.Module):
    """`model(input_ids [B, S]) -> logits [B, S, V]`; experts live in `pool`."""

    def __init__(
        self,
        config: MixtralConfig,
        embed: torch.Tensor,
        layers: list[DenseLayer],
        norm: torch.Tensor,
        lm_head: torch.Tensor,
        pool: ExpertPool,
    ) -> None:
        super().__init__()
        self.config = config
        self.embed, self.layers, self.norm, self.lm_head = embed, layers, norm, lm_head
        self.pool = pool

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def close(self) -> None:
        """Release what the expert pool holds outside this process (Ray actors), if anything."""
        self.pool.shutdown()

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch, max_len, self.dtype, self.device)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        start_pos: torch.Tensor | int = 0,
        slots: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """input_ids [B, S] -> logits [B, S, V] (or [B, 1, V] with last_only).

        With a cache, sequence b's new tokens sit at positions start_pos[b] .. start_pos[b]+S-1 of
        cache slot slots[b] (None: slot b), and attend to everything before them in that slot.
        """
        b, s = input_ids.shape
        start = torch.as_tensor(start_pos, device=input_ids.device).reshape(-1).expand(b)
        positions = start[:, None] + torch.arange(s, device=input_ids.device)  # [B, S]
        fresh = cache is None or not bool(start.any())  # nothing earlier to attend to
        cos, sin = rope(positions, self.config.head_dim, self.config.rope_theta, self.dtype)
        # A mask forces SDPA's slow math path; skip it where it would allow every key anyway:
        # a fresh causal prefill, or one new token per row with every row at the same position.
        uniform_step = s == 1 and bool((start == start[0]).all())
        needs_mask = (not fresh and not uniform_step) or self._window_cuts(int(positions.max()) + 1)
        mask = self._mask(positions) if needs_mask else None
        h = F.embedding(input_ids, self.embed)  # [B, S, D]
        for i, layer in enumerate(self.layers):
            a = rms_norm(h, layer.attn_norm, self.config.rms_norm_eps)
            h = h + self._attention(i, layer, a, cos, sin, mask, cache, slots, positions, fresh)
            m = rms_norm(h, layer.moe_norm, self.config.rms_norm_eps).view(b * s, -1)  # [T, D]
            h = h + moe_layer(m, layer.gate, self.pool, i, self.config.num_experts_per_tok).view(
                b, s, -1
            )
        if last_only:
            h = h[:, -1:]
        return linear(rms_norm(h, self.norm, self.config.rms_norm_eps), self.lm_head)

    def _attention(
        self, i, layer, x, cos, sin, mask, cache, slots, positions, fresh
    ) -> torch.Tensor:
        c = self.config
        b, s, _ = x.shape
        qkv = (
            linear(x, layer.wqkv).reshape(b, s, -1, c.head_dim).transpose(1, 2)
        )  # [B, H+2G, S, Dh]
        q, k, v = qkv.split(
            [c.num_attention_heads, c.num_key_value_heads, c.num_key_value_heads], 1
        )
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            cache.write(i, slots, positions, k, v)
            if not fresh:
                k, v = cache.read(i, slots, b, int(positions.max()) + 1)  # [B, G, L, Dh]
        causal = mask is None and s > 1  # only a fresh prefill gets here with s > 1 and no mask
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True
        )  # [B, H, S, Dh]
        return linear(out.transpose(1, 2).reshape(b, s, -1), layer.wo)

    def _window_cuts(self, s: int) -> bool:
        w = self.config.sliding_window
        return w is not None and s > w

    def _mask(self, positions: torch.Tensor) -> torch.Tensor:
        """[B, 1, S, L] True where query at positions[b, i] may see key j (causal, sliding window)."""
        keys = torch.arange(int(positions.max()) + 1, device=positions.device)
        q = positions[:, None, :, None]
        allowed = keys <= q
        w = self.config.sliding_window
        if w is not None:
            allowed &= keys > q - w
        return allowed

    @classmethod
    def from_checkpoint(
        cls, ckpt: Checkpoint, pool: ExpertPool, dtype: torch.dtype, device: torch.device | str
    ) -> MixtralModel:
        """Read the dense weights; the experts were loaded into `pool` by the caller."""
        c = ckpt.config
        d, hd, g = (
            c.hidden_size,
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        )

        def t(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            return ckpt.tensor(name, shape, dtype).to(device)

        layers = []
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}"
            qkv = [
                t(f"{p}.self_attn.{n}_proj.weight", (r, d))
                for n, r in (("q", hd), ("k", g), ("v", g))
            ]
            layers.append(
                DenseLayer(
                    attn_norm=t(f"{p}.input_layernorm.weight", (d,)),
                    wqkv=torch.cat(qkv).contiguous(),
                    wo=t(f"{p}.self_attn.o_proj.weight", (d, hd)),
                    moe_norm=t(f"{p}.post_attention_layernorm.weight", (d,)),
                    gate=t(f"{p}.block_sparse_moe.gate.weight", (c.num_local_experts, d)),
                )
            )
        embed = t("model.embed_tokens.weight", (c.vocab_size, d))
        tied = c.tie_word_embeddings
        lm_head = embed if tied else t("lm_head.weight", (c.vocab_size, d))
        return cls(c, embed, layers, t("model.norm.weight", (d,)), lm_head, pool)
