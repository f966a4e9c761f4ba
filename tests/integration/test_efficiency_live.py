"""Issue 8 on a live CPU deployment: where step time goes, the measured factors, their identity
with the tokens a client counts, calibration, and the breakdown reacting to a slow shard and to
more compute per token."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import pytest
import torch

from serving.config import MonitoringConfig
from serving.control.controller import ControllerConfig
from serving.control.steptime import PARTS, StepAccounting

from ..support import wait_until
from .test_controller_live import KEY, demo_app, live_load, status

APP = "moe-serve-efficiency"
pytestmark = pytest.mark.ray

# The controller observes every second but never acts (confirm_periods out of reach): these tests
# measure a deployment that stays as it was built.
NEVER = 10_000
WATCHING_CONTROLLER = ControllerConfig(
    period_s=1.0,
    window_s=5.0,
    confirm_periods=NEVER,
    scale_in_periods=NEVER,
    revert_periods=NEVER,
    batch_strategy="fixed",
    target_cv=10.0,
)


@pytest.fixture(scope="module")
def app(serve_http, demo_path):
    """A 5 s accounting window and a controller that only watches: (URL, Engine handle)."""
    monitoring = MonitoringConfig(period_s=1.0, cpu_measure_s=0.3, accounting_window_s=5.0)
    with demo_app(
        serve_http, demo_path, APP, monitoring=monitoring, controller=WATCHING_CONTROLLER
    ) as app:
        yield app


def bench(url: str, concurrency: int, prompts: int, output_len: int = 24) -> dict:
    """`moe-serve bench --json`'s summary, run in-process against the app."""
    from serving.cli.bench import _bench

    args = argparse.Namespace(
        url=url,
        model="demo",
        num_prompts=prompts,
        request_rate=float("inf"),
        max_concurrency=concurrency,
        input_len=16,
        output_len=output_len,
        seed=0,
        slo_ttft_ms=2000.0,
        slo_tpot_ms=200.0,
    )
    summary, _ = asyncio.run(_bench(args, KEY))
    summary.pop("start")
    assert summary["failed"] == 0, summary["errors"]
    return summary


def test_breakdown_sums_to_one_and_the_factors_match_the_client(app, tmp_path, capsys):
    url, _ = app
    report = bench(url, concurrency=8, prompts=32)
    e = report["efficiency"]
    fractions = e["fractions"]
    assert set(fractions) == set(PARTS)
    assert all(0.0 <= f <= 1.0 for f in fractions.values()), fractions
    assert sum(fractions.values()) == pytest.approx(1.0, abs=0.02)
    assert fractions["expert"] > 0 and fractions["transport"] > 0 and fractions["dense"] > 0
    m = e["measured"]
    # The product of the measured factors against the tokens the client counted over its own
    # wall time, over the ceiling: the issue asks for 10%.
    assert 0.9 <= e["identity_ratio"] <= 1.1, e
    assert m["efficiency"] == pytest.approx(
        m["tokens_per_ms_per_device"] / m["ceiling_tokens_per_ms"]
    )
    # Calibration: the plan's factors become the measured ones; at the measured batch the
    # step model gives back the measured rate.
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    from serving.cli.command import main

    config_json = str(app_model_config())
    assert main(["plan", "--model", config_json, "--hardware", "cpu", "--calibrate", str(path),
                 "--json"]) == 0  # fmt: skip
    plan = json.loads(capsys.readouterr().out)
    cal = plan["calibration"]
    assert set(plan["efficiency_factor_sources"].values()) == {"measured"}
    assert cal["predicted_at_measured_batch"] == pytest.approx(
        cal["measured_tokens_per_ms_per_device"], rel=0.01
    )
    assert plan["realistic_tokens_per_ms"] == pytest.approx(
        cal["predicted_tokens_per_ms_per_device"], rel=1e-6
    )


def app_model_config():
    from serving.engine.demo import demo_checkpoint

    return demo_checkpoint() / "config.json"


def test_a_slowed_shard_raises_the_imbalance_and_the_controller_sees_it(app):
    import ray

    url, router = app
    shards = router.expert_shards.remote().result(timeout_s=30)

    seen: list[dict] = []

    def fractions() -> dict | None:
        report = status(url)  # what the controller observed last period
        seen.append({"controller": report.get("step_fractions"),
                     "router": report["efficiency"].get("fractions")})  # fmt: skip
        return report.get("step_fractions")

    with live_load(url, clients=3):
        wait_until(fractions, 60, "a step-time breakdown in the controller's view", interval_s=1.0)
        time.sleep(6)  # a full accounting window of steady load
        before = fractions()
        ray.get(shards[0].set_delay.remote(0.06), timeout=30)  # 60 ms more per layer call
        try:
            wait_until(
                lambda: (f := fractions()) and f["imbalance"] > before["imbalance"] + 0.2,
                60,
                lambda: f"the imbalance rising from {before} (seen {seen[-3:]})",
                interval_s=1.0,
            )
            # The rise shows while the window still mixes steps from before the delay: judge a
            # window (and a controller period) of slowed steps only.
            time.sleep(6 + 1)
            after = fractions()
            reason = status(url)["last_decision"]["reason"]
        finally:
            ray.get(shards[0].set_delay.remote(0.0), timeout=30)
    assert after["imbalance"] == max(after[p] for p in ("transport", "imbalance", "bubble"))
    assert "waiting on the slowest shard" in reason, reason


def test_more_compute_per_token_lowers_the_communication_fraction(ray_session, tmp_path):
    """Two deployments side by side, stepped in turn, so that whatever else runs on the machine
    weighs on both alike; the median of each one's per-step transport share is compared."""
    from serving import load_model
    from tests.conftest import write_hf_checkpoint

    def deploy(hidden: int, ffn: int):
        path = write_hf_checkpoint(
            tmp_path / f"h{hidden}",
            hidden_size=hidden,
            intermediate_size=ffn,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            vocab_size=128,
        )
        return load_model(path, expert_shards=2, transport="plain")

    def transport_share(model, ids) -> float:
        model.pool.step_time()  # start afresh
        start = time.perf_counter()
        model(ids)
        seconds = time.perf_counter() - start
        accounting = StepAccounting()
        accounting.record(seconds, seconds, model.pool.step_time(), 0, ids.numel())
        return accounting.totals.fractions()["transport"]

    small, large = deploy(64, 128), deploy(512, 2048)
    try:
        ids = torch.randint(0, 128, (4, 64))
        shares: dict[str, list[float]] = {"small": [], "large": []}
        for _ in range(9):
            shares["small"].append(transport_share(small, ids))
            shares["large"].append(transport_share(large, ids))
    finally:
        small.close()
        large.close()
    medians = {k: statistics.median(v[1:]) for k, v in shares.items()}  # the first warms up
    assert medians["large"] < medians["small"], shares
