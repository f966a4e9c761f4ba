"""Scale-out and scale-in through Ray's autoscaler (issue 16): scripts/autoscale.py starts an
autoscaling cluster on this machine (Ray's fake multi-node provider launches worker nodes as local
processes), serves the demo with one shard filling the head, keeps the queue deep until the
controller scales out, then light until it scales in. The same with engine replicas
(`--scale engines`): the second engine lands on the node the autoscaler starts for it.

Throughput before and after is reported (BENCHMARKS.md), not asserted: every node of this cluster
shares the same cores, so a second shard adds transport and no compute here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def autoscale(*args: str) -> dict:
    cmd = [sys.executable, "scripts/autoscale.py", "--after-s", "10", *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def report() -> dict:
    return autoscale()


def test_a_deep_queue_scales_out_onto_a_node_the_autoscaler_starts(report: dict) -> None:
    assert report["nodes_at_start"] == 1
    out = report["scale_out"]
    assert out["node_started_after_s"] <= out["serving_after_s"]
    nodes = out["shard_nodes"]  # when the second shard began serving
    assert len(nodes) == len(set(nodes)) == 2, ("the new shard runs on the new node", report)


def test_a_shallow_queue_scales_in_and_the_idle_node_is_retired(report: dict) -> None:
    scale_in = report["scale_in"]
    assert scale_in["stopped_after_s"] <= scale_in["node_retired_after_s"]
    assert any(e.endswith("on 1 shards") for e in report["events"]), report["events"]


def test_past_the_autoscalers_limit_the_controller_asks_once(report: dict) -> None:
    # The deep queue stays after the scale-out: the controller asks for a third shard, the
    # autoscaler (at most one worker) has no node for it, and the wait times out once; the
    # controller asks again only when the cluster's size changes.
    timeouts = [e for e in report["events"] if "PlacementTimeout" in e]
    assert len(timeouts) <= 1, timeouts


def test_no_request_fails_through_both(report: dict) -> None:
    assert report["requests"] > 0
    assert report["failures"] == 0, report["failure_reasons"]


def test_engine_replicas_scale_out_and_in_through_the_autoscaler() -> None:
    report = autoscale("--scale", "engines", "--clients", "12")
    assert report["nodes_at_start"] == 1
    out = report["scale_out"]
    assert out["node_started_after_s"] <= out["serving_after_s"]
    first, second = out["engine_nodes"]
    assert first != second and second in out["nodes"], ("the new engine on the new node", report)
    scale_in = report["scale_in"]
    assert scale_in["stopped_after_s"] <= scale_in["node_retired_after_s"]
    assert report["requests"] > 0 and report["failures"] == 0, report["failure_reasons"]
