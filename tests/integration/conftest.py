"""One local Ray session for the whole test run (starting Ray costs seconds and ~2 GB)."""

from __future__ import annotations

import os

import pytest

# Ray sizes its worker pool from logical CPUs; 8 leaves room for shards, Serve replicas and the
# controller on this 2-core machine without pretending they run in parallel.
RAY_NUM_CPUS = 8


@pytest.fixture(scope="session")
def ray_session():
    import ray

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    if not ray.is_initialized():
        ray.init(
            num_cpus=RAY_NUM_CPUS,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # Serve may never have started
        pass
    ray.shutdown()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serve_http(ray_session) -> str:
    """Ray Serve's HTTP proxy on 127.0.0.1 at a free port, once per run: its base URL."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"
