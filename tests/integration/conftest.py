"""Helpers of the integration tests; the session's one Ray and Serve live in tests/conftest.py
(shared with tests/reliability, so the whole run starts Ray once)."""

from __future__ import annotations


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
