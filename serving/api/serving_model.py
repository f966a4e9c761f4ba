"""The model a deployment serves: where its checkpoint is, the name clients call it by, and how
each engine replica loads it (dtype, device, experts in process or on shards)."""

from __future__ import annotations

import inspect

from ray.serve.handle import DeploymentHandle

from serving.config import ServeConfig
from serving.errors import UserError

DEMO_MODEL_NAME = "moe-serve-demo"


def model_dir(config: ServeConfig) -> str:
    """The checkpoint directory; the demo is written on the machine that asks (each replica)."""
    if config.model:
        return config.model
    from serving.engine.demo import demo_checkpoint

    return str(demo_checkpoint())


def served_name(config: ServeConfig) -> str:
    from pathlib import Path

    if config.served_model_name:
        return config.served_model_name
    return Path(config.model).name if config.model else DEMO_MODEL_NAME


def expert_options(config: ServeConfig) -> dict[str, int]:
    """The expert-parallel options for load_model, passed only where asked for (> 0).

    Checked against load_model's signature so that `moe-serve up` fails before deploying, in one
    line, on a build whose load_model does not take them.
    """
    from serving.engine.load import load_model

    wanted = {"expert_shards": config.expert_shards, "redundant_experts": config.redundant_experts}
    extra = {k: v for k, v in wanted.items() if v > 0}
    accepted = inspect.signature(load_model).parameters
    missing = [k for k in extra if k not in accepted]
    if missing:
        raise UserError(f"{missing[0]} is not supported by this build's load_model yet")
    return extra


def torch_dtype(config: ServeConfig):
    from experts.shard import DTYPES

    return DTYPES[config.dtype]


def pool_options(config: ServeConfig) -> dict:
    """load_model's expert options for the deployment (nothing without shards)."""
    options: dict = expert_options(config)
    if config.expert_shards:
        options["call_timeout_s"] = config.expert_call_timeout_s  # RayExpertPool's hang bound
        options |= dict(
            overflow=config.overflow,
            transport=config.expert_transport,
            shard_cpus=config.shard_cpus,
            shard_gpus=config.shard_gpus,
            placement_timeout_s=config.placement_timeout_s,
        )
    return options


def load_serving_model(config: ServeConfig, owner: DeploymentHandle | None = None):
    """The engine's model; with `owner` its experts are on the ExpertShards deployment's shards."""
    from serving.engine.load import load_model

    options = pool_options(config)
    if owner is not None:
        from serving.api.shared_shards import OwnerHandle

        options["shard_owner"] = OwnerHandle(owner, config.placement_timeout_s)
    return load_model(model_dir(config), dtype=torch_dtype(config), device=config.device,
                      **options)  # fmt: skip
