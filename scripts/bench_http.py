"""Saturated HTTP throughput over the in-process engine's, same model and batch, in one run.

    .venv/bin/python scripts/bench_http.py [--model DIR] [--batch 16] [--num-prompts 64]
        [--input-len 64] [--output-len 64] [--device cpu] [--dtype float32] [--expert-shards N]

1. The engine: the scheduler in this process, every prompt submitted at once (ignore EOS, greedy),
   output tokens/ms over the wall-clock time until the last token.
2. HTTP: the same scheduler settings behind Ray Serve on 127.0.0.1, driven by `moe-serve bench`'s
   client with every prompt sent at once (saturated: as in the engine, the server's queue refills a
   slot the moment one frees), the same prompts and lengths.
Each side runs a short warm-up first. Prints one JSON object; the goal (issue 5) is ratio >= 0.8.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.api.app import APP_NAME, application  # noqa: E402
from serving.api.serving_model import load_serving_model, model_dir  # noqa: E402
from serving.cli.bench import random_prompts, run_load, summarize  # noqa: E402
from serving.config import SchedulerConfig, ServeConfig  # noqa: E402
from serving.engine.sampling import SamplingParams  # noqa: E402
from serving.engine.scheduler import Scheduler  # noqa: E402


def engine_tokens_per_ms(model, sched: SchedulerConfig, prompts, output_len: int) -> dict:
    """All prompts submitted at once to an in-process scheduler; tokens/ms until the last one."""

    async def main() -> tuple[int, float]:
        s = Scheduler(model, sched)
        params = SamplingParams(max_tokens=output_len)  # no stop tokens: every request full length
        start = time.perf_counter()
        seqs = [s.submit(p, params) for p in prompts]
        counts = await asyncio.gather(*(_count(s, q) for q in seqs))
        return sum(counts), time.perf_counter() - start

    tokens, seconds = asyncio.run(main())
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_ms": tokens / seconds / 1e3}


async def _count(s: Scheduler, seq) -> int:
    return sum([1 async for _ in s.stream(seq)])


def http_tokens_per_ms(config: ServeConfig, prompts, output_len: int, batch: int) -> dict:
    import aiohttp
    import ray
    from ray import serve

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": config.port})
        serve.run(application(config), name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{config.port}"

        async def main() -> dict:
            async with aiohttp.ClientSession() as session:
                name = config.served_model_name
                await run_load(session, url, name, prompts[:batch], 4, float("inf"), batch)
                start = time.perf_counter()
                results = await run_load(
                    session, url, name, prompts, output_len, float("inf"), None
                )
                summary = summarize(results, time.perf_counter() - start, 1e9, 1e9)
                async with session.get(f"{url}/health") as r:
                    summary["router"] = (await r.json())["scheduler"]
                return summary

        return asyncio.run(main())
    finally:
        serve.shutdown()
        ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint directory (default: the demo model)")
    ap.add_argument("--batch", type=int, default=16, help="KV slots = concurrent requests")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--expert-shards", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="router threads (0: the default, every core but one)",
    )
    args = ap.parse_args()

    sched = SchedulerConfig(
        max_batch_slots=args.batch,
        max_seq_len=args.input_len + args.output_len + 8,
        step_token_budget=max(512, args.batch),
        max_queue=args.num_prompts,
    )
    config = ServeConfig(
        model=args.model,
        served_model_name="bench",
        port=free_port(),
        device=args.device,
        dtype=args.dtype,
        expert_shards=args.expert_shards,
        torch_threads=args.torch_threads,
        scheduler=sched,
        max_ongoing_requests=max(256, args.batch + args.num_prompts),
    )
    model = load_serving_model(config)
    prompts = random_prompts(args.num_prompts, args.input_len, model.config.vocab_size, args.seed)
    engine_tokens_per_ms(model, sched, prompts[: args.batch], 4)  # warm-up
    engine = engine_tokens_per_ms(model, sched, prompts, args.output_len)
    del model  # the Serve replica loads its own copy
    http = http_tokens_per_ms(config, prompts, args.output_len, args.batch)
    result = {
        "model": model_dir(config),
        "device": args.device,
        "dtype": args.dtype,
        "expert_shards": args.expert_shards,
        "batch": args.batch,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "engine_tokens_per_ms": round(engine["tokens_per_ms"], 4),
        "http_tokens_per_ms": http["output_tokens_per_ms"],
        "ratio": round(http["output_tokens_per_ms"] / engine["tokens_per_ms"], 3),
        "http": http,
        "engine": engine,
    }
    print(json.dumps(result, indent=2))
    return 0 if http["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
