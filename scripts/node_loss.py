"""Node loss on a real multi-node Ray cluster on one machine: a worker node dies under HTTP load.

    .venv/bin/python scripts/node_loss.py [--workers 3] [--clients 4] [--after-s 40] > n.json
    .venv/bin/python scripts/node_loss.py --lose engine > n.json

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

`--lose engine` serves with two engine replicas sharing the shards instead, one on the head and
one on an extra worker node without CPUs for shards (each marked with one unit of `moe_engine`,
which each engine takes almost whole), the ingress on the head (`--ingress-resource
moe_ingress`), and removes that worker: the node of an engine and nothing else. The report adds
each engine's node.

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
import urllib.request
from pathlib import Path

from soak import KEY, load, recovery, wait_ready

ROOT = Path(__file__).resolve().parents[1]
ENGINE_RESOURCE = "moe_engine"
INGRESS_RESOURCE = "moe_ingress"
ENGINES = ("Engine", "Engine-1")
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
    ap.add_argument(
        "--lose",
        choices=["shard", "engine"],
        default="shard",
        help="whose node to remove: shard 0's, or (two engine replicas) an engine's",
    )
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

    engines = args.lose == "engine"
    marks = {ENGINE_RESOURCE: 1} | ({INGRESS_RESOURCE: 1} if engines else {})
    head = {"num_cpus": 0, "resources": marks, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    server = None
    try:
        # With --lose engine, worker 0 holds an engine and nothing else (no CPUs for a shard).
        engine_worker = {"num_cpus": 0, "resources": {ENGINE_RESOURCE: 1}}
        workers = [cluster.add_node(**(engine_worker if engines and i == 0 else {"num_cpus": 2}))
                   for i in range(args.workers + engines)]  # fmt: skip
        cluster.wait_for_nodes()
        say(f"cluster up: head + {len(workers)} workers at {cluster.address}")
        server = start_server(cluster.address, args.port, engines)
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


def start_server(address: str, port: int, engines: bool) -> subprocess.Popen:
    config = Path(tempfile.mkdtemp(prefix="moe-node-loss-")) / "serve.yaml"
    config.write_text(CONFIG)
    cmd = [sys.executable, "-m", "serving.cli", "up", "--address", address,
           "--port", str(port), "--config", str(config), "--expert-shards", "2",
           "--redundant-experts", "8", "--shard-cpus", "1", "--api-key", KEY,
           "--engine-resource", ENGINE_RESOURCE]  # fmt: skip
    if engines:
        cmd += ["--engine-replicas", "2", "--ingress-resource", INGRESS_RESOURCE]
    say(" ".join(cmd[1:]))
    log = open(config.parent / "up.log", "w")  # noqa: SIM115 - the server's whole life
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip


def engines(names: tuple[str, ...]) -> list:
    from ray import serve

    return [serve.get_deployment_handle(name, app_name="moe-serve") for name in names]


def engine():
    """The first engine's handle (the one holding the controller)."""
    return engines(ENGINES[:1])[0]


def placement(names: tuple[str, ...] = ENGINES[:1]) -> dict:
    """The engines' view: each one's node, each shard's node and the pool's event log (from the
    first engine that answers within 10 s: another's node may be gone)."""
    nodes, view = [], None
    for handle in engines(names):
        try:
            status = handle.status.remote().result(timeout_s=10)
        except Exception:  # its node is gone and Serve has not placed it again
            nodes.append(None)
            continue
        nodes.append(status["engine_node"])
        if view is None:
            view = {"shard_nodes": status["shard_nodes"],
                    "events": handle.expert_events.remote().result(timeout_s=30)}  # fmt: skip
    assert view is not None, "no engine answered"
    return view | {"engine_node": nodes[0], "engine_nodes": nodes}


def measure(cluster, workers: list, base: str, args: argparse.Namespace) -> dict:
    names = ENGINES if args.lose == "engine" else ENGINES[:1]
    start = placement(names)
    nodes = {w.node_id: w for w in workers}
    victim_id = workers[0].node_id if args.lose == "engine" else start["shard_nodes"][0]
    say(f"shards on nodes {[n[:8] for n in start['shard_nodes']]}, engines on "
        f"{[n[:8] for n in start['engine_nodes']]}; losing {victim_id[:8]}")  # fmt: skip
    results, failures, stop, t0, _ = load(base, args.clients)
    time.sleep(args.before_s)
    lost_at = time.monotonic() - t0
    cluster.remove_node(nodes[victim_id], allow_graceful=False)
    say(f"node {victim_id[:8]} removed at {lost_at:.1f} s")
    lost_shard = victim_id in start["shard_nodes"]
    replaced_after = wait_replaced(start["events"], t0, lost_at, args.after_s, names,
                                   start["shard_nodes"].index(victim_id)) if lost_shard else None  # fmt: skip
    time.sleep(max(0.0, t0 + lost_at + args.after_s - time.monotonic()))
    stop.set()
    time.sleep(2.0)
    end = placement(names)
    done = list(results)
    return {
        "health_after": health(base),
        "workers": len(workers),
        "clients": args.clients,
        "requests": len(done),
        "failures": sum(not ok for *_, ok in done),
        "failure_reasons": dict(failures),
        "engine_node": start["engine_node"],
        "engine_nodes_before": start["engine_nodes"],
        "engine_nodes_after": end["engine_nodes"],
        "lost_node": victim_id,
        "lost_a_shard": lost_shard,
        "shard_nodes_before": start["shard_nodes"],
        "shard_nodes_after": end["shard_nodes"],
        "alive_worker_nodes": [n for n in nodes if n != victim_id],
        "replaced_after_s": replaced_after,
        "recovery": recovery(done, lost_at),
        "events_after_loss": end["events"][len(start["events"]) :],
    }


def health(base: str) -> dict:
    """GET /health after the loss: its status and seconds (it must not wait on a lost engine)."""
    began = time.monotonic()
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=30) as r:
            status = r.status
    except Exception as exc:  # reported as it is
        status = repr(exc)[:120]
    return {"status": status, "seconds": round(time.monotonic() - began, 2)}


def wait_replaced(before: list[str], t0: float, lost_at: float, limit_s: float,
                  names: tuple[str, ...], shard: int) -> float | None:  # fmt: skip
    """Seconds from the loss until the pool reports `shard` replaced (None: not within limit)."""
    replaced = f"shard {shard} replaced"
    while time.monotonic() - t0 < lost_at + limit_s:
        if placement(names)["events"].count(replaced) > before.count(replaced):
            return round(time.monotonic() - t0 - lost_at, 1)
        time.sleep(0.5)
    return None


if __name__ == "__main__":
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    main()
