"""configs/cluster.yaml passes Ray's own cluster-config validation and keeps its security promises."""

from __future__ import annotations

from pathlib import Path

import yaml

from serving.control.metrics import DEFAULT_METRICS_PORT

CLUSTER = Path(__file__).resolve().parents[2] / "configs" / "cluster.yaml"


def load() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def start_commands(config: dict) -> list[str]:
    return config["head_start_ray_commands"] + config["worker_start_ray_commands"]


def test_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load()
    validate_config(config)
    # What `ray up` itself does: defaults filled in, validated again.
    validate_config(prepare_config(load()))


def test_head_and_gpu_worker_types():
    config = load()
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers and all(t.get("max_workers", 0) >= 1 for t in workers)


def test_dashboard_bound_to_localhost():
    head = " ".join(load()["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in yaml.safe_dump(load())


def test_token_auth_on_every_node():
    config = load()
    starts = [c for c in start_commands(config) if "ray start" in c]
    assert len(starts) == 2
    assert all(c.startswith("RAY_AUTH_MODE=token ") for c in starts)
    # The token itself reaches every node, readable by its owner only.
    assert "~/.ray/auth_token" in config["file_mounts"]
    assert "chmod 600 ~/.ray/auth_token" in config["setup_commands"]


def test_metrics_port_fixed_on_every_node():
    starts = [c for c in start_commands(load()) if "ray start" in c]
    assert all(f"--metrics-export-port={DEFAULT_METRICS_PORT}" in c for c in starts)


def test_setup_installs_torch_then_moe_serve():
    setup = load()["setup_commands"]
    torch = next(i for i, c in enumerate(setup) if "torch==" in c)
    package = next(i for i, c in enumerate(setup) if "-e ~/moe-serve" in c)
    assert torch < package
