"""Continuous batching: iteration-level scheduling over a slot-based KV cache.

Each step (1) drops cancelled sequences and frees their slots, (2) gives every running sequence one
decode token, (3) spends what is left of the step's token budget on prefill, admitting waiting
requests into free slots and splitting long prompts into chunks, (4) runs the forward pass in a
worker thread so the event loop keeps serving, and (5) samples, streams each sequence's new token
and finishes sequences (max_tokens, a stop token, a stop string). A request that finds no free slot
waits in a bounded queue, or is refused when it is full (QueueFull). After every step the observer
gets a StepReport: what ran and where the step's time went, for the engine's monitor.

Ray-free on purpose: the Engine deployment wraps it, tests drive it in-process.
Shape legend: B sequences in a step, S new tokens per sequence, V vocabulary.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import Executor

import torch

from experts.pool import ExpertUnavailableError
from experts.timing import ExpertTime
from serving.config import SchedulerConfig
from serving.engine import cuda_graphs
from serving.engine.detokenize import Decode, TextStream
from serving.engine.model import MixtralModel
from serving.engine.reports import RequestTiming, StepObserver, StepReport
from serving.engine.requests import Event
from serving.engine.sampling import (
    ContextTooLong,
    SamplingParams,
    check_context,
    most_likely,
    sample,
    token_logprobs,
)
from serving.engine.sequence import Sequence, StepPlan
from serving.engine.step_batch import step_batch

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting queue is at its limit (or the scheduler drains): retry later."""


class Scheduler:
    """Submit requests, stream their events; `run_forever` is started on the first submit."""

    def __init__(
        self,
        model: MixtralModel,
        config: SchedulerConfig,
        decode: Decode | None = None,
        observer: StepObserver | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.max_len = min(config.max_seq_len, model.config.max_position_embeddings)
        self.cache_slots = config.cache_slots or config.max_batch_slots
        self.cache = model.new_cache(self.cache_slots, self.max_len)
        self.forward = cuda_graphs.for_engine(model, self.cache, config.cuda_graphs)
        # A heap: the lowest free slot first, so running sequences stay packed at the front of
        # the cache (holes left by finished ones are closed: _compact) and their decode rows, in
        # slot order, read one contiguous block of it (kv_cache.py read_rows: a view, no gather).
        self.free_slots = list(range(self.cache_slots))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.decode = decode
        self.observer = observer
        self.draining = False
        # Slots that may hold sequences: at most the cache's, lowered at run time by set_batch.
        self.slot_limit = config.max_batch_slots
        # Before a step that could admit more, wait this long for an arrival (0: never): a
        # batch fallback trades latency for fuller batches.
        self.batch_wait_s = 0.0
        self.tokens_generated = 0  # cumulative sampled tokens
        self.tokens_processed = 0  # cumulative prompt + decode tokens run: the controller's rate
        self._step_end: float | None = None  # perf_counter at the last step's end; None: idle
        # Decode rows per step: the batch of one forward call, what continuous batching buys.
        self.step_batch_sizes: deque[int] = deque(maxlen=4096)
        self.step_tokens: deque[int] = deque(maxlen=4096)  # prefill + decode tokens per step
        self.max_step_batch = 0
        self.steps = 0
        self.slot_moves = 0  # sequences moved down into a hole (_compact)
        self._ids = itertools.count()
        self._wake, self._task = asyncio.Event(), None
        self.forward_thread: Executor | None = None  # None: asyncio's threads (cpu_bind.py)

    # -- the public interface -------------------------------------------------------------------

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        stop: tuple[str, ...] = (),
        logprobs: int | None = None,
    ) -> Sequence:
        """Queue a request. Raises QueueFull when the queue is at its limit or draining."""
        if self.draining:
            raise QueueFull("the server is shutting down")
        # Requests that a free slot will take at the next step do not count as queued.
        if len(self.waiting) >= self.config.max_queue + self._room():
            raise QueueFull(f"{len(self.waiting)} requests are waiting for a slot")
        if not prompt:
            raise ContextTooLong("the prompt is empty", "prompt")
        check_context(len(prompt), params.max_tokens, self.max_len)
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        text = TextStream(self.decode, stop) if self.decode else None
        seq = Sequence(next(self._ids), list(prompt), params, logprobs, text, gen)
        self.waiting.append(seq)
        self._ensure_running()
        self._wake.set()
        return seq

    async def stream(self, seq: Sequence) -> AsyncIterator[Event]:
        """The request's events until it finishes; closing the iterator early cancels it."""
        async for events in self.stream_batches(seq):
            for event in events:
                yield event

    async def stream_batches(self, seq: Sequence) -> AsyncIterator[list[Event]]:
        """Like `stream`, but each item holds every event ready at the time: a consumer slower
        than the model (an HTTP hop per item) then pays its per-item cost once per batch."""
        try:
            while True:
                events = [await seq.events.get()]
                while not seq.events.empty():
                    events.append(seq.events.get_nowait())
                yield events
                if events[-1].finish_reason is not None:
                    return
        finally:
            self.cancel(seq)

    def cancel(self, seq: Sequence) -> None:
        """Stop working on a request (client gone); its slot is freed before the next step."""
        if not seq.done:
            seq.cancelled = True
            self._wake.set()

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a slot."""
        return len(self.waiting)

    @property
    def in_flight(self) -> int:
        return len(self.waiting) + len(self.running)

    def stats(self) -> dict:
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "free_slots": len(self.free_slots),
            "steps": self.steps,
            "max_step_batch": self.max_step_batch,
            "draining": self.draining,
            "tokens_generated": self.tokens_generated,
            "tokens_processed": self.tokens_processed,
            "step_token_budget": self.config.step_token_budget,
            "slot_limit": self.slot_limit,
            "cache_slots": self.cache_slots,
        }

    def _room(self) -> int:
        """Sequences the next step could still admit."""
        return max(0, min(len(self.free_slots), self.slot_limit - len(self.running)))

    def set_batch(
        self, step_token_budget: int, max_batch_slots: int, batch_wait_ms: float | None = None
    ) -> dict:
        """Change the batch settings between steps (the controller's batch fallback).

        The step token budget changes freely. The slot count moves within the KV cache
        allocated at start (cache_slots): asking for more is capped there, asking for fewer
        stops admitting until running sequences finish (none is evicted). The budget stays at
        least the slot limit, so every running sequence still decodes each step. batch_wait_ms:
        how long a step that could admit more waits for an arrival first (None: unchanged).
        Returns the settings now in force.
        """
        slots = max(1, min(max_batch_slots, self.cache_slots))
        budget = max(step_token_budget, slots)
        self.config = self.config.model_copy(update={"step_token_budget": budget})
        self.slot_limit = slots
        if batch_wait_ms is not None:
            self.batch_wait_s = max(0.0, batch_wait_ms) / 1000.0
        return {"step_token_budget": budget, "max_batch_slots": slots,
                "batch_wait_ms": self.batch_wait_s * 1000.0}  # fmt: skip

    # -- the loop -------------------------------------------------------------------------------

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run_forever())

    async def _wait_for_company(self) -> None:
        """With a batch wait set, a running batch that could take more waits up to it for an
        arrival (woken at once by one)."""
        if not (self.batch_wait_s and self.running and not self.waiting and self._room()):
            return
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self.batch_wait_s)

    async def run_forever(self) -> None:
        while True:
            self._reap()
            self._compact()
            await self._wait_for_company()
            plan = self._plan()
            if not plan.decodes and not plan.prefills:
                self._wake.clear()
                self._step_end = None  # idle time belongs to no step
                await self._wake.wait()
                continue
            begin = self._step_end if self._step_end is not None else time.perf_counter()
            try:
                running = asyncio.get_running_loop().run_in_executor
                results, forward_s = await running(self.forward_thread, self._execute, plan)
            except Exception as exc:  # a failed step fails its sequences, never the loop
                log.exception("scheduler step failed")
                self._fail([*plan.decodes, *(s for s, _ in plan.prefills)], exc)
                self._step_end = None
                continue
            self._record(plan)
            tokens_before, finished = self.tokens_generated, []
            for seq, logits, greedy in results:
                timing = self._emit(seq, logits, greedy)
                if timing is not None:
                    finished.append(timing)
            self._step_end = time.perf_counter()
            expert = self.model.pool.step_time()  # taken every step: it starts afresh
            self._observe(plan, self.tokens_generated - tokens_before, finished,
                          self._step_end - begin, forward_s, expert)  # fmt: skip

    def _observe(
        self,
        plan: StepPlan,
        new_tokens: int,
        finished: list[RequestTiming],
        interval_s: float,
        forward_s: float,
        expert: ExpertTime,
    ) -> None:
        """Tell the observer about the step; its failure is logged, never the loop's."""
        if self.observer is None:
            return
        report = StepReport(
            batch_tokens=plan.tokens,
            new_tokens=new_tokens,
            queue_depth=len(self.waiting),
            slots_used=len(self.running),
            slots=self.cache_slots,
            finished=tuple(finished),
            interval_s=interval_s,
            forward_s=forward_s,
            expert=expert,
            decode_rows=len(plan.decodes),
            prefill_tokens=plan.prefill_tokens,
            prefill_chunks=len(plan.prefills),
        )
        try:
            self.observer(report)
        except Exception:
            log.exception("scheduler observer failed")

    def _reap(self) -> None:
        """Free the slots of finished and cancelled sequences; drop cancelled waiters."""
        for seq in self.running:
            if seq.cancelled:
                seq.done = True
        for seq in [s for s in self.running if s.done]:
            self.running.remove(seq)
            heapq.heappush(self.free_slots, seq.slot)
        self.waiting = deque(s for s in self.waiting if not s.cancelled)

    def _compact(self) -> None:
        """Close the holes finished sequences left below running ones, when no waiting request
        will take them: the highest slot's sequence moves down into the lowest hole (its keys and
        values copied once). Decode rows then keep reading one block of the cache, a view,
        instead of a gather per layer and step that grows with the context (BENCHMARKS.md)."""
        if self.waiting:
            return  # arrivals take the lowest free slots at the next step: no copy needed
        while self.free_slots and self.running:
            top = max(self.running, key=lambda seq: seq.slot)
            if top.slot < self.free_slots[0]:
                return
            hole = heapq.heappop(self.free_slots)
            self.cache.move(top.slot, hole, top.cached)
            heapq.heappush(self.free_slots, top.slot)
            top.slot = hole
            self.slot_moves += 1

    def _plan(self) -> StepPlan:
        """Decodes first (one token each), then prefill chunks within the remaining budget."""
        decodes = sorted((s for s in self.running if not s.prefilling), key=lambda s: s.slot)
        budget = self.config.step_token_budget - len(decodes)
        prefills = []
        for seq in [s for s in self.running if s.prefilling]:
            if budget <= 0:
                break
            n = min(budget, len(seq.prompt) - seq.cached)
            prefills.append((seq, n))
            budget -= n
        while (
            budget > 0 and self.waiting and self.free_slots and len(self.running) < self.slot_limit
        ):
            seq = self.waiting.popleft()
            seq.slot = heapq.heappop(self.free_slots)
            self.running.append(seq)
            n = min(budget, len(seq.prompt))
            prefills.append((seq, n))
            budget -= n
        return StepPlan(decodes, prefills)

    def _execute(self, plan: StepPlan) -> tuple[list[tuple], float]:
        """Runs in the worker thread: the forward pass only, no scheduler state changes.

        Every decode row and prompt chunk goes through the model in one pass (step_batch.py; on a
        GPU a decode-only step replays a CUDA graph), reading the weights once. Returns each
        sequence's logits [V] and greedy token (None, None: partial prefill), and the seconds.
        """
        began = time.perf_counter()
        decodes = [(s.output[-1], s.slot, s.cached) for s in plan.decodes]
        chunks = [(seq.prompt[seq.cached : seq.cached + n], seq.slot, seq.cached,
                   seq.cached + n == len(seq.prompt)) for seq, n in plan.prefills]  # fmt: skip
        logits = self.forward.run(step_batch(decodes, chunks, self.model.device))
        greedy = most_likely(logits).tolist()  # [R]: one pass for every row
        rows = iter(zip(logits, greedy, strict=True))  # decodes', then finished prompts' rows
        out = [(s, *next(rows)) for s in plan.decodes]
        out += [(seq, *next(rows)) if ends else (seq, None, None)
                for (seq, _), (*_, ends) in zip(plan.prefills, chunks, strict=True)]  # fmt: skip
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)  # sampling would wait anyway: time the work
        return out, time.perf_counter() - began

    def _record(self, plan: StepPlan) -> None:
        for seq in plan.decodes:
            seq.cached += 1
        for seq, n in plan.prefills:
            seq.cached += n
        self.steps += 1
        self.tokens_processed += plan.tokens
        self.step_batch_sizes.append(len(plan.decodes))
        self.step_tokens.append(plan.tokens)
        self.max_step_batch = max(self.max_step_batch, len(plan.decodes))

    def _emit(
        self, seq: Sequence, logits: torch.Tensor | None, greedy: int | None
    ) -> RequestTiming | None:
        """Sample the sequence's next token from logits [V] (greedy: the step's argmax, taken
        for every row at once) and stream it; returns the request's timing when this token
        finished it."""
        if logits is None or seq.cancelled:
            return None
        if seq.params.temperature == 0.0:
            token = greedy
        else:
            token = int(sample(logits[None], seq.params, seq.gen)[0])
        seq.output.append(token)
        self.tokens_generated += 1
        now = time.monotonic()
        if seq.first_token_at is None:
            seq.first_token_at = now
        logprob, top = token_logprobs(logits, token, seq.logprobs)
        text = seq.text.push(token) if seq.text else ""
        finish = self._finish_reason(seq, token)
        if finish is not None:
            seq.done = True
            if seq.text and not seq.text.stopped:
                text += seq.text.flush()
        seq.events.put_nowait(Event(token, text, logprob, top, finish))
        return seq.timing(now) if finish is not None else None

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        if token in seq.params.stop_token_ids or (seq.text and seq.text.stopped):
            return "stop"
        # The new token would be written at position `cached`: the slot must have room for it.
        if len(seq.output) >= seq.params.max_tokens or seq.cached >= self.max_len:
            return "length"
        return None

    def _fail(self, seqs: list[Sequence], exc: Exception) -> None:
        retryable = isinstance(exc, ExpertUnavailableError)
        for seq in seqs:
            if not seq.done:
                seq.done = True
                error = str(exc) or repr(exc)
                seq.events.put_nowait(
                    Event(finish_reason="error", error=error, retryable=retryable)
                )
