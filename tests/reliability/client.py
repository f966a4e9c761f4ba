"""Raw HTTP for the reliability tests: tests/support.py's request, completion and SSE stream with
this suite's API key and timeout (the steady load is tests.support.Load, given KEY).

Every call has a bounded timeout, so a hung server shows up as a failure, never as a hung test.
"""

from __future__ import annotations

from tests import support

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
    return support.http(method, url, body, key=key, timeout=timeout)


def completion(url: str, max_tokens: int = 8, stream: bool = False, timeout: float = TIMEOUT_S):
    return support.completion(url, KEY, max_tokens=max_tokens, stream=stream, timeout=timeout)


def stream_outcome(url: str, timeout: float = TIMEOUT_S) -> str:
    """support.stream_outcome: "finished", "error_event", or what else happened."""
    return support.stream_outcome(url, KEY, timeout=timeout)
