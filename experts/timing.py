"""ExpertTime: what an expert pool measured while a step ran, for the step accounting
(serving/control/steptime.py). Plain numbers only: the planner's command imports it without torch.

Shape legend: S expert shards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class ExpertTime:
    """What an expert pool measured during one step, summed over its MoE layer calls."""

    round_trip_s: float = 0.0  # the pool's compute calls, end to end
    # Of the round trips, the time the caller sat waiting for results: all of it for a blocking
    # call; less when it computed something else meanwhile (two micro-batches in flight).
    waited_s: float = 0.0
    mean_s: float = 0.0  # per layer: mean over shards of each shard's compute
    slowest_s: float = 0.0  # per layer: the slowest shard's compute
    shard_s: list[float] = field(default_factory=list)  # [S] each shard's compute

    def add_layer(
        self, round_trip_s: float, shard_s: Sequence[float], waited_s: float | None = None
    ) -> None:
        """One layer's fan-out: its round trip, every shard's compute (0 for a shard with no
        rows: an idle shard is part of the imbalance) and how long its caller waited for it
        (None: the whole round trip, a blocking call)."""
        self.round_trip_s += round_trip_s
        self.waited_s += round_trip_s if waited_s is None else min(waited_s, round_trip_s)
        if not shard_s:
            return
        self.mean_s += sum(shard_s) / len(shard_s)
        self.slowest_s += max(shard_s)
        if len(self.shard_s) < len(shard_s):
            self.shard_s += [0.0] * (len(shard_s) - len(self.shard_s))
        for s, seconds in enumerate(shard_s):
            self.shard_s[s] += seconds
