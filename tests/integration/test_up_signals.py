"""`moe-serve up` with its own Ray, as a user runs it: a full queue is refused, and SIGTERM, to the
process alone or to its whole process group (what systemd, `timeout` and shells send), drains the
requests in flight, exits 0 and leaves no Ray process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from ..conftest import REPO
from ..support import free_port, wait_healthy, wait_until
from .test_http import Streamer, http

KEY = "test-key-123"
pytestmark = pytest.mark.ray


@contextmanager
def moe_serve_up(tmp_path: Path, demo_path: Path, scheduler: dict) -> Iterator[tuple]:
    """`python -m serving.cli up` in a process group of its own: (process, URL, log path)."""
    port = free_port()
    args = {
        "model": str(demo_path),
        "served_model_name": "demo",
        "api_key": KEY,
        "max_ongoing_requests": 16,
        "drain_timeout_s": 120,
        "scheduler": scheduler,
        "limits": {"retry_after_s": 2},
        "metrics_port": free_port(),  # not the default 8080: another Ray may hold it
    }
    config = tmp_path / "serve.yaml"
    app = {"import_path": "serving.api.app:build_app", "args": args}
    http_options = {"host": "127.0.0.1", "port": port}
    config.write_text(yaml.safe_dump({"http_options": http_options, "applications": [app]}))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MOE_SERVE_API_KEY")}
    log_path = tmp_path / "up.log"
    log = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "up", "--config", str(config)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the test signals the whole group
    )
    try:
        yield proc, f"http://127.0.0.1:{port}", log_path
    finally:
        if proc.poll() is None:  # a failed test: stop everything it started
            for pid in [proc.pid, *descendants(proc.pid)]:
                _kill(pid)
            proc.wait()
        log.close()


def _kill(pid: int) -> None:
    try:
        os.killpg(os.getpgid(pid), signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(parent, process group, session) of a process, None when it is gone (or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[2]), int(fields[3])


def descendants(root: int) -> list[int]:
    """Every live process below `root`."""
    parents = {int(p): s[0] for p in os.listdir("/proc") if p.isdigit() and (s := _stat(int(p)))}
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def sessions_alive(sessions: set[int]) -> list[int]:
    """Live processes in any of these sessions or process groups."""
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    return [p for p in pids if (s := _stat(p)) and (s[1] in sessions or s[2] in sessions)]


def cmdlines(pids: list[int]) -> list[str]:
    return [Path(f"/proc/{p}/cmdline").read_text() for p in pids]


def test_up_refuses_when_full_and_drains_on_sigterm(tmp_path, demo_path):
    """1 slot + 1 queued -> the next request is 503 with Retry-After; SIGTERM to the process ->
    new requests are refused, both in flight finish, the process exits 0."""
    scheduler = {"max_batch_slots": 1, "step_token_budget": 64, "max_queue": 1}
    with moe_serve_up(tmp_path, demo_path, scheduler) as (proc, url, log):
        wait_healthy(url)
        running = Streamer(url, max_tokens=150)
        assert running.first_token.wait(120) and running.status == 200  # it holds the slot
        queued = Streamer(url, max_tokens=300)
        assert queued.admitted.wait(120) and queued.status == 200  # it waits in the queue
        body = json.dumps({"model": "demo", "prompt": "hi", "max_tokens": 2}).encode()
        status, headers, reply = http("POST", f"{url}/v1/completions", body)
        assert status == 503 and headers["Retry-After"] == "2"
        assert reply["error"]["code"] == "queue_full"

        proc.send_signal(signal.SIGTERM)
        while wait_healthy(url)["status"] != "draining":
            time.sleep(0.2)
        status, _, reply = http("POST", f"{url}/v1/completions", body)
        assert status == 503 and reply["error"]["type"] == "server_overloaded"
        for stream in (running, queued):
            stream.join(300)
            assert stream.done and stream.finish == "length"
            assert stream.usage["completion_tokens"] == stream.max_tokens
        assert proc.wait(timeout=180) == 0
    assert "stopped" in log.read_text()


def test_sigterm_to_the_process_group_drains_and_leaves_nothing(tmp_path, demo_path):
    scheduler = {"max_batch_slots": 4, "step_token_budget": 64, "max_queue": 4}
    with moe_serve_up(tmp_path, demo_path, scheduler) as (proc, url, log):
        wait_healthy(url)
        sessions = {proc.pid} | {_stat(p)[2] for p in descendants(proc.pid) if _stat(p)}
        assert len(sessions) > 1, "the server runs in the caller's session: Ray would get it too"
        stream = Streamer(url, max_tokens=120)
        assert stream.first_token.wait(120) and stream.status == 200
        os.killpg(proc.pid, signal.SIGTERM)
        signalled = time.monotonic()
        code = proc.wait(timeout=60)
        took = time.monotonic() - signalled
        stream.join(30)
        assert stream.done and stream.finish == "length", log.read_text()[-2000:]
        assert stream.usage["completion_tokens"] == 120
        assert code == 0, log.read_text()[-2000:]
        assert took < 10, f"exit took {took:.1f} s"
        wait_until(
            lambda: not sessions_alive(sessions),
            10,
            lambda: f"no process left: {cmdlines(sessions_alive(sessions))}",
        )
    assert "stopped" in log.read_text()
