"""The HTTP API on a real Ray Serve at 127.0.0.1, driven by the official `openai` client and raw
HTTP: outputs against in-process generation and transformers, batching, bad input, auth."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.client import HTTPConnection

import pytest
import torch

from serving.config import SchedulerConfig, ServeConfig
from serving.engine.cpu_bind import allowed_cores
from serving.engine.generate import generate
from serving.engine.sampling import SamplingParams
from serving.engine.tokenizer import TextTokenizer

from ..support import http as plain_http
from ..support import moe_status, wait_healthy

KEY = "test-key-123"
APP = "moe-serve-test"
pytestmark = pytest.mark.ray
FORWARD_CPUS = allowed_cores()[-1:]  # the engine's forward thread is kept on this CPU


def http(method: str, url: str, body: bytes | None = None, key: str | None = KEY, headers=None):
    """A plain request, with this module's API key unless told otherwise."""
    return plain_http(method, url, body, key=key, headers=headers)


@pytest.fixture(scope="module")
def server(serve_http, demo_path):
    from ray import serve

    from serving.api.app import application

    config = ServeConfig(
        api_key=KEY,
        model=str(demo_path),
        served_model_name="demo",
        scheduler=SchedulerConfig(max_batch_slots=16, step_token_budget=256, max_queue=64),
        engine_cpus=FORWARD_CPUS,  # every test here runs its forward passes on a bound thread
    )
    serve.run(application(config), name=APP, route_prefix="/", blocking=False)
    wait_healthy(serve_http)
    yield serve_http
    serve.delete(APP)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ref(demo_path):
    """In-process reference: (tokenizer, greedy(ids, n) -> token ids)."""
    from serving import load_model

    model = load_model(demo_path)
    tok = TextTokenizer(demo_path)

    def greedy(ids: list[int], n: int) -> list[int]:
        return list(
            generate(model, ids, SamplingParams(max_tokens=n, stop_token_ids=model.config.eos_ids))
        )

    return tok, greedy


def test_status_reports_the_cpus_the_forward_thread_is_kept_on(server):
    # Read from the forward thread itself: the binding took (serving/engine/cpu_bind.py).
    status = moe_status(server, KEY)
    assert status["engine_cpus"] == list(FORWARD_CPUS)
    # One core: the event loop (the scheduler's work between forward passes) is kept there too.
    assert status["loop_cpus"] == list(FORWARD_CPUS)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["demo"]


def test_completion_greedy_equals_generate_and_transformers(client, ref, demo_path):
    from transformers import MixtralForCausalLM

    tok, greedy = ref
    prompt = "The quick brown fox"
    ids = tok.encode(prompt)
    out = client.completions.create(model="demo", prompt=prompt, max_tokens=16, temperature=0)
    expected = greedy(ids, 16)
    assert out.choices[0].text == tok.decode(expected)
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.completion_tokens == len(expected)
    hf = MixtralForCausalLM.from_pretrained(demo_path, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_ids = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=16)[0, len(ids) :]
    assert hf_ids.tolist() == expected


def test_completion_from_token_ids_with_logprobs_and_echo(client, ref):
    tok, greedy = ref
    ids = [1, 40, 41, 42, 43]
    out = client.completions.create(
        model="demo", prompt=ids, max_tokens=6, temperature=0, logprobs=2
    )
    expected = greedy(ids, 6)
    assert out.choices[0].text == tok.decode(expected)
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == len(expected) and all(v <= 0 for v in lp.token_logprobs)
    assert all(len(top) == 2 for top in lp.top_logprobs)
    echoed = client.completions.create(
        model="demo", prompt="Hi there", max_tokens=3, temperature=0, echo=True
    )
    assert echoed.choices[0].text.startswith("Hi there")


def test_completion_stream_equals_non_stream(client, ref):
    tok, greedy = ref
    prompt = "Hello, world!"
    chunks = list(
        client.completions.create(
            model="demo",
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == tok.decode(greedy(tok.encode(prompt), 12))
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals in (["length"], ["stop"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_chat_streamed_and_not_equal_generate(client, ref):
    tok, greedy = ref
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is MoE?"},
    ]
    expected = tok.decode(greedy(tok.encode_chat(messages), 10))
    out = client.chat.completions.create(
        model="demo", messages=messages, max_tokens=10, temperature=0
    )
    assert out.choices[0].message.content == expected
    assert out.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model="demo", messages=messages, max_tokens=10, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_raw_stream_is_openai_sse_ending_with_done(server):
    body = json.dumps({"model": "demo", "prompt": "Hi", "max_tokens": 3, "stream": True}).encode()
    status, headers, raw = http("POST", f"{server}/v1/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = raw.decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ")
        assert json.loads(event[6:])["object"] == "text_completion"


def test_sixteen_concurrent_requests_are_batched_and_independent(server, ref):
    from openai import AsyncOpenAI

    tok, greedy = ref
    prompts = [f"Request number {i}: tell me about expert {i * 7}" for i in range(16)]
    lengths = [8 + i % 9 for i in range(16)]

    async def main():
        client = AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)
        calls = [
            client.completions.create(model="demo", prompt=p, max_tokens=n, temperature=0)
            for p, n in zip(prompts, lengths, strict=True)
        ]
        return await asyncio.gather(*calls)

    outs = asyncio.run(main())
    for p, n, out in zip(prompts, lengths, outs, strict=True):
        assert out.choices[0].text == tok.decode(greedy(tok.encode(p), n))
    stats = wait_healthy(server)["scheduler"]
    assert stats["max_step_batch"] > 1
    # Every slot free again: the KV cache holds room for the controller's batch fallback too.
    assert stats["in_flight"] == 0 and stats["free_slots"] == stats["cache_slots"] >= 16
    assert stats["slot_limit"] == 16


def test_client_disconnect_cancels_the_request(server):
    """A streaming client that goes away: the engine stops generating for it and frees the slot."""
    before = wait_healthy(server)["scheduler"]["steps"]
    host, port = server.removeprefix("http://").split(":")
    conn = HTTPConnection(host, int(port), timeout=120)
    body = {
        "model": "demo",
        "prompt": "Go on",
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    conn.request("POST", "/v1/completions", json.dumps(body), headers)
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    conn.sock.close()  # the client vanishes mid-stream
    conn.close()
    while (stats := wait_healthy(server)["scheduler"])["in_flight"]:
        time.sleep(0.2)
    assert stats["steps"] - before < 1000  # it did not run its 1500 tokens to the end
    assert stats["free_slots"] == stats["cache_slots"]


def test_bench_against_the_server(server, tmp_path, capsys):
    from serving.cli.command import main

    plot = tmp_path / "tokens.png"
    argv = ["bench", "--url", server, "--api-key", KEY, "--num-prompts", "4"]
    argv += ["--input-len", "8", "--output-len", "5", "--seed", "1", "--json", "--plot", str(plot)]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["completed"] == 4 and summary["failed"] == 0
    assert summary["total_output_tokens"] == 20 and summary["total_input_tokens"] == 32
    assert summary["output_tokens_per_ms"] > 0 and summary["p50_ttft_ms"] <= summary["p99_ttft_ms"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The engine's step accounting over exactly this run (drawn beside the curve in the plot).
    assert sum(summary["efficiency"]["fractions"].values()) == pytest.approx(1.0, abs=0.02)


LONG = {"model": "demo", "prompt": [5] * 2100}


@pytest.mark.parametrize(
    "path, body, status, param, says",
    [
        ("completions", b"{not json", 400, None, "not valid JSON"),
        ("completions", b"[1, 2, 3]", 400, None, "JSON object"),
        ("completions", {"prompt": "hi"}, 400, "model", "model"),
        (
            "completions",
            {"model": "demo", "prompt": "hi", "max_tokens": "8"},
            400,
            "max_tokens",
            "integer",
        ),
        (
            "completions",
            {"model": "demo", "prompt": "hi", "max_tokens": 0},
            400,
            "max_tokens",
            "greater than 0",
        ),
        (
            "completions",
            {"model": "demo", "prompt": "hi", "max_tokens": 5000},
            400,
            "max_tokens",
            "5000",
        ),
        ("completions", LONG, 400, "prompt", "2100"),
        ("completions", {"model": "demo", "prompt": [1, 99999]}, 400, "prompt", "99999"),
        ("completions", {"model": "demo", "prompt": "hi", "n": 2}, 400, "n", "n=1"),
        ("completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model", "gpt-4"),
        ("completions", {"model": "demo", "prompt": []}, 400, "prompt", "empty"),
        ("chat/completions", {"model": "demo", "messages": "hi"}, 400, "messages", "list"),
        (
            "chat/completions",
            {"model": "demo", "messages": [{"role": "tool", "content": "x"}]},
            400,
            "messages.0.role",
            "role",
        ),
        (
            "chat/completions",
            {"model": "demo", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1},
            400,
            "max_tokens",
            "greater than 0",
        ),
    ],
)
def test_bad_input_is_a_4xx_error_object_and_the_server_stays_healthy(
    server, path, body, status, param, says
):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, _, reply = http("POST", f"{server}/v1/{path}", raw)
    assert got == status, reply
    err = reply["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and says in err["message"]
    assert http("GET", f"{server}/health", key=None)[0] == 200


def test_context_errors_give_both_numbers(server):
    _, _, reply = http("POST", f"{server}/v1/completions", json.dumps(LONG).encode())
    assert "2100" in reply["error"]["message"] and "2048" in reply["error"]["message"]


def test_body_over_the_limit_is_413(server):
    body = json.dumps({"model": "demo", "prompt": "a" * 1_100_000}).encode()
    status, _, reply = http("POST", f"{server}/v1/completions", body)
    assert status == 413 and reply["error"]["code"] == "request_too_large"
    assert http("GET", f"{server}/health", key=None)[0] == 200


def test_unknown_route_is_404_error_object(server):
    status, _, reply = http("GET", f"{server}/v1/nothing-here")
    assert status == 404 and set(reply["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    "method, path", [("GET", "models"), ("POST", "completions"), ("POST", "chat/completions")]
)
@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_api_key_is_required_on_every_v1_route(server, method, path, key):
    body = json.dumps({"model": "demo", "prompt": "hi"}).encode() if method == "POST" else None
    status, _, reply = http(method, f"{server}/v1/{path}", body, key=key)
    assert status == 401 and reply["error"]["code"] == "invalid_api_key"


def test_health_needs_no_key(server):
    status, _, body = http("GET", f"{server}/health", key=None)
    assert status == 200 and body["status"] == "ok"


class Streamer(threading.Thread):
    """One streamed completion read in the background: `admitted` is set once the response
    headers arrive, `first_token` at the first chunk; `usage`/`finish` when it ends."""

    def __init__(self, url: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.max_tokens = url, max_tokens
        self.admitted, self.first_token = threading.Event(), threading.Event()
        self.status = self.usage = self.finish = None
        self.done = False
        self.start()

    def run(self) -> None:
        try:
            self._read()
        finally:  # so that a waiting test wakes up even if this thread failed
            self.admitted.set()
            self.first_token.set()

    def _read(self) -> None:
        host, port = self.url.removeprefix("http://").split(":")
        conn = HTTPConnection(host, int(port), timeout=300)
        body = {
            "model": "demo",
            "prompt": "Once upon a time",
            "max_tokens": self.max_tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
        conn.request("POST", "/v1/completions", json.dumps(body), headers)
        resp = conn.getresponse()
        self.status = resp.status
        self.admitted.set()
        for line in resp:
            line = line.decode().strip()
            if line == "data: [DONE]":
                self.done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                self.first_token.set()
                if chunk.get("usage"):
                    self.usage = chunk["usage"]
                for choice in chunk.get("choices", []):
                    self.finish = choice["finish_reason"] or self.finish
        conn.close()
