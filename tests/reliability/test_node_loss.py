"""Node loss on a real multi-node Ray cluster (issue 16): scripts/node_loss.py builds one on this
machine with Ray's `Cluster` (head + 3 worker raylets), serves the demo with `moe-serve up
--address`, and removes the node of a shard abruptly under HTTP load.

The script runs in its own process: its cluster is not the session's Ray (tests/conftest.py).
RELIABILITY.md records its figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The goal is 90% of the throughput before the loss within 30 s; like test_faults.py, the test
# asserts half of it (a neighbour's load is indistinguishable from the loss), the script reports
# the 90% figure itself.
RECOVERED = 0.9 / 2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report() -> dict:
    cmd = [sys.executable, "scripts/node_loss.py", "--before-s", "20", "--after-s", "36"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_shards_spread_over_worker_nodes_apart_from_the_engine(report: dict) -> None:
    before = report["shard_nodes_before"]
    assert len(set(before)) == len(before) == 2, "each shard on its own node"
    assert report["engine_node"] not in before, "the engine's node holds no shard"


def test_losing_a_shards_node_fails_no_request(report: dict) -> None:
    assert report["requests"] > 0
    assert report["failures"] == 0, report["failure_reasons"]


def test_the_lost_shard_is_recreated_on_a_surviving_node(report: dict) -> None:
    after = report["shard_nodes_after"]
    assert report["lost_node"] not in after
    assert set(after) <= set(report["alive_worker_nodes"]), after
    assert len(set(after)) == 2, "still one shard per node"
    assert report["replaced_after_s"] is not None, report["events_after_loss"]


def test_throughput_comes_back_within_30_s(report: dict) -> None:
    recovery = report["recovery"]
    assert recovery["before_per_s"] > 0
    back = [r for r in recovery["after_per_s"] if r >= RECOVERED * recovery["before_per_s"]]
    assert back, recovery


@pytest.fixture(scope="module")
def engine_loss() -> dict:
    """Two engine replicas sharing the shards, one on a node of its own that is removed."""
    cmd = [sys.executable, "scripts/node_loss.py", "--lose", "engine", "--before-s", "20",
           "--after-s", "36"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_engine_replicas_sit_on_different_nodes(engine_loss: dict) -> None:
    before = engine_loss["engine_nodes_before"]
    assert len(set(before)) == 2 and engine_loss["lost_node"] in before
    assert not engine_loss["lost_a_shard"]
    survivor = [n for n in before if n != engine_loss["lost_node"]]
    assert [n for n in engine_loss["engine_nodes_after"] if n] == survivor
    # The health check answers from the surviving engine, without waiting on the lost one.
    health = engine_loss["health_after"]
    assert health["status"] == 200 and health["seconds"] < 10, health


def test_losing_an_engines_node_ends_only_streams_under_way(engine_loss: dict) -> None:
    # Requests its engine had not started answering went to the other engine; a stream whose
    # tokens had begun may end, with a retryable error event.
    assert engine_loss["requests"] > 0
    reasons = engine_loss["failure_reasons"]
    assert all(r.startswith("stream error") and "retry" in r for r in reasons), reasons


def test_throughput_comes_back_within_30_s_after_an_engine_is_lost(engine_loss: dict) -> None:
    recovery = engine_loss["recovery"]
    back = [r for r in recovery["after_per_s"] if r >= RECOVERED * recovery["before_per_s"]]
    assert recovery["before_per_s"] > 0 and back, recovery
