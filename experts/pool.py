"""Where a layer's experts run: the small interface the MoE layer talks to, and its local form.

Shape legend: T tokens, K experts per token, N sorted token-expert pairs, S slots, D hidden.

The MoE layer (serving/runner.py) asks a pool two things per layer: which physical slot serves each
token-expert pair (`assign`), and the expert outputs for pairs already grouped by slot (`compute`).
`LocalExpertPool` keeps one slot per logical expert in this process; the Ray pool keeps copies of
experts on ExpertShard actors and answers the same two questions.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch

from experts.checkpoint import Checkpoint
from experts.ffn import ExpertWeights, grouped_swiglu
from experts.timing import ExpertTime
from router.dispatch import Dispatch
from router.gating import Gating


class ExpertPool(Protocol):
    def num_slots(self, layer: int) -> int:
        """Physical slots of this layer (slot ids are 0..S-1)."""
        ...

    def assign(self, layer: int, gating: Gating) -> tuple[torch.Tensor, torch.Tensor]:
        """Gating of T tokens -> (slots [T, K] with -1 for a dropped pair, weights [T, K])."""
        ...

    def compute(self, layer: int, x: torch.Tensor, dispatch: Dispatch) -> torch.Tensor:
        """x [N, D] pairs grouped by slot as in `dispatch` -> expert outputs [N, D], same order."""
        ...

    def step_time(self) -> ExpertTime:
        """What `compute` measured since the last call (then starts afresh): the step
        accounting's expert, transport and imbalance time (serving/steptime.py)."""
        ...


class LocalExpertPool:
    """Every logical expert once, in this process: slot id == expert id."""

    def __init__(self, layers: list[ExpertWeights]) -> None:
        self.layers = layers
        self.timing = True  # off: compute is not timed
        self._times = ExpertTime()

    @classmethod
    def from_checkpoint(
        cls, ckpt: Checkpoint, dtype: torch.dtype, device: torch.device | str
    ) -> LocalExpertPool:
        c = ckpt.config
        layers = [
            ExpertWeights.stack([ckpt.expert(layer, e, dtype) for e in range(c.num_local_experts)])
            for layer in range(c.num_hidden_layers)
        ]
        return cls([w.to(device) for w in layers])

    def num_slots(self, layer: int) -> int:
        return self.layers[layer].num_experts

    def assign(self, layer: int, gating: Gating) -> tuple[torch.Tensor, torch.Tensor]:
        return gating.experts, gating.weights

    def compute(self, layer: int, x: torch.Tensor, dispatch: Dispatch) -> torch.Tensor:
        # On CUDA kernels run asynchronously, so this times their launch; the router's
        # expert-parallel form (ExpertShard on its own device) times the kernels themselves.
        start = time.perf_counter()
        y = grouped_swiglu(x, dispatch.counts, self.layers[layer])
        if self.timing:
            seconds = time.perf_counter() - start
            self._times.add_layer(seconds, [seconds])  # one "shard": no transport, no imbalance
        return y

    def step_time(self) -> ExpertTime:
        times, self._times = self._times, ExpertTime()
        return times
