"""The overflow policy of a served model: set in serve.yaml or by --overflow, refused without
shards in one line naming the field, reported per layer by the status."""

from __future__ import annotations

import pytest

from router.balancer import OverflowCounts
from serving.cli.status import render
from serving.config import ServeConfig, config_from_args
from serving.control.controller_loop import StatusReport
from serving.control.monitor import EngineMonitor
from serving.errors import UserError

from .test_monitor import FakePool, FakeScheduler


def test_a_policy_other_than_split_needs_shards():
    assert ServeConfig(expert_shards=2, overflow="drop").overflow == "drop"
    with pytest.raises(UserError, match=r"^args: overflow: .*needs expert_shards > 0"):
        config_from_args({"overflow": "reroute"})
    with pytest.raises(UserError, match="overflow"):
        config_from_args({"expert_shards": 2, "overflow": "shuffle"})


def test_the_status_shows_the_policy_and_each_layers_counts():
    pool = FakePool(2)
    pool.balancer.overflow = "reroute"
    overflow = EngineMonitor(FakeScheduler(), pool, None, on_gpu=False).overflow()
    assert overflow == {
        "policy": "reroute",
        "layers": [vars(OverflowCounts(2, 1, 0)), vars(OverflowCounts(3, 0, 0))],
    }
    assert EngineMonitor(FakeScheduler(), None, None, on_gpu=False).overflow() is None
    text = render(StatusReport(overflow=overflow), now=0.0)
    assert "overflow (reroute): split / rerouted / dropped per layer" in text
    assert "layer 1" in text and text.count("layer ") == 2
