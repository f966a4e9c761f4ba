"""Scale-out and scale-in through Ray's autoscaler, on an autoscaling cluster on this machine.

    .venv/bin/python scripts/autoscale.py [--clients 16] [--after-s 15] [--scale shards|engines] > a.json

Starts a Ray head with Ray's fake multi-node provider (`ray start --head --autoscaling-config`,
RAY_FAKE_CLUSTER=1: the autoscaler launches worker nodes as local processes, as it would launch
machines), in a temp dir of its own so that no other Ray on the machine sees it. The head has one
CPU and the `moe_engine` marker; one worker type of one CPU, 0 to 1 nodes, retired after 6 idle
seconds. `moe-serve up --address --cluster-autoscaling` serves the demo with one ExpertShard of one
CPU (the head is then full) and a controller whose target is above reach (a shortfall for sure:
what is tested is the path from the controller's decision to a serving shard, not the target).

1. `--clients` threads keep the queue deep: the controller decides scale_out; the new shard's
   reservation makes the autoscaler start a node; the shard loads there and the engine switches.
2. One client (a shallow queue): the controller decides scale_in; the shard is stopped and the
   autoscaler retires the idle node.

With `--scale engines` the same with engine replicas: experts in the engine (it is what limits),
`--max-engine-replicas 2`, worker nodes marked `moe_engine` (one engine a node), batch strategy
`fixed` (no fallback mixes into the figures); the controller
decides add_engine, the second engine's replica makes the autoscaler start a node, and it serves
there; then remove_engine: it drains and stops, and the node is retired.

Prints one JSON report: seconds from each decision to serving (and to the node's start or
retirement), the engine's measured tokens/ms (per device and in total) and the completions/s the
clients saw before and after the scale-out, failed requests. Progress goes to stderr.
tests/reliability/test_autoscale.py runs it; BENCHMARKS.md records its figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from node_loss import ENGINE_RESOURCE, engine, load, report_stream, say
from soak import KEY, wait_ready

ROOT = Path(__file__).resolve().parents[1]
IDLE_TIMEOUT_MIN = 0.1
SERVE_ARGS = {
    "cluster_autoscaling": True,
    "placement_timeout_s": 30,  # the autoscaler's limit (one node) shows within it
    "scheduler": {
        "max_batch_slots": 4,
        "max_seq_len": 256,
        "step_token_budget": 256,
        "max_queue": 64,
    },  # fmt: skip
    "controller": {
        "period_s": 2,
        "phases": [{"name": "above-reach", "tokens_per_ms": 1000}],
        "deep_queue": 2,
        "confirm_periods": 2,
        "scale_in_periods": 3,
        "cooldown_periods": 1,
        "window_s": 8,
    },
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16, help="clients while the queue is deep")
    ap.add_argument("--after-s", type=float, default=15.0, help="load kept after the scale-out")
    ap.add_argument("--port", type=int, default=8143)
    ap.add_argument("--timeout-s", type=float, default=240.0, help="per phase")
    ap.add_argument("--scale", choices=["shards", "engines"], default="shards",
                    help="what the controller adds and removes")  # fmt: skip
    args = ap.parse_args()
    # Before Ray is imported: it reads the auth mode once, at import.
    os.environ.update(cluster_env())
    out = report_stream()
    tmp = Path(tempfile.mkdtemp(prefix="moe-as-"))
    try:
        report = run(args, tmp) | {"scale": args.scale}
    except BaseException:
        for log in ("up.log", "head.log"):  # what the server and the head said, for the failure
            if (tmp / log).exists():
                tail = (tmp / log).read_text(errors="replace")[-4000:]
                print(f"--- {log} (last lines)\n{tail}", file=sys.stderr, flush=True)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["command"] = " ".join(["scripts/autoscale.py", *sys.argv[1:]])
    print(json.dumps(report, indent=2), file=out, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_env() -> dict[str, str]:
    # Token auth on, for the head, its fake nodes, our driver and the server alike.
    return os.environ | {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                         "RAY_AUTH_MODE": "token", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}  # fmt: skip


def autoscaling_config(gcs: str, scale: str = "shards") -> dict:
    """Ray's fake multi-node provider: the head, and one worker type of 1 CPU (0 to 1 nodes),
    marked for an engine when engines scale."""
    worker = {"CPU": 1} | ({ENGINE_RESOURCE: 1} if scale == "engines" else {})
    empty: dict = {key: [] for key in (
        "initialization_commands", "setup_commands", "head_setup_commands",
        "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
        "cluster_synced_files", "rsync_exclude", "rsync_filter")}  # fmt: skip
    return empty | {
        "cluster_name": "moe-serve-autoscale",
        "max_workers": 1,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "gcs_address": gcs,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1, ENGINE_RESOURCE: 1}, "node_config": {},
                                 "max_workers": 0},
            "cpu_worker": {"resources": worker, "node_config": {}, "min_workers": 0,
                           "max_workers": 1},
        },
        "head_node_type": "ray.head.default",
        "auth": {}, "docker": {}, "file_mounts": {}, "file_mounts_sync_continuously": False,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
    }  # fmt: skip


def start_head(tmp: Path, scale: str) -> tuple[subprocess.Popen, str]:
    from ray._private.services import get_node_ip_address

    port = free_port()
    gcs = f"{get_node_ip_address()}:{port}"
    config = tmp / "autoscaling.json"
    config.write_text(json.dumps(autoscaling_config(gcs, scale)))
    ray_cli = str(Path(sys.executable).with_name("ray"))
    cmd = [ray_cli, "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
           f"--resources={json.dumps({ENGINE_RESOURCE: 1})}", "--include-dashboard=false",
           f"--temp-dir={tmp / 'ray'}", f"--autoscaling-config={config}"]  # fmt: skip
    head = subprocess.Popen(cmd, env=cluster_env(), stdout=open(tmp / "head.log", "w"),  # noqa: SIM115
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    return head, gcs


def stop_group(proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """SIGTERM to the process group (the head, its autoscaler and the nodes it launched), then
    SIGKILL whatever is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout_s)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def start_server(gcs: str, port: int, tmp: Path, scale: str) -> subprocess.Popen:
    config = tmp / "serve.yaml"
    args = SERVE_ARGS
    if scale == "engines":  # no batch fallback meanwhile: the figures are the engine's alone
        args = args | {"controller": args["controller"] | {"batch_strategy": "fixed"}}
    config.write_text(json.dumps({"applications": [{"args": args}]}))  # JSON is YAML
    cmd = [sys.executable, "-m", "serving.cli", "up", "--address", gcs, "--port", str(port),
           "--config", str(config), "--api-key", KEY, "--engine-resource", ENGINE_RESOURCE]  # fmt: skip
    if scale == "engines":
        cmd += ["--engine-replicas", "1", "--max-engine-replicas", "2"]
    else:
        cmd += ["--expert-shards", "1", "--shard-cpus", "1"]
    say(" ".join(cmd[1:]))
    return subprocess.Popen(cmd, cwd=ROOT, env=cluster_env(), stdout=open(tmp / "up.log", "w"),  # noqa: SIM115
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def run(args: argparse.Namespace, tmp: Path) -> dict:
    import ray

    head, gcs = start_head(tmp, args.scale)
    server = None
    try:
        wait_for(lambda: connect(gcs), 60, "the head to start")
        say(f"autoscaling cluster up at {gcs}: {alive_nodes()} node(s)")
        server = start_server(gcs, args.port, tmp, args.scale)
        base = f"http://127.0.0.1:{args.port}"
        wait_ready(base)
        return measure(base, args)
    finally:
        if server is not None:
            stop_group(server, 120)
        ray.shutdown()
        stop_group(head)


def connect(gcs: str) -> bool:
    import ray

    try:
        ray.init(address=gcs, log_to_driver=False)
        return True
    except Exception:
        return False


def alive_nodes() -> int:
    import ray

    return sum(node["Alive"] for node in ray.nodes())


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise SystemExit(f"autoscale: timed out after {timeout_s:g} s waiting for {what}")


def status() -> dict:
    return engine().status.remote().result(timeout_s=30)


_seen: dict[str, str] = {}


def action_time(name: str, since: float) -> float | None:
    """Wall time of the controller's first `name` action after `since` (its last decision goes
    to stderr whenever it changes)."""
    report = status()
    last = report.get("last_decision") or {}
    line = f"{last.get('action')}: {last.get('reason')}"
    if line != _seen.get("decision"):
        _seen["decision"] = line
        say(f"controller: {line}")
    times = [a["time"] for a in report["actions"] if a["action"] == name and a["time"] > since]
    return min(times) if times else None


def total_rate(report: dict) -> float | None:
    live, devices = report.get("tokens_per_ms_per_device"), report.get("devices")
    return None if live is None or not devices else round(live * devices, 4)


# What grows and shrinks: the controller's actions, what serves once it grew, and once it shrank.
SCALE = {
    "shards": ("scale_out", "scale_in"),
    "engines": ("add_engine", "remove_engine"),
}


def measure(base: str, args: argparse.Namespace) -> dict:
    timeout = args.timeout_s
    grow, shrink = SCALE[args.scale]
    out: dict = {"clients": args.clients, "nodes_at_start": alive_nodes()}
    results, failures, stop, t0, _ = load(base, args.clients)
    # 1. Deep queue: scale_out -> node started -> shard serving.
    start = time.time()
    decided = wait_for(lambda: action_time(grow, start), timeout, f"a {grow} decision")
    scaled_out = decided
    before = status()
    out |= {"before": {"tokens_per_ms_per_device": before["tokens_per_ms_per_device"],
                       "tokens_per_ms": total_rate(before), "devices": before["devices"]}}  # fmt: skip
    say(f"controller decided {grow}")
    wait_for(lambda: alive_nodes() == 2, timeout, "the autoscaler's node")
    node_s = time.time() - decided
    grown = two_shards if args.scale == "shards" else two_engines
    serving = wait_for(grown, timeout, f"the second {args.scale[:-1]} serving")
    serving_s = time.time() - decided
    say(f"second {args.scale[:-1]} serving {serving_s:.1f} s after the decision")
    switched = time.monotonic() - t0
    time.sleep(args.after_s)
    after = status()
    stop.set()
    done = list(results)
    out |= {
        "scale_out": {"node_started_after_s": round(node_s, 1),
                      "serving_after_s": round(serving_s, 1),
                      "shard_nodes": serving.get("shard_nodes"),
                      "engine_nodes": serving.get("engine_nodes"),
                      "nodes": serving.get("nodes")},
        "after": {"tokens_per_ms_per_device": after["tokens_per_ms_per_device"],
                  "tokens_per_ms": total_rate(after), "devices": after["devices"]},
        "completions_per_s": rates(done, switched, args.after_s),
    }  # fmt: skip
    # 2. Shallow queue: scale_in -> shard stopped -> node retired.
    light, light_failures, light_stop, *_ = load(base, 1)
    # Counted from the scale-out: should the queue have dipped below deep for scale_in_periods
    # in a row already, the scale-in came before this phase.
    decided = wait_for(lambda: action_time(shrink, scaled_out), timeout, f"a {shrink} decision")
    say(f"controller decided {shrink}")
    shrunk = one_shard if args.scale == "shards" else one_engine
    wait_for(shrunk, timeout, f"the {args.scale[:-1]} to go")
    stopped_s = time.time() - decided
    wait_for(lambda: alive_nodes() == 1, timeout, "the autoscaler to retire the idle node")
    retired_s = time.time() - decided
    light_stop.set()
    time.sleep(2.0)
    every = done + list(light)
    out |= {
        "scale_in": {"stopped_after_s": round(stopped_s, 1),
                     "node_retired_after_s": round(retired_s, 1),
                     "idle_timeout_s": IDLE_TIMEOUT_MIN * 60},
        "requests": len(every),
        "failures": sum(not ok for *_, ok in every),
        "failure_reasons": failures | light_failures,
        "events": engine().expert_events.remote().result(timeout_s=30),
        # The controller's actions (its last 20), seconds from the start of the load.
        "actions": [f"{a['time'] - start:+.1f} s {a['action']}: {a['reason']}"
                    for a in status()["actions"]],
    }  # fmt: skip
    return out


def one_shard() -> bool:
    return len(status()["shard_nodes"]) == 1


def engines_running() -> list[int]:
    from serving.api.app import APP_NAME
    from serving.control.engine_scaler import engine_states

    return [s.running for s in engine_states(APP_NAME, ["Engine", "Engine-1"])]


def two_engines() -> dict | None:
    """The Ray nodes of both engines once the second serves."""
    import ray

    if engines_running() != [1, 1]:
        return None
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    try:
        second = serve_handle("Engine-1").status.remote().result(timeout_s=30)["engine_node"]
    except TimeoutError:  # running, but not answering yet (a clean-clone run, one core busy)
        return None
    return {"engine_nodes": [status()["engine_node"], second], "nodes": nodes}


def one_engine() -> bool:
    return engines_running() == [1, 0]


def serve_handle(name: str):
    from ray import serve

    from serving.api.app import APP_NAME

    return serve.get_deployment_handle(name, app_name=APP_NAME)


def two_shards() -> dict | None:
    """The status once the second shard serves (what the scale-out is judged on: a scale-in
    may follow before the throughput window ends)."""
    report = status()
    return report if len(report["shard_nodes"]) == 2 else None


def rates(done: list[tuple[float, float, bool]], switched: float, after_s: float) -> dict:
    """Completions/s the clients saw over the `after_s` before the switch and after it."""

    def rate(lo: float, hi: float) -> float:
        return round(sum(ok and lo <= s + lat < hi for s, lat, ok in done) / (hi - lo), 2)

    return {"before": rate(switched - after_s, switched),
            "after": rate(switched, switched + after_s)}  # fmt: skip


if __name__ == "__main__":
    main()
