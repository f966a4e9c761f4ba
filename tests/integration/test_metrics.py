"""Every moe-serve metric, recorded through serving.control.metrics in a Ray actor, appears on the node's
live Prometheus endpoint under its exported (`ray_`-prefixed) name."""

from __future__ import annotations

import urllib.request

import pytest

from serving.control import metrics
from tests.integration.metrics_recorder import start_recorder
from tests.support import wait_until

pytestmark = pytest.mark.ray

SCRAPE_TIMEOUT_S = 45  # metrics appear 5-10 s after recording (ARCHITECTURE.md section 7)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def present(text: str) -> set[str]:
    """Series names in a Prometheus text exposition."""
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}


def test_every_metric_is_scraped_with_its_exported_name(ray_session):
    ray = ray_session
    recorder = start_recorder(ray)
    port = metrics.node_metrics_port()
    expected = set(metrics.exported_names())
    # Series only this recorder writes: other processes of the session (a deployed app, its
    # controller) may already have put every name there, and counters outlive their process.
    labels = ('policy="split"', 'action="rebalance"', 'phase="phase 1"')
    missing = expected

    def scraped() -> bool:
        nonlocal missing
        ray.get(recorder.record_once.remote())  # re-recording keeps gauges alive
        text = scrape(port)
        missing = expected - present(text)
        return not missing and all(label in text for label in labels)

    try:
        wait_until(
            scraped,
            SCRAPE_TIMEOUT_S,
            lambda: f"every metric and {labels} on :{port}/metrics (missing {sorted(missing)})",
            interval_s=1.0,
        )
    finally:
        ray.kill(recorder)
