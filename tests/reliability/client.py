"""Raw HTTP for the reliability tests: one request, one SSE stream, and a steady load.

Every call has a bounded timeout, so a hung server shows up as a failure, never as a hung test.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

from ..http_client import http as plain_http

KEY = "reliability-key"
TIMEOUT_S = 60.0


def http(
    method: str,
    url: str,
    body: bytes | None = None,
    key: str | None = KEY,
    timeout: float = TIMEOUT_S,
):
    """A plain request with this suite's API key and timeout."""
    return plain_http(method, url, body, key=key, timeout=timeout)


def completion(url: str, max_tokens: int = 8, stream: bool = False, timeout: float = TIMEOUT_S):
    body = {
        "model": "demo",
        "prompt": "Once upon a time",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }
    return http("POST", f"{url}/v1/completions", json.dumps(body).encode(), timeout=timeout)


def stream_outcome(url: str, timeout: float = TIMEOUT_S) -> str:
    """Stream one completion: "finished" (a finish_reason, then [DONE]), "error_event" (an
    OpenAI error object, then [DONE]), or what else happened ("status 500", "no [DONE]", ...)."""
    status, _, raw = completion(url, stream=True, timeout=timeout)
    if status != 200:
        return f"status {status}"
    lines = [ln[6:] for ln in raw.decode().splitlines() if ln.startswith("data: ")]
    if not lines or lines[-1] != "[DONE]":
        return "no [DONE]"
    chunks = [json.loads(ln) for ln in lines[:-1]]
    if chunks and "error" in chunks[-1]:
        return "error_event"
    if any(c["choices"] and c["choices"][0].get("finish_reason") for c in chunks):
        return "finished"
    return "no finish_reason"


@dataclass
class Load:
    """`clients` threads sending short non-streaming completions, `streamers` threads streaming,
    until the block ends. Exceptions (timeouts, resets) count as failures. The thread count is
    fixed, so the load is steady: throughput is `rate`, from the successes' start and end times."""

    url: str
    clients: int = 3
    streamers: int = 1
    ok: int = 0
    done: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of each success
    failed: list = field(default_factory=list)
    streams: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def _plain(self) -> None:
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                status, _, reply = completion(self.url)
            except Exception as exc:  # noqa: BLE001 - a timeout or reset is a failure to report
                status, reply = None, repr(exc)
            if status == 200:
                self.done.append((start, time.monotonic()))
                self.ok += 1
            else:
                self.failed.append((status, reply))

    def _streaming(self) -> None:
        while not self.stop.is_set():
            try:
                self.streams.append(stream_outcome(self.url))
            except Exception as exc:  # noqa: BLE001
                self.streams.append(repr(exc))

    def rate(self, start: float, end: float) -> float:
        """Non-streaming requests completed per second in [start, end) (monotonic times), each
        counted by the share of its duration inside the window: with a few requests per second,
        whole counts would move a window's rate by several percent per request. Requests still
        running are not counted yet: call this once the window's requests have ended."""
        share = sum(
            max(0.0, min(end, b) - max(start, a)) / (b - a) for a, b in list(self.done) if b > a
        )
        return share / (end - start)

    def wait_ok(self, n: int, timeout_s: float = 60.0) -> None:
        """Until `n` more non-streaming requests succeeded."""
        target, deadline = self.ok + n, time.monotonic() + timeout_s
        while self.ok < target and time.monotonic() < deadline:
            time.sleep(0.1)
        assert self.ok >= target, f"load stalled: {self.ok} ok, failures {self.failed[:3]}"

    def __enter__(self) -> Load:
        targets = [self._plain] * self.clients + [self._streaming] * self.streamers
        self._threads = [threading.Thread(target=t, daemon=True) for t in targets]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(TIMEOUT_S + 5)
        assert not any(t.is_alive() for t in self._threads), "a client thread hung"
