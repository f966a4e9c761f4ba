"""Scenario (a) of the controller (issue 16): a skewed model drives the load CV across shards far
above 0.15; the controller rebalances live, the measured CV falls to <= 0.15, and no request fails.

The checkpoint is the demo's with gates rewritten so that routing is skewed for every input: in
each layer, rows 0/4 of the gate are +a*u / -a*u and rows 2/6 are +a*v / -a*v (u, v random unit
directions), the other rows zero. Every token's top-2 is then the positive one of experts {0, 4}
and of {2, 6}. The first placement deals experts round-robin over the 2 shards (even ones on shard
0), so shard 0 computes every pair (CV across shards = 1, whatever the inputs); a placement from the
load window puts one expert of each pair, or each pair, on each shard.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from serving.config import MonitoringConfig, PhaseTarget
from serving.control.controller import ControllerConfig

from ..support import Load, moe_status, wait_until
from .test_controller_live import KEY, demo_app

APP = "moe-serve-skew"
TARGET_CV = 0.15
pytestmark = pytest.mark.ray


def write_skewed(demo_path, out, scale: float = 4.0) -> None:
    """The demo checkpoint with every layer's gate skewed as the module docstring says."""
    shutil.copytree(demo_path, out)
    tensors = load_file(str(out / "model.safetensors"))
    gen = torch.Generator().manual_seed(7)
    for name, gate in tensors.items():
        if not name.endswith("block_sparse_moe.gate.weight"):
            continue
        u, v = torch.randn(2, gate.shape[1], generator=gen)
        u, v = u / u.norm(), v / v.norm()
        skewed = torch.zeros_like(gate)
        skewed[0], skewed[4], skewed[2], skewed[6] = scale * u, -scale * u, scale * v, -scale * v
        tensors[name] = skewed
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def skewed(serve_http, demo_path, tmp_path_factory):
    """The skewed model on 2 shards (no redundant copies: only moving experts can balance it),
    a controller that only the imbalance can move (a target it meets), under APP."""
    path = tmp_path_factory.mktemp("skew") / "ckpt"
    write_skewed(demo_path, path)
    controller = ControllerConfig(
        period_s=1.0,
        window_s=5.0,
        confirm_periods=2,
        cooldown_periods=3,
        target_cv=TARGET_CV,
        phases=(PhaseTarget(name="met", tokens_per_ms=1e-6),),
    )
    monitoring = MonitoringConfig(period_s=1.0, metrics=False)
    with demo_app(serve_http, path, APP, monitoring=monitoring, controller=controller) as app:
        yield app


def status(url: str) -> dict:
    return moe_status(url, KEY)


def test_the_controller_rebalances_a_skewed_model_below_the_cv_target(skewed):
    url, engine = skewed
    with Load(url, KEY, 3, max_tokens=16, timeout_s=120.0) as load:
        before = wait_until(
            lambda: (s := status(url))["expert_load_cv"] is not None and s, 60, "a load reading"
        )["expert_load_cv"]
        wait_until(
            lambda: any(a["action"] == "rebalance" for a in status(url)["actions"]),
            90,
            "a rebalance decision",
            interval_s=1.0,
        )
        wait_until(
            lambda: any(
                "switched to placement version" in e
                for e in engine.expert_events.remote().result(timeout_s=30)
            ),
            90,
            "the new placement in service",
            interval_s=1.0,
        )
        # The balancer's window starts afresh with the placement: read it once it has refilled.
        (after,) = wait_until(  # a tuple: a CV of 0.0 is a success, not a falsy reading
            lambda: (cv := status(url)["expert_load_cv"]) is not None and cv <= TARGET_CV and (cv,),
            60,
            f"the load CV across shards <= {TARGET_CV}",
            interval_s=1.0,
        )
    assert before > 0.9, f"every pair on shard 0 before: CV {before}"
    assert after <= TARGET_CV < before
    assert not load.failed, load.failed[:3]
    assert load.ok > 0
