"""Whether the CPU kernel's software prefetch pays on this machine, measured once at load.

The packed GEMM (experts/cpu_gemm_source.py) can pull the next weight block towards the core
while it computes on this one. Measured as whole decode steps in one process: 34.5 ms with it and
45.1 without on one 2-vCPU machine (memory read at 13-15 GB/s), 26.6 with it and 26.2 without
on another (28-33 GB/s, half the arithmetic): the hardware decides (BENCHMARKS.md). It also
depends on the rows of a call: on the second machine, one layer's experts at 4 rows each took
16.1 ms with it and 13.1 without (the read streams, and the hardware's own prefetcher does
better alone), while lm_head at 16 rows, bound by arithmetic, took 6.35 with it and 6.98 without.
So at load a process times one layer's experts both ways, in turns, at a decode step's few rows
(one register tile: `cpu_kernels.tile_rows()` or fewer) and at twice the tile, and keeps
prefetch in each regime unless going without is clearly faster there: the cost of keeping it
where it does not pay is a few percent, of dropping it where it does, a third.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch

from experts import cpu_kernels
from experts.ffn import ExpertWeights

log = logging.getLogger(__name__)

PAIRS = 7  # turns of (with, without): a majority of them must agree
MIN_GAIN = 0.03  # going without must save at least this share of the median time
# Weights timed per call: past any last-level cache (so they stream from memory, as in a decode
# step), and no more, so that a large model's load does not pay for reading whole layers.
STREAM_BYTES = 96 << 20


def prefetch_pays(with_s: list[float], without_s: list[float]) -> bool:
    """Keep prefetch unless going without was faster in most turns and by MIN_GAIN at the
    median. with_s, without_s: seconds of the same work, turn by turn."""
    wins = sum(off < on for on, off in zip(with_s, without_s, strict=True))
    on, off = statistics.median(with_s), statistics.median(without_s)
    return not (wins > len(with_s) // 2 and off < on * (1 - MIN_GAIN))


def tune(weights: ExpertWeights, calls: int = 4) -> tuple[bool, bool] | None:
    """Time `weights` (one layer's packed experts) with and without prefetch, at 4 rows per
    expert and at twice the kernel's tile, keep the faster setting of each regime for this
    process and return them, (few rows, many rows) (None: not packed, nothing to tune)."""
    if weights.packed is None:
        return None
    tile = cpu_kernels.tile_rows()
    return _tune_regime(weights, min(4, tile), calls), _tune_regime(weights, 2 * tile, calls)


def _tune_regime(weights: ExpertWeights, rows_per_expert: int, calls: int) -> bool:
    w13 = [p[0].packed for p in weights.packed]
    w2 = [p[1].packed for p in weights.packed]
    d, f = weights.packed[0][0].in_features, weights.packed[0][1].in_features
    many = rows_per_expert > cpu_kernels.tile_rows()
    per_expert = 3 * d * f * 4  # float32 bytes of w1, w3 and w2
    used = min(len(w13), -(-STREAM_BYTES // per_expert))  # experts with rows; the rest skipped
    counts = [rows_per_expert] * used + [0] * (len(w13) - used)
    x = torch.randn(sum(counts), d, generator=torch.Generator().manual_seed(0))

    def seconds(on: bool) -> float:
        cpu_kernels.set_prefetch(on, many)
        start = time.perf_counter()
        for _ in range(calls):
            cpu_kernels.swiglu(x, counts, w13, w2, f)
        return time.perf_counter() - start

    seconds(True)  # warm up: pages touched, code loaded
    with_s, without_s = [], []
    for _ in range(PAIRS):
        with_s.append(seconds(True))
        without_s.append(seconds(False))
    keep = prefetch_pays(with_s, without_s)
    cpu_kernels.set_prefetch(keep, many)
    log.info("CPU kernel prefetch %s for calls of %s %d rows: one layer's experts at %d rows "
             "each, %.2f ms with it, %.2f without (medians of %d turns)", "on" if keep else "off",
             "more than" if many else "at most", cpu_kernels.tile_rows(), rows_per_expert,
             statistics.median(with_s) * 1e3 / calls, statistics.median(without_s) * 1e3 / calls,
             PAIRS)  # fmt: skip
    return keep


_decided: tuple[bool, bool] | None = None  # this process's settings, once measured


def tune_once(weights: ExpertWeights) -> tuple[bool, bool] | None:
    """`tune` the first time packed weights load in this process (the setting is the process's:
    later loads, shards' reconfigurations among them, keep it)."""
    global _decided
    if _decided is None:
        _decided = tune(weights)
    return _decided
