"""Overload at twice capacity on a live HTTP server at 127.0.0.1 (issue 7, fault test 5): rejected
requests are answered 503 with Retry-After as fast as a reply that never reaches the scheduler,
admitted requests complete.

Capacity is what the scheduler admits at once: max_batch_slots running plus max_queue waiting.
Twice that many client threads send completions without pause, so the server is always full and
every free place is taken at once. A rejected client waits REJECTED_PAUSE_S before trying again:
honouring Retry-After (1 s) would let the load fall back towards capacity; not pausing at all would
turn the test into a flood of rejections that starves generation on 2 cores.

The latency of a rejection is measured by the client: connect, send, read the whole 503 reply.
The goal is 100 ms; what the test asserts is relative, so that it holds on a busy machine: against
`GET /v1/models` sent meanwhile (the same proxy and ingress, no scheduler), a refusal may take at
most REJECT_VS_MODELS times as long. A refusal that waits on the Engine (the design before the
ingress refused on its own) measured 2.9x at the median; the ingress's own refusal 1.7x
(RELIABILITY.md, which also records the absolute figures).
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from dataclasses import dataclass, field

import pytest

from serving.config import LimitsConfig, SchedulerConfig
from tests.reliability.client import completion, http
from tests.reliability.conftest import deployed, fault_config

pytestmark = pytest.mark.ray

SLOTS, QUEUE = 2, 2
CAPACITY = SLOTS + QUEUE
MAX_TOKENS = 32  # long enough that a slot is held for many scheduler steps
LOAD_S = 15.0
REJECTED_PAUSE_S = 0.25
# Asserted for the median and the 90th percentile, each against the same quantile of
# /v1/models; the slowest refusals wait behind a scheduler step or a descheduled process on 2
# shared cores (the maximum is reported, and recorded in RELIABILITY.md, not asserted).
REJECT_VS_MODELS = 2.5


@dataclass
class Overload:
    """2 x CAPACITY client threads for LOAD_S seconds; every reply sorted by its status."""

    url: str
    admitted: list[dict] = field(default_factory=list)  # replies of 200s
    rejected: list[tuple[float, dict, dict]] = field(
        default_factory=list
    )  # latency, headers, reply
    other: list = field(default_factory=list)  # anything else: a failure to report
    # Latency of GET /v1/models meanwhile: the same proxy and ingress, no scheduler. What the
    # platform costs a reply on this machine at this moment, reported beside the rejections'.
    reference: list[float] = field(default_factory=list)

    def _client(self, until: float) -> None:
        while time.monotonic() < until:
            start = time.monotonic()
            try:
                status, headers, reply = completion(self.url, max_tokens=MAX_TOKENS, timeout=120)
            except Exception as exc:  # noqa: BLE001 - a timeout or reset is a failure to report
                self.other.append(repr(exc))
                continue
            latency = time.monotonic() - start
            if status == 200:
                self.admitted.append(reply)
            elif status == 503:
                self.rejected.append((latency, headers.get("Retry-After"), reply))
                time.sleep(REJECTED_PAUSE_S)
            else:
                self.other.append((status, reply))

    def _reference(self, until: float) -> None:
        while time.monotonic() < until:
            start = time.monotonic()
            status, _, _ = http("GET", f"{self.url}/v1/models", timeout=60)
            if status == 200:
                self.reference.append(time.monotonic() - start)
            time.sleep(REJECTED_PAUSE_S)

    def run(self) -> None:
        until = time.monotonic() + LOAD_S
        threads = [
            threading.Thread(target=self._client, args=(until,), daemon=True)
            for _ in range(2 * CAPACITY)
        ] + [threading.Thread(target=self._reference, args=(until,), daemon=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(LOAD_S + 180)  # admitted requests in flight at the end still finish
        assert not any(t.is_alive() for t in threads), "a client thread hung"


@pytest.fixture(scope="module")
def small_app(serve_http, demo_path):
    config = fault_config(
        demo_path,
        scheduler=SchedulerConfig(
            max_batch_slots=SLOTS, max_seq_len=128, step_token_budget=64, max_queue=QUEUE
        ),
        limits=LimitsConfig(retry_after_s=1),
    )
    with deployed(serve_http, "rel-overload", config) as (url, _):
        yield url


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def test_twice_capacity_rejects_fast_and_completes_the_admitted(small_app):
    url = small_app
    assert completion(url, max_tokens=MAX_TOKENS)[0] == 200  # warm
    load = Overload(url)
    load.run()

    assert load.other == [], load.other[:3]
    # Overloaded indeed: many rejections, and the admitted requests kept the slots busy.
    assert len(load.rejected) >= 20, f"only {len(load.rejected)} rejections"
    assert len(load.admitted) >= 2 * CAPACITY, f"only {len(load.admitted)} admitted"
    for reply in load.admitted:
        assert reply["choices"][0]["finish_reason"] == "length"
        assert reply["usage"]["completion_tokens"] == MAX_TOKENS
    for _, retry_after, reply in load.rejected:
        assert retry_after == "1", reply
        assert reply["error"]["code"] == "queue_full", reply
        assert reply["error"]["type"] == "server_overloaded", reply

    latencies = [lat for lat, _, _ in load.rejected]
    summary = json.dumps(
        {
            "rejected": len(latencies),
            "admitted": len(load.admitted),
            "median_ms": round(1000 * statistics.median(latencies), 1),
            "p90_ms": round(1000 * quantile(latencies, 0.90), 1),
            "p99_ms": round(1000 * quantile(latencies, 0.99), 1),
            "max_ms": round(1000 * max(latencies), 1),
            "models_median_ms": round(1000 * statistics.median(load.reference), 1),
            "models_p90_ms": round(1000 * quantile(load.reference, 0.90), 1),
        }
    )
    print(f"overload: {summary}")
    ref = load.reference
    assert statistics.median(latencies) <= REJECT_VS_MODELS * statistics.median(ref), summary
    assert quantile(latencies, 0.90) <= REJECT_VS_MODELS * quantile(ref, 0.90), summary
