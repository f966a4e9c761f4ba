"""Where a layer's experts run: the interfaces serving uses, and the local pool.

Shape legend: T tokens, K experts per token, N sorted token-expert pairs, S slots, D hidden.

The MoE layer (serving/engine/moe_layer.py) asks a pool two things per layer: which physical slot serves each
token-expert pair (`assign`), and the expert outputs for pairs already grouped by slot (`compute`).
`LocalExpertPool` keeps one slot per logical expert in this process; the Ray pool keeps copies of
experts on ExpertShard actors and answers the same two questions.

`ElasticPool` is the rest of what serving uses of a pool whose experts live on shards: the
monitor and controller read its balancer and shard count and grow, shrink or rebalance it; the
engine's operators read its events. It is handed to them where the pool is built, never looked up
on the model.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Protocol

import torch

from experts import prefetch
from experts.checkpoint import Checkpoint
from experts.ffn import ExpertWeights, grouped_swiglu
from experts.timing import ExpertTime
from router.dispatch import Dispatch
from router.gating import Gating

if TYPE_CHECKING:
    from router.balancer import ExpertLoadBalancer


class ExpertUnavailableError(RuntimeError):
    """An expert has no live copy (its shard is down and being replaced): requests that need it
    fail fast, and retrying shortly succeeds."""


class Pending(Protocol):
    """Expert outputs on their way (experts/pool.py ExpertPool.start)."""

    def result(self) -> torch.Tensor:
        """Wait for them: [N, D], in dispatch order."""
        ...


class Ready:
    """A Pending computed already (a pool in this process has nothing to overlap)."""

    def __init__(self, y: torch.Tensor) -> None:
        self.y = y

    def result(self) -> torch.Tensor:
        return self.y


class ExpertPool(Protocol):
    # Whether starting a layer's experts returns before they are done, so that the engine can
    # compute something else meanwhile (two micro-batches in flight): True for shards elsewhere.
    overlaps: bool
    # Whether `assign` may drop a pair (slot -1). False lets dispatch skip checking on the host.
    drops: bool

    def begin_step(self) -> None:
        """A step begins: nothing is in flight, so a pool may switch placements here."""
        ...

    def num_slots(self, layer: int) -> int:
        """Physical slots of this layer (slot ids are 0..S-1)."""
        ...

    def assign(self, layer: int, gating: Gating) -> tuple[torch.Tensor, torch.Tensor]:
        """Gating of T tokens -> (slots [T, K] with -1 for a dropped pair, weights [T, K])."""
        ...

    def start(self, layer: int, x: torch.Tensor, dispatch: Dispatch) -> Pending:
        """Start the experts on x [N, D], pairs grouped by slot as in `dispatch`; the Pending's
        result is their outputs [N, D], same order."""
        ...

    def step_time(self) -> ExpertTime:
        """What `compute` measured since the last call (then starts afresh): the step
        accounting's expert, transport and imbalance time (serving/control/steptime.py)."""
        ...

    def shutdown(self) -> None:
        """Release what the pool holds outside this process (nothing, for a local pool)."""
        ...


class ElasticPool(ExpertPool, Protocol):
    """A pool on ExpertShard actors (experts/ray_pool.py), as serving uses it."""

    num_shards: int
    redundant: int  # extra expert copies beyond one per expert
    device: str  # where the shards compute: "cpu" or "cuda"
    balancer: ExpertLoadBalancer
    events: list[str]  # what happened (failures, replacements, switches), newest last
    shards: list[Any]  # the actor handles, in shard order
    nodes: list[str]  # the Ray node id of each shard, in shard order

    @property
    def shard_request(self) -> tuple[str, float]:
        """What one more shard asks Ray for: ("GPU" or "CPU", amount)."""
        ...

    @property
    def transport_in_use(self) -> str:
        """How layers reach the shards right now ("compiled", "linked (gloo|nccl)", "plain")."""
        ...

    def add_shard(self, wait: bool = False) -> threading.Thread:
        """Grow by one shard in the background; the switch happens between two batches."""
        ...

    def remove_shard(self, wait: bool = False) -> threading.Thread:
        """Shrink by one shard in the background, draining it first."""
        ...

    def rebalance(self, wait: bool = False) -> threading.Thread:
        """Place experts afresh from the load window, in the background."""
        ...


class LocalExpertPool:
    """Every logical expert once, in this process: slot id == expert id."""

    overlaps = False
    drops = False  # one slot per expert, no capacity: every pair is computed

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
        packed = [w.to(device).packed_for_cpu() for w in layers]
        prefetch.tune_once(packed[0])  # the kernel's prefetch, where it pays here
        return cls(packed)

    def num_slots(self, layer: int) -> int:
        return self.layers[layer].num_experts

    def assign(self, layer: int, gating: Gating) -> tuple[torch.Tensor, torch.Tensor]:
        return gating.experts, gating.weights

    def begin_step(self) -> None:
        pass  # one placement, always

    def start(self, layer: int, x: torch.Tensor, dispatch: Dispatch) -> Ready:
        # On CUDA kernels run asynchronously, so this times their launch; the engine's
        # expert-parallel form (ExpertShard on its own device) times the kernels themselves.
        began = time.perf_counter()
        y = grouped_swiglu(x, dispatch.counts, self.layers[layer])
        if self.timing:
            seconds = time.perf_counter() - began
            self._times.add_layer(seconds, [seconds])  # one "shard": no transport, no imbalance
        return Ready(y)

    def step_time(self) -> ExpertTime:
        times, self._times = self._times, ExpertTime()
        return times

    def shutdown(self) -> None:
        pass  # nothing outside this process
