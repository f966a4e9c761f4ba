"""Expert shard faults on a live HTTP server at 127.0.0.1 (issue 7, fault tests 1-3): real
SIGKILL / SIGSTOP of ExpertShard processes under load, observed from the client's side.

Controller-actor death, overload, SIGTERM drain and disconnects live in tests/integration
(RELIABILITY.md lists where each fault test is).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.reliability.client import KEY, completion, stream_outcome
from tests.reliability.conftest import deployed, fault_config
from tests.support import Load, wait_until

pytestmark = pytest.mark.ray


def shard_pids(router) -> list[int]:
    import ray

    shards = router.expert_shards.remote().result(timeout_s=30)
    return ray.get([s.pid.remote() for s in shards], timeout=30)


def events(router) -> list[str]:
    return router.expert_events.remote().result(timeout_s=30)


def wait_event(router, text: str, timeout_s: float = 60.0) -> list[str]:
    """The pool's events once `text` is one of them."""
    seen: list[str] = []

    def happened() -> list[str] | None:
        nonlocal seen
        seen = events(router)
        return seen if text in seen else None

    return wait_until(
        happened, timeout_s, lambda: f"{text!r} in the pool's events {seen}", interval_s=0.3
    )


# Throughput: a fixed-thread load's non-streaming completions per second (Load.rate). The rate
# before the kill is the mean over BASELINE_S; after it, consecutive WINDOW_S windows from the
# kill up to RECOVERY_S (5 windows), of which one must reach RECOVERED x that rate. The goal is
# 90% within 30 s; a test cannot tell a kill from another process taking a core meanwhile, so it
# asserts half of that (which survives either side running 2x slower; a stall still fails, and
# the replacement itself is asserted below), and scripts/soak.py measures the 90% figure itself
# (RELIABILITY.md). Windows of seconds, not single requests: on 2 shared cores a request's
# latency alone varies by tens of percent.
BASELINE_S = 12.0
WINDOW_S = 6.0
RECOVERY_S = 30.0
RECOVERED = 0.9 / 2


def recovery_rates(load: Load, killed_at: float) -> list[float]:
    """Rates of the consecutive WINDOW_S windows from the kill to RECOVERY_S after it. Call after
    the load has stopped, so every request of the last window has ended and counts."""
    n = int(RECOVERY_S // WINDOW_S)
    return [load.rate(killed_at + i * WINDOW_S, killed_at + (i + 1) * WINDOW_S) for i in range(n)]


HANG_TIMEOUT_S = 1.5  # the call timeout with copies: a hang detected well inside the 5 s
ONLY_COPY_TIMEOUT_S = 10.0  # long on purpose: a 503 faster than this did not wait on it


# Class-scoped: one app at a time, so the shards of only one app share the 2 cores.
@pytest.fixture(scope="class")
def copies_app(serve_http, demo_path):
    config = fault_config(
        demo_path, expert_shards=2, redundant_experts=8, expert_call_timeout_s=HANG_TIMEOUT_S
    )
    with deployed(serve_http, "rel-copies", config) as app:
        yield app


@pytest.fixture(scope="class")
def only_copy_app(serve_http, demo_path):
    config = fault_config(demo_path, expert_shards=2, expert_call_timeout_s=ONLY_COPY_TIMEOUT_S)
    with deployed(serve_http, "rel-only-copy", config) as app:
        yield app


class TestTwoCopies:
    """expert_shards=2, redundant_experts=8: every expert has a copy on each shard."""

    def test_sigkill_under_load_fails_nothing_and_the_shard_is_replaced(self, copies_app):
        url, router = copies_app
        victim = shard_pids(router)[0]
        with Load(url, KEY, clients=3, streamers=1) as load:
            load.wait_ok(10)  # warm: first batches are slower
            time.sleep(BASELINE_S)
            killed_at = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            seen = wait_event(router, "shard 0 replaced")
            time.sleep(max(0.0, killed_at + RECOVERY_S - time.monotonic()))
        before = load.rate(killed_at - BASELINE_S, killed_at)
        after = recovery_rates(load, killed_at)
        print(f"throughput: {before:.2f}/s before the kill, {[round(r, 2) for r in after]}/s after")
        assert "shard 0 failed: " in " ".join(seen)
        assert before > 0, "no request completed in the window before the kill"
        assert max(after) >= RECOVERED * before, (
            f"throughput not back to {RECOVERED:.0%} within {RECOVERY_S} s: "
            f"{before:.2f}/s before the kill, {[round(r, 2) for r in after]}/s after"
        )
        assert load.failed == [], load.failed[:3]
        assert load.streams and set(load.streams) <= {"finished", "error_event"}, load.streams
        pids = shard_pids(router)
        assert victim not in pids and len(pids) == 2
        status, _, reply = completion(url)
        assert status == 200 and reply["choices"][0]["finish_reason"] == "length"

    def test_sigstop_is_detected_by_the_call_timeout(self, copies_app):
        url, router = copies_app
        victim = shard_pids(router)[1]
        os.kill(victim, signal.SIGSTOP)
        try:
            for _ in range(3):
                start = time.monotonic()
                try:
                    status, _, reply = completion(url, timeout=30)
                except TimeoutError:
                    pytest.fail(f"no answer within 30 s; the pool's events: {events(router)}")
                assert status == 200, reply
                assert time.monotonic() - start < 5.0  # the bound for a hang
            assert "shard 1 failed: GetTimeoutError" in events(router)
        finally:
            os.kill(victim, signal.SIGCONT)  # the pool killed it; let the kill land
        wait_event(router, "shard 1 replaced")
        assert victim not in shard_pids(router)


class TestOnlyCopy:
    """expert_shards=2, no copies: losing a shard loses experts until it is replaced."""

    def test_lost_expert_answers_503_with_retry_after_then_recovers(self, only_copy_app):
        url, router = only_copy_app
        assert completion(url)[0] == 200
        os.kill(shard_pids(router)[1], signal.SIGKILL)
        start = time.monotonic()
        status, headers, reply = completion(url, timeout=30)
        elapsed = time.monotonic() - start
        assert status == 503, reply
        assert elapsed < ONLY_COPY_TIMEOUT_S  # fails fast: no call waited for its timeout
        assert headers["Retry-After"] == "1"
        assert reply["error"]["code"] == "expert_unavailable"
        assert reply["error"]["type"] == "server_overloaded"
        assert "no live copy" in reply["error"]["message"] or "failed" in reply["error"]["message"]
        wait_event(router, "shard 1 replaced")
        status, _, reply = completion(url)
        assert status == 200, reply

    def test_lost_expert_ends_a_stream_with_an_error_event(self, only_copy_app):
        url, router = only_copy_app
        assert stream_outcome(url) == "finished"
        os.kill(shard_pids(router)[0], signal.SIGKILL)
        assert stream_outcome(url, timeout=30) == "error_event"
        wait_event(router, "shard 0 replaced")
        assert stream_outcome(url) == "finished"
