"""Several engines behind one ingress (serving/api/streams.py EngineChoice), each engine a real
scheduler wired to its stream in one process: requests spread over the engines and get their own
tokens; a full or unreachable engine passes the request on; when every one refuses, the refusal
stands."""

from __future__ import annotations

import asyncio

import pytest

from serving import load_model
from serving.api.streams import EngineChoice, EngineStreams, IngressStreams
from serving.config import SchedulerConfig
from serving.engine.generate import generate
from serving.engine.requests import Admission, Event, Job
from serving.engine.sampling import SamplingParams
from serving.engine.scheduler import Scheduler

from .test_scheduler import prompts
from .test_streams import wired


@pytest.fixture(scope="module")
def model(demo_path):
    return load_model(demo_path)


def scheduler(model, slots: int = 4, queue: int = 64) -> Scheduler:
    return Scheduler(model, SchedulerConfig(max_batch_slots=slots, step_token_budget=64,
                                            max_queue=queue))  # fmt: skip


def unreachable() -> IngressStreams:
    async def submit(job, stream, request):
        raise ConnectionError("the engine's replica died")

    async def no_events(stream):
        return
        yield

    return IngressStreams(submit, no_events, lambda request: None)


def hanging() -> IngressStreams:
    """An engine whose replica is gone: Serve's handle holds the call until another is up."""

    async def submit(job, stream, request):
        await asyncio.Event().wait()

    async def no_events(stream):
        await asyncio.Event().wait()
        yield

    return IngressStreams(submit, no_events, lambda request: None)


def breaking(tokens_first: int) -> IngressStreams:
    """An engine that admits, sends `tokens_first` tokens, then its stream breaks (it died)."""
    requests: list[str] = []

    async def submit(job, stream, request):
        requests.append(request)
        return Admission(True)

    async def open_stream(stream):
        while not requests:
            await asyncio.sleep(0)
        for _ in range(tokens_first):
            yield [(requests[0], [Event(token=7)])]
        raise ConnectionError("the engine's replica died")

    return IngressStreams(submit, open_stream, lambda request: None)


async def run(choice: EngineChoice, job: Job, streamed: bool = True) -> list:
    return [item async for item in choice.generate(job, streamed)]


def test_requests_spread_over_engines_and_get_their_own_tokens(model):
    jobs = [Job(tuple(p), SamplingParams(max_tokens=3 + i % 4)) for i, p in enumerate(prompts(8))]

    async def main():
        engines = [scheduler(model), scheduler(model)]
        choice = EngineChoice([wired(EngineStreams(s)) for s in engines])
        return await asyncio.gather(*(run(choice, job) for job in jobs)), engines, choice

    results, engines, choice = asyncio.run(main())
    for job, items in zip(jobs, results, strict=True):
        assert items[0].admitted
        tokens = [e.token for batch in items[1:] for e in batch]
        assert tokens == list(generate(model, list(job.prompt), job.params))
    # In turn (the first to engine 1), as all were in flight together.
    assert [s.tokens_generated for s in engines] == [
        sum(j.params.max_tokens for j in jobs[i::2]) for i in (1, 0)
    ]
    assert choice.in_flight == [0, 0]


def test_a_full_engine_passes_the_request_on(model):
    job = Job(tuple(prompts(1)[0]), SamplingParams(max_tokens=3))

    async def main():
        full, free = scheduler(model, slots=1, queue=0), scheduler(model)
        choice = EngineChoice([wired(EngineStreams(full)), wired(EngineStreams(free))])
        busy = choice.generate(job)  # takes the full engine's only slot
        assert (await anext(busy)).admitted
        choice._turn = len(choice.engines) - 1  # the full engine comes first in turn again
        choice.in_flight = [0, 0]
        second = await run(choice, job)
        rest = [x async for x in busy]
        return second, rest, full, free

    second, rest, full, free = asyncio.run(main())
    assert second[0].admitted and second[-1][-1].finish_reason == "length"
    assert rest[-1][-1].finish_reason == "length"
    assert full.tokens_generated == 3 and free.tokens_generated == 3


def test_an_unreachable_engine_passes_the_request_on(model):
    job = Job(tuple(prompts(1)[0]), SamplingParams(max_tokens=3))

    async def main():
        choice = EngineChoice([unreachable(), wired(EngineStreams(scheduler(model)))])
        return [await run(choice, job) for _ in range(3)], choice

    results, choice = asyncio.run(main())
    for items in results:
        assert items[0].admitted
        assert [e.token for batch in items[1:] for e in batch] == list(
            generate(model, list(job.prompt), job.params)
        )
    assert choice.in_flight == [0, 0]


def test_an_engine_lost_before_the_client_saw_a_token_passes_the_request_on(model):
    job = Job(tuple(prompts(1)[0]), SamplingParams(max_tokens=3))

    async def main(tokens_first: int, streamed: bool = True):
        other = scheduler(model)
        choice = EngineChoice([breaking(tokens_first), wired(EngineStreams(other))])
        choice._turn = len(choice.engines) - 1  # the breaking engine first
        return await run(choice, job, streamed), other

    items, other = asyncio.run(main(0))
    assert [type(x) for x in items].count(Admission) == 1 and items[0].admitted
    tokens = [e.token for batch in items[1:] for e in batch]
    assert tokens == list(generate(model, list(job.prompt), job.params))
    assert other.tokens_generated == 3
    # After a token went out, the request stays: its stream ends with a retryable error.
    items, other = asyncio.run(main(1))
    events = [e for batch in items[1:] for e in batch]
    assert [e.token for e in events] == [7, None] and events[-1].finish_reason == "error"
    assert events[-1].retryable and other.tokens_generated == 0
    # Answered whole, nothing went out: the request starts again on the other engine.
    items, other = asyncio.run(main(1, streamed=False))
    assert [type(x) for x in items].count(Admission) == 1 and items[0].admitted
    tokens = [e.token for batch in items[1:] for e in batch]
    assert tokens == list(generate(model, list(job.prompt), job.params))
    assert other.tokens_generated == 3


def test_an_engine_that_does_not_admit_in_time_is_passed_and_tried_last(model):
    job = Job(tuple(prompts(1)[0]), SamplingParams(max_tokens=3))

    async def main():
        other = scheduler(model)
        choice = EngineChoice([hanging(), wired(EngineStreams(other))], admission_timeout_s=0.2)
        choice._turn = len(choice.engines) - 1  # the hanging engine first
        first = await run(choice, job)
        choice._turn = len(choice.engines) - 1  # first in turn again, but down: tried last
        second = await asyncio.wait_for(run(choice, job), 5)
        return first, second, other, choice

    first, second, other, choice = asyncio.run(main())
    for items in (first, second):
        assert items[0].admitted and items[-1][-1].finish_reason == "length"
    assert other.tokens_generated == 6 and choice.in_flight == [0, 0]
    assert choice.down_until[0] > choice.down_until[1]


def test_when_every_engine_refuses_the_refusal_stands(model):
    job = Job(tuple(prompts(1)[0]), SamplingParams(max_tokens=3))

    async def main():
        engines = [scheduler(model, slots=1, queue=0) for _ in range(2)]
        choice = EngineChoice([wired(EngineStreams(s)) for s in engines])
        busy = [choice.generate(job) for _ in range(2)]
        assert all([(await anext(b)).admitted for b in busy])
        refused = await run(choice, job)
        for b in busy:
            [x async for x in b]
        return refused

    refused = asyncio.run(main())
    assert len(refused) == 1 and not refused[0].admitted and refused[0].reason


def test_the_last_engine_unreachable_raises():
    async def main():
        choice = EngineChoice([unreachable(), unreachable()])
        return await run(choice, Job((1, 2), SamplingParams(max_tokens=1)))

    with pytest.raises(ConnectionError):
        asyncio.run(main())


def test_engines_that_do_not_serve_are_not_tried_until_they_do(model):
    """An engine the controller has not started (no replica: a call would wait) takes nothing;
    once the serving view says it runs, requests reach it."""
    job = Job(tuple(prompts(1)[0]), SamplingParams(max_tokens=3))
    view = [True, False]

    async def read_serving():
        return list(view)

    async def main():
        started = scheduler(model)
        choice = EngineChoice(
            [wired(EngineStreams(scheduler(model))), hanging()],
            serving=[True, False], read_serving=read_serving, refresh_s=0.0,
        )  # fmt: skip
        before = [await run(choice, job) for _ in range(3)]  # the hanging one is never tried
        choice.engines[1] = wired(EngineStreams(started))  # its replica is up
        view[1] = True
        await run(choice, job)  # the next request starts the refresh
        await asyncio.sleep(0)
        after = await asyncio.gather(*(run(choice, job) for _ in range(4)))
        return before, after, started, choice

    before, after, started, choice = asyncio.run(main())
    assert all(items[0].admitted for items in before + list(after))
    assert choice.serving == [True, True]
    assert started.tokens_generated >= 6  # of the 4 in flight together, it took half
    assert choice.down_until == [0.0, 0.0]  # nobody waited on the unstarted engine


def test_a_draining_engine_passes_requests_on_and_goes_last(model):
    job = Job(tuple(prompts(1)[0]), SamplingParams(max_tokens=3))

    async def main():
        leaving, staying = scheduler(model), scheduler(model)
        leaving.draining = True  # the controller is removing it
        choice = EngineChoice([wired(EngineStreams(leaving)), wired(EngineStreams(staying))])
        choice._turn = len(choice.engines) - 1  # the draining engine comes first in turn
        results = [await run(choice, job) for _ in range(2)]
        return results, leaving, staying, choice

    results, leaving, staying, choice = asyncio.run(main())
    assert all(items[0].admitted for items in results)
    assert leaving.tokens_generated == 0 and staying.tokens_generated == 6
    assert choice.down_until[0] > 0 and choice.down_until[1] == 0.0


def test_stats_totals_drain_only_when_every_engine_does():
    from serving.api.engines import total_stats

    leaving, staying = {"running": 1, "draining": True}, {"running": 2, "draining": False}
    total = total_stats([leaving, staying, None])  # the third did not answer
    assert (total["running"], total["draining"]) == (3, False)  # /health stays "ok"
    assert total_stats([leaving, leaving])["draining"]


def test_status_sums_every_engines_overflow_and_keeps_the_first_answer():
    from serving.api.engines import merged_status

    def status(split: int, dropped: int, node: str) -> dict:
        layer = {"split": split, "rerouted": 0, "dropped": dropped}
        return {"engine_node": node, "overflow": {"policy": "split", "layers": [layer, layer]}}

    merged = merged_status([None, status(3, 1, "a"), status(4, 0, "b")])  # the first: no answer
    assert merged["engine_node"] == "a"
    assert merged["overflow"]["policy"] == "split"
    assert merged["overflow"]["layers"] == [{"split": 7, "rerouted": 0, "dropped": 1}] * 2
    assert merged_status([{"engine_node": "c", "overflow": None}]) == {
        "engine_node": "c",
        "overflow": None,
    }
    with pytest.raises(RuntimeError, match="no engine answered"):
        merged_status([None])
