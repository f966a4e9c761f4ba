"""`moe-serve up`: start (or join) Ray, deploy the HTTP application, serve until told to stop.

On Ctrl-C or SIGTERM it (1) stops admitting requests (new ones get 503 with Retry-After), (2) waits
for the requests in flight to finish, at most `drain_timeout_s`, (3) deletes the application
(its replicas finish sending first), and (4) stops the Ray it started, Serve with it (a joined
cluster is left running). When it starts Ray, the server runs under a supervisor in a session of
its own (serving/cli/supervisor.py), so that SIGTERM to the whole process group drains the same
way.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

from serving.cli.supervisor import die_with_supervisor, supervise, supervised
from serving.config import ServeConfig, load_config, with_overrides
from serving.control.metrics import DEFAULT_METRICS_PORT
from serving.engine import cpu_bind


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="serve the OpenAI-compatible HTTP API on Ray Serve")
    p.add_argument("--model", metavar="DIR", help="Mixtral checkpoint directory (default: demo)")
    p.add_argument("--host", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--expert-shards", type=int, metavar="N", help="ExpertShard actors (0: none)")
    p.add_argument("--redundant-experts", type=int, metavar="R", help="extra expert replicas")
    p.add_argument(
        "--engine-replicas",
        type=int,
        metavar="M",
        help="engine deployments (default 1); with --expert-shards they share the shards",
    )
    p.add_argument(
        "--max-engine-replicas",
        type=int,
        metavar="M",
        help="the most engines the controller may run (default: --engine-replicas, fixed): it "
        "adds one when the queue, not the experts, limits tokens/ms, and removes it, drained, "
        "when the work fits fewer",
    )
    _add_shard_flags(p)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or MOE_SERVE_API_KEY)")
    p.add_argument("--config", metavar="YAML", help="a Ray Serve config file (configs/serve.yaml)")
    p.add_argument(
        "--address", help="join this Ray cluster (or RAY_ADDRESS) instead of starting one"
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", help="torch device of the engine, e.g. cpu or cuda:0")
    p.add_argument("--dashboard", action="store_true", help="start Ray's dashboard too")
    p.add_argument("--no-bind-cpus", dest="bind_cpus", action="store_false", default=None,
                   help="on a CPU, leave the engine's forward pass where the OS puts it (default: "
                   "cores of its own, Ray on the others, for one engine holding its experts)")  # fmt: skip
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="P",
        help=f"Ray's metrics export port, where Prometheus scrapes http://HOST:P/metrics "
        f"(default {DEFAULT_METRICS_PORT}; only when this command starts Ray: a joined cluster "
        "keeps the port of its `ray start --metrics-export-port`)",
    )
    p.add_argument(
        "--hardware",
        metavar="PROFILE",
        help="hardware profile of the controller's targets: h200, h100, a100, a YAML, or cpu "
        "(measured; the default)",
    )
    p.add_argument(
        "--calibrate",
        metavar="REPORT.json",
        action="append",
        help="a `moe-serve bench --json` report of this deployment (repeat to pool several): the "
        "controller's targets use the efficiency factors measured there (checked before deploying)",
    )
    p.set_defaults(func=run)


def _add_shard_flags(p: argparse.ArgumentParser) -> None:
    """What the ExpertShards ask for, how long to wait for room, and the overflow policy."""
    p.add_argument(
        "--overflow",
        choices=["split", "reroute", "drop"],
        help="pairs over a slot's capacity: split to another copy (default, lossless), reroute "
        "to the next-best expert or drop (both change outputs); with --expert-shards",
    )
    p.add_argument(
        "--expert-transport",
        choices=["auto", "compiled", "linked", "plain"],
        help="how a layer's rows reach the shards: compiled graph (shared memory), linked (NCCL "
        "between GPUs, gloo between CPUs) or plain actor calls; auto (default): linked when "
        "each shard has a whole GPU, else compiled",
    )
    p.add_argument(
        "--shard-cpus",
        type=float,
        metavar="C",
        help="CPUs each ExpertShard asks Ray for (default: an equal share of the cluster's CPUs, "
        "at most 1, so shards share cores)",
    )
    p.add_argument(
        "--shard-gpus",
        type=float,
        metavar="G",
        help="GPUs each ExpertShard asks for on CUDA (default 1; 0.5 puts two shards per GPU)",
    )
    p.add_argument(
        "--engine-resource",
        metavar="NAME",
        help="place the engine and the ingress on nodes that advertise this Ray custom resource "
        "(ray start --resources '{\"NAME\": 1}'), apart from the shards' nodes",
    )
    p.add_argument(
        "--ingress-resource",
        metavar="NAME",
        help="place the HTTP ingress on nodes that advertise this Ray custom resource (default: "
        "the engine's), e.g. the head, apart from several engines' nodes",
    )
    p.add_argument(
        "--cluster-autoscaling",
        action="store_true",
        default=None,
        help="the Ray cluster has an autoscaler: the controller may add a shard where no node has "
        "room yet (the autoscaler starts one; see --placement-timeout)",
    )
    p.add_argument(
        "--placement-timeout",
        type=float,
        metavar="S",
        help="seconds to wait for room for the shards before failing (default 120; an "
        "autoscaling cluster may need longer)",
    )


def resolve_config(args: argparse.Namespace) -> ServeConfig:
    """The config file (if any), then the flags; the API key may come from MOE_SERVE_API_KEY."""
    config = load_config(args.config) if args.config else ServeConfig()
    return with_overrides(
        config,
        model=args.model,
        host=args.host,
        port=args.port,
        expert_shards=args.expert_shards,
        redundant_experts=args.redundant_experts,
        engine_replicas=args.engine_replicas,
        max_engine_replicas=args.max_engine_replicas,
        overflow=args.overflow,
        expert_transport=args.expert_transport,
        shard_cpus=args.shard_cpus,
        shard_gpus=args.shard_gpus,
        placement_timeout_s=args.placement_timeout,
        engine_resource=args.engine_resource,
        ingress_resource=args.ingress_resource,
        cluster_autoscaling=args.cluster_autoscaling,
        api_key=args.api_key or os.environ.get("MOE_SERVE_API_KEY") or None,
        dtype=args.dtype,
        device=args.device,
        bind_cpus=args.bind_cpus,
        metrics_port=args.metrics_port,
        hardware=args.hardware,
        calibration=args.calibrate,
    )


def run(args: argparse.Namespace) -> int:
    from experts.checkpoint import Checkpoint
    from serving.api.engines import engine_threads
    from serving.api.model_info import ModelInfo
    from serving.api.serving_model import expert_options, model_dir

    config = resolve_config(args)
    if config.calibration:
        from serving.control.calibrate import load_calibration

        load_calibration(config.calibration)  # a bad report fails here, in one line
    # Fail here, in one line, rather than inside a replica: the checkpoint and the options.
    expert_options(config)
    path = model_dir(config)
    Checkpoint(path).validate()  # headers only, no tensor data: a cut download fails here
    ModelInfo.load(path, config)
    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:  # Ray will be ours: keep it out of the caller's process group
        if not supervised():
            return supervise(args.argv)
        die_with_supervisor()
    split = None if address else cpu_bind.split_for(config, engine_threads(config))
    if split is not None:  # Ray's processes, started next from this thread, inherit its CPUs
        cpu_bind.bind_this_thread(split.rest)
        config = config.model_copy(update={"engine_cpus": split.engine})
    _start_ray(address, args.dashboard, config.metrics_port)
    stop = _stop_event()  # after ray.init, which installs a SIGTERM handler that exits at once
    try:
        _check_engine_resource(config)
        _wait_for_shard_room(config)
        _deploy(config)
        _announce(config)
        _announce_metrics(config)
        while not stop.wait(0.5):
            pass
        print("moe-serve up: stopping: draining requests in flight", file=sys.stderr, flush=True)
        _drain(config)
    finally:
        _shutdown()
    print("moe-serve up: stopped", file=sys.stderr, flush=True)
    return 0


def _stop_event() -> threading.Event:
    """Set by SIGINT or SIGTERM; a second signal interrupts the drain."""
    stop = threading.Event()

    def handle(signum: int, _frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    return stop


def _start_ray(address: str | None, dashboard: bool, metrics_port: int) -> bool:
    """Join `address` or start a local Ray (its metrics on `metrics_port`); True when we started
    it (and so must stop it)."""
    import ray

    from serving.control.metrics import ray_init_kwargs

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    if address:
        ray.init(address=address, log_to_driver=False)
        return False
    # "local": our own Ray, even where `ray start` ran on this machine (a bare ray.init() would
    # join that cluster, and refuse our settings for it); joining is what --address is for.
    ray.init(address="local", include_dashboard=dashboard, log_to_driver=False,
             **ray_init_kwargs(metrics_port))  # fmt: skip
    return True


def _check_engine_resource(config: ServeConfig) -> None:
    """An engine resource no node has would leave the engine unplaced, silently: fail here."""
    import ray

    from serving.api.engines import engine_share
    from serving.errors import UserError

    for field in ("engine_resource", "ingress_resource"):
        name = getattr(config, field)
        if name and ray.cluster_resources().get(name, 0) <= 0:
            raise UserError(
                f"{field} {name!r}: no node in the Ray cluster advertises it (start the "
                f"node with: ray start --resources '{{\"{name}\": 1}}')"
            )
    name = config.engine_resource
    units, wanted = ray.cluster_resources().get(name, 0), config.engine_replicas
    if name and wanted > 1 and units < wanted * engine_share(config):
        raise UserError(
            f"engine_resource {name!r}: the cluster advertises {units:g} units and "
            f"{wanted} engine replicas take one each (mark one node per engine)"
        )


def _wait_for_shard_room(config: ServeConfig) -> None:
    """Wait, out loud, until the cluster has room for the shards, or fail in one line: inside
    the engine replica the same wait would be invisible here."""
    if not config.expert_shards:
        return
    from experts.shard_resources import ShardResources, wait_for_room

    resources = ShardResources(config.device.startswith("cuda"), config.shard_gpus,
                               config.shard_cpus)  # fmt: skip
    amount = resources.amount(config.expert_shards)
    wait_for_room(config.expert_shards, amount, resources.kind, config.placement_timeout_s)


def _deploy(config: ServeConfig) -> None:
    from ray import serve

    from serving.api.app import run_app

    # One HTTP proxy, on the head, as configs/serve.yaml says: Serve's default puts one on every
    # node with a replica, and losing such a node (an engine's) cut the connections it held.
    serve.start(proxy_location="HeadOnly", http_options={"host": config.host, "port": config.port})
    run_app(config)


def _announce(config: ServeConfig) -> None:
    from serving.api.serving_model import served_name

    base = f"http://{config.host}:{config.port}"
    auth = ' -H "Authorization: Bearer $MOE_SERVE_API_KEY"' if config.api_key else ""
    body = f'{{"model": "{served_name(config)}", "prompt": "Hello, MoE", "max_tokens": 16}}'
    lines = [
        f"moe-serve up: serving {served_name(config)} at {base}",
        f"  POST {base}/v1/completions",
        f"  POST {base}/v1/chat/completions",
        f"  GET  {base}/v1/models",
        f"  GET  {base}/health",
        "try:",
        f"  curl {base}/v1/completions -H 'Content-Type: application/json'{auth} -d '{body}'",
        "Ctrl-C or SIGTERM stops it (requests in flight finish first).",
    ]
    if config.expert_shards:
        from experts.link import resolve_transport

        transport = resolve_transport(config.expert_transport, config.device, config.shard_gpus)
        if config.engines_at_most > 1:
            transport = "plain (shared by the engines)"
        lines.insert(1, f"  experts on {config.expert_shards} ExpertShards, transport: {transport}")
    if config.engine_cpus:
        cpus = ", ".join(map(str, config.engine_cpus))
        loop = cpu_bind.loop_cores(config.engine_cpus)  # where the Engine binds its loop too
        what = "forward pass and event loop" if loop else "forward pass"
        lines.insert(1, f"  the engine's {what} on CPU {cpus} (engine_cpus)")
    if config.engines_at_most > config.engine_replicas:
        more = f"{config.engine_replicas} engine replicas, up to {config.engines_at_most}"
        lines.insert(1, f"  {more} as the controller decides")
    elif config.engine_replicas > 1:
        lines.insert(1, f"  {config.engine_replicas} engine replicas")
    print("\n".join(lines), flush=True)


def _announce_metrics(config: ServeConfig) -> None:
    """Where Prometheus scrapes this node, and where the controller's view is."""
    from serving.control.metrics import node_metrics_port, prometheus_url

    base = f"http://{config.host}:{config.port}"
    try:
        url = prometheus_url(config.host, node_metrics_port())
    except Exception as exc:  # the address is a convenience: serving goes on without it
        url = f"unknown ({exc})"
    print(f"  metrics (Prometheus): {url}", flush=True)
    print(f"  status: moe-serve status --url {base}   (GET {base}/v1/moe/status)", flush=True)


def _drain(config: ServeConfig) -> None:
    """Stop admitting, then wait until nothing is in flight or the timeout passes."""
    from ray import serve

    from serving.api.app import APP_NAME
    from serving.api.engines import engine_names
    from serving.control.engine_scaler import engine_states

    timeout_s = config.drain_timeout_s
    try:
        names = engine_names(config)
        if config.engines_at_most > config.engine_replicas:  # not the standby ones: none to wait on
            names = [s.name for s in engine_states(APP_NAME, names) if s.target > 0]
        engines = [serve.get_deployment_handle(n, app_name=APP_NAME) for n in names]
        in_flight, engines = _in_flight(engines, "drain")
        deadline = time.monotonic() + timeout_s
        while in_flight > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
            in_flight, engines = _in_flight(engines, "stats")
        if in_flight > 0:
            print(
                f"moe-serve up: {in_flight} requests still in flight after "
                f"{timeout_s} s; stopping anyway",
                file=sys.stderr,
            )
    except Exception as exc:  # the drain is best effort: shutting down must go on
        print(f"moe-serve up: drain failed: {exc}", file=sys.stderr)


def _in_flight(engines: list, method: str) -> tuple[int, list]:
    """Requests in flight over the engines that answer `method` (drain or stats) within 10 s,
    and those engines; one that does not (its node is gone) has none left to wait for."""
    calls = [(engine, getattr(engine, method).remote()) for engine in engines]
    total, answered = 0, []
    for engine, call in calls:
        try:
            total += call.result(timeout_s=10)["in_flight"]
            answered.append(engine)
        except Exception as exc:
            print(f"moe-serve up: an engine did not answer ({exc}); not waiting for it",
                  file=sys.stderr)  # fmt: skip
    return total, answered


def _shutdown() -> None:
    import ray
    from ray import serve

    from serving.api.app import APP_NAME

    try:
        # Deleting the app first lets its replicas finish what they still send (graceful). Serve
        # itself goes with the Ray we started (ray.shutdown below stops its controller and
        # proxies); a joined cluster keeps its Serve instance and other apps.
        serve.delete(APP_NAME)
    except Exception as exc:  # Ray's own shutdown below still stops everything we started
        print(f"moe-serve up: Serve shutdown: {exc}", file=sys.stderr)
    finally:
        ray.shutdown()
