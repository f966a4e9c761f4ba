"""The controller loop around `decide()`: read counters, decide, apply, log, count; never dies.

Each period `ControllerLoop.step()`:
  1. reads the app's cumulative `Counters` through an injected callable,
  2. turns them into an `Observation` (live tokens/ms per device over a sliding window),
  3. calls the pure `decide()`,
  4. applies any action other than hold through an injected callable (the new state is kept only
     once the apply succeeded, so a failed action is proposed again next period),
  5. logs the decision with its reason, counts it in `moe_controller_actions_total`, re-sets the
     controller's gauges.
Any exception in a step is logged and the loop goes on (as Ray Serve's controller does).

`ControllerActor` hosts the loop in a Ray actor that Ray restarts if it dies (`max_restarts=-1`);
a restarted controller starts from scratch (empty window, fallback level 0, no history).
`StatusReport` is the JSON the app serves at `GET /v1/moe/status` and `moe-serve status` reads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from serving.control.controller import (
    ControllerConfig,
    ControllerState,
    Decision,
    Observation,
    decide,
    devices_in_use,
    tokens_per_ms_per_device,
)

logger = logging.getLogger("moe_serve.controller")

CONTROLLER_NAME = "moe-serve-controller"
HISTORY = 20  # actions kept for the status report


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Counters(Frozen):
    """What the app reports each period; cumulative where it says so."""

    tokens_generated: int = Field(ge=0)  # cumulative output tokens since the app started
    # Cumulative prompt + output tokens run: the planner's unit, the rate the controller uses
    # where given (None: an app that does not count them; the output tokens stand in).
    tokens_processed: int | None = Field(None, ge=0)
    # The step-time breakdown of the engine's recent window (serving/control/steptime.py PARTS).
    step_fractions: dict[str, float] | None = None
    measured_efficiency: float | None = None  # tokens/ms per device over the ceiling
    gpus: int = Field(0, ge=0)  # GPUs in use by the engine and the expert shards
    cpu_shards: int = Field(0, ge=0)  # expert shards on CPU, each counted as a device
    queue_depth: int = Field(0, ge=0)
    expert_load_cv: float | None = None  # worst layer: ExpertLoadBalancer.stats() cv_shards
    max_over_mean: float | None = None  # worst layer: max_over_mean_shards
    p99_ttft_s: float | None = None  # over the app's recent requests
    p99_tpot_s: float | None = None
    can_scale_out: bool = False
    can_scale_in: bool = False
    can_rebalance: bool = True
    # Engine replicas: the engine fills running and engine_slots (its batch slots now), the
    # controller's reader the rest (serving/control/controller_app.py).
    engines: int = Field(1, ge=1)
    running: int = Field(0, ge=0)
    engine_slots: int = Field(0, ge=0)
    can_add_engine: bool = False
    can_remove_engine: bool = False
    draining: bool = False  # this engine takes no more requests (being stopped)


class ActionRecord(Frozen):
    time: float  # Unix seconds
    action: str
    reason: str


class StatusReport(Frozen):
    """GET /v1/moe/status: the controller's view, as `moe-serve status` prints it."""

    tokens_per_ms_per_device: float | None = None
    target_tokens_per_ms: float | None = None
    ceiling_tokens_per_ms: float | None = None
    phase: str | None = None
    expert_load_cv: float | None = None
    max_over_mean: float | None = None
    queue_depth: int | None = None
    devices: int | None = None
    step_fractions: dict[str, float] | None = None  # where the engine's recent steps went
    measured_efficiency: float | None = None
    efficiency: dict | None = None  # the engine's full efficiency section (filled by the engine)
    # The overflow policy and, per MoE layer, the pairs over capacity it split, rerouted or
    # dropped since start (filled by the engine; None without shards).
    overflow: dict | None = None
    # The Ray node id of each ExpertShard, in shard order (empty without shards).
    shard_nodes: list[str] = []
    engine_node: str | None = None  # the Ray node of the engine replica that answered
    engine_replicas: int = 1  # engines serving behind the ingress (filled by the ingress)
    max_engine_replicas: int = 1  # the most the controller may run (filled by the ingress)
    # How layers reach the shards now: "compiled" (the compiled graph), "plain" (actor calls: a
    # shard being replaced, or the graph released while idle); None without shards.
    expert_transport: str | None = None
    # The CPUs the engine's forward thread is kept on, read from it (serving/engine/cpu_bind.py);
    # None: not kept anywhere.
    engine_cpus: list[int] | None = None
    # The CPUs the engine's event loop is kept on, read from it: the forward pass's one core, or
    # None (serving/engine/cpu_bind.py loop_cores).
    loop_cpus: list[int] | None = None
    batch_strategy: str | None = None
    fallback_level: int = 0
    last_decision: ActionRecord | None = None  # hold included
    actions: list[ActionRecord] = []  # the last actions other than hold, oldest first


class TokenWindow:
    """(time, cumulative tokens) samples of the last `window_s` seconds, for the live rate."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, time_s: float, tokens: int) -> None:
        if self._samples and tokens < self._samples[-1][1]:
            self._samples.clear()  # the app restarted: its counter went back to 0
        self._samples.append((time_s, tokens))
        # Keep one sample at or before the window's start, so the window is fully covered.
        while len(self._samples) > 1 and self._samples[1][0] <= time_s - self.window_s:
            self._samples.popleft()

    def rate(self, devices: int) -> float | None:
        return tokens_per_ms_per_device(list(self._samples), devices)


class ControllerLoop:
    """Runs decide() every period around injected I/O; see the module docstring for one step."""

    def __init__(
        self,
        config: ControllerConfig,
        read_counters: Callable[[], Counters],
        apply: Callable[[Decision], None],
        metrics: Any | None = None,  # serving.metrics.Metrics, or None (not recorded)
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.state = ControllerState()
        self.failures = 0
        self._read, self._apply, self._metrics = read_counters, apply, metrics
        self._clock, self._wall = clock, wall_clock
        self._window = TokenWindow(config.window_s)
        self._lock = threading.Lock()
        self._last_obs: Observation | None = None
        self._last: ActionRecord | None = None
        self._history: deque[ActionRecord] = deque(maxlen=HISTORY)

    def observe(self) -> Observation:
        """Steps 1-2: counters in, observation out."""
        c = self._read()
        devices = devices_in_use(c.gpus, c.cpu_shards)
        tokens = c.tokens_processed if c.tokens_processed is not None else c.tokens_generated
        self._window.add(self._clock(), tokens)
        fields = c.model_dump(
            exclude={"tokens_generated", "tokens_processed", "gpus", "cpu_shards", "draining"}
        )
        return Observation(
            tokens_per_ms_per_device=self._window.rate(devices), devices=devices, **fields
        )

    def step(self) -> Decision | None:
        """One period; returns the decision, or None when the step failed (logged)."""
        try:
            obs = self.observe()
            decision, new_state = decide(self.state, obs, self.config)
            if decision.action != "hold":
                self._apply(decision)
            self.state = new_state
            self._record(obs, decision)
            return decision
        except Exception:
            self.failures += 1
            logger.exception("controller step failed (%d so far); continuing", self.failures)
            return None

    def _record(self, obs: Observation, decision: Decision) -> None:
        record = ActionRecord(time=self._wall(), action=decision.action, reason=decision.reason)
        with self._lock:
            self._last_obs, self._last = obs, record
            if decision.action != "hold":
                self._history.append(record)
        logger.info("controller: %s: %s", decision.action, decision.reason)
        if self._metrics is not None:
            self._export(obs, decision)

    def _export(self, obs: Observation, decision: Decision) -> None:
        m = self._metrics
        m.count_action(decision.action)
        m.record_throughput(obs.tokens_per_ms_per_device)
        m.record_load(cv=obs.expert_load_cv, max_over_mean=obs.max_over_mean)
        current = self.config.current_phase()
        if current is not None and self.config.ceiling_tokens_per_ms is not None:
            number, phase = current
            m.set_targets(
                target=phase.tokens_per_ms,
                ceiling=self.config.ceiling_tokens_per_ms,
                phase_number=number,
                phase_name=phase.name,
            )
        m.refresh()

    def run(self, stop: threading.Event) -> None:
        """Step every period until `stop` is set."""
        while not stop.wait(self.config.period_s):
            self.step()

    def status(self) -> StatusReport:
        with self._lock:
            obs, last, actions = self._last_obs, self._last, list(self._history)
        current = self.config.current_phase()
        return StatusReport(
            tokens_per_ms_per_device=obs.tokens_per_ms_per_device if obs else None,
            target_tokens_per_ms=current[1].tokens_per_ms if current else None,
            ceiling_tokens_per_ms=self.config.ceiling_tokens_per_ms,
            phase=current[1].name if current else None,
            expert_load_cv=obs.expert_load_cv if obs else None,
            max_over_mean=obs.max_over_mean if obs else None,
            queue_depth=obs.queue_depth if obs else None,
            devices=obs.devices if obs else None,
            step_fractions=obs.step_fractions if obs else None,
            measured_efficiency=obs.measured_efficiency if obs else None,
            batch_strategy=self.config.batch_strategy,
            fallback_level=self.state.fallback_level,
            last_decision=last,
            actions=actions,
        )


class _Lazy:
    """Builds the real callable on first use, so that a factory failing (the app not up yet)
    fails one step, not the actor's constructor (Ray does not retry a failed constructor)."""

    def __init__(self, factory: Callable[[], Callable]) -> None:
        self._factory, self._fn = factory, None

    def __call__(self, *args):
        if self._fn is None:
            self._fn = self._factory()
        return self._fn(*args)


class ControllerActor:
    """The loop in a thread of a Ray actor. Factories, not callables, cross into the actor:
    `make_counters()` returns the counters reader, `make_apply()` the action applier (e.g. closing
    over Serve deployment handles); both are built lazily in the actor's process."""

    def __init__(
        self,
        config: ControllerConfig,
        make_counters: Callable[[], Callable[[], Counters]],
        make_apply: Callable[[], Callable[[Decision], None]],
    ) -> None:
        from serving.control.metrics import Metrics

        metrics = Metrics()
        self._loop = ControllerLoop(config, _Lazy(make_counters), _Lazy(make_apply), metrics)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop.run, args=(self._stop,), name="moe-controller", daemon=True
        )
        self._thread.start()

    def status(self) -> dict:
        """The StatusReport as JSON-ready data (what GET /v1/moe/status returns)."""
        return self._loop.status().model_dump(mode="json")

    def stop(self) -> None:
        self._stop.set()


def start_controller(
    config: ControllerConfig,
    make_counters: Callable[[], Callable[[], Counters]],
    make_apply: Callable[[], Callable[[Decision], None]],
    name: str = CONTROLLER_NAME,
    namespace: str | None = None,
):
    """Start (or find, by name) the controller actor; Ray restarts it whenever it dies."""
    import ray

    actor = ray.remote(max_restarts=-1, max_task_retries=-1, num_cpus=0)(ControllerActor)
    options: dict[str, Any] = {"name": name, "get_if_exists": True}
    if namespace is not None:
        options["namespace"] = namespace
    return actor.options(**options).remote(config, make_counters, make_apply)
