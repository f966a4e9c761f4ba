"""Options for a multi-node cluster: the engine's node marker and an autoscaler, from the CLI
and serve.yaml; the status names each shard's node."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.api.engines import engine_names
from serving.cli.command import build_parser
from serving.cli.status import render
from serving.cli.up import resolve_config
from serving.config import config_from_args, load_config
from serving.control.controller_loop import StatusReport
from serving.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def test_up_flags_set_the_engine_resource_and_autoscaling():
    args = build_parser().parse_args(
        ["up", "--engine-resource", "moe_engine", "--cluster-autoscaling"]
    )
    config = resolve_config(args)
    assert (config.engine_resource, config.cluster_autoscaling) == ("moe_engine", True)
    plain = resolve_config(build_parser().parse_args(["up"]))
    assert (plain.engine_resource, plain.cluster_autoscaling) == (None, False)


def test_serve_yaml_carries_both_and_an_empty_resource_is_refused():
    config = load_config(ROOT / "configs" / "serve.yaml")
    assert (config.engine_resource, config.cluster_autoscaling) == (None, False)
    with pytest.raises(UserError, match="engine_resource"):
        config_from_args({"engine_resource": ""})


def test_the_status_names_each_shards_node_and_the_transport():
    report = StatusReport(
        shard_nodes=["a1b2c3d4e5", "f6a7b8c9d0"], engine_node="e0", expert_transport="plain"
    )
    text = render(report, now=0.0)
    assert "shard nodes           0:a1b2c3d4, 1:f6a7b8c9 (2 nodes)" in text
    assert "expert transport      plain" in text
    assert "expert transport" not in render(StatusReport(), now=0.0)  # no shards


def test_the_engine_beside_cpu_shards_lets_its_idle_threads_sleep(monkeypatch):
    from serving.api.app import engine_env
    from serving.config import ServeConfig

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    passive = {"runtime_env": {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}}
    assert engine_env(ServeConfig(expert_shards=2)) == passive
    assert engine_env(ServeConfig()) == {}  # no shards to leave the cores to
    assert engine_env(ServeConfig(expert_shards=2, device="cuda")) == {}
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the operator's choice wins
    assert engine_env(ServeConfig(expert_shards=2)) == {
        "runtime_env": {"env_vars": {"OMP_WAIT_POLICY": "ACTIVE"}}
    }


def test_engine_replicas_from_the_cli_and_yaml_and_only_plain_calls_share_shards():
    config = resolve_config(build_parser().parse_args(["up", "--engine-replicas", "3"]))
    assert config.engine_replicas == 3
    assert load_config(ROOT / "configs" / "serve.yaml").engine_replicas == 1
    with pytest.raises(UserError, match="engine_replicas"):
        config_from_args({"engine_replicas": 0})
    args = {"engine_replicas": 2, "expert_shards": 2, "expert_transport": "compiled"}
    with pytest.raises(UserError, match="expert_transport: 'compiled' cannot be used"):
        config_from_args(args)
    assert config_from_args(args | {"expert_transport": "plain"}).engine_replicas == 2
    assert config_from_args({"engine_replicas": 2}).expert_shards == 0  # each holds its experts


def test_max_engine_replicas_from_the_cli_and_yaml_never_below_the_start():
    argv = ["up", "--engine-replicas", "2", "--max-engine-replicas", "4"]
    config = resolve_config(build_parser().parse_args(argv))
    assert (config.engine_replicas, config.engines_at_most) == (2, 4)
    assert engine_names(config) == ["Engine", "Engine-1", "Engine-2", "Engine-3"]
    yaml = load_config(ROOT / "configs" / "serve.yaml")
    assert yaml.max_engine_replicas is None and yaml.engines_at_most == 1
    with pytest.raises(UserError, match="max_engine_replicas: 1 is below engine_replicas"):
        config_from_args({"engine_replicas": 2, "max_engine_replicas": 1})
    # Engines that may start later share the shards too: plain calls only.
    args = {"max_engine_replicas": 2, "expert_shards": 2, "expert_transport": "compiled"}
    with pytest.raises(UserError, match="expert_transport: 'compiled' cannot be used"):
        config_from_args(args)
