"""`load_model`: a checkpoint directory in, a ready model out."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from experts.checkpoint import Checkpoint
from experts.pool import LocalExpertPool
from experts.shard_resources import DEFAULT_PLACEMENT_TIMEOUT_S
from serving.engine.model import MixtralModel
from serving.errors import UserError

if TYPE_CHECKING:
    from experts.shared_pool import OwnerLink, ShardOwner


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    expert_shards: int = 0,
    redundant_experts: int = 0,
    shard_cpus: float | None = None,
    shard_gpus: float = 1.0,
    placement_timeout_s: float = DEFAULT_PLACEMENT_TIMEOUT_S,
    shard_owner: OwnerLink | None = None,
    **pool_options: Any,
) -> MixtralModel:
    """Load a Hugging Face Mixtral checkpoint directory (config.json + safetensors).

    Returns a module: `model(input_ids [B, S]) -> logits [B, S, vocab]`.
    expert_shards=0 keeps every expert in this process. expert_shards=N > 0 places the experts on N
    ExpertShard Ray actors (starting a local Ray if none is running), with `redundant_experts`
    extra copies of the hottest experts, copies of one expert on different shards. Each shard asks
    Ray for `shard_gpus` GPUs on CUDA, else `shard_cpus` CPUs (None: an equal share of the
    cluster's CPUs, so any number of shards fits); a cluster without room for them is reported
    every 10 s and, after `placement_timeout_s`, fails with PlacementTimeout. Extra keyword
    arguments go to RayExpertPool (balancer, call_timeout_s, ...).
    With `shard_owner` (experts/shared_pool.py) the experts are on shards another owns, shared
    with other engines: expert_shards and redundant_experts are the owner's, and of the extra
    arguments only overflow, call_timeout_s and poll_s apply.
    """
    if expert_shards < 0 or redundant_experts < 0:
        raise UserError("expert_shards and redundant_experts must be >= 0")
    if shard_gpus <= 0 or (shard_cpus is not None and shard_cpus <= 0):
        raise UserError("shard_gpus and shard_cpus must be > 0")
    pool_options |= dict(
        shard_cpus=shard_cpus, shard_gpus=shard_gpus, placement_timeout_s=placement_timeout_s
    )
    if redundant_experts and not expert_shards:
        raise UserError("redundant_experts needs expert_shards > 0 (copies live on shards)")
    ckpt = Checkpoint(path)
    ckpt.validate()  # headers only: a broken download fails here, in one line
    try:
        if shard_owner is not None:
            pool = _shared_pool(shard_owner, ckpt, dtype, str(device), pool_options)
        elif expert_shards:
            pool = _ray_pool(
                ckpt, dtype, str(device), expert_shards, redundant_experts, pool_options
            )
        else:
            pool = LocalExpertPool.from_checkpoint(ckpt, dtype, device)
        return MixtralModel.from_checkpoint(ckpt, pool, dtype, device).eval()
    finally:
        ckpt.close()


def start_shard_owner(
    path: str | Path,
    expert_shards: int,
    redundant_experts: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    **pool_options: Any,
) -> ShardOwner:
    """The shards of several engines (experts/shared_pool.py ShardOwner), started and loaded:
    load_model's expert arguments; each engine then loads with `shard_owner=` this or a link
    to it."""
    from experts.shared_pool import ShardOwner

    if expert_shards < 1 or redundant_experts < 0:
        raise UserError("a shard owner needs expert_shards >= 1 and redundant_experts >= 0")
    ckpt = Checkpoint(path)
    ckpt.validate()
    try:
        return _ray_pool(ckpt, dtype, device, expert_shards, redundant_experts, pool_options,
                         ShardOwner)  # fmt: skip
    finally:
        ckpt.close()


def _shared_pool(owner: OwnerLink, ckpt: Checkpoint, dtype, device: str, options: dict):
    from experts.shared_pool import SharedExpertPool

    mine = {k: options[k] for k in ("overflow", "call_timeout_s", "poll_s") if k in options}
    return SharedExpertPool(owner, ckpt.config, dtype, device, **mine)


def _ray_pool(ckpt: Checkpoint, dtype, device: str, shards: int, redundant: int, options: dict,
              cls: type | None = None):  # fmt: skip
    from experts.ray_pool import RayExpertPool, ensure_ray
    from router.placement import check_sizes

    try:
        check_sizes(ckpt.config.num_local_experts, shards, redundant)
    except ValueError as exc:
        raise UserError(f"expert_shards={shards}, redundant_experts={redundant}: {exc}") from None
    ensure_ray()
    return (cls or RayExpertPool)(
        str(ckpt.path), ckpt.config, shards, redundant, dtype=dtype, device=device, **options
    )
