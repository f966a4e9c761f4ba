"""Fixtures of the reliability suite: Serve apps of our own on the session's one Ray and Serve
(tests/conftest.py), each under its own route prefix and deleted when its tests end."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from serving.config import MonitoringConfig, SchedulerConfig, ServeConfig
from tests.reliability.client import KEY
from tests.support import wait_healthy

MODEL = "demo"


def fault_config(demo_path, **fields) -> ServeConfig:
    """A small app: the demo model, a short context (cheap requests), no controller (it would
    rebalance under the tests' feet) and no metrics (less CPU on a 2-core machine)."""
    defaults = {
        "scheduler": SchedulerConfig(
            max_batch_slots=8, max_seq_len=128, step_token_budget=128, max_queue=32
        ),
        "monitoring": MonitoringConfig(metrics=False, controller=False),
    }
    return ServeConfig(
        api_key=KEY, model=str(demo_path), served_model_name=MODEL, **(defaults | fields)
    )


@contextmanager
def deployed(serve_http: str, name: str, config: ServeConfig) -> Iterator[tuple[str, object]]:
    """Run the app `name` at route prefix /name: yields (its base URL, its Engine handle)."""
    from ray import serve

    from serving.api.app import application

    serve.run(application(config), name=name, route_prefix=f"/{name}", blocking=False)
    url = f"{serve_http}/{name}"
    try:
        wait_healthy(url)
        yield url, serve.get_deployment_handle("Engine", app_name=name)
    finally:
        serve.delete(name)
