"""What one ExpertShard asks Ray for, and waiting (bounded, out loud) until the cluster has it.

On GPUs a shard takes one GPU unless told to share (`shard_gpus=0.5`: two shards per GPU). On CPU
shards share the cores: by default each asks for an equal share of the CPUs free when the pool
starts (at most one whole CPU), so any number of shards fits on a laptop; `shard_cpus` fixes it.

Before creating shard actors the pool reserves their resources with a placement group and waits
for it: a cluster that lacks them (no free GPU, an autoscaler still starting a node) is reported
every `report_every_s`, and after `timeout_s` the wait ends with one line naming what was wanted,
what is free, and the flags to change. Without this, an actor that can never be placed waits
forever and says nothing.

Ray is imported where it is used, so that the in-process path (serving/engine/load.py) stays Ray-free.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

DEFAULT_PLACEMENT_TIMEOUT_S = 120.0
REPORT_EVERY_S = 10.0


class PlacementTimeout(RuntimeError):
    """The cluster did not have room for the shards within the timeout (one line, for users)."""


@dataclass(frozen=True)
class ShardResources:
    """Ray resources of one shard: `gpus` on a CUDA device, else `cpus` (None: an equal share of
    the cluster's CPUs among `shards`, at most 1)."""

    gpu: bool
    gpus: float = 1.0
    cpus: float | None = None

    def __post_init__(self) -> None:
        if self.gpus <= 0 or (self.gpus > 1 and not float(self.gpus).is_integer()):
            raise ValueError(f"shard_gpus must be in (0, 1] or a whole number, got {self.gpus}")
        if self.cpus is not None and self.cpus <= 0:
            raise ValueError(f"shard_cpus must be > 0, got {self.cpus}")

    @property
    def kind(self) -> str:
        return "GPU" if self.gpu else "CPU"

    def amount(self, shards: int) -> float:
        """What each of `shards` shards asks for, of `kind`."""
        if self.gpu:
            return self.gpus
        if self.cpus is not None:
            return self.cpus
        import ray

        # What is free now (other deployments may hold CPUs), or the whole cluster when nothing
        # is: then the wait reports it. Ray accounts in 1e-4 units: round down so that N shares
        # never exceed what is there.
        free = ray.available_resources().get("CPU", 0.0) or ray.cluster_resources().get("CPU", 1)
        return max(1e-4, min(1.0, int(free / max(shards, 1) * 1e4) / 1e4))

    def actor_options(self, amount: float) -> dict:
        # SPREAD: one shard per node where the cluster allows, so that losing a node loses as
        # few shards (and, with copies on other shards, no expert) as possible.
        need = {"num_gpus": amount} if self.gpu else {"num_cpus": amount}
        return need | {"scheduling_strategy": "SPREAD"}

    def flag(self) -> str:
        return "--shard-gpus" if self.gpu else "--shard-cpus"


def wait_for_room(
    shards: int,
    amount: float,
    kind: str,
    timeout_s: float = DEFAULT_PLACEMENT_TIMEOUT_S,
    say: Callable[[str], None] | None = None,
    report_every_s: float = REPORT_EVERY_S,
) -> None:
    """Block until the cluster can place `shards` bundles of `amount` `kind` each.

    A placement group asks for them (so an autoscaler sees the demand), is waited on in short
    steps with a line to `say` every `report_every_s`, and is removed once ready: the actors are
    created right after. Raises PlacementTimeout after `timeout_s`.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    if shards <= 0:
        return
    say = say or _say
    # SPREAD, as the actors that follow: the reservation must not fail where they would fit.
    pg = placement_group([{kind: amount}] * shards, strategy="SPREAD")
    start = time.monotonic()
    next_report = start + report_every_s
    try:
        while True:
            ready, _ = ray.wait([pg.ready()], timeout=1.0)
            if ready:
                return
            now = time.monotonic()
            if now - start >= timeout_s:
                raise PlacementTimeout(_timeout_line(shards, amount, kind, timeout_s))
            if now >= next_report:
                next_report = now + report_every_s
                say(_waiting_line(shards, amount, kind, now - start, timeout_s))
    finally:
        remove_placement_group(pg)


def _free_of_total(kind: str) -> str:
    import ray

    free = ray.available_resources().get(kind, 0.0)
    total = ray.cluster_resources().get(kind, 0.0)
    return f"{free:g} {kind} free of {total:g}"


def _waiting_line(shards: int, amount: float, kind: str, waited: float, timeout_s: float) -> str:
    return (
        f"moe-serve: waiting for room for {shards} ExpertShard(s) of {amount:g} {kind} each: "
        f"{_free_of_total(kind)} in the cluster (waited {waited:.0f} s of {timeout_s:g}, "
        "--placement-timeout)"
    )


def _timeout_line(shards: int, amount: float, kind: str, timeout_s: float) -> str:
    flag = "--shard-gpus 0.5 to share GPUs" if kind == "GPU" else "--shard-cpus to ask for less"
    return (
        f"{shards} ExpertShard(s) want {amount:g} {kind} each, but the cluster has "
        f"{_free_of_total(kind)} after {timeout_s:g} s: lower --expert-shards, use {flag}, "
        f"add {kind}s, or wait longer with --placement-timeout"
    )


def _say(line: str) -> None:
    log.warning(line)
    print(line, file=sys.stderr, flush=True)
