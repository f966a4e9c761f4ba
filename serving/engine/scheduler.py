"""Continuous batching: iteration-level scheduling over a slot-based KV cache.

Each step (1) drops cancelled sequences and frees their slots, (2) gives every running sequence one
decode token, (3) spends what is left of the step's token budget on prefill, admitting waiting
requests into free slots and splitting long prompts into chunks, (4) runs the forward passes in a
worker thread so the event loop keeps serving HTTP, and (5) samples, streams each sequence's new
token and finishes sequences on their own (max_tokens, a stop token, a stop string). A request that
finds no free slot waits in a bounded queue; one that finds the queue full is refused (QueueFull).
Every step's wall time is split into dense, expert, transport, imbalance and bubble time
(serving/steptime.py) in `accounting`.

Ray-free on purpose: the router deployment wraps it, tests drive it in-process.
Shape legend: B sequences in a step, S new tokens per sequence, V vocabulary.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field

import torch

from serving.config import SchedulerConfig
from serving.detokenize import Decode, TextStream
from serving.generate import SamplingParams, sample
from serving.model import MixtralModel
from serving.steptime import StepAccounting

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting queue is at its limit (or the scheduler drains): retry later."""


@dataclass(frozen=True)
class Event:
    """One streamed update of a request: a new token, and/or the reason it finished."""

    token: int | None = None
    text: str = ""  # text now final (needs a decode function; see detokenize.TextStream)
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "error"
    error: str | None = None
    # The error is transient (an expert shard is down and being replaced): the ingress answers
    # 503 with Retry-After rather than 500, as retrying shortly will succeed.
    retryable: bool = False


@dataclass(eq=False)
class Sequence:
    """A request's state inside the scheduler."""

    id: int
    prompt: list[int]
    params: SamplingParams
    logprobs: int | None  # how many top alternatives to report; None: no logprobs
    text: TextStream | None
    gen: torch.Generator | None
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    slot: int | None = None
    cached: int = 0  # tokens written into the slot's cache
    output: list[int] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False
    submitted_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.prompt)


@dataclass(frozen=True)
class RequestTiming:
    """Latencies of one request that finished normally (seconds)."""

    ttft_s: float  # submit to first token: queueing + prefill
    e2e_s: float  # submit to last token
    tpot_s: float | None  # mean time per output token after the first; None for one token


@dataclass(frozen=True)
class StepReport:
    """What one step did, for an observer (the router's metrics); plain numbers, no state."""

    batch_tokens: int  # prefill + decode tokens run
    new_tokens: int  # tokens sampled (streamed) this step
    queue_depth: int  # requests waiting for a slot
    slots_used: int
    slots: int  # KV cache slots allocated
    finished: tuple[RequestTiming, ...]


# Called on the event loop after every step, between two forward passes (the model is idle).
StepObserver = Callable[[StepReport], None]


@dataclass
class StepPlan:
    decodes: list[Sequence]
    prefills: list[tuple[Sequence, int]]  # (sequence, chunk length)

    @property
    def prefill_tokens(self) -> int:
        return sum(n for _, n in self.prefills)

    @property
    def tokens(self) -> int:
        """Decode rows + prompt tokens: what the step runs through the model."""
        return len(self.decodes) + self.prefill_tokens


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
        self.cache = model.new_cache(config.max_batch_slots, self.max_len)
        self.free_slots = deque(range(config.max_batch_slots))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.decode = decode
        self.observer = observer
        self.draining = False
        # Slots that may hold sequences: at most the cache's, lowered at run time by set_batch.
        self.slot_limit = config.max_batch_slots
        self.tokens_generated = 0  # cumulative sampled tokens
        self.tokens_processed = 0  # cumulative prompt + decode tokens run: the controller's rate
        # Where each step's time goes; None: not accounted (the overhead benchmark's baseline).
        self.accounting: StepAccounting | None = StepAccounting()
        self._step_end: float | None = None  # perf_counter at the last step's end; None: idle
        # Decode rows per step: the batch of one forward call, what continuous batching buys.
        self.step_batch_sizes: deque[int] = deque(maxlen=4096)
        self.step_tokens: deque[int] = deque(maxlen=4096)  # prefill + decode tokens per step
        self.max_step_batch = 0
        self.steps = 0
        self._ids = itertools.count()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

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
        if len(self.waiting) >= self.config.max_queue + len(self.free_slots):
            raise QueueFull(f"{len(self.waiting)} requests are waiting for a slot")
        if not prompt or len(prompt) + params.max_tokens > self.max_len:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) must fit "
                f"{self.max_len} tokens"
            )
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
        }

    def set_batch(self, step_token_budget: int, max_batch_slots: int) -> dict:
        """Change the batch settings between steps (the controller's batch fallback).

        The step token budget changes freely. The slot count only moves within the KV cache
        allocated at start (config.max_batch_slots): asking for more is capped there, asking for
        fewer stops admitting until running sequences finish (none is evicted). The budget stays
        at least the slot limit, so every running sequence still decodes each step.
        Returns the settings now in force.
        """
        slots = max(1, min(max_batch_slots, self.config.max_batch_slots))
        budget = max(step_token_budget, slots)
        self.config = self.config.model_copy(update={"step_token_budget": budget})
        self.slot_limit = slots
        return {"step_token_budget": budget, "max_batch_slots": slots}

    # -- the loop -------------------------------------------------------------------------------

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run_forever())

    async def run_forever(self) -> None:
        while True:
            self._reap()
            plan = self._plan()
            if not plan.decodes and not plan.prefills:
                self._wake.clear()
                self._step_end = None  # idle time belongs to no step
                await self._wake.wait()
                continue
            begin = self._step_end if self._step_end is not None else time.perf_counter()
            try:
                results, forward_s = await asyncio.to_thread(self._execute, plan)
            except Exception as exc:  # a failed step fails its sequences, never the loop
                log.exception("scheduler step failed")
                self._fail([*plan.decodes, *(s for s, _ in plan.prefills)], exc)
                self._step_end = None
                continue
            self._record(plan)
            tokens_before, finished = self.tokens_generated, []
            for seq, logits in results:
                timing = self._emit(seq, logits)
                if timing is not None:
                    finished.append(timing)
            self._observe(plan, self.tokens_generated - tokens_before, finished)
            self._account(plan, begin, forward_s)

    def _account(self, plan: StepPlan, begin: float, forward_s: float) -> None:
        """Split the step's interval (previous step's end, or waking, to now) into its parts.
        Its failure is logged, never the loop's."""
        self._step_end = end = time.perf_counter()
        try:
            expert = self.model.pool.step_time()  # taken even when not accounting: starts afresh
            if self.accounting is not None:
                self.accounting.record(end - begin, forward_s, expert, len(plan.decodes),
                                       plan.prefill_tokens, len(plan.prefills))  # fmt: skip
        except Exception:
            log.exception("step accounting failed")

    def _observe(self, plan: StepPlan, new_tokens: int, finished: list[RequestTiming]) -> None:
        """Tell the observer about the step; its failure is logged, never the loop's."""
        if self.observer is None:
            return
        report = StepReport(
            batch_tokens=plan.tokens,
            new_tokens=new_tokens,
            queue_depth=len(self.waiting),
            slots_used=len(self.running),
            slots=self.config.max_batch_slots,
            finished=tuple(finished),
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
            self.free_slots.append(seq.slot)
        self.waiting = deque(s for s in self.waiting if not s.cancelled)

    def _plan(self) -> StepPlan:
        """Decodes first (one token each), then prefill chunks within the remaining budget."""
        decodes = [s for s in self.running if not s.prefilling]
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
            seq.slot = self.free_slots.popleft()
            self.running.append(seq)
            n = min(budget, len(seq.prompt))
            prefills.append((seq, n))
            budget -= n
        return StepPlan(decodes, prefills)

    def _execute(self, plan: StepPlan) -> tuple[list[tuple[Sequence, torch.Tensor | None]], float]:
        """Runs in the worker thread: the forward passes only, no scheduler state changes.

        Returns each sequence with its next-token logits [V] (None for a partial prefill), and
        the seconds the forward passes took.
        """
        began = time.perf_counter()
        out: list[tuple[Sequence, torch.Tensor | None]] = []
        device = self.model.device
        if plan.decodes:
            ids = torch.tensor([[s.output[-1]] for s in plan.decodes], device=device)  # [B, 1]
            start = torch.tensor([s.cached for s in plan.decodes], device=device)
            slots = torch.tensor([s.slot for s in plan.decodes], device=device)
            logits = self.model(ids, cache=self.cache, start_pos=start, slots=slots, last_only=True)
            out += [(s, logits[i, -1]) for i, s in enumerate(plan.decodes)]
        for seq, n in plan.prefills:
            # Rows of one forward share S, so each prompt chunk is its own call (B=1).
            chunk = torch.tensor([seq.prompt[seq.cached : seq.cached + n]], device=device)  # [1, S]
            logits = self.model(
                chunk,
                cache=self.cache,
                start_pos=seq.cached,
                slots=torch.tensor([seq.slot], device=device),
                last_only=True,
            )
            ends_prompt = seq.cached + n == len(seq.prompt)
            out.append((seq, logits[0, -1] if ends_prompt else None))
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

    def _emit(self, seq: Sequence, logits: torch.Tensor | None) -> RequestTiming | None:
        """Sample the sequence's next token from logits [V] and stream it; returns the
        request's timing when this token finished it."""
        if logits is None or seq.cancelled:
            return None
        token = int(sample(logits[None], seq.params, seq.gen)[0])
        seq.output.append(token)
        self.tokens_generated += 1
        now = time.monotonic()
        if seq.first_token_at is None:
            seq.first_token_at = now
        logprob, top = self._logprobs(seq, logits, token)
        text = seq.text.push(token) if seq.text else ""
        finish = self._finish_reason(seq, token)
        if finish is not None:
            seq.done = True
            if seq.text and not seq.text.stopped:
                text += seq.text.flush()
        seq.events.put_nowait(Event(token, text, logprob, top, finish))
        return self._timing(seq, now) if finish is not None else None

    @staticmethod
    def _timing(seq: Sequence, now: float) -> RequestTiming:
        first = seq.first_token_at if seq.first_token_at is not None else now
        n = len(seq.output)
        tpot = (now - first) / (n - 1) if n > 1 else None
        return RequestTiming(first - seq.submitted_at, now - seq.submitted_at, tpot)

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        if token in seq.params.stop_token_ids or (seq.text and seq.text.stopped):
            return "stop"
        # The new token would be written at position `cached`: the slot must have room for it.
        if len(seq.output) >= seq.params.max_tokens or seq.cached >= self.max_len:
            return "length"
        return None

    @staticmethod
    def _logprobs(seq: Sequence, logits: torch.Tensor, token: int):
        """The chosen token's log-probability under the model (before temperature) and the top-k."""
        if seq.logprobs is None:
            return None, None
        lp = torch.log_softmax(logits.float(), dim=-1)  # [V]
        top = lp.topk(seq.logprobs) if seq.logprobs > 0 else None
        alternatives = (
            {int(i): float(v) for v, i in zip(top.values, top.indices, strict=True)} if top else {}
        )
        return float(lp[token]), alternatives

    def _fail(self, seqs: list[Sequence], exc: Exception) -> None:
        retryable = _is_retryable(exc)
        for seq in seqs:
            if not seq.done:
                seq.done = True
                error = str(exc) or repr(exc)
                seq.events.put_nowait(
                    Event(finish_reason="error", error=error, retryable=retryable)
                )


def _is_retryable(exc: Exception) -> bool:
    """An expert without a live copy (experts/ray_pool.py) is transient: its shard is being
    replaced. Looked up in sys.modules so the scheduler stays Ray-free: if the Ray pool was never
    imported, no exception can be one of its errors."""
    pool = sys.modules.get("experts.ray_pool")
    return pool is not None and isinstance(exc, pool.ExpertUnavailableError)


async def run_job(scheduler: Scheduler, job: dict) -> AsyncIterator[dict]:
    """The wire form the router serves: a job dict in, items {"events": [event dicts]} out.

    The first item says whether the request was admitted ({"admitted": True}) or refused
    ({"rejected": reason}), so the ingress can answer 503 before it sends any response header.
    Closing this generator early (client gone) cancels the request.
    """
    try:
        seq = scheduler.submit(
            job["prompt"],
            SamplingParams(**job["params"]),
            tuple(job.get("stop", ())),
            job.get("logprobs"),
        )
    except QueueFull as exc:
        yield {"rejected": str(exc)}
        return
    yield {"admitted": True}
    async for events in scheduler.stream_batches(seq):
        yield {"events": [asdict(e) for e in events]}
