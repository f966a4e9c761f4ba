"""Expert shards shared by several engines: one owner creates and changes them, each engine calls
them through its own view.

Shape legend: L layers, E experts.

With one engine, its RayExpertPool owns the shards and reaches them through a compiled graph. An
actor runs one compiled graph at a time and only the process that compiled a graph may call it
(ARCHITECTURE.md section 7), so M engines cannot each hold one over the same N shards. Here one
`ShardOwner` (a RayExpertPool that never computes) starts, replaces, rebalances and rescales the
shards, and every engine holds a `SharedExpertPool` that sends its layers to them with plain actor
calls (experts/fanout.py), over the owner's latest `PoolView`:

    engine i: SharedExpertPool --every poll_s: view(engine, its load window)--> ShardOwner
              SharedExpertPool --compute, one plain call per shard with rows--> ExpertShard actors
                                                    ShardOwner --prepare / free / kill--> actors

Versions: the owner switches to a new placement once every shard has loaded it; each engine takes
the new view at the start of its next step, so every layer of a step sees one version. The old
version stays loaded, and removed shards alive, for `retire_after_s`: a step begun on it by any
engine still finishes.

Load: each engine sends its balancer's window with every poll; the owner places experts from the
sum of the engines' recent windows (statistics merged across engines).

Failure: an engine whose call to a shard fails serves that layer from other copies (the fan-out's
fallback), marks the actor dead in its own view and reports it; the owner replaces that actor
once, whichever engine reported it, and the replacement reaches every engine with the next view.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Protocol

import torch
from ray.exceptions import RayTaskError

from experts.checkpoint import MixtralConfig
from experts.fanout import Fanout, FansOut
from experts.ray_pool import RayExpertPool
from experts.timing import ExpertTime
from router.balancer import ExpertLoadBalancer
from router.placement import Placement

log = logging.getLogger(__name__)

ACTIONS = ("rebalance", "add_shard", "remove_shard")
RETIRE_AFTER_S = 30.0  # an old placement outlives the switch by this much (steps take far less)
WINDOW_TTL_S = 60.0  # an engine's load window older than this is left out (the engine is gone)


@dataclass(frozen=True)
class PoolView:
    """The owner's shards as an engine uses them: one placement version."""

    version: int
    shards: list  # actor handles, in shard order
    placements: list[Placement]  # per layer
    dead: frozenset[int]  # shards down and being replaced
    nodes: list[str]  # the Ray node of each shard
    redundant: int
    events: list[str]  # the owner's event log, oldest first
    shard_request: tuple[str, float]  # what one more shard asks Ray for


class OwnerLink(Protocol):
    """How an engine reaches the owner: the ShardOwner itself in one process, a Serve handle
    to its deployment when served (serving/api/app.py)."""

    def view(self, engine: str, window: torch.Tensor | None) -> PoolView: ...

    def shard_failed(self, shard: int, actor: object) -> None: ...

    def reconfigure(self, action: str, wait: bool) -> None: ...


def _actor_id(actor: object) -> str:
    return actor._actor_id.hex()  # type: ignore[attr-defined]


class ShardOwner(RayExpertPool):
    """The shards of M engines (RayExpertPool's arguments; plain calls, no compiled graph)."""

    def __init__(self, *args, retire_after_s: float = RETIRE_AFTER_S, **kwargs) -> None:
        self.retire_after_s = retire_after_s
        self._windows: dict[str, tuple[float, torch.Tensor]] = {}  # engine -> (when, [L, E])
        super().__init__(*args, **(kwargs | {"transport": "plain"}))

    def view(self, engine: str, window: torch.Tensor | None) -> PoolView:
        """The current view; `window` is that engine's recent load [L, E] (None: nothing yet).
        A placement loaded meanwhile is switched to here: the owner has no steps of its own."""
        if window is not None:
            self._windows[engine] = (time.monotonic(), window)
        self._switch_if_ready()
        with self._lock:
            return PoolView(self.version, list(self.shards), self.placements(),
                            frozenset(self._dead), list(self.nodes), self.redundant,
                            list(self.events), self.shard_request)  # fmt: skip

    def load_window(self) -> torch.Tensor:
        """[L, E] the sum of the engines' recent windows."""
        now = time.monotonic()
        fresh = [w for when, w in self._windows.values() if now - when < WINDOW_TTL_S]
        return torch.stack(fresh).sum(0) if fresh else super().load_window()

    def shard_failed(self, shard: int, actor: object) -> None:
        """An engine's call to `actor` failed: replace it, unless that actor is gone already."""
        with self._lock:
            current = shard < len(self.shards) and _actor_id(self.shards[shard]) == _actor_id(actor)
        if current:
            self._mark_dead(shard, RuntimeError("an engine's call to it failed"))

    def reconfigure(self, action: str, wait: bool = False) -> None:
        """rebalance, add_shard or remove_shard (RayExpertPool's); the switch follows at the
        next view once loaded."""
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
        getattr(self, action)(wait=wait)

    def _retire(self, old: int, removed: list) -> None:
        timer = threading.Timer(self.retire_after_s, super()._retire, args=(old, removed))
        timer.daemon = True
        timer.start()


class SharedExpertPool(FansOut):
    """One engine's pool over a ShardOwner's shards: ExpertPool and ElasticPool
    (experts/pool.py); changes to the shards are asked of the owner."""

    transport_in_use = "plain (shared)"  # an actor runs one compiled graph: no engine owns one

    def __init__(
        self,
        owner: OwnerLink,
        config: MixtralConfig,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        overflow: str = "split",
        call_timeout_s: float = 30.0,
        poll_s: float = 0.5,
    ) -> None:
        self.owner, self.config, self.dtype, self.device = owner, config, dtype, device
        self.engine = uuid.uuid4().hex  # this engine, to the owner
        self.events: list[str] = []
        self.fanout = Fanout(dtype, call_timeout_s, 0, self._failed, self.events)  # plain calls
        self.timing, self._times = True, ExpertTime()
        self._dead: set[int] = set()
        self._failed_ids: set[str] = set()  # actors this engine saw fail
        self._seen_events = 0
        self._lock = threading.Lock()
        self._next: PoolView | None = None  # the latest view, taken at the next step
        view = owner.view(self.engine, None)
        self.balancer = ExpertLoadBalancer(list(view.placements), overflow=overflow)
        self.version = view.version
        self._apply(view)
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, args=(poll_s,), daemon=True)
        self._poller.start()

    def begin_step(self) -> None:
        with self._lock:
            view, self._next = self._next, None
        if view is not None:
            self._apply(view)

    def _apply(self, view: PoolView) -> None:
        """Take `view` (between steps: nothing in flight)."""
        if view.version != self.version:
            for layer, placement in enumerate(view.placements):
                self.balancer.set_placement(layer, placement)
            self.events.append(f"switched to placement version {view.version}")
        self.version, self.shards, self.nodes = view.version, list(view.shards), list(view.nodes)
        self.num_shards, self.redundant = len(self.shards), view.redundant
        self.shard_request = view.shard_request
        failed = {s for s, a in enumerate(self.shards) if _actor_id(a) in self._failed_ids}
        self._dead.clear()
        self._dead.update(view.dead | failed)  # in place: the fan-out holds this set
        self.events.extend(view.events[self._seen_events :])
        self._seen_events = len(view.events)

    def _poll(self, period_s: float) -> None:
        while not self._stop.wait(period_s):
            try:
                view = self.owner.view(self.engine, self.balancer.tokens_per_expert())
            except Exception as exc:  # the owner restarting: keep serving on the last view
                log.warning("the shard owner did not answer (%s); keeping the last view", exc)
                continue
            with self._lock:
                self._next = view

    def _failed(self, shard: int, exc: BaseException) -> None:
        """The fan-out's failure report: out of this engine's view until the next one; when the
        actor died or hung (not when it raised: it is alive, and a placement version this engine
        still uses may have been freed), out for good and told to the owner, off the forward
        thread."""
        actor = self.shards[shard]
        self._dead.add(shard)
        self.events.append(f"shard {shard} failed: {type(exc).__name__}")
        log.warning("expert shard %d failed (%s); serving from other copies", shard, exc)
        if isinstance(exc, RayTaskError):
            return
        self._failed_ids.add(_actor_id(actor))
        threading.Thread(target=self._report, args=(shard, actor), daemon=True).start()

    def _report(self, shard: int, actor: object) -> None:
        try:
            self.owner.shard_failed(shard, actor)
        except Exception as exc:  # the owner finds it too, when its own next call fails
            log.warning("reporting shard %d to the owner failed: %s", shard, exc)

    def rebalance(self, wait: bool = False) -> threading.Thread:
        return self._ask("rebalance", wait)

    def add_shard(self, wait: bool = False) -> threading.Thread:
        return self._ask("add_shard", wait)

    def remove_shard(self, wait: bool = False) -> threading.Thread:
        if self.num_shards <= 1:
            raise ValueError("cannot remove the last expert shard")
        return self._ask("remove_shard", wait)

    def _ask(self, action: str, wait: bool) -> threading.Thread:
        """The owner does it (loading in the background); every engine switches with a view."""
        thread = threading.Thread(target=self._reconfigure, args=(action,), daemon=True)
        thread.start()
        if wait:
            thread.join()
        return thread

    def _reconfigure(self, action: str) -> None:
        try:
            self.owner.reconfigure(action, True)
        except Exception as exc:  # logged like the owner's own failures: serving goes on
            log.warning("%s through the shard owner failed: %s", action, exc)
            self.events.append(f"reconfiguration failed: {type(exc).__name__}: {exc}")

    def shutdown(self) -> None:
        """Stop polling; the shards are the owner's to stop."""
        self._stop.set()
