"""One MoE layer's fan-out to the ExpertShard actors: each shard gets its rows, answers come back
in shard order. The transport only; which actors are live, and replacing them, is the pool's.

Shape legend: N sorted pairs, n one shard's rows, P physical slots, s a shard's slots, D hidden.

Slots are numbered shard by shard, so after dispatch each shard's rows are one contiguous range of
the sorted pairs. Three transports carry the same call (`call_shard`): a Ray Compiled Graph over a
fixed set of actors (one execution per layer, ~20x less overhead than plain actor calls for
decode-sized payloads); the same graph carrying only counts while the rows go over a process group
(`LinkedGraph`, experts/link.py: NCCL between GPUs, device to device); and plain actor calls, used
above `compiled_max_bytes` for the compiled graph (prefill-sized payloads, where they measured as
fast), while no graph is live, and to recompute a failed shard's rows on live copies of the same
experts (outputs are unchanged).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import ray
import torch
from ray.exceptions import GetTimeoutError, RayError

from experts import link
from experts.graph_watch import GraphWatch, close_stuck
from experts.pool import ExpertUnavailableError
from experts.shard import from_numpy, to_numpy
from experts.timing import ExpertTime
from router.dispatch import Dispatch
from router.gating import Gating
from router.placement import Placement, live_slots

log = logging.getLogger(__name__)

# (version, layer, x [n, D], counts [s]) -> (y [n, D], the shard's compute seconds)
ShardCall = Callable[..., object]


def call_shard(actor, version: int, layer: int, x: torch.Tensor, counts: torch.Tensor):
    """The one call to a shard: x [n, D] rows grouped by its local slots, counts [s] host
    integers. Returns the ObjectRef of (y [n, D] numpy, seconds)."""
    return actor.compute.remote(version, layer, to_numpy(x), counts.numpy())


class CompiledGraph:
    """The per-layer fan-out compiled once over a fixed list of actors (inputs: version, layer,
    then one x and one counts array per shard). Raises when compiling fails."""

    size_limited = True  # above the fan-out's compiled_max_bytes, plain calls are as fast

    def __init__(self, actors: list) -> None:
        from ray.dag import InputNode, MultiOutputNode

        self.actors = list(actors)
        self.released = False  # teardown begun: later calls return at once
        with InputNode() as inp:
            outs = [self._bind(a, inp, s, len(self.actors)) for s, a in enumerate(self.actors)]
            # Two executions in flight: two micro-batches (serving/engine/model.py). Ray's
            # default of 10 keeps 10 sets of buffers in this process, ~60 MiB per compile that
            # teardown did not give back (measured: RSS +60 MiB per shard replacement; with 1,
            # +6 MiB).
            self._graph = MultiOutputNode(outs).experimental_compile(_max_inflight_executions=2)

    @staticmethod
    def _bind(actor, inp, s: int, n: int):
        return actor.compute.bind(inp[0], inp[1], inp[2 + s], inp[2 + n + s])

    def execute(self, version: int, layer: int, xs: list[torch.Tensor], counts: list) -> object:
        """Start one execution: xs [n, D] and counts [s] (numpy) per shard; `results` waits."""
        return self._graph.execute(version, layer, *[to_numpy(x) for x in xs], *counts)

    def results(self, started, timeout_s: float, dtype: torch.dtype,
                device: torch.device) -> tuple[list[torch.Tensor], list[float]]:  # fmt: skip
        """Each shard's y [n, D] and compute seconds; raises when a shard died or hung."""
        ys = ray.get(started, timeout=timeout_s)
        return [from_numpy(y, dtype, device) for y, _ in ys], [seconds for _, seconds in ys]

    def teardown(self, background: bool = True) -> None:
        """Release the graph, once; with a dead actor inside this can take seconds, so by default
        it runs on a background thread."""
        if self.released:
            return
        self.released = True
        if background:
            threading.Thread(target=self._release, daemon=True).start()
        else:
            self._release()

    def _release(self) -> None:
        try:
            self._graph.teardown()
        except Exception as exc:  # already broken: nothing more to release
            log.info("compiled graph teardown: %s", exc)


class LinkedGraph(CompiledGraph):
    """The compiled fan-out carrying only each shard's counts, with the rows on the linked group
    (experts/link.py): NCCL between GPUs, gloo between CPU processes. Rank 0 is this process."""

    size_limited = False  # rows of any size go device to device

    def __init__(self, actors: list, own: link.Link) -> None:
        self.link = own
        super().__init__(actors)

    @classmethod
    def over(cls, actors: list, device: str, hidden: int, timeout_s: float) -> LinkedGraph:
        """A new group of this process (rank 0) and `actors` (ranks 1..S), and the graph on it.
        Blocks until every rank joined; raises when one cannot (the pool then serves plainly)."""
        host, world, name = ray.util.get_node_ip_address(), len(actors) + 1, link.new_name()
        store = link.open_store(host, world, timeout_s)
        joins = [a.join_link_here.remote(host, store.port, s + 1, world, name, hidden, timeout_s)
                 for s, a in enumerate(actors)]  # fmt: skip
        own = link.Link(host, store.port, 0, world, name, device, host, timeout_s, store=store)
        ray.get(joins, timeout=timeout_s)
        return cls(actors, own)

    @staticmethod
    def _bind(actor, inp, s: int, n: int):
        return actor.compute_linked.bind(inp[0], inp[1], inp[2 + s])

    def execute(self, version: int, layer: int, xs: list[torch.Tensor], counts: list) -> object:
        # Receives are posted before the shards start, so a shard's answer never waits on us.
        sent, ys = [], []
        for s, x in enumerate(xs):
            y = torch.empty_like(x)  # [n, D]
            if x.shape[0]:
                x = x.contiguous()
                sent.append((x, self.link.send(x, s + 1)))  # x stays alive until sent
                sent.append((y, self.link.recv(y, s + 1)))
            ys.append(y)
        return self._graph.execute(version, layer, *counts), ys, sent

    def results(self, started, timeout_s: float, dtype: torch.dtype,
                device: torch.device) -> tuple[list[torch.Tensor], list[float]]:  # fmt: skip
        refs, ys, sent = started
        seconds = ray.get(refs, timeout=timeout_s)  # raises first when a shard died
        for _, work in sent:
            if not work.wait(timedelta(seconds=timeout_s)):
                raise TimeoutError("the linked transport timed out")
        return ys, seconds


class Fanout:
    """Runs a layer's fan-out over the pool's actors. A shard whose call raises or outlives
    `call_timeout_s` is reported to `on_failure` (the pool marks it dead and replaces it)."""

    def __init__(
        self,
        dtype: torch.dtype,
        call_timeout_s: float,
        compiled_max_bytes: int,
        on_failure: Callable[[int, BaseException], None],
        events: list[str],
    ) -> None:
        self.dtype, self.call_timeout_s = dtype, call_timeout_s
        self.compiled_max_bytes = compiled_max_bytes
        self.on_failure = on_failure
        self.graph: CompiledGraph | None = None  # the compiled fan-out, when live
        self.lock = threading.Lock()  # guards `graph` between the forward thread and the pool
        self.events = events  # the pool's event log: what happened, newest last
        self.watch: GraphWatch | None = None  # closes a hung graph; made with the first graph

    def set_graph(self, graph: CompiledGraph | None) -> None:
        """Put a graph in (None: plain calls from now on); the one replaced is torn down."""
        if graph is not None and self.watch is None:
            self.watch = GraphWatch(self.call_timeout_s, self._close_stuck)
        with self.lock:
            old, self.graph = self.graph, graph
        if old is not None and old is not graph:
            old.teardown()

    def _close_stuck(self, graph: CompiledGraph) -> None:
        close_stuck(graph, self.call_timeout_s, self.on_failure, self.events)

    def close(self) -> None:
        """Stop the watch (the pool's shutdown)."""
        if self.watch is not None:
            self.watch.stop()

    def start(self, actors: list, dead: set[int], version: int, layer: int,
              placement: Placement, x: torch.Tensor, counts: torch.Tensor,
              shard_s: list[float]) -> InFlight:  # fmt: skip
        """Send x [N, D] grouped by slot (counts [P] host rows per slot) to the shards; the
        InFlight's result() is [N, D] and adds each shard's compute seconds to shard_s."""
        job = InFlight(self, actors, dead, version, layer, placement, x, counts, shard_s)
        graph = self.graph
        if graph is not None and (
            not graph.size_limited or x.numel() * x.element_size() <= self.compiled_max_bytes
        ):
            job.refs = self._execute(job)
        if job.refs is None:
            job.calls = self._plain(job)
        return job

    def _execute(self, job: InFlight):
        """Start one execution of the compiled fan-out (every shard gets its rows, maybe none);
        None when there is no graph any more."""
        xs = [job.x[start:end] for start, end in job.rows]
        cs = [job.counts[first:last].numpy() for first, last in job.ranges]
        with self.lock:
            if self.graph is None:
                return None
            job.graph = self.graph
            try:
                with self.watch.waiting(job.graph):
                    return job.graph.execute(job.version, job.layer, xs, cs)
            except Exception as exc:  # a shard died and Ray closed the graph's channels already
                self._drop(job.graph, exc)
                return None

    def _drop(self, graph: CompiledGraph, exc: BaseException) -> None:
        """Tear down a failed graph (with the lock held), if it is still the live one: plain
        calls take over and find which shard failed."""
        if self.graph is graph:
            self.graph = None
            graph.teardown()
            self.events.append(f"compiled graph torn down: {type(exc).__name__}")
        log.warning("compiled graph failed (%s); serving through plain calls", exc)

    def _plain(self, job: InFlight) -> dict:
        """One plain actor call per shard with rows: {shard: (start, end, ref)}."""
        calls = {}
        for shard, ((first, last), (start, end)) in enumerate(
            zip(job.ranges, job.rows, strict=True)
        ):
            if end > start and shard not in job.dead:
                ref = call_shard(job.actors[shard], job.version, job.layer, job.x[start:end],
                                 job.counts[first:last])  # fmt: skip
                calls[shard] = (start, end, ref)
        return calls

    def _compiled_result(self, job: InFlight) -> torch.Tensor | None:
        """The compiled execution's outputs; None when it failed (a shard died or hung: the
        graph is torn down and plain calls find which)."""
        try:
            with self.watch.waiting(job.graph):
                ys, seconds = job.graph.results(job.refs, self.call_timeout_s, self.dtype,
                                                job.x.device)  # fmt: skip
        except Exception as exc:
            with self.lock:
                self._drop(job.graph, exc)
            return None
        for s, shard_seconds in enumerate(seconds):
            job.shard_s[s] += shard_seconds
        return torch.cat(ys)

    def _plain_result(self, job: InFlight) -> torch.Tensor:
        out = torch.empty_like(job.x)
        failed = self._collect(job.calls, out, job.shard_s)
        for shard, ((first, last), (start, end)) in enumerate(
            zip(job.ranges, job.rows, strict=True)
        ):
            if end > start and (shard in failed or shard not in job.calls):
                out[start:end] = self._redirect(job.actors, job.dead, job.version, job.layer,
                                                job.placement, (first, last), job.counts,
                                                job.x[start:end], job.shard_s)  # fmt: skip
        return out

    def _collect(self, calls: dict, out: torch.Tensor, shard_s: list[float]) -> set[int]:
        """Wait for every call (bounded by the timeout); fill `out` and each shard's compute
        seconds; return the shards that failed (each reported to on_failure)."""
        failed = set()
        deadline = time.monotonic() + self.call_timeout_s
        for shard, (start, end, ref) in calls.items():
            try:
                y, seconds = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
                out[start:end] = from_numpy(y, self.dtype, out.device)
                shard_s[shard] += seconds
            except (GetTimeoutError, RayError) as exc:
                failed.add(shard)
                self.on_failure(shard, exc)
        return failed

    def _redirect(self, actors, dead, version, layer, placement, slot_range, counts, x,
                  shard_s) -> torch.Tensor:  # fmt: skip
        """Rows of dead slots [first, last), recomputed on live copies of the same experts."""
        first, last = slot_range
        slot_of_row = torch.repeat_interleave(torch.arange(first, last), counts[first:last])  # [n]
        target = self._live_alternative(layer, placement, dead)[slot_of_row]  # [n] live slots
        y = torch.empty_like(x)
        for shard, (lo, hi) in enumerate(placement.shard_ranges()):
            rows = torch.nonzero((target >= lo) & (target < hi)).flatten()
            rows = rows[torch.argsort(target[rows], stable=True)]  # grouped by slot
            if rows.numel() == 0:
                continue
            local = torch.bincount(target[rows] - lo, minlength=hi - lo)
            ref = call_shard(actors[shard], version, layer, x[rows], local)
            try:
                out, seconds = ray.get(ref, timeout=self.call_timeout_s)
                y[rows] = from_numpy(out, self.dtype, x.device)
                shard_s[shard] += seconds
            except (GetTimeoutError, RayError) as exc:
                self.on_failure(shard, exc)
                raise ExpertUnavailableError(
                    f"layer {layer}: shard {shard} failed while covering for another; retry shortly"
                ) from exc
        return y

    @staticmethod
    def _live_alternative(layer: int, placement: Placement, dead: set[int]) -> torch.Tensor:
        """[P] for each slot, a slot of the same expert on a live shard (itself if live)."""
        live = live_slots(placement, dead)
        shard_of = placement.slot_shard.tolist()
        alt = torch.arange(placement.num_slots)
        for slot in range(placement.num_slots):
            if shard_of[slot] not in dead:
                continue
            expert = int(placement.phy2log[slot])
            if not live[expert]:
                raise ExpertUnavailableError(
                    f"expert {expert} of layer {layer} has no live copy (shard {shard_of[slot]} "
                    "is down and being replaced); retry shortly"
                )
            alt[slot] = live[expert][slot % len(live[expert])]
        return alt


class InFlight:
    """One layer's fan-out on its way: result() waits, falling back to plain calls (and to live
    copies of a failed shard's experts) as the blocking form would."""

    def __init__(self, fanout: Fanout, actors, dead, version, layer, placement, x, counts,
                 shard_s) -> None:  # fmt: skip
        self.fanout, self.actors, self.dead = fanout, actors, dead
        self.version, self.layer, self.placement = version, layer, placement
        self.x, self.counts, self.shard_s = x, counts, shard_s
        self.ranges = placement.shard_ranges()
        ends = [0, *torch.cumsum(counts, 0).tolist()]
        self.rows = [(ends[first], ends[last]) for first, last in self.ranges]  # each shard's
        self.refs, self.graph, self.calls = None, None, None

    def result(self) -> torch.Tensor:
        if self.refs is not None:
            y = self.fanout._compiled_result(self)
            if y is not None:
                return y
            self.calls = self.fanout._plain(self)
        return self.fanout._plain_result(self)


class FansOut:
    """The ExpertPool calls of a pool whose layers fan out to ExpertShard actors: the Ray pool
    that owns its shards (experts/ray_pool.py) and an engine's view of shards another owns
    (experts/shared_pool.py). Uses the pool's balancer, fanout, shards, dead set, version."""

    overlaps = True  # start() returns while the shards compute
    drops = True  # the balancer's overflow policy may be "drop"
    idle = None  # experts/idle.py IdleRelease, where the pool releases a compiled graph

    def num_slots(self, layer: int) -> int:
        return self.balancer.placement(layer).num_slots

    def assign(self, layer: int, gating: Gating) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.balancer.assign(layer, gating.experts, gating.weights, gating.probs)
        return a.slots, a.weights

    def step_time(self) -> ExpertTime:
        """What the compute calls measured since the last call (then starts afresh)."""
        times, self._times = self._times, ExpertTime()
        return times

    def start(self, layer: int, x: torch.Tensor, dispatch: Dispatch) -> Timed:
        """x [N, D] grouped by slot -> (later) [N, D]; one concurrent call per shard with rows,
        sent now; the caller may compute something else before it asks for the result."""
        began = time.perf_counter()
        if self.idle is not None:
            self.idle.touch()  # after an idle release: plain calls now, compiling again
        shard_s = [0.0] * self.num_shards  # each shard's own compute time in this layer
        # Host row counts: they travel as numpy (the model may be on a GPU).
        job = self.fanout.start(self.shards, self._dead, self.version, layer,
                                self.balancer.placement(layer), x, dispatch.counts.cpu(),
                                shard_s)  # fmt: skip
        return Timed(job, began, shard_s, self._times if self.timing else None)


class Timed:
    """A fan-out in flight that, when its result is taken, records the layer for the step
    accounting: the round trip from sending to the result, and how much of it the caller spent
    waiting (all of it but the time it computed something else between sending and asking)."""

    def __init__(self, job: InFlight, began: float, shard_s: list[float], times) -> None:
        self.job, self.began, self.shard_s, self.times = job, began, shard_s, times
        self.sent = time.perf_counter()

    def result(self) -> torch.Tensor:
        asked = time.perf_counter()
        y = self.job.result()
        if self.times is not None:
            round_trip = time.perf_counter() - self.began
            self.times.add_layer(round_trip, self.shard_s, round_trip - (asked - self.sent))
        return y
