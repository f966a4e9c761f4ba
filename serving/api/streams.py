"""One stream of events from the engine to each ingress replica, instead of one per request.

Every decode step produces one event batch per running request. Sent as a streaming call per
request, that is a Ray message per request per step through the engine's event loop, competing
with the forward pass for its core (BENCHMARKS.md: HTTP at 0.684-0.82 of the engine alone). Here
each ingress replica opens one stream to the engine and the engine sends, per step, one message
holding every new event of that replica's requests; the ingress hands them to its requests.

    ingress                                 engine
    IngressStreams.generate(job)   ---->    EngineStreams.submit(job, stream, request)  -> Admission
    (one reader task per replica)  <----    EngineStreams.stream(stream): [(request, [Event])]...
    client gone                    ---->    EngineStreams.cancel(request)

If the stream breaks (the engine replica restarted), the requests waiting on it end with a
retryable error event and the next request opens a new stream. When a stream closes (its ingress
went away), the engine cancels that stream's requests.

The ingress makes its calls to the engine (the shared stream, a cancel notice) outside the calling
request's context: Ray Serve cancels a cancelled request's calls still waiting for a replica, and
the notice that a client went away is sent exactly while its request is being cancelled; the
shared stream must outlive the request that happened to open it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable

from serving.engine.requests import Admission, Event, Job
from serving.engine.scheduler import QueueFull, Scheduler

log = logging.getLogger(__name__)

Batch = list[tuple[str, list[Event]]]  # (request id, its new events), every request with news
# EngineChoice: an engine that has not admitted or refused a request by then is taken as down
# (its replica died: Serve's handle would hold the request until another replica is up), and
# goes last in the order for DOWN_S. Which engines serve (Serve runs a replica of them) is read
# every REFRESH_S: the controller starts and stops engines (serving/control/engine_scaler.py).
ADMISSION_TIMEOUT_S = 3.0
DOWN_S = 30.0
REFRESH_S = 1.0
# EngineStreams: a cancel that comes before its request (the ingress gave up waiting for the
# admission while the submit was still on its way) is kept this long, so that the late submit is
# refused rather than generated for nobody.
CANCELLED_KEEP_S = 60.0


class EngineStreams:
    """The engine's side: requests by stream, their events queued per stream."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        # None in a queue ends its stream (close()).
        self._queues: dict[str, asyncio.Queue[tuple[str, list[Event]] | None]] = defaultdict(
            asyncio.Queue
        )
        self._pumps: dict[str, asyncio.Task] = {}  # request id -> the task moving its events
        self._streams: dict[str, set[str]] = defaultdict(set)  # stream id -> its request ids
        self._cancelled: dict[str, float] = {}  # request id -> when, cancelled before submitted

    def submit(self, job: Job, stream: str, request: str) -> Admission:
        if self._cancelled.pop(request, None) is not None:
            return Admission(False, "the request was cancelled before it reached the engine")
        try:
            seq = self.scheduler.submit(list(job.prompt), job.params, job.stop, job.logprobs)
        except QueueFull as exc:
            return Admission(False, str(exc), draining=self.scheduler.draining)
        queue = self._queues[stream]
        self._streams[stream].add(request)
        task = asyncio.get_running_loop().create_task(self._pump(seq, queue, request))
        self._pumps[request] = task
        task.add_done_callback(lambda _: self._forget(stream, request))
        return Admission(True)

    async def _pump(self, seq, queue: asyncio.Queue, request: str) -> None:
        async for events in self.scheduler.stream_batches(seq):
            queue.put_nowait((request, events))

    def _forget(self, stream: str, request: str) -> None:
        self._pumps.pop(request, None)
        self._streams.get(stream, set()).discard(request)

    def close(self) -> None:
        """End every stream (once its queued events are sent): the engine is shutting down, and
        an open stream would hold the replica's graceful shutdown to its timeout."""
        for queue in self._queues.values():
            queue.put_nowait(None)

    def cancel(self, request: str) -> None:
        """The client went away: stop generating for it (its pump's close cancels it); one not
        submitted yet is refused when it comes."""
        task = self._pumps.get(request)
        if task is not None:
            task.cancel()
            return
        now = time.monotonic()
        while self._cancelled:  # oldest first: drop those kept long enough
            oldest, at = next(iter(self._cancelled.items()))
            if now - at < CANCELLED_KEEP_S:
                break
            del self._cancelled[oldest]
        self._cancelled[request] = now

    async def stream(self, stream: str) -> AsyncIterator[Batch]:
        """Every event of the stream's requests, as they come: each item holds all that waited,
        so a step's events for all of them travel as one message."""
        queue = self._queues[stream]
        try:
            while True:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                batch = [item for item in items if item is not None]
                if batch:
                    yield batch
                if None in items:  # close(): the engine is shutting down
                    return
        finally:  # the ingress went away: nobody will read its requests' events
            for request in list(self._streams.pop(stream, ())):
                self.cancel(request)
            self._queues.pop(stream, None)


class IngressStreams:
    """The ingress's side: one stream from the engine, read by one task, handed out per request.

    submit(job, stream, request) -> Awaitable[Admission]; open(stream) -> the engine's stream;
    cancel(request) tells the engine a client went away."""

    def __init__(
        self,
        submit: Callable[[Job, str, str], Awaitable[Admission]],
        open_stream: Callable[[str], AsyncIterator[Batch]],
        cancel: Callable[[str], None],
    ) -> None:
        self._submit, self._open, self._cancel = submit, open_stream, cancel
        self._inboxes: dict[str, asyncio.Queue[list[Event]]] = {}
        self._stream_id: str | None = None
        self._reader: asyncio.Task | None = None

    def _ensure_reader(self) -> str:
        if self._reader is None or self._reader.done():
            self._stream_id = uuid.uuid4().hex
            reader = self._read(self._stream_id)
            loop = asyncio.get_running_loop()
            self._reader = loop.create_task(reader, context=contextvars.Context())
        return self._stream_id

    async def _read(self, stream: str) -> None:
        try:
            async for batch in self._open(stream):
                for request, events in batch:
                    inbox = self._inboxes.get(request)
                    if inbox is not None:
                        inbox.put_nowait(events)
            error = "the engine closed the event stream"
        except Exception as exc:  # the engine replica failed: its requests are lost
            log.warning("event stream from the engine broke: %s", exc)
            error = f"the engine's event stream broke ({type(exc).__name__}); retry"
        lost = Event(finish_reason="error", error=error, retryable=True)
        for inbox in list(self._inboxes.values()):
            inbox.put_nowait([lost])

    async def generate(
        self, job: Job, streamed: bool = True
    ) -> AsyncIterator[Admission | list[Event]]:
        """What the ingress's routes consume (serving/api/ingress.py Generate); one engine sends
        events the same way, streamed or not."""
        stream, request = self._ensure_reader(), uuid.uuid4().hex
        inbox: asyncio.Queue[list[Event]] = asyncio.Queue()
        self._inboxes[request] = inbox  # before submitting: no event can arrive unclaimed
        finished = False
        try:
            admission = await self._submit(job, stream, request)
            yield admission
            if not admission.admitted:
                finished = True
                return
            while not finished:
                events = await inbox.get()
                finished = events[-1].finish_reason is not None
                yield events
        finally:
            self._inboxes.pop(request, None)
            if not finished:
                with contextlib.suppress(Exception):
                    contextvars.Context().run(self._cancel, request)


class EngineChoice:
    """Several engines behind one ingress (config.engine_replicas), each with its own stream: a
    request goes to the engine with the fewest of this ingress's requests in flight (ties in
    turn). One that cannot take it, full (503) or unreachable (its replica died), passes it to
    the next; so does one that fails with an error worth retrying (its stream broke: the replica
    died) before the client saw a token: a streamed request's first, or any of a request
    answered whole (its events are held until it ends). The client sees one admission and one
    answer; the last engine's stands.

    Only engines that serve are tried: `serving` at first, then as `read_serving()` says every
    `refresh_s` (an engine the controller has not started, or one Serve is restarting, has no
    replica to take a request: a call to it would wait). An engine that refuses because it is
    draining (being stopped) goes last, like one that is down."""

    def __init__(
        self,
        engines: list[IngressStreams],
        admission_timeout_s: float = ADMISSION_TIMEOUT_S,
        down_s: float = DOWN_S,
        serving: list[bool] | None = None,
        read_serving: Callable[[], Awaitable[list[bool]]] | None = None,
        refresh_s: float = REFRESH_S,
    ) -> None:
        self.engines = engines
        self.admission_timeout_s, self.down_s = admission_timeout_s, down_s
        self.in_flight = [0] * len(engines)
        self.down_until = [0.0] * len(engines)  # monotonic time until which an engine goes last
        self.serving = list(serving) if serving is not None else [True] * len(engines)
        self._read_serving, self.refresh_s = read_serving, refresh_s
        self._refresh: asyncio.Task | None = None
        self._refreshed = float("-inf")
        self._turn = 0

    def _order(self) -> list[int]:
        self.refresh_serving()
        n, now = len(self.engines), time.monotonic()
        self._turn = (self._turn + 1) % n
        candidates = [i for i in range(n) if self.serving[i]] or list(range(n))
        return sorted(
            candidates,
            key=lambda i: (self.down_until[i] > now, self.in_flight[i], (i - self._turn) % n),
        )

    def refresh_serving(self) -> None:
        """Start reading which engines serve, at most every refresh_s (requests do not wait)."""
        if self._read_serving is None or (self._refresh and not self._refresh.done()):
            return
        if time.monotonic() - self._refreshed < self.refresh_s:
            return
        self._refreshed = time.monotonic()
        loop = asyncio.get_running_loop()
        self._refresh = loop.create_task(self._update_serving(), context=contextvars.Context())

    async def _update_serving(self) -> None:
        try:
            serving = list(await self._read_serving())
        except Exception as exc:  # Serve's controller busy or restarting: keep the last view
            log.warning("could not read which engines serve: %s", exc)
            return
        if len(serving) == len(self.engines):
            self.serving = serving

    def _down(self, i: int) -> None:
        self.down_until[i] = time.monotonic() + self.down_s

    async def generate(
        self, job: Job, streamed: bool = True
    ) -> AsyncIterator[Admission | list[Event]]:
        order, admitted = self._order(), False
        for tried, i in enumerate(order, 1):
            last = tried == len(order)
            self.in_flight[i] += 1
            attempt = self._attempt(i, job, last, admitted, streamed)
            try:
                async for item in attempt:
                    if isinstance(item, Admission):
                        if not item.admitted or not admitted:
                            yield item  # the client's one admission (or the final refusal)
                        admitted = admitted or item.admitted
                    elif item is _NEXT:
                        break
                    else:
                        yield item
                else:
                    return
            finally:
                await attempt.aclose()  # an async generator left by `break` is not closed
                self.in_flight[i] -= 1

    async def _attempt(self, i: int, job: Job, last: bool, admitted: bool, streamed: bool):
        """Engine i's try: its admission and events, or _NEXT to try the next engine. Only the
        last engine tried may take as long as it needs to admit (a Serve handle waits for a
        replica that is gone until Serve has started another)."""
        events = self.engines[i].generate(job)
        try:
            try:
                timeout = None if last else self.admission_timeout_s
                admission = await asyncio.wait_for(anext(events), timeout)
            except Exception as exc:
                self._down(i)
                if not last:
                    log.warning("an engine did not take a request (%s); trying another", exc)
                    yield _NEXT
                    return
                if not admitted:
                    raise
                yield [Event(finish_reason="error", error=f"no engine could take it ({exc})",
                             retryable=True)]  # fmt: skip
                return
            if not admission.admitted and admitted:  # admitted before, then its engine failed
                yield [Event(finish_reason="error", error=admission.reason, retryable=True)]
                return
            if not admission.admitted and not last:
                if admission.draining:
                    self._down(i)
                yield _NEXT
                return
            yield admission
            sent = False  # streamed: a token went out to the client
            held: list[list[Event]] = []  # not streamed: the answer's events, until it ends
            async for batch in events:
                if not last and _lost(batch) and not sent:
                    self._down(i)
                    yield _NEXT
                    return
                if streamed:
                    sent = sent or any(e.token is not None for e in batch)
                    yield batch
                else:
                    held.append(batch)
            for batch in held:
                yield batch
        finally:
            await events.aclose()


_NEXT = object()  # EngineChoice: this engine could not answer; try the next one


def _lost(batch: list[Event]) -> bool:
    """The request ended with an error worth retrying (its engine's stream broke)."""
    return batch[-1].finish_reason == "error" and batch[-1].retryable
