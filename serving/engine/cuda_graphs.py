"""Decode steps replayed as CUDA graphs (a GPU, experts in process).

Shape legend: D decode rows, L keys each row attends to (a bucket), V vocabulary.

Why: on a GPU a decode step is bound by the host, not by memory: a few hundred kernel launches
from Python per step (BENCHMARKS.md, "On one NVIDIA H200": 5.5 ms for a step whose weights take
45 us to read). A CUDA graph records the step's kernels once and replays them with one launch.

A graph fixes every shape and address, so the graphed step
- reads its ids, positions and slots from static buffers that each replay overwrites, and writes
  its logits to the same tensor every time;
- attends to L keys, L the longest row's key count rounded up to a power of two (at least 64, at
  most the cache's length), masked by each row's position: one graph per (D, L), captured the
  first time a step of that shape runs;
- reads nothing back to the host: the in-process pool never drops a pair, so dispatch needs no
  check (router/dispatch.py), and grouped_mm takes its per-expert offsets on the device.
Experts on ExpertShards answer through Ray, which a graph cannot record, and the per-expert loop
(fp32, or GPUs before sm80) reads its counts on the host: those steps run eagerly (`unsupported`).
A replay runs no Python inside the step, so the in-process pool's expert timer (which on a GPU
timed kernel launches only) records nothing for it: the step's whole time counts as the forward.
Measured on an H200 (BENCHMARKS.md): a demo decode step at batch 32 from 7.5 to 1.0 ms.
"""

from __future__ import annotations

import logging

import torch

from experts.ffn import grouped_mm_supported
from serving.engine.kv_cache import KVCache
from serving.engine.model import MixtralModel
from serving.engine.step_batch import StepBatch

log = logging.getLogger(__name__)

MIN_KEYS = 64  # the shortest key bucket: fewer graphs for short contexts, little extra reading


def unsupported(model: MixtralModel) -> str | None:
    """Why decode steps of `model` cannot be graphed, or None when they can."""
    if model.device.type != "cuda":
        return f"the model is on {model.device.type}, not a CUDA device"
    if model.pool.overlaps:
        return "the experts run on ExpertShards, through Ray"
    probe = torch.empty(1, model.config.hidden_size, dtype=model.dtype, device=model.device)
    if not all(grouped_mm_supported(probe, w) for w in model.pool.layers):
        return "the experts run one GEMM per expert (grouped_mm needs bf16 on sm80 or later)"
    return None


class EagerSteps:
    """Every step through model.step over one cache (`run`, as DecodeGraphs offers it)."""

    def __init__(self, model: MixtralModel, cache: KVCache) -> None:
        self.model, self.cache = model, cache

    def run(self, batch: StepBatch) -> torch.Tensor:
        return self.model.step(batch, self.cache)


def for_engine(model: MixtralModel, cache: KVCache, wanted: bool) -> DecodeGraphs | EagerSteps:
    """How the engine runs its steps over its cache: decode steps graphed where wanted and
    possible (logged either way on a GPU), else every step eagerly."""
    why = unsupported(model) if wanted else "turned off (scheduler.cuda_graphs)"
    if why is not None:
        if model.device.type == "cuda":  # on a CPU nobody expects graphs: no noise
            log.info("decode steps run eagerly, not as CUDA graphs: %s", why)
        return EagerSteps(model, cache)
    log.info("decode steps replay as CUDA graphs (captured per batch size and key bucket)")
    return DecodeGraphs(model, cache, cache.k.shape[1])


def key_bucket(keys: int, max_len: int) -> int:
    """The keys a graphed step attends to: `keys` rounded up to a power of two, within bounds."""
    return min(max_len, max(MIN_KEYS, 1 << max(keys - 1, 0).bit_length()))


class DecodeGraphs:
    """Replays decode-only steps of `model` over `cache` as CUDA graphs; `step` is model.step's
    stand-in for a batch with no prompt chunks."""

    def __init__(self, model: MixtralModel, cache: KVCache, max_rows: int) -> None:
        why = unsupported(model)
        if why is not None:
            raise ValueError(f"decode steps cannot be graphed: {why}")
        self.model, self.cache = model, cache
        dev = model.device
        self.ids = torch.zeros(max_rows, dtype=torch.long, device=dev)  # [D_max]
        self.positions = torch.zeros_like(self.ids)  # [D_max]
        self.slots = torch.zeros_like(self.ids)  # [D_max]
        self.rows = torch.arange(max_rows, device=dev)  # [D_max]
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()  # every graph's intermediates share it

    def run(self, batch: StepBatch) -> torch.Tensor:
        """model.step(batch, cache): replayed when the batch `fits`, else run eagerly."""
        return self.step(batch) if self.fits(batch) else self.model.step(batch, self.cache)

    def fits(self, batch: StepBatch) -> bool:
        """Whether `step` serves this batch: decode rows only, no more than the buffers hold."""
        return not batch.spans and 0 < batch.decodes <= self.ids.numel()

    def step(self, batch: StepBatch) -> torch.Tensor:
        """A decode-only batch -> logits [D, V], as model.step returns them."""
        d = batch.decodes
        length = key_bucket(batch.decode_keys, self.cache.max_len)
        self.ids[:d].copy_(batch.ids)
        self.positions[:d].copy_(batch.positions)
        self.slots[:d].copy_(batch.slots)
        if (d, length) not in self.graphs:
            self.graphs[(d, length)] = self._capture(d, length)
        graph, logits = self.graphs[(d, length)]
        graph.replay()
        return logits.clone()  # the next replay overwrites the graph's own tensor

    def static_batch(self, d: int, length: int) -> StepBatch:
        """The batch a graph records: the buffers' first d rows, L keys each under a mask."""
        return StepBatch(
            ids=self.ids[:d],
            positions=self.positions[:d],
            slots=self.slots[:d],
            decodes=d,
            decode_keys=length,
            decode_ragged=True,  # the mask is what makes L keys right for every row
            spans=(),
            logit_rows=self.rows[:d],
        )

    def _capture(self, d: int, length: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        batch = self.static_batch(d, length)
        # Warm up on a side stream (library handles and workspaces are made outside the capture).
        # It runs the very step being asked for, so its cache writes are the step's own.
        side = torch.cuda.Stream(self.model.device)
        side.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(side):
            self.model.step(batch, self.cache)
        torch.cuda.current_stream(self.model.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.model.step(batch, self.cache)  # [D, V]
        return graph, logits
