"""A watch over the waits on a compiled fan-out: a graph whose call outlives the call timeout is
closed, so that the call returns.

Ray's compiled-graph channels bound the wait for data by a timeout, but take each channel's header
semaphore (in shared memory, held for a moment by every process that reads or writes the channel;
an idle shard polls its input channel all the time) with an untimed wait. A shard stopped while it
holds one (SIGSTOP, a frozen VM or node) leaves this process's call waiting for as long as the shard
stays stopped, and for good if it is then killed, whatever `call_timeout_s` says. Closing the
graph's channels (its teardown) posts those semaphores and makes the waiting call raise. Ray then
waits up to 10 s for the graph's actor loops to say why; the shards that do not answer within the
call timeout are reported failed at once (the pool kills and replaces them), which ends that wait
too, and the pool serves their rows from other copies.

Time goes by `time.monotonic()`; the watch wakes every quarter of the timeout, so a stuck call is
closed between 1 and 1.25 timeouts after it began.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import ray
from ray.exceptions import GetTimeoutError, RayError

log = logging.getLogger(__name__)


class GraphWatch:
    """Calls `close(graph)` once for a graph whose call, entered through `waiting(graph)`, has not
    returned `timeout_s` after it began. One call is watched at a time: the pool's forward thread
    is the only caller of a graph."""

    def __init__(self, timeout_s: float, close: Callable[[object], None]) -> None:
        self.timeout_s = timeout_s
        self._close = close
        self._call: tuple[float, object] | None = None  # (began, graph) of the call under way
        self._closed: object | None = None  # the graph closed for the call under way: once
        self._stop = threading.Event()
        threading.Thread(target=self._watch, daemon=True, name="graph-watch").start()

    @contextmanager
    def waiting(self, graph: object) -> Iterator[None]:
        """Around one call that may block on the graph's channels."""
        self._call = (time.monotonic(), graph)
        try:
            yield
        finally:
            self._call = self._closed = None  # holds no graph past its call

    def check(self, now: float) -> bool:
        """Close the graph of a call under way for more than timeout_s; True when it did."""
        call = self._call
        if call is None or now - call[0] <= self.timeout_s or call[1] is self._closed:
            return False
        self._closed = call[1]
        self._close(call[1])
        return True

    def _watch(self) -> None:
        while not self._stop.wait(self.timeout_s / 4):
            self.check(time.monotonic())

    def stop(self) -> None:
        self._stop.set()


def close_stuck(graph, timeout_s: float, on_failure: Callable[[int, BaseException], None],
                events: list[str]) -> None:  # fmt: skip
    """The watch's action on a fan-out graph: close it, then report each of its shards that does
    not answer a ping within timeout_s to `on_failure(shard, exc)`."""
    graph.teardown()
    events.append("compiled graph closed: a call outlived the timeout")
    log.warning("a compiled fan-out call outlived %.1f s; graph closed", timeout_s)
    for shard, exc in unresponsive(graph.actors, timeout_s):
        on_failure(shard, exc)


def unresponsive(actors: list, timeout_s: float) -> list[tuple[int, BaseException]]:
    """(index, error) of each actor that does not answer `pid()` within timeout_s (together)."""
    refs = [a.pid.remote() for a in actors]
    deadline = time.monotonic() + timeout_s
    failed = []
    for i, ref in enumerate(refs):
        try:
            ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
        except (GetTimeoutError, RayError) as exc:
            failed.append((i, exc))
    return failed
