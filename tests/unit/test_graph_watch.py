"""experts/graph_watch.py's decision: which call is stuck, and each graph closed once."""

from __future__ import annotations

import time

from experts.graph_watch import GraphWatch


def test_a_call_is_closed_once_past_the_timeout_and_only_while_under_way() -> None:
    closed: list[object] = []
    watch = GraphWatch(60.0, closed.append)  # its own thread wakes every 15 s: not in this test
    graph, other = object(), object()
    try:
        assert not watch.check(time.monotonic() + 120)  # no call under way
        with watch.waiting(graph):
            began = time.monotonic()
            assert not watch.check(began + 30)  # within the timeout
            assert watch.check(began + 61)
            assert not watch.check(began + 90)  # closed already
        assert closed == [graph]
        assert not watch.check(time.monotonic() + 120)  # the call returned
        with watch.waiting(other):
            assert watch.check(time.monotonic() + 61)  # another graph: closed too
        assert closed == [graph, other]
    finally:
        watch.stop()
