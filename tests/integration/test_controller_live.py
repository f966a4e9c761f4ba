"""The wired app on a real Ray Serve: the engine records metrics, the controller reads its counters,
acts on a shortfall (one expert shard slowed on purpose), and reports at GET /v1/moe/status,
which `moe-serve status` prints; everything shows on the node's Prometheus endpoint."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest

from serving.config import MonitoringConfig, SchedulerConfig, ServeConfig
from serving.control import metrics
from serving.control.controller import ControllerConfig

from ..support import Load, moe_status, wait_healthy, wait_until
from .test_http import http
from .test_metrics import present, scrape

KEY = "live-key-456"
APP = "moe-serve-live"
pytestmark = pytest.mark.ray

# Short periods and little hysteresis so that the controller acts within seconds; a CV target out
# of reach so that the random demo model's uneven routing (CV ~0.5) triggers no rebalance and the
# throughput shortfall decides.
FAST_CONTROLLER = ControllerConfig(
    period_s=1.0,
    window_s=5.0,
    confirm_periods=1,
    scale_in_periods=1,
    cooldown_periods=2,
    target_cv=10.0,
)


@contextmanager
def demo_app(serve_http: str, demo_path, app: str, **fields):
    """The demo model on 2 expert shards, API key KEY, served as "demo", planned for this CPU,
    under `app`; `fields` set more ServeConfig fields (or replace these). Yields (base URL,
    Engine handle)."""
    from ray import serve

    from serving.api.app import run_app

    defaults = dict(
        expert_shards=2,
        scheduler=SchedulerConfig(
            max_batch_slots=8, max_seq_len=256, step_token_budget=128, max_queue=32
        ),
        hardware="cpu",  # measured: the planner's targets for this machine
    )
    config = ServeConfig(
        api_key=KEY, model=str(demo_path), served_model_name="demo", **(defaults | fields)
    )
    run_app(config, app)
    wait_healthy(serve_http)
    try:
        yield serve_http, serve.get_deployment_handle("Engine", app_name=app)
    finally:
        serve.delete(app)


@pytest.fixture(scope="module")
def live(serve_http, demo_path):
    """Metrics and a fast controller on: (base URL, Engine handle)."""
    monitoring = MonitoringConfig(period_s=1.0, cpu_measure_s=0.3)
    with demo_app(
        serve_http, demo_path, APP, monitoring=monitoring, controller=FAST_CONTROLLER
    ) as app:
        yield app


def live_load(url: str, clients: int = 3) -> Load:
    """`clients` threads sending completions of 16 tokens with KEY until the block ends."""
    return Load(url, KEY, clients, max_tokens=16, timeout_s=120.0)


def status(url: str) -> dict:
    return moe_status(url, KEY)


def test_controller_sees_the_slowed_shard_and_acts(live):
    import ray

    url, router = live

    def shards() -> list:
        return router.expert_shards.remote().result(timeout_s=30)

    assert len(shards()) == 2
    ray.get(shards()[0].set_delay.remote(0.02), timeout=30)  # a straggler: 20 ms per layer call
    with live_load(url) as load:
        report = wait_until(
            lambda: (s := status(url))["actions"] and s, 90, "a controller action", interval_s=1.0
        )
        acted = report["actions"][-1]
        if acted["action"] in ("scale_in", "scale_out"):  # the pool switches at a later batch
            want = 1 if acted["action"] == "scale_in" else 3
            wait_until(lambda: len(shards()) == want, 60, f"{want} expert shards", interval_s=1.0)
    assert not load.failed, load.failed[:3]  # acting (shards added or removed) loses no request
    assert load.ok > 0
    # Far below the planner's target for this CPU: a shortfall rule acted (not a rebalance,
    # which the test's target_cv rules out).
    assert report["tokens_per_ms_per_device"] < report["target_tokens_per_ms"]
    assert acted["action"] in ("scale_in", "scale_out", "batch_fallback"), acted
    assert "shortfall" in acted["reason"] or "surplus" in acted["reason"]
    assert report["phase"] and report["ceiling_tokens_per_ms"] >= report["target_tokens_per_ms"]
    # The decision is counted on the node's Prometheus endpoint, labelled by action.
    port = metrics.node_metrics_port()
    series = f'action="{acted["action"]}"'
    name = metrics.exported_name("moe_controller_actions_total")
    wait_until(
        lambda: any(line.startswith(name) and series in line for line in scrape(port).splitlines()),
        30,
        f"{name}{{{series}}} on :{port}/metrics",
        interval_s=1.0,
    )


def test_status_command_prints_the_live_report(live, capsys):
    from serving.cli.command import main

    url, _ = live
    assert main(["status", "--url", url, "--api-key", KEY, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["phase"] and report["devices"] >= 1 and report["last_decision"]
    assert report["expert_transport"] in ("compiled", "plain")  # the app has 2 shards
    assert main(["status", "--url", url, "--api-key", KEY]) == 0
    out = capsys.readouterr().out
    assert "tokens/ms per device" in out and "expert transport" in out
    # Same auth as the /v1 routes.
    code, _, body = http("GET", f"{url}/v1/moe/status", key=None)
    assert code == 401 and body["error"]["code"] == "invalid_api_key"


def test_router_and_controller_metrics_are_scraped(live):
    url, _ = live
    # A Ray Counter has no series before its first increment, and overflow depends on routing.
    expected = set(metrics.exported_names()) - {metrics.exported_name("moe_overflow_tokens_total")}
    port = metrics.node_metrics_port()
    missing = expected

    def all_present() -> bool:
        nonlocal missing
        missing = expected - present(scrape(port))
        return not missing

    with live_load(url, clients=2):
        wait_until(
            all_present,
            30,
            lambda: f"every series on :{port}/metrics (missing {sorted(missing)})",
            interval_s=1.0,
        )


def test_up_documents_the_metrics_port():
    from serving.cli.command import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    help_text = " ".join(sub.choices["up"].format_help().split())
    assert "--metrics-port" in help_text and f"default {metrics.DEFAULT_METRICS_PORT}" in help_text
