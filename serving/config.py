"""The serving configuration: one tree of frozen pydantic models, passed down.

`configs/serve.yaml` is a Ray Serve config file (`serve run` / `serve deploy` read it as is); the
moe-serve settings are the `args` of its application and `http_options` gives host and port. So one
file configures both `moe-serve up --config` and Ray Serve's own tools.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serving.errors import UserError

# moe-serve's metrics port when `moe-serve up` starts Ray (Ray's own default is random). 8080 is
# what Ray's documentation uses in its Prometheus examples and clashes with neither Serve's HTTP
# port (8000) nor Ray's dashboard (8265).
DEFAULT_METRICS_PORT = 8080
BatchStrategy = Literal["fixed", "throughput", "latency", "adaptive"]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PhaseTarget(Frozen):
    """One planner phase: tokens/ms per device, and whether it is below the ceiling."""

    name: str
    tokens_per_ms: float = Field(gt=0)
    feasible: bool = True


class FallbackConfig(Frozen):
    """How far the batch-strategy fallback may go; level L multiplies by factor**L."""

    max_level: int = Field(3, ge=0)
    factor: float = Field(2.0, gt=1.0)  # step token budget and batch slots, per level
    batch_wait_ms_per_level: float = Field(5.0, ge=0)
    # What level 0 is: the scheduler's configured settings (SchedulerConfig below).
    base_step_token_budget: int = Field(512, gt=0)
    base_max_batch_slots: int = Field(16, gt=0)
    base_batch_wait_ms: float = Field(0.0, ge=0)


class ControllerConfig(Frozen):
    """Every threshold of the controller. Targets come from the planner (`config_from_plan`)."""

    period_s: float = Field(10.0, gt=0)
    phases: tuple[PhaseTarget, ...] = ()
    phase: str | None = None  # the current phase's name; None: the first feasible one
    ceiling_tokens_per_ms: float | None = None
    # The planner's memory limit: sequences of seq_len that fit one device (None: unknown).
    max_batch: int | None = Field(None, ge=1)
    seq_len: int = Field(2048, gt=0)
    shortfall_margin: float = Field(0.10, ge=0, lt=1)
    surplus_margin: float = Field(0.10, ge=0, lt=1)
    deep_queue: int = Field(8, ge=1)  # waiting requests from which the queue counts as deep
    # Waiting requests up to which a surplus may scale in (None: half of deep_queue). The band
    # between holds the devices: a queue hovering at the deep mark would otherwise add a device
    # one period and remove it a few periods later.
    shallow_queue: int | None = Field(None, ge=0)
    target_cv: float = Field(0.15, gt=0)
    max_p99_ttft_s: float | None = Field(2.0, gt=0)
    max_p99_tpot_s: float | None = Field(0.2, gt=0)
    batch_strategy: BatchStrategy = "adaptive"
    fallback: FallbackConfig = FallbackConfig()
    min_devices: int = Field(1, ge=1)
    confirm_periods: int = Field(3, ge=1)
    scale_in_periods: int = Field(6, ge=1)
    revert_periods: int = Field(1, ge=1)
    cooldown_periods: int = Field(3, ge=0)
    window_s: float = Field(30.0, gt=0)  # the live tokens/ms sliding window

    @model_validator(mode="after")
    def _shallow_below_deep(self) -> ControllerConfig:
        if self.shallow_queue is not None and self.shallow_queue >= self.deep_queue:
            raise ValueError(
                f"shallow_queue: {self.shallow_queue} must be below deep_queue ({self.deep_queue})"
            )
        return self

    @model_validator(mode="after")
    def _phase_known(self) -> ControllerConfig:
        if self.phase is None:
            return self
        chosen = [p for p in self.phases if p.name == self.phase]
        if not chosen:
            known = ", ".join(p.name for p in self.phases) or "none"
            raise ValueError(f"phase: {self.phase!r} is not a planner phase (known: {known})")
        if not chosen[0].feasible:
            raise ValueError(f"phase: {self.phase!r} exceeds the ceiling; choose a feasible phase")
        return self

    @property
    def shallow_mark(self) -> int:
        """Waiting requests up to which a surplus may scale in."""
        return self.deep_queue // 2 if self.shallow_queue is None else self.shallow_queue

    def current_phase(self) -> tuple[int, PhaseTarget] | None:
        """(1-based number, phase) of the phase in force, or None without feasible phases."""
        for number, p in enumerate(self.phases, start=1):
            if p.name == self.phase or (self.phase is None and p.feasible):
                return number, p
        return None


class SchedulerConfig(BaseModel):
    """Continuous batching: KV cache slots, the per-step token budget and the waiting queue."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # KV cache slots: at most this many sequences are in flight; the cache's memory is fixed by
    # max_batch_slots x max_seq_len.
    max_batch_slots: int = Field(16, gt=0)
    # Tokens one slot holds (prompt + output); capped by the model's context.
    max_seq_len: int = Field(2048, gt=1)
    # Prefill and decode tokens one step may run; long prompts are prefilled in chunks.
    step_token_budget: int = Field(512, gt=0)
    # Requests waiting for a slot; one more is answered 503 with Retry-After.
    max_queue: int = Field(64, ge=0)
    # KV cache slots allocated (None: max_batch_slots): room a batch fallback can grow the batch
    # into at run time. The engine sizes it for its controller's largest fallback level.
    cache_slots: int | None = Field(None, gt=0)
    # Decode steps replayed as CUDA graphs, one launch per step, where the model allows it (a
    # GPU, experts in process, grouped_mm); elsewhere, or False, every step runs eagerly.
    cuda_graphs: bool = True

    @model_validator(mode="after")
    def _decodes_fit(self) -> SchedulerConfig:
        # Every running sequence decodes one token per step, so all of them must fit the budget.
        if self.cache_slots is not None and self.cache_slots < self.max_batch_slots:
            raise ValueError(
                f"cache_slots ({self.cache_slots}) must be at least max_batch_slots "
                f"({self.max_batch_slots})"
            )
        if self.step_token_budget < self.max_batch_slots:
            raise ValueError(
                f"step_token_budget ({self.step_token_budget}) must be at least "
                f"max_batch_slots ({self.max_batch_slots})"
            )
        return self


class LimitsConfig(BaseModel):
    """What one HTTP request may cost the server before it is turned away."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_body_bytes: int = Field(1_000_000, gt=0)
    retry_after_s: int = Field(1, ge=0)  # the Retry-After header on 503
    max_stop_strings: int = Field(4, ge=0)


class MonitoringConfig(BaseModel):
    """What the engine records and whether the controller runs (configs/serve.yaml `monitoring`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Record the moe_* metrics in the engine (serving/control/metrics.py); off: none from the engine.
    metrics: bool = True
    # Run the throughput controller (serving/control/controller_app.py) beside the engine.
    controller: bool = True
    # Seconds between the engine's slower readings (overflow, expert load) and gauge re-sets;
    # gauges expire ~30 s after their last set (ARCHITECTURE.md section 7), so keep it well below.
    period_s: float = Field(5.0, gt=0, le=20)
    # Seconds of steps the step-time breakdown and measured efficiency are taken over (status,
    # metrics, the controller's view); totals since start are kept as well (serving/control/steptime.py).
    accounting_window_s: float = Field(30.0, gt=0)
    # Seconds spent measuring this machine when `hardware` is "cpu" (at router start).
    cpu_measure_s: float = Field(1.0, gt=0)


# Settings that only mean something with ExpertShards: (field, its default, why not in process).
# Any other value without shards is refused, naming the field, rather than silently ignored.
SHARD_SETTINGS = (
    ("overflow", "split", "no expert has a capacity to overflow"),
    ("expert_transport", "auto", "the experts need no transport"),
)


class ServeConfig(BaseModel):
    """Everything `moe-serve up` and the Serve application need."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = None
    model: str | None = None  # checkpoint directory; None is the demo model
    served_model_name: str | None = None  # the name clients send; default: the directory's name
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    # torch intra-op threads in the engine; 0: every core but one, which the HTTP proxy and ingress
    # need: with every core, MKL's threads wait on descheduled peers and HTTP throughput fell by a
    # third on 2 cores (BENCHMARKS.md). Set explicitly: Ray forces OMP_NUM_THREADS=1 on an actor
    # that reserves no CPU.
    torch_threads: int = Field(0, ge=0)
    # CPUs the engine's forward pass is kept on (empty: wherever the OS puts it). On a CPU machine
    # it shares the cores with Ray, Serve's proxy, the ingress and the engine's own event loop;
    # on cores of its own it served faster (serving/engine/cpu_bind.py, BENCHMARKS.md).
    # `moe-serve up` fills it, and moves everything else to the other cores, when `bind_cpus` is
    # on and it starts Ray for one engine with its experts in process on a CPU.
    engine_cpus: tuple[Annotated[int, Field(ge=0)], ...] = ()
    bind_cpus: bool = True
    expert_shards: int = Field(0, ge=0)
    redundant_experts: int = Field(0, ge=0)
    # Engines (attention, KV cache, scheduler: one Serve deployment each). With expert_shards they
    # share one set of shards, held by the ExpertShards deployment and reached with plain actor
    # calls (an actor runs one compiled graph at a time: ARCHITECTURE.md section 7); without, each
    # holds every expert. An ingress sends each request to the engine with fewest in flight.
    engine_replicas: int = Field(1, ge=1)
    # The most engines the controller may run (None: engine_replicas, fixed). Engines beyond
    # engine_replicas are deployed with no replica; the controller starts one when the queue, not
    # the experts, limits tokens/ms and stops it again, drained, when the work fits fewer
    # (ARCHITECTURE.md section 5). Never fewer than engine_replicas.
    max_engine_replicas: int | None = Field(None, ge=1)
    # Seconds one call to an ExpertShard may take before its shard counts as failed (hung) and is
    # replaced; its rows then go to surviving copies. Only used with expert_shards > 0.
    expert_call_timeout_s: float = Field(30.0, gt=0)
    # What each ExpertShard asks Ray for: a share of a GPU on CUDA (0.5: two shards per GPU), or
    # of the CPUs (None: an equal share of the cluster's CPUs, at most one, so any count fits).
    shard_gpus: float = Field(1.0, gt=0)
    shard_cpus: float | None = Field(None, gt=0)
    # How long to wait for the cluster to have room for the shards (an autoscaler may need
    # minutes to add a node) before failing with one line; progress is reported every 10 s.
    placement_timeout_s: float = Field(120.0, gt=0)
    # A Ray custom resource that marks the nodes meant for the engine and the ingress (e.g.
    # `ray start --head --resources '{"moe_engine": 1}'`): on a cluster they then never share a
    # node with the expert shards by chance, so losing a shard's node costs no request. None: Ray
    # places them. ExpertShards spread one per node where possible either way.
    engine_resource: str | None = Field(None, min_length=1)
    # The same for the HTTP ingress alone (None: engine_resource's nodes): e.g. the head node,
    # apart from several engines' nodes, so that losing an engine's node loses no ingress.
    ingress_resource: str | None = Field(None, min_length=1)
    # The Ray cluster runs an autoscaler (`ray up`, KubeRay): the controller may scale out beyond
    # the resources free now, since the new shard's reservation makes the autoscaler start a node
    # (waited for up to placement_timeout_s). Off: only where a node has room already.
    cluster_autoscaling: bool = False
    # With shards: steps of at least this many tokens run as two micro-batches in flight (one's
    # experts compute while the engine runs the other's attention); 0 never. Measure before
    # turning it on (scripts/bench_microbatch.py): on 2 CPU cores it lost (BENCHMARKS.md).
    micro_batch_min_tokens: int = Field(0, ge=0)
    # Token-expert pairs over a slot's capacity (router/balancer.py): `split` to another copy of
    # the same expert (lossless, the default), `reroute` to the token's next-best expert or
    # `drop` them (both change outputs; counted per layer in GET /v1/moe/status). Shards only.
    overflow: Literal["split", "reroute", "drop"] = "split"
    # How a layer's rows reach the shards: `compiled` (Ray's compiled graph, shared memory),
    # `linked` (a process group: NCCL between GPUs, device to device; gloo between CPUs), `plain`
    # (an actor call per shard). `auto`: linked when every shard and the engine have a GPU of their
    # own, else compiled (faster on CPUs, BENCHMARKS.md). Shards only.
    expert_transport: Literal["auto", "compiled", "linked", "plain"] = "auto"
    # Ray Serve's default of 5 silently caps concurrency (ARCHITECTURE.md section 7): set it here.
    max_ongoing_requests: int = Field(256, gt=0)
    drain_timeout_s: float = Field(30.0, ge=0)
    scheduler: SchedulerConfig = SchedulerConfig()
    limits: LimitsConfig = LimitsConfig()
    # Ray's metrics export port, set when `moe-serve up` starts Ray (a joined cluster keeps its own:
    # `ray start --metrics-export-port`). Prometheus scrapes http://HOST:PORT/metrics.
    metrics_port: int = Field(DEFAULT_METRICS_PORT, gt=0, le=65535)
    # The planner's hardware profile for the controller's targets: a name under configs/hardware
    # (h200, h100, ...), a YAML path, or "cpu" (this machine, measured at router start).
    hardware: str = "cpu"
    # `moe-serve bench --json` reports of this deployment (one, or a list pooled): the plan (phase
    # targets, measured factors) uses the efficiency factors measured there, not assumed ones.
    calibration: str | list[str] | None = None
    monitoring: MonitoringConfig = MonitoringConfig()
    # Controller thresholds, batch strategy and fallback; targets (phases, ceiling, memory limit)
    # come from the planner unless `controller.phases` is given.
    controller: ControllerConfig = ControllerConfig()

    @model_validator(mode="after")
    def _shard_settings_need_shards(self) -> ServeConfig:
        if self.expert_shards:
            return self
        for field, default, why in SHARD_SETTINGS:
            if getattr(self, field) != default:
                value = getattr(self, field)
                raise ValueError(f"{field}: {value!r} needs expert_shards > 0 (in process {why})")
        return self

    @model_validator(mode="after")
    def _shared_shards_take_plain_calls(self) -> ServeConfig:
        shared = self.engines_at_most > 1 and self.expert_shards
        if shared and self.expert_transport not in ("auto", "plain"):
            raise ValueError(
                f"expert_transport: {self.expert_transport!r} cannot be used with "
                "several engine replicas (engines sharing the shards reach them with plain calls)"
            )
        return self

    @model_validator(mode="after")
    def _engine_ceiling_above_floor(self) -> ServeConfig:
        top = self.max_engine_replicas
        if top is not None and top < self.engine_replicas:
            raise ValueError(
                f"max_engine_replicas: {top} is below engine_replicas ({self.engine_replicas})"
            )
        return self

    @property
    def engines_at_most(self) -> int:
        """Engine deployments in the app: the most the controller may run."""
        return self.max_engine_replicas or self.engine_replicas

    @model_validator(mode="after")
    def _router_takes_the_queue(self) -> ServeConfig:
        # Below this, Ray Serve would queue requests unseen by our bounded queue (no 503).
        need = self.scheduler.max_batch_slots + self.scheduler.max_queue
        if self.max_ongoing_requests < need:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be at least "
                f"scheduler.max_batch_slots + scheduler.max_queue ({need})"
            )
        return self


def validation_message(exc: ValidationError, prefix: str = "") -> str:
    """The first error of a pydantic ValidationError as one line naming the field."""
    err = exc.errors()[0]
    loc = ".".join(error_path(err["loc"]))
    field = ".".join(p for p in (prefix, loc) if p) or "config"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{field}: {msg}"


def error_path(loc: tuple) -> list[str]:
    """A pydantic error location without the union-member tags it inserts (`str`, `list[int]`)."""
    tags = {"str", "int", "float", "bool", "none", "list", "dict"}
    return [str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p in tags))]


def config_from_args(args: dict[str, Any] | None, source: str = "args") -> ServeConfig:
    """Validate an application's `args` mapping (as Ray Serve passes it) into a ServeConfig."""
    try:
        return ServeConfig.model_validate(args or {})
    except ValidationError as exc:
        raise UserError(validation_message(exc, source)) from None


def load_config(path: str | Path) -> ServeConfig:
    """Read a Ray Serve config YAML: `http_options` host/port and the first application's args."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping (a Ray Serve config file)")
    apps = raw.get("applications") or [{}]
    if not isinstance(apps, list) or not isinstance(apps[0], dict):
        raise UserError(f"{path}: applications: expected a list of mappings")
    args = dict(apps[0].get("args") or {})
    http = raw.get("http_options") or {}
    if not isinstance(http, dict):
        raise UserError(f"{path}: http_options: expected a mapping")
    for key in ("host", "port"):
        if key in http:
            args.setdefault(key, http[key])
    return config_from_args(args, f"{path}: applications[0].args")


def with_overrides(config: ServeConfig, **values: Any) -> ServeConfig:
    """A copy with the given fields replaced (None means keep), validated again."""
    data = config.model_dump()
    data.update({k: v for k, v in values.items() if v is not None})
    return config_from_args(data, "option")
