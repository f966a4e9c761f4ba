"""The engine-to-ingress event stream (serving/api/streams.py), both sides wired in one process:
every request gets exactly its own tokens, refusals come first, a client that goes away stops its
generation, and a broken stream ends the waiting requests with a retryable error."""

from __future__ import annotations

import asyncio
import contextvars

import pytest
from starlette.responses import StreamingResponse

from serving import load_model
from serving.api.responses import ClosingStream
from serving.api.streams import EngineStreams, IngressStreams
from serving.config import SchedulerConfig
from serving.engine.generate import generate
from serving.engine.requests import Job
from serving.engine.sampling import SamplingParams
from serving.engine.scheduler import Scheduler

from .test_scheduler import prompts


@pytest.fixture(scope="module")
def model(demo_path):
    return load_model(demo_path)


def wired(engine: EngineStreams) -> IngressStreams:
    async def submit(job, stream, request):
        return engine.submit(job, stream, request)

    return IngressStreams(submit, engine.stream, engine.cancel)


async def collect(ingress: IngressStreams, job: Job) -> tuple:
    items = [item async for item in ingress.generate(job)]
    return items[0], [e for batch in items[1:] for e in batch]


def test_every_request_gets_its_own_tokens(model):
    jobs = [Job(tuple(p), SamplingParams(max_tokens=4 + i % 5)) for i, p in enumerate(prompts(10))]

    async def main():
        scheduler = Scheduler(model, SchedulerConfig(max_batch_slots=4, step_token_budget=64))
        ingress = wired(EngineStreams(scheduler))
        return await asyncio.gather(*(collect(ingress, job) for job in jobs)), scheduler

    results, scheduler = asyncio.run(main())
    for job, (admission, events) in zip(jobs, results, strict=True):
        assert admission.admitted
        assert [e.token for e in events] == list(generate(model, list(job.prompt), job.params))
        assert events[-1].finish_reason == "length"
    assert scheduler.max_step_batch > 1  # they shared steps


def test_a_full_queue_is_refused_before_any_event(model):
    job = Job(tuple(prompts(1)[0]), SamplingParams(max_tokens=3))

    async def main():
        scheduler = Scheduler(
            model, SchedulerConfig(max_batch_slots=1, step_token_budget=8, max_queue=0)
        )
        ingress = wired(EngineStreams(scheduler))
        busy = ingress.generate(job)
        assert (await anext(busy)).admitted
        refused = [x async for x in ingress.generate(job)]
        rest = [e for batch in [x async for x in busy] for e in batch]
        return refused, rest

    refused, rest = asyncio.run(main())
    assert len(refused) == 1 and not refused[0].admitted and refused[0].reason
    assert [e.finish_reason for e in rest] == [None, None, "length"]


def test_a_client_that_goes_away_frees_its_slot(model):
    job = Job(tuple(prompts(1)[0]), SamplingParams(max_tokens=500))

    async def main():
        scheduler = Scheduler(model, SchedulerConfig(max_batch_slots=2, step_token_budget=64))
        ingress = wired(EngineStreams(scheduler))
        stream = ingress.generate(job)
        assert (await anext(stream)).admitted
        await anext(stream)  # a token arrived: it is running
        await stream.aclose()  # the client is gone
        for _ in range(100):
            if not scheduler.running:
                break
            await asyncio.sleep(0.01)
        return scheduler

    scheduler = asyncio.run(main())
    assert not scheduler.running and len(scheduler.free_slots) == 2
    assert scheduler.tokens_generated < 500


def test_a_request_cancelled_before_it_arrives_is_refused_when_it_comes(model):
    """The ingress stops waiting for an admission (serving/api/streams.py ADMISSION_TIMEOUT_S)
    and cancels while its submit is still on the way: the late submit generates nothing."""
    job = Job(tuple(prompts(1)[0]), SamplingParams(max_tokens=5))

    async def main():
        scheduler = Scheduler(model, SchedulerConfig(max_batch_slots=2, step_token_budget=64))
        engine = EngineStreams(scheduler)
        engine.cancel("late")
        late = engine.submit(job, "s", "late")
        waiting_after_late = scheduler.in_flight
        other = engine.submit(job, "s", "other")  # another request is not affected
        return late, waiting_after_late, other

    late, waiting_after_late, other = asyncio.run(main())
    assert not late.admitted and "cancelled" in late.reason
    assert waiting_after_late == 0
    assert other.admitted


def test_a_broken_stream_ends_waiting_requests_with_a_retryable_error(model):
    job = Job(tuple(prompts(1)[0]), SamplingParams(max_tokens=50))

    async def main():
        scheduler = Scheduler(model, SchedulerConfig(max_batch_slots=2, step_token_budget=64))
        engine = EngineStreams(scheduler)
        opened = []

        async def breaking(stream):
            opened.append(stream)
            if len(opened) == 1:
                raise ConnectionError("engine replica died")
            async for batch in engine.stream(stream):
                yield batch

        async def submit(job, stream, request):
            return engine.submit(job, stream, request)

        ingress = IngressStreams(submit, breaking, engine.cancel)
        first = await collect(ingress, job)
        second = await collect(ingress, job)  # a new stream is opened
        return first, second, opened

    (adm1, ev1), (adm2, ev2), opened = asyncio.run(main())
    assert adm1.admitted and ev1[-1].finish_reason == "error" and ev1[-1].retryable
    assert adm2.admitted and ev2[-1].finish_reason == "length" and len(ev2) == 50
    assert len(set(opened)) == 2


def test_close_ends_the_streams_after_their_events():
    async def main():
        engine = EngineStreams(scheduler=None)
        engine._queues["s"].put_nowait(("r", []))
        engine.close()
        return [batch async for batch in engine.stream("s")]

    assert asyncio.run(main()) == [[("r", [])]]


REQUEST = contextvars.ContextVar(
    "REQUEST", default="none"
)  # stands for Ray Serve's request context


def test_the_stream_and_the_cancel_notice_leave_the_request_context(model):
    """Ray Serve cancels a cancelled request's pending calls: the notice that its client went
    away, and the stream shared by every request, must not be calls of that request."""
    job = Job(tuple(prompts(1)[0]), SamplingParams(max_tokens=50))
    seen: dict[str, str] = {}

    async def main():
        scheduler = Scheduler(model, SchedulerConfig(max_batch_slots=2, step_token_budget=64))
        engine = EngineStreams(scheduler)

        async def submit(job, stream, request):
            seen["submit"] = REQUEST.get()
            return engine.submit(job, stream, request)

        def open_stream(stream):
            seen["stream"] = REQUEST.get()
            return engine.stream(stream)

        def cancel(request):
            seen["cancel"] = REQUEST.get()
            engine.cancel(request)

        REQUEST.set("request-1")
        stream = IngressStreams(submit, open_stream, cancel).generate(job)
        assert (await anext(stream)).admitted
        await anext(stream)
        await stream.aclose()

    asyncio.run(main())
    assert seen == {"submit": "request-1", "stream": "none", "cancel": "none"}


def sse_cancelled_while_sending(response_class) -> bool:
    """Run a streaming response whose client disconnects while a chunk is being sent; whether
    the body's generator was closed when the response returned."""
    closed = asyncio.Event()

    async def body():
        try:
            while True:
                yield b"data: x\n\n"
        finally:
            closed.set()

    async def main():
        sending = asyncio.Event()

        async def send(message):
            if message["type"] == "http.response.body":
                sending.set()
                await asyncio.Event().wait()  # a slow client: this send never completes

        async def receive():
            await sending.wait()
            return {"type": "http.disconnect"}

        gen = body()
        await response_class(gen)({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send)
        return closed.is_set()

    return asyncio.run(main())


def test_a_stream_cut_mid_send_closes_its_source_at_once():
    assert not sse_cancelled_while_sending(StreamingResponse)  # what Starlette alone does
    assert sse_cancelled_while_sending(ClosingStream)
