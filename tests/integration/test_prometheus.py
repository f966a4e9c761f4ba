"""A real Prometheus server (Debian's `prometheus`, installed by scripts/install_prometheus.sh),
started here on 127.0.0.1 and scraping the Ray node's metrics port, evaluates every PromQL query of
configs/grafana/moe-serve.json; each must return data (a number, not NaN)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from serving.cli.dashboard import dashboard_exprs, load_dashboard
from serving.control import metrics
from tests.integration.metrics_recorder import start_recorder
from tests.support import free_port

pytestmark = pytest.mark.ray

QUERY_TIMEOUT_S = 90  # Ray exports 5-10 s after recording; rates need two scrapes after that


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def prometheus(ray_session, tmp_path):
    """Prometheus on 127.0.0.1, scraping this node's Ray metrics every second; yields its URL."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail(
            "prometheus is not installed: run `bash scripts/install_prometheus.sh` "
            "(Debian's prometheus package) before the tests"
        )
    target = f"127.0.0.1:{metrics.node_metrics_port()}"
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(metrics.scrape_config([target], interval_s=1.0)))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/-/ready", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail(
                        f"prometheus did not start: {(tmp_path / 'prometheus.log').read_text()}"
                    )
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def query(url: str, expr: str) -> list:
    answer = get_json(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]["result"]


def has_data(result: list) -> bool:
    """Some series with a number: a quantile over no observations is NaN, which is no data."""
    return any(r["value"][1] != "NaN" for r in result)


def test_every_dashboard_query_returns_data(ray_session, prometheus):
    ray = ray_session
    exprs = dashboard_exprs(load_dashboard(), substitute=True)
    assert len(exprs) >= 10
    recorder = start_recorder(ray)
    ray.get(recorder.start.remote(0.5))
    empty = exprs
    deadline = time.monotonic() + QUERY_TIMEOUT_S
    try:
        while empty and time.monotonic() < deadline:
            time.sleep(2.0)
            empty = [e for e in empty if not has_data(query(prometheus, e))]
    finally:
        ray.get(recorder.stop.remote())
        ray.kill(recorder)
    up = query(prometheus, "up")
    assert empty == [], f"no data after {QUERY_TIMEOUT_S}s for {empty}; scrape targets: {up}"
