"""One plain HTTP request for the tests (urllib, bounded by a timeout): what a client sees."""

from __future__ import annotations

import json
import urllib.request
from urllib.error import HTTPError


def http(
    method: str,
    url: str,
    body: bytes | None = None,
    key: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 120.0,
):
    """(status, headers, parsed JSON or raw bytes) of one plain HTTP request."""
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
