"""The Mixtral transformer: embeddings, RMSNorm, grouped-query attention with RoPE over the KV cache
(serving/engine/attention.py), the MoE layer (serving/engine/moe_layer.py), final norm, lm_head.
A forward pass runs a flat step batch (serving/engine/step_batch.py): decode rows and prompt
chunks of many sequences together; `model(input_ids [B, S])` builds one.

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

from experts import cpu_kernels
from experts.checkpoint import Checkpoint, MixtralConfig
from experts.gemm import Linear
from experts.pool import ExpertPool
from serving.engine.attention import apply_rope, attend, rope
from serving.engine.kv_cache import KVCache
from serving.engine.moe_layer import moe_layer, start_moe_layer
from serving.engine.step_batch import StepBatch, halves, rows_batch

# Steps of at least this many tokens run as two micro-batches when the experts are on shards; 0:
# never. Off by default: on a 2-core CPU it measured 0.63-0.74x of one batch (BENCHMARKS.md), as
# each half reads every expert's weights again and the engine and shards share the cores.
SPLIT_MIN_TOKENS = 0
FUSED_ROPE = True  # RoPE in C++ where it applies (off: apply_rope's operators, for comparisons)


@dataclass
class DenseLayer:
    """The dense weights of one decoder layer (everything but the experts)."""

    attn_norm: torch.Tensor  # [D]
    wqkv: Linear  # [(H + 2G) * Dh, D]: q, k, v projections fused into one GEMM
    wo: Linear  # [D, H * Dh]
    moe_norm: torch.Tensor  # [D]
    gate: Linear  # [E, D] router


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, as Mixtral does, then cast back before the scale."""
    if cpu_kernels.fits(x, weight):  # one C++ pass instead of six operators
        return cpu_kernels.rms_norm(x, weight, eps)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class MixtralModel(nn.Module):
    """`model(input_ids [B, S]) -> logits [B, S, V]`; experts live in `pool`."""

    def __init__(
        self,
        config: MixtralConfig,
        embed: torch.Tensor,
        layers: list[DenseLayer],
        norm: torch.Tensor,
        lm_head: Linear,
        pool: ExpertPool,
    ) -> None:
        super().__init__()
        self.config = config
        self.embed, self.layers, self.norm, self.lm_head = embed, layers, norm, lm_head
        self.pool = pool
        self.split_min_tokens = SPLIT_MIN_TOKENS  # 0: never two micro-batches

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
        if cache is None:  # the keys must live somewhere: a cache for this call alone
            cache, slots, start_pos = self.new_cache(b, s), None, 0
        start = torch.as_tensor(start_pos).reshape(-1).expand(b).tolist()
        rows = list(range(b)) if slots is None else torch.as_tensor(slots).tolist()
        logits = self.step(rows_batch(input_ids, start, rows, last_only), cache)  # [R, V]
        return logits.view(b, -1, logits.shape[-1])

    @torch.inference_mode()
    def step(self, batch: StepBatch, cache: KVCache) -> torch.Tensor:
        """Every token of a step at once (serving/engine/step_batch.py) -> logits [R, V] of
        batch.logit_rows. The step reads each weight once, however many sequences it serves.

        With experts on shards, a step of at least `split_min_tokens` tokens (and two
        sequences) runs as two micro-batches in flight: while one's experts compute on the
        shards, the engine computes the other's attention and gating (`_step_in_halves`).
        """
        self.pool.begin_step()
        if (
            self.pool.overlaps
            and self.split_min_tokens
            and batch.tokens >= self.split_min_tokens
            and batch.decodes + len(batch.spans) >= 2
        ):
            return self._step_in_halves(batch, cache)
        c = self.config
        cos, sin = rope(batch.positions, c.head_dim, c.rope_theta, self.dtype)  # [T, 1, Dh]
        h = F.embedding(batch.ids, self.embed)  # [T, D]
        for i, layer in enumerate(self.layers):
            a = rms_norm(h, layer.attn_norm, c.rms_norm_eps)
            h = h + self._attention(i, layer, a, cos, sin, batch, cache)
            m = rms_norm(h, layer.moe_norm, c.rms_norm_eps)
            h = moe_layer(m, layer.gate, self.pool, i, c.num_experts_per_tok, residual=h)
        return self._logits(h, batch)

    def _logits(self, h: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """h [T, D] -> logits [R, V] of the batch's logit rows."""
        h = rms_norm(h[batch.logit_rows], self.norm, self.config.rms_norm_eps)  # [R, D]
        return self.lm_head(h)

    def _step_in_halves(self, batch: StepBatch, cache: KVCache) -> torch.Tensor:
        """Ping-pong: per layer, micro-batch A's experts run on the shards while the engine
        computes B's attention and gating, then the roles swap; each half waits only on its own
        experts. Row-wise the same arithmetic as one batch: outputs are unchanged."""
        c, parts = self.config, halves(batch)
        hs = [F.embedding(p.batch.ids, self.embed) for p in parts]  # [T_half, D] each
        ropes = [rope(p.batch.positions, c.head_dim, c.rope_theta, self.dtype) for p in parts]
        moe = [None, None]  # each half's MoE layer in flight
        for i, layer in enumerate(self.layers):
            for j, part in enumerate(parts):
                if moe[j] is not None:
                    hs[j] = moe[j].result(hs[j])  # the previous layer's experts, added
                a = rms_norm(hs[j], layer.attn_norm, c.rms_norm_eps)
                hs[j] = hs[j] + self._attention(i, layer, a, *ropes[j], part.batch, cache)
                m = rms_norm(hs[j], layer.moe_norm, c.rms_norm_eps)
                moe[j] = start_moe_layer(m, layer.gate, self.pool, i, c.num_experts_per_tok)
        logits = None
        for j, part in enumerate(parts):
            rows = self._logits(moe[j].result(hs[j]), part.batch)  # [R_half, V]
            if logits is None:
                logits = rows.new_empty((batch.logit_rows.numel(), rows.shape[-1]))
            logits[part.rows] = rows
        return logits

    def _attention(self, i, layer, x, cos, sin, batch: StepBatch, cache: KVCache) -> torch.Tensor:
        """x [T, D] -> [T, D]: q, k, v in one GEMM, RoPE, attention over the cache, output."""
        c = self.config
        t = x.shape[0]
        qkv = layer.wqkv(x).view(t, -1, c.head_dim)  # [T, H+2G, Dh]
        h, g = c.num_attention_heads, c.num_key_value_heads
        if FUSED_ROPE and cpu_kernels.fits(qkv, cos):  # q and k rotated in place, one C++ pass
            cpu_kernels.rope_(qkv, cos, sin, h + g)
            q, k, v = qkv.split([h, g, g], 1)
        else:
            q, k, v = qkv.split([h, g, g], 1)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attend(i, q, k, v, batch, cache, c.sliding_window)  # [T, H, Dh]
        return layer.wo(out.reshape(t, -1))

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
                    wqkv=Linear(torch.cat(qkv).contiguous()),
                    wo=Linear(t(f"{p}.self_attn.o_proj.weight", (d, hd))),
                    moe_norm=t(f"{p}.post_attention_layernorm.weight", (d,)),
                    gate=Linear(t(f"{p}.block_sparse_moe.gate.weight", (c.num_local_experts, d))),
                )
            )
        embed = t("model.embed_tokens.weight", (c.vocab_size, d))
        tied = c.tie_word_embeddings
        lm_head = Linear(embed if tied else t("lm_head.weight", (c.vocab_size, d)))
        return cls(c, embed, layers, t("model.norm.weight", (d,)), lm_head, pool)
