"""Node loss on a real multi-node Ray cluster on one machine: a worker node dies under HTTP load.

    .venv/bin/python scripts/node_loss.py [--workers 3] [--clients 4] [--after-s 40] > n.json

Builds a cluster with Ray's own `ray.cluster_utils.Cluster` (every node its own raylet and
object store; a head marked for the engine with the custom resource `moe_engine` and no CPUs for
shards, `--workers` worker nodes of 2 CPUs each), starts `moe-serve up --address` on it (demo
model, 2 ExpertShards of 1 CPU each spread over the workers, two copies of every expert, the
engine and ingress pinned to the head with `--engine-resource moe_engine`, controller off: the
subject is failover), sends completions and chat, streamed and not, from `--clients` threads, and
after `--before-s` removes the worker node of shard 0 abruptly (`remove_node(...,
allow_graceful=False)`: its raylet and every process on it die at once). Prints one JSON report:
requests and failures (with reasons), the shards' nodes before and after, whether shard 0 was
re-created on a surviving node and how long after the loss, and completions/s before the loss and
in 6 s windows after it (when throughput was back to 90%). Progress goes to stderr.

tests/reliability/test_node_loss.py runs it; RELIABILITY.md records its figures.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from soak import KEY, load, recovery, wait_ready

ROOT = Path(__file__).resolve().parents[1]
ENGINE_RESOURCE = "moe_engine"
CONFIG = """\
applications:
  - args:
      monitoring: {controller: false}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=3, help="worker nodes (2 CPUs each)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--before-s", type=float, default=20.0, help="load before the loss")
    ap.add_argument("--after-s", type=float, default=40.0, help="load after the loss")
    ap.add_argument("--port", type=int, default=8141)
    args = ap.parse_args()
    out = report_stream()
    report = run(args)
    report["command"] = " ".join(["scripts/node_loss.py", *sys.argv[1:]])
    print(json.dumps(report, indent=2), file=out, flush=True)


def report_stream():
    """The real stdout, for the report alone; everything else written to stdout from now on (Ray
    prints a dead raylet's log there) goes to stderr."""
    report = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return report


def say(line: str) -> None:
    print(f"{Path(sys.argv[0]).stem}: {line}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    head = {"num_cpus": 0, "resources": {ENGINE_RESOURCE: 1}, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    server = None
    try:
        workers = [cluster.add_node(num_cpus=2) for _ in range(args.workers)]
        cluster.wait_for_nodes()
        say(f"cluster up: head + {len(workers)} workers at {cluster.address}")
        server = start_server(cluster.address, args.port)
        base = f"http://127.0.0.1:{args.port}"
        wait_ready(base)
        ray.init(address=cluster.address, log_to_driver=False)
        return measure(cluster, workers, base, args)
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)  # `moe-serve up` drains and leaves the cluster
            try:
                server.wait(120)
            except subprocess.TimeoutExpired:
                server.kill()
        ray.shutdown()
        cluster.shutdown()


def start_server(address: str, port: int) -> subprocess.Popen:
    config = Path(tempfile.mkdtemp(prefix="moe-node-loss-")) / "serve.yaml"
    config.write_text(CONFIG)
    cmd = [sys.executable, "-m", "serving.cli", "up", "--address", address,
           "--port", str(port), "--config", str(config), "--expert-shards", "2",
           "--redundant-experts", "8", "--shard-cpus", "1", "--api-key", KEY,
           "--engine-resource", ENGINE_RESOURCE]  # fmt: skip
    say(" ".join(cmd[1:]))
    log = open(config.parent / "up.log", "w")  # noqa: SIM115 - the server's whole life
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip


def engine():
    from ray import serve

    return serve.get_deployment_handle("Engine", app_name="moe-serve")


def placement() -> dict:
    """The engine's view: its node, each shard's node, and the pool's event log."""
    handle = engine()
    status = handle.status.remote().result(timeout_s=30)
    return {"shard_nodes": status["shard_nodes"], "engine_node": status["engine_node"],
            "events": handle.expert_events.remote().result(timeout_s=30)}  # fmt: skip


def measure(cluster, workers: list, base: str, args: argparse.Namespace) -> dict:
    start = placement()
    nodes = {w.node_id: w for w in workers}
    victim_id = start["shard_nodes"][0]
    say(f"shards on nodes {[n[:8] for n in start['shard_nodes']]}; losing {victim_id[:8]}")
    results, failures, stop, t0, _ = load(base, args.clients)
    time.sleep(args.before_s)
    lost_at = time.monotonic() - t0
    cluster.remove_node(nodes[victim_id], allow_graceful=False)
    say(f"node {victim_id[:8]} removed at {lost_at:.1f} s")
    replaced_after = wait_replaced(start["events"], t0, lost_at, args.after_s)
    time.sleep(max(0.0, t0 + lost_at + args.after_s - time.monotonic()))
    stop.set()
    time.sleep(2.0)
    end = placement()
    done = list(results)
    return {
        "workers": len(workers),
        "clients": args.clients,
        "requests": len(done),
        "failures": sum(not ok for *_, ok in done),
        "failure_reasons": dict(failures),
        "engine_node": start["engine_node"],
        "lost_node": victim_id,
        "shard_nodes_before": start["shard_nodes"],
        "shard_nodes_after": end["shard_nodes"],
        "alive_worker_nodes": [n for n in nodes if n != victim_id],
        "replaced_after_s": replaced_after,
        "recovery": recovery(done, lost_at),
        "events_after_loss": end["events"][len(start["events"]) :],
    }


def wait_replaced(before: list[str], t0: float, lost_at: float, limit_s: float) -> float | None:
    """Seconds from the loss until the pool reports shard 0 replaced (None: not within limit)."""
    while time.monotonic() - t0 < lost_at + limit_s:
        events = placement()["events"][len(before) :]
        if "shard 0 replaced" in events:
            return round(time.monotonic() - t0 - lost_at, 1)
        time.sleep(0.5)
    return None


if __name__ == "__main__":
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    main()
