"""Every metric moe-serve exports, defined in one place, and where Prometheus finds them.

Metrics go through `ray.util.metrics`: each Ray process that records them hands them to its node's
metrics agent, which serves them in Prometheus text format on the node's metrics export port
(http://HOST:PORT/metrics). Facts that shape this module (measured with Ray 2.60, ARCHITECTURE.md
section 7):

- Exported names carry Ray's prefix: `moe_queue_depth` is scraped as `ray_moe_queue_depth`. Counters
  are named with `_total` here, which the exporter keeps as is (`ray_moe_overflow_tokens_total`);
  histograms add `_bucket`, `_sum` and `_count`.
- A gauge disappears about 30 s after its last `set()`, so `Metrics.refresh()` re-sets every gauge
  to its last value; call it at least every ~10 s (the controller loop does, every period).
- The metrics export port is random unless fixed when Ray starts: `ray.init(_metrics_export_port=P)`
  or `ray start --metrics-export-port=P`. `DEFAULT_METRICS_PORT` is moe-serve's documented choice.

Nothing is created at import: a process that records builds one `Metrics()` (after Ray is up) and
keeps it. Labels are bounded: overflow policy (3 values), controller action (6), phase name (the
plan's few phases), step part (5), efficiency factor (4). No per-request, per-expert or per-layer
labels.
"""

from __future__ import annotations

import threading
from typing import Any

from serving.config import DEFAULT_METRICS_PORT

# What Ray's exporter puts before each custom metric name.
EXPORT_PREFIX = "ray_"

# Seconds. TTFT spans queueing + prefill; TPOT is one decode step; end-to-end a whole request.
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
E2E_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# name -> (kind, description, tag keys, histogram boundaries)
DEFINITIONS: dict[str, tuple[str, str, tuple[str, ...], tuple[float, ...]]] = {
    "moe_tokens_per_ms_per_gpu": (
        "gauge",
        "Live tokens (prompt + generated) per ms per device in use (sliding window)",
        (),
        (),
    ),
    "moe_target_tokens_per_ms": ("gauge", "Current phase target, tokens/ms per device", (), ()),
    "moe_ceiling_tokens_per_ms": ("gauge", "Planner ceiling, tokens/ms per device", (), ()),
    "moe_phase": ("gauge", "Current phase number (1-based), labelled by name", ("phase",), ()),
    "moe_expert_load_cv": ("gauge", "CV of expert load across shards (max over layers)", (), ()),
    "moe_expert_load_max_over_mean": (
        "gauge",
        "Max/mean of expert load across shards (max over layers)",
        (),
        (),
    ),
    "moe_overflow_tokens_total": (
        "counter",
        "Token-expert pairs over slot capacity, by overflow policy",
        ("policy",),
        (),
    ),
    "moe_request_ttft_seconds": ("histogram", "Time to first token", (), TTFT_BUCKETS_S),
    "moe_request_tpot_seconds": ("histogram", "Time per output token", (), TPOT_BUCKETS_S),
    "moe_request_e2e_seconds": ("histogram", "Request end-to-end latency", (), E2E_BUCKETS_S),
    "moe_queue_depth": ("gauge", "Requests waiting for a batch slot", (), ()),
    "moe_step_batch_tokens": ("gauge", "Tokens (prefill + decode) in the last step", (), ()),
    "moe_kv_cache_usage": ("gauge", "Fraction of KV cache slots in use (0-1)", (), ()),
    "moe_step_time_fraction": (
        "gauge",
        "Share of step time by part: dense, expert, transport, imbalance, bubble (sums to 1)",
        ("part",),
        (),
    ),
    "moe_measured_efficiency": (
        "gauge",
        "Measured efficiency: tokens/ms per device over the ceiling (the factors' product)",
        (),
        (),
    ),
    "moe_efficiency_factor": (
        "gauge",
        "Measured planner factor: kernel, communication, load_imbalance, pipeline_bubbles",
        ("factor",),
        (),
    ),
    "moe_controller_actions_total": (
        "counter",
        "Controller decisions, by action (hold included: one per period)",
        ("action",),
        (),
    ),
}
METRIC_NAMES = tuple(DEFINITIONS)
# The overflow label values, matching router.balancer.OverflowCounts' fields.
OVERFLOW_POLICIES = ("split", "rerouted", "dropped")


def exported_name(name: str) -> str:
    """The name Prometheus scrapes for a metric defined here (Ray adds its prefix)."""
    return EXPORT_PREFIX + name


def exported_names() -> list[str]:
    """Every scraped series name: histograms as their `_bucket` series."""
    kinds = {name: kind for name, (kind, *_rest) in DEFINITIONS.items()}
    return [exported_name(n) + ("_bucket" if kinds[n] == "histogram" else "") for n in kinds]


class Metrics:
    """The metric objects of one recording process, with the last value of every gauge.

    Build it inside the process that records (a Serve replica, the controller actor), after Ray is
    initialised; recording methods are thread-safe and cheap (a dict update and a Ray call).
    """

    def __init__(self) -> None:
        from ray.util import metrics  # here: importing this module must not need Ray

        self._lock = threading.Lock()
        self._gauge_values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._overflow_seen = dict.fromkeys(OVERFLOW_POLICIES, 0)
        self._phase: str | None = None
        self._objects: dict[str, Any] = {}
        for name, (kind, description, tags, bounds) in DEFINITIONS.items():
            if kind == "gauge":
                obj = metrics.Gauge(name, description, tag_keys=tags)
            elif kind == "counter":
                obj = metrics.Counter(name, description, tag_keys=tags)
            else:
                obj = metrics.Histogram(name, description, boundaries=list(bounds), tag_keys=tags)
            self._objects[name] = obj

    # --- gauges, re-set by refresh() ---

    def _set(self, name: str, value: float | None, tags: dict[str, str] | None = None) -> None:
        if value is None:
            return
        key = (name, tuple(sorted((tags or {}).items())))
        with self._lock:
            self._gauge_values[key] = float(value)
        self._objects[name].set(float(value), tags=tags)

    def refresh(self) -> None:
        """Re-set every gauge to its last value, so that none expires (~30 s after a set)."""
        with self._lock:
            values = list(self._gauge_values.items())
        for (name, tags), value in values:
            self._objects[name].set(value, tags=dict(tags) or None)

    def set_targets(
        self, *, target: float, ceiling: float, phase_number: int, phase_name: str
    ) -> None:
        """The controller's current phase target and the planner's ceiling (tokens/ms/device)."""
        self._set("moe_target_tokens_per_ms", target)
        self._set("moe_ceiling_tokens_per_ms", ceiling)
        if self._phase is not None and self._phase != phase_name:
            # The old phase's series reads 0 from now on, so that only the current one is > 0.
            self._set("moe_phase", 0, {"phase": self._phase})
        self._phase = phase_name
        self._set("moe_phase", phase_number, {"phase": phase_name})

    def record_throughput(self, tokens_per_ms_per_device: float | None) -> None:
        """Live tokens/ms per device (None: no measurement yet; the gauge keeps its last value)."""
        self._set("moe_tokens_per_ms_per_gpu", tokens_per_ms_per_device)

    def record_load(self, *, cv: float | None, max_over_mean: float | None) -> None:
        """Expert load evenness across shards: the worst layer's CV and max/mean."""
        self._set("moe_expert_load_cv", cv)
        self._set("moe_expert_load_max_over_mean", max_over_mean)

    def record_step(
        self, *, batch_tokens: int, queue_depth: int, kv_cache_usage: float | None = None
    ) -> None:
        """One scheduler step: its token count, the waiting queue, KV cache use (0-1)."""
        self._set("moe_step_batch_tokens", batch_tokens)
        self._set("moe_queue_depth", queue_depth)
        self._set("moe_kv_cache_usage", kv_cache_usage)

    def record_efficiency(
        self,
        fractions: dict[str, float],
        efficiency: float | None = None,
        factors: dict[str, float] | None = None,
    ) -> None:
        """The step-time breakdown of the engine's recent window, and the measured factors where
        the deployment has a plan (None: the gauges keep their last value)."""
        for part, value in fractions.items():
            self._set("moe_step_time_fraction", value, {"part": part})
        self._set("moe_measured_efficiency", efficiency)
        for name, value in (factors or {}).items():
            self._set("moe_efficiency_factor", value, {"factor": name})

    # --- counters and histograms ---

    def record_request(self, *, ttft_s: float, e2e_s: float, tpot_s: float | None = None) -> None:
        """One finished request's latencies; tpot_s is None for a single-token answer."""
        self._objects["moe_request_ttft_seconds"].observe(ttft_s)
        self._objects["moe_request_e2e_seconds"].observe(e2e_s)
        if tpot_s is not None:
            self._objects["moe_request_tpot_seconds"].observe(tpot_s)

    def record_overflow_totals(self, split: int, rerouted: int, dropped: int) -> None:
        """Cumulative overflow counts (the balancer's `counters()` summed over layers): the
        increase since the last call goes to the counter, so callers need not keep deltas."""
        totals = {"split": split, "rerouted": rerouted, "dropped": dropped}
        for policy, total in totals.items():
            with self._lock:
                delta, self._overflow_seen[policy] = total - self._overflow_seen[policy], total
            # A new balancer (a restart) counts from 0 again: its whole total is new.
            delta = delta if delta >= 0 else total
            if delta > 0:  # Ray's Counter refuses an increment of 0
                self._objects["moe_overflow_tokens_total"].inc(delta, tags={"policy": policy})

    def count_action(self, action: str) -> None:
        """One controller decision (hold included)."""
        self._objects["moe_controller_actions_total"].inc(1, tags={"action": action})


# --- where the metrics are served ---


def ray_init_kwargs(port: int = DEFAULT_METRICS_PORT) -> dict[str, int]:
    """Keyword arguments that make `ray.init()` (starting a local Ray) serve metrics on `port`."""
    return {"_metrics_export_port": port}


def ray_start_args(port: int = DEFAULT_METRICS_PORT) -> list[str]:
    """`ray start` flags for the same, as used in configs/cluster.yaml."""
    return [f"--metrics-export-port={port}"]


def node_metrics_port(node_ip: str | None = None) -> int:
    """The metrics export port of this node (or of the node at `node_ip`) of the running Ray."""
    import ray

    node_ip = node_ip or ray.util.get_node_ip_address()
    for node in ray.nodes():
        if node.get("Alive") and node.get("NodeManagerAddress") == node_ip:
            return int(node["MetricsExportPort"])
    raise RuntimeError(f"no live Ray node at {node_ip}")


def prometheus_url(host: str = "127.0.0.1", port: int = DEFAULT_METRICS_PORT) -> str:
    """The URL Prometheus scrapes (what `moe-serve up` prints)."""
    return f"http://{host}:{port}/metrics"


def scrape_config(targets: list[str], interval_s: float = 5.0) -> dict[str, Any]:
    """A minimal prometheus.yml (as a mapping) scraping `targets` ("host:port") for moe-serve."""
    interval = f"{interval_s:g}s"
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [{"job_name": "moe-serve", "static_configs": [{"targets": targets}]}],
    }
