"""Two engine deployments sharing two ExpertShards through HTTP (config.engine_replicas): answers
equal in-process generation, both engines serve, they call the same shards, the controller's
reading covers both, and a rebalance asked of one reaches both."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from serving.config import MonitoringConfig
from serving.control.controller import Decision
from serving.control.controller_app import _applier, _counters_reader
from serving.engine.generate import generate
from serving.engine.sampling import SamplingParams
from serving.engine.tokenizer import TextTokenizer

from ..support import Load, wait_healthy, wait_until
from .test_controller_live import KEY, demo_app

APP = "moe-serve-engines"
ENGINES = ("Engine", "Engine-1")
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def app(serve_http, demo_path):
    from ray import serve

    monitoring = MonitoringConfig(period_s=1.0, metrics=False, controller=False)
    with demo_app(serve_http, demo_path, APP, engine_replicas=2, monitoring=monitoring) as (url, _):
        yield url, [serve.get_deployment_handle(name, app_name=APP) for name in ENGINES]


@pytest.fixture(scope="module")
def greedy(demo_path):
    from serving import load_model

    model, tok = load_model(demo_path), TextTokenizer(demo_path)

    def text(prompt: str, n: int) -> str:
        params = SamplingParams(max_tokens=n, stop_token_ids=model.config.eos_ids)
        return tok.decode(list(generate(model, tok.encode(prompt), params)))

    return text


def complete(url: str, prompts: list[str], n: int) -> list[str]:
    from openai import AsyncOpenAI

    async def main():
        client = AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
        calls = [client.completions.create(model="demo", prompt=p, max_tokens=n, temperature=0)
                 for p in prompts]  # fmt: skip
        return await asyncio.gather(*calls)

    return [out.choices[0].text for out in asyncio.run(main())]


def _ids(actors) -> list[str]:
    return [a._actor_id.hex() for a in actors]


def test_two_engines_share_the_shards_and_answer_as_one(app, greedy):
    url, engines = app
    prompts = [f"Request {i}: tell me about expert {i * 3}" for i in range(8)]
    assert complete(url, prompts, 12) == [greedy(p, 12) for p in prompts]
    stats = wait_healthy(url)["scheduler"]
    assert len(stats["engines"]) == 2
    assert all(e["tokens_generated"] > 0 for e in stats["engines"])  # both served
    assert stats["tokens_generated"] == sum(e["tokens_generated"] for e in stats["engines"])
    shards = [_ids(e.expert_shards.remote().result()) for e in engines]
    assert len(shards[0]) == 2 and shards[0] == shards[1]
    status = engines[0].status.remote().result()
    assert status["expert_transport"] == "plain (shared)"
    from serving.cli.status import fetch_status, render

    report = fetch_status(url, KEY)  # what `moe-serve status` reads
    assert report.engine_replicas == 2 and "engine replicas       2" in render(report)


def test_the_controller_reads_both_engines_and_a_rebalance_reaches_both(app, greedy):
    url, engines = app
    complete(url, ["warm both engines", "and the other one"], 4)
    merged = _counters_reader(APP, ENGINES, 0)()
    each = [e.counters.remote().result()["tokens_generated"] for e in engines]
    assert merged.tokens_generated == sum(each) and min(each) > 0
    _applier(APP, ENGINES)(Decision(action="rebalance", reason="test"))
    for engine in engines:
        wait_until(
            lambda e=engine: (complete(url, ["tick"], 1), "switched to placement version 1"
                              in e.expert_events.remote().result())[1],
            60, "the engine took the new placement", interval_s=0.5,
        )  # fmt: skip
    prompts = ["After the switch", "both engines still answer"]
    assert complete(url, prompts, 12) == [greedy(p, 12) for p in prompts]


def test_a_lost_shard_owner_is_restarted_and_the_engines_serve_on_its_new_shards(app, greedy):
    """The ExpertShards replica killed (its shards die with it): requests meanwhile fail with a
    503 that says retry, or succeed; Serve starts the owner again, it starts new shards, and both
    engines take them at their next poll and answer as before."""
    from ray import serve

    url, engines = app
    owner = serve.get_deployment_handle("ExpertShards", app_name=APP)
    before = _ids(engines[0].expert_shards.remote().result())
    with Load(url, KEY, 2, max_tokens=8, timeout_s=120.0) as load:
        load.wait_ok(2)
        os.kill(owner.pid.remote().result(), signal.SIGKILL)
        for engine in engines:
            wait_until(lambda e=engine: (s := _ids(e.expert_shards.remote().result())) and
                       not set(s) & set(before), 120, "the engine on the new shards")  # fmt: skip
        load.wait_ok(4, timeout_s=120)
    assert all(status == 503 and "retry" in str(reply).lower() for status, reply in load.failed), (
        load.failed
    )
    prompts = ["After the owner came back", "both engines answer again"]
    assert complete(url, prompts, 12) == [greedy(p, 12) for p in prompts]
