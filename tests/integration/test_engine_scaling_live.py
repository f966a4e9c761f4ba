"""The controller adds an engine replica live when the queue is deep and the engines limit
(experts in the engines), the queue it acted on falls, and it removes the engine, drained, once
the load is gone (config.max_engine_replicas, through HTTP on a real Ray Serve)."""

from __future__ import annotations

import statistics
import threading

import pytest

from serving.config import MonitoringConfig, SchedulerConfig
from serving.control.controller import ControllerConfig, PhaseTarget

from ..support import Load, moe_status, wait_healthy, wait_until
from .test_controller_live import KEY, demo_app
from .test_engine_scaling import running, serving

pytestmark = pytest.mark.ray


# The controller live. A target above what this machine gives keeps a shortfall on (the rules
# under test are the queue's); 12 clients on 4 batch slots an engine leave 8 waiting with one
# engine and 4 with two; experts in the engines: the engines are what limits.
SLOTS, CLIENTS = 4, 12
LIVE_CONTROLLER = ControllerConfig(
    period_s=1.0,
    window_s=4.0,
    confirm_periods=2,
    scale_in_periods=3,
    cooldown_periods=3,
    deep_queue=6,
    batch_strategy="fixed",
    phases=(PhaseTarget(name="more than it gives", tokens_per_ms=1000.0),),
)


class QueueWatch:
    """(engines serving, requests waiting) from /health every 0.25 s, in a thread."""

    def __init__(self, url: str) -> None:
        self.url, self.samples = url, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            body = wait_healthy(self.url)["scheduler"]
            self.samples.append((len(body["engines"]), body["waiting"]))

    def __enter__(self) -> QueueWatch:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def waiting(self, engines: int, last: float = 1.0) -> list[int]:
        """Waiting counts seen with `engines` serving: the `last` share of them."""
        seen = [w for n, w in self.samples if n == engines]
        return seen[int(len(seen) * (1 - last)) :]


def test_the_controller_adds_an_engine_for_a_deep_queue_and_removes_it_when_idle(
    serve_http, demo_path
):
    app = "moe-serve-elastic-live"
    fields = dict(
        expert_shards=0,
        engine_replicas=1,
        max_engine_replicas=2,
        scheduler=SchedulerConfig(
            max_batch_slots=SLOTS, max_seq_len=256, step_token_budget=128, max_queue=32
        ),  # fmt: skip
        monitoring=MonitoringConfig(period_s=1.0, metrics=False, cpu_measure_s=0.3),
        controller=LIVE_CONTROLLER,
    )
    with demo_app(serve_http, demo_path, app, **fields) as (url, _):
        assert running(app) == [1, 0]
        with Load(url, KEY, CLIENTS, max_tokens=24, timeout_s=180.0) as load:
            load.wait_ok(2, timeout_s=120)
            with QueueWatch(url) as watch:
                wait_until(lambda: running(app) == [1, 1], 120,
                           lambda: f"an engine added: {running(app)}, {moe_status(url, KEY)}")  # fmt: skip
                wait_until(lambda: len(serving(url)) == 2, 30, "the ingress sends to both")
                done = load.ok
                load.wait_ok(done + 2 * CLIENTS, timeout_s=120)  # the load spreads over both
            added = [a for a in moe_status(url, KEY)["actions"] if a["action"] == "add_engine"]
        assert load.failed == []
        assert added and "deep queue" in added[0]["reason"], added
        # The figure the action targets: requests waiting for a batch slot (once spread).
        before, after = watch.waiting(1), watch.waiting(2, last=0.5)
        assert before and after, watch.samples
        print(f"waiting for a slot, median: {statistics.median(before)} with one engine, "
              f"{statistics.median(after)} with two")  # fmt: skip
        assert statistics.median(after) < statistics.median(before), watch.samples
        # The load gone, the running requests fit one engine: it is removed, drained.
        wait_until(lambda: running(app) == [1, 0], 120,
                   lambda: f"the engine removed: {running(app)}, {moe_status(url, KEY)}")  # fmt: skip
        actions = [a["action"] for a in moe_status(url, KEY)["actions"]]
        assert actions.count("add_engine") == 1 and "remove_engine" in actions, actions
