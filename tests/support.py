"""Plumbing the tests share: a free port, plain HTTP, waiting for a condition or a healthy server,
and a steady client load.

Every network call has a bounded timeout and every wait a deadline, so a hung server shows up as a
failure, never as a hung test.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import TypeVar
from urllib.error import HTTPError

T = TypeVar("T")

MODEL = "demo"
PROMPT = "Once upon a time"
COMPLETIONS = "/v1/completions"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(
    predicate: Callable[[], T],
    timeout_s: float,
    what: str | Callable[[], str],
    interval_s: float = 0.2,
) -> T:
    """Call `predicate` every `interval_s` until it returns something truthy, and return that.

    It is called at least once, and once more when `timeout_s` has passed; if it is still falsy
    then, AssertionError names `what` (a string, or a callable giving one then, to describe the
    state at that moment) and the predicate's last value. Exceptions of `predicate` propagate.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            name = what() if callable(what) else what
            raise AssertionError(f"{name}: not seen within {timeout_s} s (last: {value!r})")
        time.sleep(interval_s)


def http(
    method: str,
    url: str,
    body: bytes | None = None,
    key: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 120.0,
):
    """(status, headers, parsed JSON or raw bytes) of one plain HTTP request: what a client sees."""
    h = {"Content-Type": "application/json"} | (headers or {})
    if key:
        h["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=body, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, hdrs, raw = r.status, r.headers, r.read()
    except HTTPError as e:
        status, hdrs, raw = e.code, e.headers, e.read()
    try:
        return status, hdrs, json.loads(raw)
    except ValueError:
        return status, hdrs, raw


def moe_status(url: str, key: str | None = None) -> dict:
    """GET /v1/moe/status (the controller's report), asserted to answer 200."""
    code, _, body = http("GET", f"{url}/v1/moe/status", key=key)
    assert code == 200, body
    return body


def wait_healthy(url: str, timeout_s: float = 120.0, key: str | None = None) -> dict:
    """The body of `url`/health once it answers 200 with the engine's view (a dict with a
    "scheduler" entry; its "status" is "ok", or "draining" once a drain began). Refused
    connections, timeouts (10 s a try) and other answers (404 before the app is routed, 503) are
    tried again every 0.5 s until `timeout_s`."""
    last: object = None

    def healthy() -> dict | None:
        nonlocal last
        try:
            status, _, body = http("GET", f"{url}/health", key=key, timeout=10)
        except OSError as exc:  # not listening yet, or reset: ask again
            last = repr(exc)
            return None
        last = (status, body)
        ok = status == 200 and isinstance(body, dict) and "scheduler" in body
        return body if ok else None

    return wait_until(
        healthy, timeout_s, lambda: f"{url}/health answering 200 (last answer: {last})", 0.5
    )


def completion(
    url: str,
    key: str | None = None,
    *,
    max_tokens: int = 8,
    stream: bool = False,
    timeout: float = 60.0,
    model: str = MODEL,
    endpoint: str = COMPLETIONS,
):
    """One completion of PROMPT that runs to `max_tokens` (ignore_eos): http()'s triple."""
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }
    return http("POST", f"{url}{endpoint}", json.dumps(body).encode(), key=key, timeout=timeout)


def stream_outcome(
    url: str,
    key: str | None = None,
    *,
    max_tokens: int = 8,
    timeout: float = 60.0,
    model: str = MODEL,
    endpoint: str = COMPLETIONS,
) -> str:
    """Stream one completion: "finished" (a finish_reason, then [DONE]), "error_event" (an
    OpenAI error object, then [DONE]), or what else happened ("status 500", "no [DONE]", ...)."""
    status, _, raw = completion(
        url,
        key,
        max_tokens=max_tokens,
        stream=True,
        timeout=timeout,
        model=model,
        endpoint=endpoint,
    )
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


class Load:
    """A steady load while the `with` block runs: `clients` threads sending completions of
    `max_tokens` tokens (not streamed) one after another, and `streamers` threads streaming them,
    each request with API key `key` and a timeout of `timeout_s`. The thread count is fixed, so
    the load is steady.

    Outcomes: `done`, the (start, end) monotonic times of each successful non-streaming request
    (`ok` counts them; `rate` turns them into throughput); `failed`, (status, reply) of each that
    was not a 200, status None and the exception's repr where it raised (timeouts, resets);
    `streams`, each stream's outcome (stream_outcome()'s words, or the exception's repr).
    Leaving the block stops the threads and asserts that none hung.
    """

    def __init__(
        self,
        url: str,
        key: str | None = None,
        clients: int = 3,
        streamers: int = 0,
        *,
        max_tokens: int = 8,
        model: str = MODEL,
        endpoint: str = COMPLETIONS,
        timeout_s: float = 60.0,
    ) -> None:
        self.url, self.key, self.clients, self.streamers = url, key, clients, streamers
        self._request = {"max_tokens": max_tokens, "model": model, "endpoint": endpoint}
        self.timeout_s = timeout_s
        self.done: list[tuple[float, float]] = []
        self.failed: list = []
        self.streams: list[str] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def ok(self) -> int:
        """Non-streaming requests that succeeded so far."""
        return len(self.done)

    def _plain(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                status, _, reply = completion(
                    self.url, self.key, timeout=self.timeout_s, **self._request
                )
            except Exception as exc:  # noqa: BLE001 - a timeout or reset is a failure to report
                status, reply = None, repr(exc)
            if status == 200:
                self.done.append((start, time.monotonic()))
            else:
                self.failed.append((status, reply))

    def _streaming(self) -> None:
        while not self._stop.is_set():
            try:
                outcome = stream_outcome(
                    self.url, self.key, timeout=self.timeout_s, **self._request
                )
            except Exception as exc:  # noqa: BLE001 - reported as the stream's outcome
                outcome = repr(exc)
            self.streams.append(outcome)

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
        target = self.ok + n
        wait_until(
            lambda: self.ok >= target,
            timeout_s,
            lambda: (
                f"{n} more ok requests (load stalled: {self.ok} ok, failures {self.failed[:3]})"
            ),
            interval_s=0.1,
        )

    def __enter__(self) -> Load:
        targets = [self._plain] * self.clients + [self._streaming] * self.streamers
        self._threads = [threading.Thread(target=t, daemon=True) for t in targets]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout_s + 5)
        assert not any(t.is_alive() for t in self._threads), "a client thread hung"
