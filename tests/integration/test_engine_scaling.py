"""Engine replicas the controller starts and stops (config.max_engine_replicas), through HTTP on a
real Ray Serve: the standby engine has no replica until asked for; once added it serves on the
same expert shards and answers as in-process generation; removed under load it drains and stops
with no failed request. The controller's own decisions: test_engine_scaling_live.py."""

from __future__ import annotations

import pytest

from serving.cli.status import fetch_status, render
from serving.config import MonitoringConfig
from serving.control.controller import Decision
from serving.control.controller_app import EngineScaling, _applier
from serving.control.engine_scaler import engine_states

from ..support import Load, wait_healthy, wait_until
from .test_controller_live import KEY, demo_app
from .test_engine_replicas import complete, greedy  # noqa: F401  (a fixture)

APP = "moe-serve-elastic"
ENGINES = ("Engine", "Engine-1")
pytestmark = pytest.mark.ray


def running(app: str = APP) -> list[int]:
    return [s.running for s in engine_states(app, ENGINES)]


def serving(url: str) -> list[dict]:
    """The engines behind the ingress now, as /health reports them."""
    return wait_healthy(url)["scheduler"]["engines"]


@pytest.fixture(scope="module")
def app(serve_http, demo_path):
    from ray import serve

    monitoring = MonitoringConfig(period_s=1.0, metrics=False, controller=False)
    fields = dict(engine_replicas=1, max_engine_replicas=2, monitoring=monitoring)
    with demo_app(serve_http, demo_path, APP, **fields) as (url, _):
        yield url, [serve.get_deployment_handle(name, app_name=APP) for name in ENGINES]


def test_a_standby_engine_added_serves_on_the_same_shards_and_removed_drains(app, greedy):  # noqa: F811
    url, engines = app
    assert running() == [1, 0]  # deployed, the standby engine has no replica
    assert len(serving(url)) == 1
    report = fetch_status(url, KEY)  # what `moe-serve status` reads and prints
    assert (report.engine_replicas, report.max_engine_replicas) == (1, 2)
    assert "engine replicas       1 of at most 2" in render(report)
    apply = _applier(APP, ENGINES, EngineScaling(floor=1, ask={}))
    apply(Decision(action="add_engine", reason="test"))
    wait_until(lambda: running() == [1, 1], 120, lambda: f"the engine started: {running()}")
    wait_until(lambda: len(serving(url)) == 2, 30, "the ingress sends to both")
    prompts = [f"Request {i}: tell me about expert {i * 3}" for i in range(8)]
    assert complete(url, prompts, 12) == [greedy(p, 12) for p in prompts]
    assert all(e["tokens_generated"] > 0 for e in serving(url))  # both served
    shards = [[a._actor_id for a in e.expert_shards.remote().result()] for e in engines]
    assert len(shards[0]) == 2 and shards[0] == shards[1]  # the new engine joined the shards

    with Load(url, KEY, 3, max_tokens=12, timeout_s=120.0) as load:
        load.wait_ok(3)
        apply(Decision(action="remove_engine", reason="test"))
        wait_until(lambda: running() == [1, 0], 120, lambda: f"the engine stopped: {running()}")
        done = load.ok
        load.wait_ok(done + 3, timeout_s=120)  # served on by the one left
    assert load.failed == [] and load.ok > done
    assert [s.target for s in engine_states(APP, ENGINES)] == [1, 0]
    wait_until(lambda: len(serving(url)) == 1, 30, "the ingress sends to one")
    assert complete(url, prompts[:2], 12) == [greedy(p, 12) for p in prompts[:2]]


def test_the_first_engine_is_never_removed_nor_below_the_floor(app):
    apply = _applier(APP, ENGINES, EngineScaling(floor=1, ask={}))
    with pytest.raises(RuntimeError, match="no engine above the 1 configured"):
        apply(Decision(action="remove_engine", reason="test"))
    assert running() == [1, 0]
