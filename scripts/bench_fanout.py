"""One MoE layer's fan-out to ExpertShards against Ray's bare compiled-graph fan-out, same run.

Prints one JSON object; per token count (decode- to prefill-sized), median ms of one layer:
  in_process:     the layer's experts computed in this process, no actor alive;
  bare:           a compiled graph over 2 actors that echo their input, fed the same bytes per
                  actor as the layer sends (each shard's rows [n, D]): Ray's floor for the trip;
  bare_beside_sleep: the bare trip less the wait, when each actor sleeps as long as the slowest
                  shard computed (below): Ray's own cost over a wait that takes no CPU;
  beside_idle_graph: in_process again while that graph's actors wait for work (Ray's compiled
                  graph readers poll their channels: what idle shards cost the engine's cores);
  compiled, plain, linked: the layer through the ExpertShard pool with each transport (linked:
                  rows over a gloo process group, experts/link.py);
  *_overhead:     the pool's round trip minus the slowest shard's own compute (both measured by
                  the pool): dispatch, transport and combine as the layer pays them, and that
                  over bare (the goal: <= 2 at 64 tokens);
  shard_compute:  the slowest shard's own compute in the compiled phase.
Phases run one after another, each with only its own actors alive (idle ones would skew the
others); rounds inside a phase alternate token counts.

Usage: python scripts/bench_fanout.py [--rounds 15] [--tokens 16 64 512] [--shards 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import MODEL, write_checkpoint  # noqa: E402


class Echo:
    """The bare fan-out's actor: returns what it got, after sleeping `wait_s` (standing in for
    compute that takes no CPU)."""

    def echo(self, x, wait_s: float):
        if wait_s:
            time.sleep(wait_s)
        return x


def bare_graph(shards: int):
    """A compiled graph sending one array to each of `shards` echo actors; (graph, actors)."""
    import ray
    from ray.dag import InputNode, MultiOutputNode

    actors = [ray.remote(num_cpus=0)(Echo).remote() for _ in range(shards)]
    with InputNode() as inp:
        outs = [a.echo.bind(inp[s], inp[shards]) for s, a in enumerate(actors)]
    return MultiOutputNode(outs).experimental_compile(_max_inflight_executions=2), actors


def layer_inputs(pool, tokens: int):
    """One layer's pairs for `tokens` random tokens: (x sorted by slot [N, D], dispatch)."""
    from router.dispatch import group_by_slot
    from router.gating import top_k_gating

    experts, k = MODEL["num_local_experts"], MODEL["num_experts_per_tok"]
    gating = top_k_gating(torch.randn(tokens, experts), k)
    slots, _ = pool.assign(0, gating)
    dispatch = group_by_slot(slots, pool.num_slots(0))
    return torch.randn(tokens, MODEL["hidden_size"])[dispatch.token_idx], dispatch


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def phase(ways: dict, rounds: int, warm: int = 1) -> dict:
    """Median ms of each fn in `ways` (name -> fn), after `warm` untimed rounds, rounds
    interleaved."""
    for _ in range(warm):
        for fn in ways.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, fn in ways.items():
            times[name].append(timed(fn))
    return {name: round(statistics.median(v) * 1e3, 3) for name, v in times.items()}


def pool_phase(model, inputs: dict, rounds: int) -> tuple[dict, dict, dict]:
    """Per token count through `model`'s pool: (ms, overhead ms = round trip minus the slowest
    shard's own compute, which the pool measures, that compute in ms); then its actors are
    released."""
    pool = model.pool
    over: dict[int, list[float]] = {t: [] for t in inputs}
    slowest: dict[int, list[float]] = {t: [] for t in inputs}

    def call(t: int, x, d) -> None:
        pool.step_time()  # start afresh
        pool.start(0, x, d).result()
        took = pool.step_time()
        over[t].append(took.round_trip_s - took.slowest_s)
        slowest[t].append(took.slowest_s)

    ways = {t: (lambda t=t, x=x, d=d: call(t, x, d)) for t, (x, d) in inputs.items()}
    try:
        ms = phase(ways, rounds)
    finally:
        model.close()

    def median_ms(by: dict) -> dict:
        return {t: round(statistics.median(v[1:]) * 1e3, 3) for t, v in by.items()}

    return ms, median_ms(over), median_ms(slowest)


def bare_phase(local, inputs: dict, parts: dict, shards: int, rounds: int,
               compute: dict) -> tuple[dict, dict, dict]:  # fmt: skip
    """Per token count: the bare graph's ms; its ms less the wait when each actor sleeps as
    long as the slowest shard computed (`compute`, ms); in-process ms beside its idle actors."""
    import ray

    graph, actors = bare_graph(shards)
    try:
        bare = phase({t: (lambda p=p: ray.get(graph.execute(*p, 0.0))) for t, p in parts.items()},
                     rounds)  # fmt: skip
        waits = {t: compute[t] / 1e3 for t in parts}
        slept = phase({t: (lambda p=p, w=waits[t]: ray.get(graph.execute(*p, w)))
                       for t, p in parts.items()}, rounds)  # fmt: skip
        slept = {t: round(ms - compute[t], 3) for t, ms in slept.items()}
        beside = phase({t: (lambda x=x, d=d: local.pool.start(0, x, d).result())
                        for t, (x, d) in inputs.items()}, rounds)  # fmt: skip
    finally:
        graph.teardown()
        for actor in actors:
            ray.kill(actor)
    return bare, slept, beside


def report(tokens: list[int], ms: dict[str, dict]) -> dict:
    out = {}
    for t in tokens:
        row = {name: by[t] for name, by in ms.items()}
        for transport in ("compiled", "plain", "linked"):
            row[f"{transport}_overhead_over_bare"] = round(
                row[f"{transport}_overhead"] / row["bare"], 2
            )
        out[str(t)] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 512])
    parser.add_argument("--shards", type=int, default=2)
    args = parser.parse_args()

    import ray

    from serving import load_model

    ray.init(address="local", num_cpus=max(4, args.shards + 2), include_dashboard=False,
             log_to_driver=False)  # fmt: skip
    torch.manual_seed(0)
    ms: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp), MODEL)
        local = load_model(tmp)
        compiled = load_model(tmp, expert_shards=args.shards)
        assert compiled.pool.transport_in_use == "compiled"
        compiled.pool.compiled_max_bytes = 1 << 40  # the graph at every size, as the bare one
        inputs = {t: layer_inputs(compiled.pool, t) for t in args.tokens}
        ranges = compiled.pool.balancer.placement(0).shard_ranges()
        parts = {t: [x[a:b].numpy() for a, b in d.segments(ranges)]  # what each shard gets
                 for t, (x, d) in inputs.items()}  # fmt: skip
        ms["compiled"], ms["compiled_overhead"], compute = pool_phase(compiled, inputs,
                                                                      args.rounds)  # fmt: skip
        ms["shard_compute"] = compute
        ms["in_process"] = phase({t: (lambda x=x, d=d: local.pool.start(0, x, d).result())
                                  for t, (x, d) in inputs.items()}, args.rounds)  # fmt: skip
        ms["bare"], ms["bare_beside_sleep"], ms["beside_idle_graph"] = bare_phase(
            local, inputs, parts, args.shards, args.rounds, compute
        )
        plain = load_model(tmp, expert_shards=args.shards, transport="plain")
        ms["plain"], ms["plain_overhead"], _ = pool_phase(plain, inputs, args.rounds)
        linked = load_model(tmp, expert_shards=args.shards, transport="linked")
        assert linked.pool.transport_in_use == "linked (gloo)"
        ms["linked"], ms["linked_overhead"], _ = pool_phase(linked, inputs, args.rounds)
    out = {
        "model": MODEL,
        "shards": args.shards,
        "threads": torch.get_num_threads(),
        "pairs": {str(t): int(x.shape[0]) for t, (x, _) in inputs.items()},
        "ms_per_layer_by_tokens": report(args.tokens, ms),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
