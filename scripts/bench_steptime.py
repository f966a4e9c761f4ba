"""The step accounting's overhead: decode steps with it on and off, side by side in one run.

The accounting (serving/control/steptime.py) costs, per step, two clock reads and a few additions per MoE
layer in the expert pool and one `StepAccounting.record` in the scheduler. Measured two ways:
  ab:    median seconds per decode step (batch --batch, cache of --context tokens) with the pool's
         timing and `record` on, and with both off, in interleaved rounds; overhead = on/off - 1
         (noisy on a busy machine: the rounds' spread is printed too);
  micro: the accounting's own work per step (the layers' `add_layer`, `step_time`, `record`)
         timed alone over many repetitions, over the median step: a bound without the noise.
Goal (issue 8): below 2% of step time.

Prints one JSON object. Usage:
  python scripts/bench_steptime.py [--shards 0|2] [--batch 8] [--rounds 9] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from experts.timing import ExpertTime
from serving import load_model
from serving.control.steptime import StepAccounting
from serving.engine.demo import demo_checkpoint


def decode_steps(model, cache, batch: int, context: int, steps: int, on: bool) -> float:
    """Median seconds of `steps` decode steps at batch `batch` after `context` cached tokens."""
    model.pool.timing = on
    accounting = StepAccounting()
    ids = torch.randint(3, model.config.vocab_size, (batch, 1))
    times = []
    for i in range(steps):
        start = time.perf_counter()
        model(ids, cache=cache, start_pos=context + i, last_only=True)
        expert = model.pool.step_time()
        if on:
            accounting.record(time.perf_counter() - start, 0.9 * (time.perf_counter() - start),
                              expert, batch, 0)  # fmt: skip
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def micro_seconds(layers: int, shards: int, repeats: int = 20000) -> float:
    """Seconds of the accounting's own work for one step of `layers` MoE layers."""
    accounting = StepAccounting()
    shard_s = [0.001] * max(shards, 1)
    start = time.perf_counter()
    for _ in range(repeats):
        t = ExpertTime()
        for _ in range(layers):
            a = time.perf_counter()
            t.add_layer(time.perf_counter() - a, shard_s)
        accounting.record(0.01, 0.009, t, 8, 0)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the engine's setting on 2 cores: one core left to the rest
    model = load_model(demo_checkpoint(), expert_shards=args.shards)
    try:
        max_len = args.context + args.steps + 1
        cache = model.new_cache(args.batch, max_len)
        prompt = torch.randint(3, model.config.vocab_size, (args.batch, args.context))
        model(prompt, cache=cache)  # fill the cache the steps attend to
        rounds = {"on": [], "off": []}
        for _ in range(args.rounds):
            for mode in ("off", "on"):
                rounds[mode].append(
                    decode_steps(model, cache, args.batch, args.context, args.steps, mode == "on")
                )
        on, off = statistics.median(rounds["on"]), statistics.median(rounds["off"])
        micro = micro_seconds(model.config.num_hidden_layers, args.shards)
    finally:
        model.close()
    print(json.dumps({
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)",
        "shards": args.shards,
        "batch": args.batch,
        "ab": {
            "step_ms_on": round(on * 1e3, 3),
            "step_ms_off": round(off * 1e3, 3),
            "overhead": round(on / off - 1.0, 4),
            "rounds_ms_on": [round(x * 1e3, 2) for x in rounds["on"]],
            "rounds_ms_off": [round(x * 1e3, 2) for x in rounds["off"]],
        },
        "micro": {
            "accounting_us_per_step": round(micro * 1e6, 2),
            "overhead": round(micro / off, 5),
        },
        "goal": "overhead below 0.02",
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
