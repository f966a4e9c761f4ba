"""Property-based fuzzing of both POST routes (issue 7, fault test 8): hypothesis generates 500
bodies (250 per route) — arbitrary JSON, wrong types, huge and negative numbers, nested junk, and
valid-looking requests — sent as raw HTTP to a live app at 127.0.0.1. No body may get a 5xx, every
4xx carries OpenAI's error object, and the server is healthy afterwards.

The app's context is 32 tokens, so even a valid request generates at most a few tokens: the run
stays cheap whatever hypothesis draws.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.config import SchedulerConfig
from tests.reliability.client import completion, http
from tests.reliability.conftest import MODEL, deployed, fault_config

pytestmark = pytest.mark.ray

EXAMPLES_PER_ROUTE = 250
FUZZ = settings(
    max_examples=EXAMPLES_PER_ROUTE,
    deadline=None,  # a live server on 2 shared cores: latency is not what is under test
    derandomize=True,  # the same bodies on every run: a CI failure reproduces
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Any JSON value: the body as a whole, or the value of a known field.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()  # NaN and ±Infinity too: Python's json writes and reads them
    | st.text(max_size=40)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
small_ints = st.integers(min_value=-3, max_value=6)
token_ids = st.lists(st.integers(min_value=-5, max_value=300), max_size=8)
roles = st.sampled_from(["system", "user", "assistant", "tool", "", "USER"]) | json_values
messages = (
    st.lists(
        st.fixed_dictionaries({"role": roles, "content": st.text(max_size=30) | json_values}),
        max_size=3,
    )
    | json_values
)

COMMON = {
    "model": st.sampled_from([MODEL, "other"]) | json_values,
    "max_tokens": small_ints | json_values,
    "temperature": st.floats(min_value=-1, max_value=3) | json_values,
    "top_p": st.floats(min_value=-1, max_value=2) | json_values,
    "seed": st.integers(min_value=-(2**65), max_value=2**65) | json_values,
    "stop": st.lists(st.text(max_size=4), max_size=6) | json_values,
    "stream": st.booleans() | json_values,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | json_values,
    "logprobs": st.booleans() | small_ints | json_values,
    "ignore_eos": st.booleans(),
    "n": small_ints,
    "user": json_values,
}


def bodies(specific: dict) -> st.SearchStrategy:
    """Bodies for one route: valid-looking (known fields, any subset), junk JSON, or not JSON."""
    fields = COMMON | specific
    optional = {k: v for k, v in fields.items() if k != "model"}
    # Mostly the served model, so most valid-looking bodies get past the model check.
    model = st.one_of(st.just(MODEL), st.just(MODEL), st.just(MODEL), fields["model"])
    valid_looking = st.fixed_dictionaries({"model": model}, optional=optional).map(json.dumps)
    junk = json_values.map(json.dumps)
    raw = st.binary(max_size=64)
    return st.one_of(valid_looking, valid_looking, junk, raw)


COMPLETION_BODIES = bodies(
    {
        "prompt": st.text(max_size=40) | token_ids | st.lists(token_ids, max_size=2) | json_values,
        "echo": st.booleans() | json_values,
        "suffix": json_values,
    }
)
CHAT_BODIES = bodies(
    {
        "messages": messages,
        "max_completion_tokens": small_ints | json_values,
        "top_logprobs": small_ints | json_values,
        "tools": json_values,
    }
)


@pytest.fixture(scope="module")
def url(serve_http, demo_path):
    config = fault_config(
        demo_path,
        scheduler=SchedulerConfig(max_batch_slots=4, max_seq_len=32, step_token_budget=64),
    )
    with deployed(serve_http, "rel-fuzz", config) as (base, _router):
        yield base
        # Healthy afterwards: /health answers ok and a plain request still completes.
        status, _, body = http("GET", f"{base}/health", key=None)
        assert status == 200 and body["status"] == "ok", body
        status, _, reply = completion(base, max_tokens=4)
        assert status == 200 and reply["usage"]["completion_tokens"] == 4, reply


def check(url: str, path: str, body: str | bytes) -> None:
    data = body.encode() if isinstance(body, str) else body
    status, _, reply = http("POST", f"{url}{path}", data, timeout=30)
    assert status < 500, (status, body, reply)
    if status >= 400:
        assert isinstance(reply, dict), (status, body, reply)
        error = reply.get("error")
        assert isinstance(error, dict) and isinstance(error.get("message"), str), reply
        assert {"type", "param", "code"} <= error.keys(), reply


@FUZZ
@given(body=COMPLETION_BODIES)
def test_fuzz_completions(url, body):
    check(url, "/v1/completions", body)


@FUZZ
@given(body=CHAT_BODIES)
def test_fuzz_chat_completions(url, body):
    check(url, "/v1/chat/completions", body)
