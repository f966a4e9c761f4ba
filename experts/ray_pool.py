"""The Ray expert pool: experts on ExpertShard actors, behind the same interface as the local pool.

Shape legend: T tokens, K top-k, N sorted pairs, P physical slots, D hidden, L layers, E experts.

Per layer the balancer maps each token-expert pair to a physical slot; slots are numbered shard by
shard, so after dispatch each shard's rows are one contiguous range. The pool sends each shard with
work its range (one concurrent call per shard), and concatenates the answers in shard order.

Failure: a call that raises or outlives `call_timeout_s` marks its shard dead; its rows are
recomputed at once on surviving copies of the same experts (outputs are unchanged), and a
replacement actor is started and loaded in the background. Only when some expert has no live copy
does the call fail, fast, with ExpertUnavailableError.

Transport: each layer's fan-out runs through a Ray Compiled Graph (`ray.dag`, compiled once per
set of actors: measured here ~20x less per-call overhead than plain actor calls for decode-sized
payloads). The graph takes the placement version as an input, so rebalancing keeps it; a dead or
replaced shard tears it down, the pool serves through plain actor calls (numpy payloads) meanwhile,
and recompiles in the background once every shard is live again. Payloads above
`compiled_max_bytes` (4 MiB: prefill-sized) go through plain calls, which measured as fast there.

Rebalancing: `rebalance()` computes a new placement from the balancer's load window, loads it on
every shard beside the serving one (shards run two threads), and switches at the start of the next
batch (layer 0); the old version is freed after the switch. No call waits on it.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError, RayError

from experts.checkpoint import MixtralConfig
from experts.shard import ExpertShard, from_numpy, to_numpy
from experts.shard_resources import DEFAULT_PLACEMENT_TIMEOUT_S, ShardResources, wait_for_room
from experts.timing import ExpertTime
from router.balancer import ExpertLoadBalancer
from router.dispatch import Dispatch
from router.gating import Gating
from router.placement import Placement, initial_placement, place_layers

log = logging.getLogger(__name__)


class ExpertUnavailableError(RuntimeError):
    """An expert has no live copy: requests needing it fail fast until its shard is back."""


# The one thin Ray wrapper. Three threads: a compiled graph's loop holds one for as long as the graph
# lives, a background `prepare` takes another, and plain `compute` calls still get through.
RemoteShard = ray.remote(max_concurrency=3)(ExpertShard)
TRANSPORTS = ("compiled", "plain")


class RayExpertPool:
    """Experts of every layer on `num_shards` ExpertShard actors, `redundant` extra copies."""

    def __init__(
        self,
        checkpoint: str,
        config: MixtralConfig,
        num_shards: int,
        redundant: int = 0,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        balancer: ExpertLoadBalancer | None = None,
        call_timeout_s: float = 30.0,
        load_timeout_s: float = 600.0,
        transport: str = "compiled",
        compiled_max_bytes: int = 4 << 20,
        shard_gpus: float = 1.0,
        shard_cpus: float | None = None,
        placement_timeout_s: float = DEFAULT_PLACEMENT_TIMEOUT_S,
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        self.checkpoint, self.config = checkpoint, config
        self.dtype, self.device = dtype, device
        self.num_shards, self.redundant = num_shards, redundant
        self.call_timeout_s, self.load_timeout_s = call_timeout_s, load_timeout_s
        first = initial_placement(config.num_local_experts, num_shards, redundant)
        self.balancer = balancer or ExpertLoadBalancer([first] * config.num_hidden_layers)
        self.version = 0
        self._dead: set[int] = set()
        self._lock = threading.Lock()
        # A prepared reconfiguration: (version, placements, the actors serving when it started,
        # the actors that loaded it, redundant copies).
        self._pending: tuple | None = None
        self._replacing: set[int] = set()
        self.events: list[str] = []  # what happened, newest last (failures, switches)
        self.transport = transport
        # Above this payload per layer, plain calls measured as fast or faster here (BENCHMARKS.md):
        # the graph's shared-memory channels pay to grow and copy large buffers.
        self.compiled_max_bytes = compiled_max_bytes
        self._graph = None  # the compiled fan-out, when live
        self._graph_lock = threading.Lock()
        # Step accounting (serving/steptime.py): round trips and each shard's own compute time,
        # summed until the scheduler takes them after its step. Off: nothing is timed.
        self.timing = True
        self._times = ExpertTime()
        # What each shard asks Ray for (experts/shard_resources.py), fixed for the pool's life.
        self.resources = ShardResources(device.startswith("cuda"), shard_gpus, shard_cpus)
        self.shard_amount = self.resources.amount(num_shards)
        self.placement_timeout_s = placement_timeout_s
        self._wait_for_room(num_shards)
        self.shards = [self._start_actor() for _ in range(num_shards)]
        self._load_all(self.version, self.placements())
        if transport == "compiled":
            self._compile()

    # -- the ExpertPool interface ----------------------------------------------------------------

    def num_slots(self, layer: int) -> int:
        return self.balancer.placement(layer).num_slots

    def assign(self, layer: int, gating: Gating) -> tuple[torch.Tensor, torch.Tensor]:
        if layer == 0:
            self._switch_if_ready()  # between two batches: every layer of a batch sees one version
        a = self.balancer.assign(layer, gating.experts, gating.weights, gating.probs)
        return a.slots, a.weights

    def step_time(self) -> ExpertTime:
        """What the compute calls measured since the last call (then starts afresh)."""
        times, self._times = self._times, ExpertTime()
        return times

    def compute(self, layer: int, x: torch.Tensor, dispatch: Dispatch) -> torch.Tensor:
        """x [N, D] grouped by slot -> [N, D]; one concurrent call per shard with rows."""
        start = time.perf_counter()
        shard_s = [0.0] * self.num_shards  # each shard's own compute time in this layer
        y = self._compute(layer, x, dispatch, shard_s)
        if self.timing:
            self._times.add_layer(time.perf_counter() - start, shard_s)
        return y

    def _compute(self, layer, x, dispatch, shard_s: list[float]) -> torch.Tensor:
        placement, version = self.balancer.placement(layer), self.version
        # Host copies of the row counts: they travel as numpy (the model may be on a GPU).
        dispatch = Dispatch(dispatch.pair_idx, dispatch.token_idx, dispatch.counts.cpu())
        ranges = self._shard_ranges(placement)
        rows = dispatch.segments(ranges)  # [start, end) of each shard's rows
        if self._graph is not None and x.numel() * x.element_size() <= self.compiled_max_bytes:
            y = self._compiled_compute(layer, version, x, dispatch.counts, ranges, rows, shard_s)
            if y is not None:
                return y
        calls = {}
        for shard, ((first, last), (start, end)) in enumerate(zip(ranges, rows, strict=True)):
            if end > start and shard not in self._dead:
                counts = dispatch.counts[first:last].numpy()
                ref = self.shards[shard].compute.remote(
                    version, layer, to_numpy(x[start:end]), counts
                )
                calls[shard] = (start, end, ref)
        out = torch.empty_like(x)
        failed = self._collect(calls, out, shard_s)
        for shard, ((first, last), (start, end)) in enumerate(zip(ranges, rows, strict=True)):
            if end > start and (shard in failed or shard not in calls):
                out[start:end] = self._redirect(layer, version, placement, first, last,
                                                dispatch.counts, x[start:end], shard_s)  # fmt: skip
        return out

    # -- transport -----------------------------------------------------------------------------

    def _compiled_compute(
        self, layer, version, x, counts, ranges, rows, shard_s
    ) -> torch.Tensor | None:
        """One execution of the compiled fan-out: every shard gets its rows (maybe none).
        Returns None when the graph failed; the caller then uses plain calls."""
        xs = [to_numpy(x[start:end]) for start, end in rows]
        cs = [counts[first:last].numpy() for first, last in ranges]
        with self._graph_lock:
            graph = self._graph
            if graph is None:
                return None
            try:
                refs = graph.execute(version, layer, *xs, *cs)
                ys = ray.get(refs, timeout=self.call_timeout_s)
            except Exception as exc:  # a shard died or hung: plain calls find which
                self._graph = None
                self.events.append(f"compiled graph torn down: {type(exc).__name__}")
                log.warning("compiled graph failed (%s); serving through plain calls", exc)
                threading.Thread(target=_teardown, args=(graph,), daemon=True).start()
                return None
        for s, (_, seconds) in enumerate(ys):
            shard_s[s] += seconds
        return torch.cat([from_numpy(y, self.dtype, x.device) for y, _ in ys])

    def _compile(self) -> None:
        """Compile the per-layer fan-out over the current actors (inputs: version, layer, one x
        and one counts array per shard). Any failure leaves plain calls in charge."""
        from ray.dag import InputNode, MultiOutputNode

        actors, n = list(self.shards), len(self.shards)
        try:
            with InputNode() as inp:
                outs = [a.compute.bind(inp[0], inp[1], inp[2 + s], inp[2 + n + s])
                        for s, a in enumerate(actors)]  # fmt: skip
                # One execution at a time is all the pool needs (each layer waits for its
                # results). Ray's default of 10 in flight keeps 10 sets of buffers in this process,
                # ~60 MiB per compile that teardown did not give back (measured: RSS +60 MiB per
                # shard replacement; with 1, +6 MiB).
                graph = MultiOutputNode(outs).experimental_compile(_max_inflight_executions=1)
        except Exception as exc:
            self.events.append(f"compile failed: {type(exc).__name__}")
            log.warning("compiling the expert fan-out failed (%s); using plain calls", exc)
            return
        with self._graph_lock:
            if self._dead or any(a is not b for a, b in zip(actors, self.shards, strict=True)):
                stale, graph = graph, None  # the shard set changed while compiling
                threading.Thread(target=_teardown, args=(stale,), daemon=True).start()
                return
            self._graph = graph
        self.events.append("compiled graph ready")

    def _collect(self, calls: dict, out: torch.Tensor, shard_s: list[float]) -> set[int]:
        """Wait for every call (bounded by the timeout); fill `out` and each shard's compute
        seconds; return the shards that failed."""
        failed = set()
        deadline = time.monotonic() + self.call_timeout_s
        for shard, (start, end, ref) in calls.items():
            try:
                y, seconds = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
                out[start:end] = from_numpy(y, self.dtype, out.device)
                shard_s[shard] += seconds
            except (GetTimeoutError, RayError) as exc:
                failed.add(shard)
                self._mark_dead(shard, exc)
        return failed

    def _redirect(self, layer, version, placement, first, last, counts, x, shard_s) -> torch.Tensor:
        """Rows of dead slots first..last-1, recomputed on live copies of the same experts."""
        seg_counts = counts[first:last]
        slot_of_row = torch.repeat_interleave(torch.arange(first, last), seg_counts)  # [n]
        alternative = self._live_alternative(layer, placement)  # [P]
        target = alternative[slot_of_row]  # [n] a live slot holding the same expert
        order = torch.argsort(target, stable=True)
        y = torch.empty_like(x)
        ranges = self._shard_ranges(placement)
        for shard, (lo, hi) in enumerate(ranges):
            rows = order[(target[order] >= lo) & (target[order] < hi)]
            if rows.numel() == 0:
                continue
            local = torch.bincount(target[rows] - lo, minlength=hi - lo).numpy()
            ref = self.shards[shard].compute.remote(version, layer, to_numpy(x[rows]), local)
            try:
                out, seconds = ray.get(ref, timeout=self.call_timeout_s)
                y[rows] = from_numpy(out, self.dtype, x.device)
                shard_s[shard] += seconds
            except (GetTimeoutError, RayError) as exc:
                self._mark_dead(shard, exc)
                raise ExpertUnavailableError(
                    f"layer {layer}: shard {shard} failed while covering for another; retry shortly"
                ) from exc
        return y

    def _live_alternative(self, layer: int, placement: Placement) -> torch.Tensor:
        """[P] for each slot, a slot of the same expert on a live shard (itself if live)."""
        alt = torch.arange(placement.num_slots)
        dead = set(self._dead)
        for slot in range(placement.num_slots):
            if int(placement.slot_shard[slot]) not in dead:
                continue
            expert = int(placement.phy2log[slot])
            live = [
                s for s in placement.slots_of(expert) if int(placement.slot_shard[s]) not in dead
            ]
            if not live:
                raise ExpertUnavailableError(
                    f"expert {expert} of layer {layer} has no live copy (shard "
                    f"{int(placement.slot_shard[slot])} is down and being replaced); retry shortly"
                )
            alt[slot] = live[slot % len(live)]
        return alt

    # -- placement and shard lifecycle ---------------------------------------------------------

    @property
    def transport_in_use(self) -> str:
        """ "compiled" while the compiled fan-out is live, else "plain"."""
        return "compiled" if self._graph is not None else "plain"

    def placements(self) -> list[Placement]:
        return [self.balancer.placement(layer) for layer in range(self.balancer.num_layers)]

    @staticmethod
    def _shard_ranges(placement: Placement) -> list[tuple[int, int]]:
        """[first, last) slot range of each shard (slots are numbered shard by shard)."""
        sizes = placement.slots_per_shard()
        starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        return [(starts[s], starts[s + 1]) for s in range(len(sizes))]

    def _wait_for_room(self, shards: int) -> None:
        wait_for_room(shards, self.shard_amount, self.resources.kind, self.placement_timeout_s)

    def _start_actor(self):
        options = self.resources.actor_options(self.shard_amount)
        device = "cuda" if self.device.startswith("cuda") else self.device
        dtype = str(self.dtype).removeprefix("torch.")
        return RemoteShard.options(**options).remote(self.checkpoint, dtype, device)

    @staticmethod
    def _layer_experts(placements: list[Placement], shard: int) -> list[list[int]]:
        return [[int(p.phy2log[s]) for s in p.shard_slots(shard)] for p in placements]

    def _load_all(self, version: int, placements: list[Placement]) -> None:
        refs = [a.prepare.remote(version, self._layer_experts(placements, s))
                for s, a in enumerate(self.shards) if s not in self._dead]  # fmt: skip
        ray.get(refs, timeout=self.load_timeout_s)

    def _mark_dead(self, shard: int, exc: BaseException) -> None:
        with self._lock:
            if shard in self._dead:
                return
            self._dead.add(shard)
        with self._graph_lock:
            graph, self._graph = self._graph, None
        if graph is not None:
            threading.Thread(target=_teardown, args=(graph,), daemon=True).start()
        self.events.append(f"shard {shard} failed: {type(exc).__name__}")
        log.warning(
            "expert shard %d failed (%s); serving from other copies, replacing it", shard, exc
        )
        try:
            ray.kill(self.shards[shard])  # a hung actor would otherwise hold its resources
        except Exception:  # already gone
            pass
        threading.Thread(target=self._replace, args=(shard,), daemon=True).start()

    def _replace(self, shard: int) -> None:
        """Start a new actor for `shard`, load its slots for the serving version, put it in."""
        while True:
            try:
                version, placements = self.version, self.placements()
                self._wait_for_room(1)
                actor = self._start_actor()
                ray.get(actor.prepare.remote(version, self._layer_experts(placements, shard)),
                        timeout=self.load_timeout_s)  # fmt: skip
                with self._lock:
                    if version != self.version:  # a switch happened meanwhile: load again
                        ray.kill(actor)
                        continue
                    self.shards[shard] = actor
                    self._dead.discard(shard)
                self.events.append(f"shard {shard} replaced")
                log.info("expert shard %d replaced", shard)
                if self.transport == "compiled" and not self._dead:
                    self._compile()
                return
            except Exception as exc:  # keep trying: a replacement must never stop for good
                log.warning("replacing expert shard %d failed (%s); retrying", shard, exc)
                time.sleep(1.0)

    def rebalance(self, wait: bool = False) -> threading.Thread:
        """Compute a placement from the load window, load it beside the serving one, then switch
        at the next batch. Returns the loading thread (joined first when wait=True)."""
        return self._reconfigure(self.num_shards, wait)

    def add_shard(self, wait: bool = False) -> threading.Thread:
        """Grow to N+1 shards: start an actor, load a placement over N+1 shards, switch."""
        return self._reconfigure(self.num_shards + 1, wait)

    def remove_shard(self, wait: bool = False) -> threading.Thread:
        """Shrink to N-1 shards: move the last shard's slots to the others, switch, then stop it
        (after the switch no call can reach it: every batch runs on the forward thread)."""
        if self.num_shards <= 1:
            raise ValueError("cannot remove the last expert shard")
        return self._reconfigure(self.num_shards - 1, wait)

    def _reconfigure(self, num_shards: int, wait: bool) -> threading.Thread:
        thread = threading.Thread(target=self._prepare, args=(num_shards,), daemon=True)
        thread.start()
        if wait:
            thread.join()
        return thread

    def _prepare(self, num_shards: int) -> None:
        """1. placement from the load window over `num_shards` (copies capped to fit apart);
        2. the actors: the serving ones, plus a new one or less the last one;
        3. load the new version on each, beside the serving one; 4. hand it to the next batch."""
        try:
            if self._dead:
                raise RuntimeError("a shard is down; reconfigure after it is replaced")
            experts = self.config.num_local_experts
            redundant = min(self.redundant, experts * (num_shards - 1))
            placements = place_layers(self.balancer.tokens_per_expert(), num_shards, redundant)
            base = list(self.shards)
            self._wait_for_room(num_shards - len(base))
            actors = base[:num_shards] + [
                self._start_actor() for _ in range(num_shards - len(base))
            ]
            version = self.version + 1
            refs = [a.prepare.remote(version, self._layer_experts(placements, s))
                    for s, a in enumerate(actors)]  # fmt: skip
            ray.get(refs, timeout=self.load_timeout_s)
            with self._lock:
                self._pending = (version, placements, base, actors, redundant)
        except Exception as exc:  # a failed reconfiguration leaves the serving placement in place
            log.warning("reconfiguration to %d shards failed: %s", num_shards, exc)
            self.events.append(f"reconfiguration failed: {type(exc).__name__}: {exc}")

    def _switch_if_ready(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        version, placements, base, actors, redundant = pending
        if self._dead or any(a is not b for a, b in zip(base, self.shards, strict=True)):
            # A shard was lost or replaced while the new placement loaded: it lacks the new
            # version, so keep serving the old one (the next rebalance will try again).
            self.events.append(f"placement version {version} abandoned: a shard changed")
            for extra in actors[len(base) :]:
                ray.kill(extra)
            return
        old, resized = self.version, len(actors) != len(self.shards)
        for layer, placement in enumerate(placements):
            self.balancer.set_placement(layer, placement)
        removed = self.shards[len(actors) :]
        self.shards, self.num_shards, self.redundant = actors, len(actors), redundant
        self.version = version
        self.events.append(f"switched to placement version {version} on {len(actors)} shards")
        for actor in self.shards:
            actor.free.remote(old)  # fire and forget: nothing waits on freeing
        for actor in removed:
            ray.kill(actor)  # drained: no batch can reach it any more
        if resized:  # the graph names its actors: rebuild it over the new set
            with self._graph_lock:
                graph, self._graph = self._graph, None
            if graph is not None:
                threading.Thread(target=_teardown, args=(graph,), daemon=True).start()
            if self.transport == "compiled":
                threading.Thread(target=self._compile, daemon=True).start()

    def shutdown(self) -> None:
        with self._graph_lock:
            graph, self._graph = self._graph, None
        if graph is not None:
            _teardown(graph)
        for actor in self.shards:
            try:
                ray.kill(actor)
            except Exception:
                pass


def _teardown(graph) -> None:
    """Tear a compiled graph down; with a dead actor inside this can take seconds, so callers run
    it on a background thread."""
    try:
        graph.teardown()
    except Exception as exc:  # already broken: nothing more to release
        log.info("compiled graph teardown: %s", exc)
