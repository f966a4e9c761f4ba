"""The OpenAI wire format and the serving config: what is accepted, what is refused and how."""

from __future__ import annotations

import json

import pytest

from serving.api import protocol as p
from serving.config import ServeConfig, config_from_args, load_config
from serving.errors import UserError

from ..conftest import REPO


def parse(body: dict | bytes, kind=p.CompletionRequest):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return p.parse_request(raw, kind)


def refused(body: dict | bytes, kind=p.CompletionRequest) -> p.ApiError:
    with pytest.raises(p.ApiError) as info:
        parse(body, kind)
    assert info.value.status == 400
    err = info.value.body()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    return info.value


OK = {"model": "m", "prompt": "hi"}


@pytest.mark.parametrize(
    "body, param",
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'"text"', None),
        ({"prompt": "hi"}, "model"),
        ({"model": "m"}, "prompt"),
        (OK | {"max_tokens": "16"}, "max_tokens"),
        (OK | {"max_tokens": 0}, "max_tokens"),
        (OK | {"max_tokens": 1.5}, "max_tokens"),
        (OK | {"temperature": -1}, "temperature"),
        (OK | {"temperature": "hot"}, "temperature"),
        (OK | {"top_p": 0}, "top_p"),
        (OK | {"n": 2}, "n"),
        (OK | {"best_of": 3}, "best_of"),
        (OK | {"stream": "yes"}, "stream"),
        (OK | {"stop": [1, 2]}, "stop"),
        (OK | {"logprobs": 9}, "logprobs"),
        (OK | {"presence_penalty": 0.5}, "presence_penalty"),
        (OK | {"max_token": 5}, "max_token"),
        ({"model": "m", "prompt": [1, True]}, "prompt"),
        ({"model": "m", "prompt": [1, 2.0]}, "prompt"),
        ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "m", "prompt": {"text": "hi"}}, "prompt"),
        ({"model": 3, "prompt": "hi"}, "model"),
    ],
)
def test_completion_bad_input_names_the_field(body, param):
    assert refused(body).param == param


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": "m"}, "messages"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": "hi"}, "messages"),
        ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"model": "m", "messages": [{"role": "user"}]}, "messages.0.content"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 99},
            "top_logprobs",
        ),
    ],
)
def test_chat_bad_input_names_the_field(body, param):
    assert refused(body, p.ChatCompletionRequest).param == param


def test_accepted_forms_are_normalised():
    assert parse({"model": "m", "prompt": ["one"]}).prompt == "one"
    assert parse({"model": "m", "prompt": [[5, 6]]}).prompt == [5, 6]
    assert parse(OK | {"stop": "x"}).stop == ("x",)
    req = parse(OK | {"stream": True, "stream_options": {"include_usage": True}})
    assert req.include_usage
    chat = parse(
        {
            "model": "m",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                }
            ],
            "max_completion_tokens": 7,
        },
        p.ChatCompletionRequest,
    )
    assert chat.messages[0].text() == "ab" and chat.token_limit == 7


def test_sse_is_openais_framing():
    assert p.sse({"a": 1}) == b'data: {"a":1}\n\n'
    assert p.SSE_DONE == b"data: [DONE]\n\n"


def test_responses_have_openais_shape():
    use = p.usage(3, 4)
    assert use == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    r = p.chat_response("id", "m", "hello", "stop", use)
    assert r["object"] == "chat.completion"
    assert r["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
    chunk = p.completion_chunk("id", "m", "x")
    assert chunk["usage"] is None and chunk["choices"][0]["finish_reason"] is None
    lp = p.completion_logprobs([1, 2], [-0.5, -1.0], [{1: -0.5}, {2: -1.0}], lambda t: "ab"[t - 1])
    assert lp == {
        "tokens": ["a", "b"],
        "token_logprobs": [-0.5, -1.0],
        "top_logprobs": [{"a": -0.5}, {"b": -1.0}],
        "text_offset": [0, 1],
    }


def test_error_body_shape():
    err = p.ApiError(
        503, "busy", "server_overloaded", code="queue_full", headers={"Retry-After": "1"}
    )
    assert err.body() == {
        "error": {
            "message": "busy",
            "type": "server_overloaded",
            "param": None,
            "code": "queue_full",
        }
    }


def test_repo_serve_yaml_loads_and_is_a_ray_serve_config():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    path = REPO / "configs" / "serve.yaml"
    config = load_config(path)
    assert config.host == "127.0.0.1" and config.scheduler.max_batch_slots > 1
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    assert schema.applications[0].import_path == "serving.api.app:build_app"


def test_config_errors_are_one_line_naming_the_field(tmp_path):
    bad = tmp_path / "serve.yaml"
    bad.write_text("applications:\n  - args:\n      scheduler:\n        max_batch_slots: zero\n")
    with pytest.raises(UserError, match=r"applications\[0\]\.args\.scheduler\.max_batch_slots"):
        load_config(bad)
    bad.write_text("applications: [ {")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(UserError, match="max_ongoing_requests"):
        config_from_args({"max_ongoing_requests": 4})
    with pytest.raises(UserError, match="step_token_budget"):
        config_from_args({"scheduler": {"max_batch_slots": 8, "step_token_budget": 4}})
    with pytest.raises(UserError, match="unknown_field"):
        config_from_args({"unknown_field": 1})
    assert ServeConfig().host == "127.0.0.1"
