"""Continuous batching against the in-process reference `generate`, on the demo model."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from serving import load_model
from serving.config import SchedulerConfig
from serving.engine.detokenize import TextStream
from serving.engine.generate import generate
from serving.engine.sampling import SamplingParams
from serving.engine.scheduler import QueueFull, Scheduler
from serving.engine.tokenizer import TextTokenizer


@pytest.fixture(scope="module")
def model(demo_path):
    return load_model(demo_path)


@pytest.fixture(scope="module")
def tok(demo_path):
    return TextTokenizer(demo_path)


def prompts(n: int, length: int = 6, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (length + i % 5,), generator=g).tolist() for i in range(n)]


async def collect(sched: Scheduler, seq) -> list:
    return [e async for e in sched.stream(seq)]


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_batch_and_match_generate(model):
    """Many requests at once: each equals the reference, and decodes really shared a forward."""
    ps = prompts(12)
    params = [SamplingParams(max_tokens=5 + i % 7) for i in range(12)]

    async def main():
        s = Scheduler(model, SchedulerConfig(max_batch_slots=8, step_token_budget=64))
        seqs = [s.submit(p, q) for p, q in zip(ps, params, strict=True)]
        outs = await asyncio.gather(*(collect(s, q) for q in seqs))
        return s, outs

    s, outs = run(main())
    for p, q, events in zip(ps, params, outs, strict=True):
        assert [e.token for e in events] == list(generate(model, p, q))
        assert events[-1].finish_reason == "length"
        assert all(e.finish_reason is None for e in events[:-1])
    assert s.max_step_batch > 1
    assert max(s.step_batch_sizes) <= 8  # never more rows than KV slots
    assert len(s.free_slots) == 8 and not s.running and not s.waiting


def test_requests_wait_for_a_slot_and_prompts_prefill_in_chunks(model):
    """2 slots, 5 requests, a budget smaller than the prompts: all finish, within the budget."""
    ps = prompts(5, length=20, seed=1)
    q = SamplingParams(max_tokens=6)

    async def main():
        s = Scheduler(model, SchedulerConfig(max_batch_slots=2, step_token_budget=7))
        seqs = [s.submit(p, q) for p in ps]
        return s, await asyncio.gather(*(collect(s, x) for x in seqs))

    s, outs = run(main())
    for p, events in zip(ps, outs, strict=True):
        assert [e.token for e in events] == list(generate(model, p, q))
    assert max(s.step_tokens) <= 7
    assert max(s.step_batch_sizes) == 2


def test_stop_token_and_seeded_sampling_match_generate(model):
    p = prompts(1, seed=2)[0]
    greedy = list(generate(model, p, SamplingParams(max_tokens=8)))
    stop = SamplingParams(max_tokens=8, stop_token_ids=(greedy[2],))
    hot = SamplingParams(max_tokens=8, temperature=1.3, top_p=0.9, seed=11)

    async def main():
        s = Scheduler(model, SchedulerConfig(max_batch_slots=4, step_token_budget=16))
        a, b = s.submit(p, stop), s.submit(p, hot)
        return await collect(s, a), await collect(s, b)

    stopped, sampled = run(main())
    assert [e.token for e in stopped] == greedy[:3]
    assert stopped[-1].finish_reason == "stop"
    assert [e.token for e in sampled] == list(generate(model, p, hot))


def test_stop_string_ends_the_request_and_is_not_returned(model, tok):
    ids = tok.encode("The quick brown fox")
    params = SamplingParams(max_tokens=24)
    full = tok.decode(list(generate(model, ids, params)))
    stop = full[5:8]
    assert stop and full.find(stop) == 5  # the stop string first occurs where we cut

    async def main():
        s = Scheduler(model, SchedulerConfig(), decode=tok.decode)
        return await collect(s, s.submit(ids, params, stop=(stop,)))

    events = run(main())
    assert "".join(e.text for e in events) == full[:5]
    assert events[-1].finish_reason == "stop"
    assert len(events) < 24


def test_streamed_text_adds_up_to_the_decoded_output(model, tok):
    ids = tok.encode("Hello, world!")
    params = SamplingParams(max_tokens=20)

    async def main():
        s = Scheduler(model, SchedulerConfig(), decode=tok.decode)
        return await collect(s, s.submit(ids, params))

    events = run(main())
    assert "".join(e.text for e in events) == tok.decode([e.token for e in events])


def test_logprobs_are_the_models_log_softmax(model):
    p = prompts(1, seed=3)[0]

    async def main():
        s = Scheduler(model, SchedulerConfig())
        return await collect(s, s.submit(p, SamplingParams(max_tokens=1), logprobs=3))

    (event,) = run(main())
    lp = torch.log_softmax(model(torch.tensor([p]))[0, -1].float(), -1)
    assert event.logprob == pytest.approx(float(lp[event.token]), abs=1e-4)
    assert list(event.top_logprobs) == lp.topk(3).indices.tolist()


def test_full_queue_refuses_and_draining_refuses(model):
    async def main():
        s = Scheduler(model, SchedulerConfig(max_batch_slots=1, step_token_budget=4, max_queue=1))
        p, q = prompts(1)[0], SamplingParams(max_tokens=2)
        first, second = s.submit(p, q), s.submit(p, q)  # one takes the slot, one waits
        with pytest.raises(QueueFull):
            s.submit(p, q)
        await asyncio.gather(collect(s, first), collect(s, second))
        s.draining = True
        with pytest.raises(QueueFull):
            s.submit(p, q)

    run(main())


def test_cancel_frees_the_slot_for_the_next_request(model):
    """A client that goes away mid-stream: its slot serves the next request."""

    async def main():
        s = Scheduler(model, SchedulerConfig(max_batch_slots=1, step_token_budget=8))
        p = prompts(1)[0]
        long = s.submit(p, SamplingParams(max_tokens=500))
        stream = s.stream(long)
        await anext(stream)
        await stream.aclose()  # what a disconnect does
        short = s.submit(p, SamplingParams(max_tokens=3))
        events = await collect(s, short)
        return s, long, events

    s, long, events = run(main())
    assert len(events) == 3 and events[-1].finish_reason == "length"
    assert long.cancelled and len(long.output) < 500
    assert len(s.free_slots) == 1


def test_a_failing_step_fails_its_requests_and_the_loop_survives(model):
    class Flaky:
        config, device, pool = model.config, model.device, model.pool
        calls = 0

        def new_cache(self, *a):
            return model.new_cache(*a)

        def step(self, *a, **k):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RuntimeError("expert shard lost")
            return model.step(*a, **k)

    async def main():
        s = Scheduler(Flaky(), SchedulerConfig(max_batch_slots=2, step_token_budget=32))
        p = prompts(1)[0]
        failed = await collect(s, s.submit(p, SamplingParams(max_tokens=3)))
        ok = await collect(s, s.submit(p, SamplingParams(max_tokens=3)))
        return s, failed, ok

    s, failed, ok = run(main())
    assert failed[-1].finish_reason == "error" and "expert shard lost" in failed[-1].error
    assert [e.token for e in ok] == list(
        generate(model, prompts(1)[0], SamplingParams(max_tokens=3))
    )
    assert len(s.free_slots) == 2


def test_a_slow_reader_gets_its_tokens_in_batches(model):
    """Events that piled up while the consumer was busy arrive together, none lost."""
    p, q = prompts(1)[0], SamplingParams(max_tokens=6)

    async def main():
        s = Scheduler(model, SchedulerConfig())
        seq = s.submit(p, q)
        while not seq.done:
            await asyncio.sleep(0.01)  # a consumer that reads only after generation ended
        return [batch async for batch in s.stream_batches(seq)]

    batches = run(main())
    assert len(batches) == 1
    assert [e.token for e in batches[0]] == list(generate(model, p, q))


def test_text_stream_holds_back_a_possible_stop_string():
    pieces = ["ab", "c", "X", "Y", "Z", "d"]
    stream = TextStream(lambda ids: "".join(pieces[i] for i in ids), stop=("XYZ",))
    out = [stream.push(i) for i in range(5)]
    assert out == ["ab", "c", "", "", ""]  # "X", "XY" might start the stop string
    assert stream.stopped and stream.text == "abc"
    partial = TextStream(lambda ids: "".join(pieces[i] for i in ids), stop=("XQ",))
    assert [partial.push(i) for i in range(4)] == ["ab", "c", "", "XY"]
    assert partial.flush() == ""


def test_observer_sees_every_step_and_each_request_timing(model):
    reports = []

    async def main():
        s = Scheduler(model, SchedulerConfig(max_batch_slots=4, step_token_budget=32))
        s.observer = reports.append
        seqs = [s.submit(p, SamplingParams(max_tokens=4)) for p in prompts(3)]
        await asyncio.gather(*(collect(s, q) for q in seqs))
        return s

    s = run(main())
    assert len(reports) == s.steps
    assert sum(r.new_tokens for r in reports) == s.tokens_generated == 12
    timings = [t for r in reports for t in r.finished]
    assert len(timings) == 3
    assert all(0 <= t.ttft_s <= t.e2e_s and t.tpot_s is not None for t in timings)
    assert all(r.slots == 4 and 0 < r.slots_used <= 4 for r in reports)


def test_a_failing_observer_never_stops_the_loop(model):
    def broken(_report):
        raise RuntimeError("metrics down")

    async def main():
        s = Scheduler(
            model, SchedulerConfig(max_batch_slots=2, step_token_budget=32), observer=broken
        )
        return await collect(s, s.submit(prompts(1)[0], SamplingParams(max_tokens=3)))

    events = run(main())
    assert len(events) == 3 and events[-1].finish_reason == "length"


def test_set_batch_changes_the_budget_and_slots_within_the_cache(model):
    async def main():
        s = Scheduler(model, SchedulerConfig(max_batch_slots=4, step_token_budget=16))
        assert s.set_batch(64, 99) == {"step_token_budget": 64, "max_batch_slots": 4,
                                       "batch_wait_ms": 0.0}  # fmt: skip
        assert s.set_batch(1, 2) == {"step_token_budget": 2, "max_batch_slots": 2,
                                     "batch_wait_ms": 0.0}  # fmt: skip
        seqs = [s.submit(p, SamplingParams(max_tokens=3)) for p in prompts(4)]
        await asyncio.gather(*(collect(s, q) for q in seqs))
        return s

    s = run(main())
    assert max(s.step_batch_sizes) <= 2  # the lowered slot limit held
    assert len(s.free_slots) == 4


def steps_for(model, slots: int, cache_slots: int, grow_to: int | None) -> Scheduler:
    """16 requests of 8 tokens through `slots` slots, raised to `grow_to` at the start."""

    async def main():
        s = Scheduler(model, SchedulerConfig(max_batch_slots=slots, step_token_budget=64,
                                             cache_slots=cache_slots))  # fmt: skip
        if grow_to:
            s.set_batch(128, grow_to)
        seqs = [s.submit(p, SamplingParams(max_tokens=8)) for p in prompts(16)]
        outs = await asyncio.gather(*(collect(s, q) for q in seqs))
        return s, outs

    return run(main())


def test_a_batch_fallback_grows_the_batch_into_the_spare_cache(model):
    """Counted, not timed: the same 16 requests take fewer steps once the fallback doubles the
    slots (the KV cache was allocated for it), and each still gets its own tokens."""
    base, outs = steps_for(model, 4, 8, None)
    grown, grown_outs = steps_for(model, 4, 8, 8)
    assert max(base.step_batch_sizes) == 4 and max(grown.step_batch_sizes) == 8
    assert grown.steps <= 0.7 * base.steps, (grown.steps, base.steps)
    assert [[e.token for e in o] for o in outs] == [[e.token for e in o] for o in grown_outs]
    capped, _ = steps_for(model, 4, 4, 8)  # no spare cache: the slots stay within it
    assert max(capped.step_batch_sizes) == 4


def test_a_batch_wait_holds_a_step_for_company_and_an_arrival_ends_it(model):
    """Bounds that only a slower machine could move the wrong way are not asserted: a wait of
    0.3 s makes 4 tokens take at least 3 waits; with a 5 s wait, an arrival 0.05 s in ends it."""

    async def main():
        s = Scheduler(model, SchedulerConfig(max_batch_slots=2, step_token_budget=64))
        s.set_batch(64, 2, batch_wait_ms=300)
        began = time.monotonic()
        await collect(s, s.submit(prompts(1)[0], SamplingParams(max_tokens=4)))
        waited = time.monotonic() - began
        s.set_batch(64, 2, batch_wait_ms=5000)
        first = s.submit(prompts(1)[0], SamplingParams(max_tokens=3))
        stream = s.stream(first)
        await anext(stream)  # running: its next step waits for company
        began = time.monotonic()
        await asyncio.sleep(0.05)
        await collect(s, s.submit(prompts(2)[1], SamplingParams(max_tokens=2)))
        rest = [e async for e in stream]
        return waited, time.monotonic() - began, rest, s

    waited, joined, rest, s = run(main())
    assert waited >= 3 * 0.3
    assert joined < 5.0 and rest[-1].finish_reason == "length"
    assert s.max_step_batch == 2  # the arrival ran in the held step


def test_a_freed_slot_goes_to_the_next_request_lowest_first(model):
    """Slots are taken lowest first, so running sequences stay packed at the front of the cache
    and their decode rows read one block of it (a view, not a gather): the new request takes
    the freed slot 0, or (when the hole was closed before it arrived) the slot the moved
    sequence left; never slot 3."""

    async def main():
        s = Scheduler(
            model, SchedulerConfig(max_batch_slots=3, cache_slots=4, step_token_budget=64)
        )
        p = prompts(1)[0]
        seqs = [s.submit(p, SamplingParams(max_tokens=400)) for _ in range(3)]
        streams = [s.stream(q) for q in seqs]
        for stream in streams:
            await anext(stream)
        await streams[0].aclose()  # slot 0 frees; slot 3 was never used
        nxt = s.submit(p, SamplingParams(max_tokens=2))
        nxt_stream = s.stream(nxt)
        await anext(nxt_stream)  # all three running now
        in_use = {seqs[1].slot, seqs[2].slot, nxt.slot}
        for stream in [*streams[1:], nxt_stream]:
            await stream.aclose()
        return [q.slot for q in seqs], in_use

    slots, in_use = run(main())
    assert slots[0] == 0 and in_use == {0, 1, 2}


def test_a_hole_a_finished_sequence_leaves_closes_and_outputs_stay_exact(model, monkeypatch):
    """Nobody waiting: the highest slot's sequence moves down into the hole a finished one
    left, so the decode rows read one block of the cache again (a view, not a gather), and every
    token still equals the reference."""
    from serving.engine import scheduler as scheduler_module

    batches = []
    build = scheduler_module.step_batch

    def recording(*args, **kwargs):
        batch = build(*args, **kwargs)
        batches.append((batch.decodes, batch.decode_first_slot))
        return batch

    monkeypatch.setattr(scheduler_module, "step_batch", recording)
    ps = prompts(3, seed=2)
    params = [SamplingParams(max_tokens=n) for n in (12, 3, 12)]

    async def main():
        s = Scheduler(model, SchedulerConfig(max_batch_slots=3, step_token_budget=64))
        seqs = [s.submit(p, q) for p, q in zip(ps, params, strict=True)]
        outs = await asyncio.gather(*(collect(s, q) for q in seqs))
        return s, seqs, outs

    s, seqs, outs = run(main())
    for p, q, events in zip(ps, params, outs, strict=True):
        assert [e.token for e in events] == list(generate(model, p, q))
    assert s.slot_moves == 1 and [q.slot for q in seqs] == [0, 1, 1]
    after = [first for rows, first in batches if rows == 2]  # once the middle one finished
    assert after and all(first == 0 for first in after), batches
