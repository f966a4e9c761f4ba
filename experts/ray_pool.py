"""The Ray expert pool: experts on ExpertShard actors, behind the same interface as the local pool.

Shape legend: T tokens, K top-k, N sorted pairs, P physical slots, D hidden, L layers, E experts.

Per layer the balancer maps each token-expert pair to a physical slot; slots are numbered shard by
shard, so after dispatch each shard's rows are one contiguous range. The pool sends each shard with
work its range (one concurrent call per shard), and concatenates the answers in shard order.

The per-layer fan-out (transport) is experts/fanout.py; this module is the pool's lifecycle.

Failure: a call that raises or outlives `call_timeout_s` marks its shard dead; its rows are
recomputed at once on surviving copies of the same experts (outputs are unchanged), and a
replacement actor is started and loaded in the background. Only when some expert has no live copy
does the call fail, fast, with ExpertUnavailableError.

Compiled graph: the fan-out is compiled once per set of actors. It takes the placement version as
an input, so rebalancing keeps it; a dead or replaced shard tears it down, the pool serves through
plain actor calls meanwhile, and recompiles in the background once every shard is live again.
Unused for `idle_release_s`, the graph is released too (its actors would poll, a core each) and
compiled again when layers come back (experts/idle.py).

Rebalancing: `rebalance()` computes a new placement from the balancer's load window, loads it on
every shard beside the serving one (shards run two threads), and switches at the start of the next
batch (layer 0); the old version is freed after the switch. No call waits on it.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import ray
import torch

from experts import shard as plain_shard
from experts.checkpoint import MixtralConfig
from experts.fanout import CompiledGraph, Fanout, FansOut, LinkedGraph
from experts.idle import IdleRelease
from experts.link import GRAPHS, TRANSPORTS, resolve_transport
from experts.shard_resources import DEFAULT_PLACEMENT_TIMEOUT_S, ShardResources, wait_for_room
from experts.timing import ExpertTime
from router.balancer import ExpertLoadBalancer
from router.placement import Placement, initial_placement, place_layers

log = logging.getLogger(__name__)


class ExpertShard(plain_shard.ExpertShard):
    """experts/shard.py's ExpertShard, which can also say which Ray node it runs on (the plain
    class knows no Ray). Same name: the actor's process is still titled ray::ExpertShard."""

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def join_link_here(self, host: str, port: int, rank: int, world: int, name: str, hidden: int,
                       timeout_s: float) -> str:  # fmt: skip
        """join_link, reachable at this node's address."""
        own = ray.util.get_node_ip_address()
        return self.join_link(host, port, rank, world, name, own, hidden, timeout_s)


# The one thin Ray wrapper. Three threads: a compiled graph's loop holds one for as long as the graph
# lives, a background `prepare` takes another, and plain `compute` calls still get through.
RemoteShard = ray.remote(max_concurrency=3)(ExpertShard)
IDLE_RELEASE_S = 30.0  # no layer for this long: the compiled graph is released (experts/idle.py)


def ensure_ray() -> None:
    """Start a local Ray unless one is running (or join RAY_ADDRESS if set). A library call never
    exposes Ray's dashboard, nor joins a cluster it was not told of: a bare ray.init() would join
    whichever cluster `ray start` last started on the machine."""
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or "local"
        ray.init(address=address, include_dashboard=False, configure_logging=False)


class RayExpertPool(FansOut):
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
        overflow: str = "split",
        call_timeout_s: float = 30.0,
        load_timeout_s: float = 600.0,
        transport: str = "auto",
        compiled_max_bytes: int = 4 << 20,
        shard_gpus: float = 1.0,
        shard_cpus: float | None = None,
        placement_timeout_s: float = DEFAULT_PLACEMENT_TIMEOUT_S,
        idle_release_s: float = IDLE_RELEASE_S,
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        self.checkpoint, self.config = checkpoint, config
        self.dtype, self.device = dtype, device
        self.num_shards, self.redundant = num_shards, redundant
        self.call_timeout_s, self.load_timeout_s = call_timeout_s, load_timeout_s
        first = initial_placement(config.num_local_experts, num_shards, redundant)
        self.balancer = balancer or ExpertLoadBalancer(
            [first] * config.num_hidden_layers, overflow=overflow
        )
        self.version = 0
        self._dead: set[int] = set()
        self._closed = False  # shut down: a replacement under way stops
        self._lock = threading.Lock()
        # A prepared reconfiguration: (version, placements, the actors serving when it started,
        # the actors that loaded it, redundant copies).
        self._pending: tuple | None = None
        self._replacing: set[int] = set()
        self.events: list[str] = []  # what happened, newest last (failures, switches)
        self.transport = resolve_transport(transport, device, shard_gpus)
        # Above compiled_max_bytes per layer, plain calls measured as fast or faster here
        # (BENCHMARKS.md): the graph's shared-memory channels pay to grow and copy large buffers.
        self.fanout = Fanout(dtype, call_timeout_s, compiled_max_bytes, self._mark_dead,
                             self.events)  # fmt: skip
        # Step accounting (serving/control/steptime.py): round trips and each shard's own compute time,
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
        self.nodes = self._nodes_of(self.shards)  # the Ray node of each shard, for operators
        self.idle: IdleRelease | None = None  # releases the compiled graph while unused
        if self.transport in GRAPHS:
            self._compile()
            if idle_release_s > 0:
                self.idle = IdleRelease(idle_release_s, self._release_idle, self._compile)

    # -- the ExpertPool interface ----------------------------------------------------------------

    def begin_step(self) -> None:
        self._switch_if_ready()  # between two steps: every layer of a step sees one version

    def _compile(self) -> None:
        """Compile the fan-out over the current actors; any failure leaves plain calls in
        charge. A graph compiled while the shard set changed is dropped."""
        actors = list(self.shards)
        try:
            if self.transport == "linked":
                graph = LinkedGraph.over(actors, self.device, self.config.hidden_size,
                                         self.call_timeout_s)  # fmt: skip
            else:
                graph = CompiledGraph(actors)
        except Exception as exc:
            self.events.append(f"compile failed: {type(exc).__name__}")
            log.warning("compiling the expert fan-out failed (%s); using plain calls", exc)
            return
        with self._lock:  # a shard added or removed meanwhile changes the count: not current
            now = list(self.shards)
            same = len(now) == len(actors) and all(a is b for a, b in zip(actors, now, strict=True))
            current = not self._dead and same
        if not current:
            graph.teardown()
            return
        self.fanout.set_graph(graph)
        self.events.append("compiled graph ready")

    # -- placement and shard lifecycle ---------------------------------------------------------

    @property
    def transport_in_use(self) -> str:
        """The transport of the live graph ("compiled", "linked (gloo)", "linked (nccl)"), else
        "plain"."""
        graph = self.fanout.graph
        if graph is None:
            return "plain"
        return f"linked ({graph.link.backend})" if isinstance(graph, LinkedGraph) else "compiled"

    def placements(self) -> list[Placement]:
        return [self.balancer.placement(layer) for layer in range(self.balancer.num_layers)]

    @property
    def shard_request(self) -> tuple[str, float]:
        return self.resources.kind, self.shard_amount

    def _wait_for_room(self, shards: int) -> None:
        wait_for_room(shards, self.shard_amount, self.resources.kind, self.placement_timeout_s)

    def _start_actor(self):
        options = self.resources.actor_options(self.shard_amount)
        device = "cuda" if self.device.startswith("cuda") else self.device
        dtype = str(self.dtype).removeprefix("torch.")
        return RemoteShard.options(**options).remote(self.checkpoint, dtype, device)

    def _nodes_of(self, actors: list) -> list[str]:
        return ray.get([a.node_id.remote() for a in actors], timeout=self.load_timeout_s)

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
        self.fanout.set_graph(None)
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
        while not self._closed:
            try:
                version, placements = self.version, self.placements()
                self._wait_for_room(1)
                actor = self._start_actor()
                ray.get(actor.prepare.remote(version, self._layer_experts(placements, shard)),
                        timeout=self.load_timeout_s)  # fmt: skip
                node = self._nodes_of([actor])[0]
                with self._lock:
                    if self._closed or version != self.version:  # closed, or switched: again
                        ray.kill(actor)
                        continue
                    self.shards[shard] = actor
                    self.nodes[shard] = node
                    self._dead.discard(shard)
                self.events.append(f"shard {shard} replaced")
                log.info("expert shard %d replaced", shard)
                if self.transport in GRAPHS and not self._dead:
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
            placements = place_layers(self.load_window(), num_shards, redundant)
            base = list(self.shards)
            self._wait_for_room(num_shards - len(base))
            actors = base[:num_shards] + [
                self._start_actor() for _ in range(num_shards - len(base))
            ]
            version = self.version + 1
            refs = [a.prepare.remote(version, self._layer_experts(placements, s))
                    for s, a in enumerate(actors)]  # fmt: skip
            ray.get(refs, timeout=self.load_timeout_s)
            nodes = self._nodes_of(actors)
            with self._lock:
                self._pending = (version, placements, base, actors, redundant, nodes)
        except Exception as exc:  # a failed reconfiguration leaves the serving placement in place
            log.warning("reconfiguration to %d shards failed: %s", num_shards, exc)
            self.events.append(f"reconfiguration failed: {type(exc).__name__}: {exc}")

    def _switch_if_ready(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        version, placements, base, actors, redundant, nodes = pending
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
        self.nodes = nodes
        self.version = version
        self.events.append(f"switched to placement version {version} on {len(actors)} shards")
        self._retire(old, removed)
        if resized:  # the graph names its actors: rebuild it over the new set
            self.fanout.set_graph(None)
            if self.transport in GRAPHS:
                threading.Thread(target=self._compile, daemon=True).start()

    def load_window(self) -> torch.Tensor:
        """[L, E] tokens per expert, recent: what a new placement is computed from."""
        return self.balancer.tokens_per_expert()

    def _retire(self, old: int, removed: list) -> None:
        """After a switch: free the old version on every shard, stop the removed ones (drained:
        no batch can reach them any more, every batch runs on the forward thread)."""
        for actor in self.shards:
            actor.free.remote(old)  # fire and forget: nothing waits on freeing
        for actor in removed:
            ray.kill(actor)

    def _release_idle(self) -> bool:
        """Tear the compiled graph down while no layer comes (its actors would poll, a core
        each); True when there was one."""
        if self.fanout.graph is None:
            return False
        self.fanout.set_graph(None)
        self.events.append("compiled graph released: idle")
        return True

    def shutdown(self) -> None:
        self._closed = True
        if self.idle is not None:
            self.idle.stop()
        self.fanout.close()
        with self.fanout.lock:
            graph, self.fanout.graph = self.fanout.graph, None
        if graph is not None:
            graph.teardown(background=False)
        for actor in self.shards:
            try:
                ray.kill(actor)
            except Exception:
                pass
