"""`moe-serve bench`: load-test an OpenAI-compatible server, in the manner of `vllm bench serve`.

Random token-id prompts of a fixed length are sent as streamed completions with `ignore_eos`, so
every request produces exactly `--output-len` tokens; arrivals follow a Poisson process at
`--request-rate` (inf: all at once), at most `--max-concurrency` in flight. Reported: output
tokens/ms, request throughput, TTFT / TPOT / ITL percentiles, goodput (requests/s meeting both
SLOs), and optionally a PNG of tokens/ms over time.

Against a moe-serve server it also reads the engine's step accounting (GET /v1/moe/status) before
and after the run, and reports for exactly the run's window where the step time went, the measured
efficiency factors, the fitted step model (what `moe-serve plan --calibrate` reads) and the
identity check: the factors' product against the tokens this client counted over its own wall time.
This module sends the load and reads the server; serving/cli/bench_report.py turns what it
collected into those figures, the text report and the plot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from typing import TYPE_CHECKING

from serving.cli.bench_report import (
    RequestResult,
    efficiency_report,
    format_summary,
    plot_throughput,
    summarize,
)
from serving.errors import UserError

if TYPE_CHECKING:
    from aiohttp import ClientSession


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="load-test a server: tokens/ms, TTFT, TPOT, ITL, goodput")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument("--model", help="model name (default: the first of /v1/models)")
    p.add_argument("--api-key", help="bearer key (default: MOE_SERVE_API_KEY)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (inf)")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens")
    p.add_argument("--output-len", type=int, default=64, help="output tokens per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0, help="goodput SLO on TTFT")
    p.add_argument("--slo-tpot-ms", type=float, default=200.0, help="goodput SLO on TPOT")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="FILE.png", help="plot tokens/ms over time (matplotlib)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if args.max_concurrency is not None and args.max_concurrency <= 0:
        raise UserError("--max-concurrency must be positive")
    if args.request_rate <= 0:
        raise UserError("--request-rate must be positive (inf sends all at once)")
    key = args.api_key or os.environ.get("MOE_SERVE_API_KEY")
    summary, results = asyncio.run(_bench(args, key))
    if args.plot:
        fractions = (summary.get("efficiency") or {}).get("fractions")
        plot_throughput(results, summary["start"], args.plot, fractions)
    summary.pop("start")
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_summary(summary))
    return 0 if summary["completed"] else 1


async def _bench(args: argparse.Namespace, key: str | None) -> tuple[dict, list[RequestResult]]:
    import aiohttp

    url = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        model, vocab = await model_card(session, url, args.model)
        prompts = random_prompts(args.num_prompts, args.input_len, vocab, args.seed)
        before = await read_accounting(session, url)
        start = time.perf_counter()
        results = await run_load(
            session,
            url,
            model,
            prompts,
            args.output_len,
            args.request_rate,
            args.max_concurrency,
            args.seed,
            progress=Progress(len(prompts)),
        )
        duration = time.perf_counter() - start
        after = await read_accounting(session, url)
    summary = summarize(results, duration, args.slo_ttft_ms, args.slo_tpot_ms)
    client_tokens = summary["total_input_tokens"] + summary["total_output_tokens"]
    summary["efficiency"] = efficiency_report(before, after, client_tokens, duration)
    summary["start"] = start
    return summary, results


async def read_accounting(session: ClientSession, url: str) -> dict | None:
    """The engine's `efficiency` section of GET /v1/moe/status; None from other servers."""
    try:
        async with session.get(f"{url}/v1/moe/status") as r:
            if r.status != 200:
                return None
            body = await r.json(content_type=None)
    except (OSError, ValueError):
        return None
    section = body.get("efficiency") if isinstance(body, dict) else None
    return section if isinstance(section, dict) and section.get("totals") else None


async def model_card(session: ClientSession, url: str, model: str | None) -> tuple[str, int]:
    """The model to ask for and its vocabulary size (token-id prompts stay inside it)."""
    try:
        async with session.get(f"{url}/v1/models") as r:
            body = await r.json(content_type=None)
            if r.status != 200:
                raise UserError(f"{url}/v1/models: HTTP {r.status}: {body}")
    except OSError as exc:
        raise UserError(f"{url}: cannot connect ({exc}); is the server up?") from None
    cards = body.get("data") or []
    if not cards:
        raise UserError(f"{url}/v1/models lists no model")
    card = next((c for c in cards if c["id"] == model), cards[0]) if model else cards[0]
    return model or card["id"], int(card.get("vocab_size", 256))


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    low = min(3, vocab - 1)  # skip the usual special tokens (pad, bos, eos)
    return [[rng.randrange(low, vocab) for _ in range(length)] for _ in range(n)]


async def run_load(
    session: ClientSession,
    url: str,
    model: str,
    prompts: list[list[int]],
    output_len: int,
    request_rate: float,
    max_concurrency: int | None,
    seed: int = 0,
    progress: Progress | None = None,
) -> list[RequestResult]:
    """Send every prompt (Poisson arrivals, bounded concurrency); one result per prompt."""
    rng = random.Random(seed + 1)
    limit = asyncio.Semaphore(max_concurrency or len(prompts))

    async def one(prompt: list[int]) -> RequestResult:
        async with limit:
            result = await stream_completion(session, url, model, prompt, output_len)
        if progress:
            progress.step()
        return result

    tasks = []
    for prompt in prompts:
        tasks.append(asyncio.create_task(one(prompt)))
        if request_rate != float("inf"):
            await asyncio.sleep(rng.expovariate(request_rate))
    results = await asyncio.gather(*tasks)
    if progress:
        progress.close()
    return list(results)


async def stream_completion(
    session: ClientSession, url: str, model: str, prompt: list[int], output_len: int
) -> RequestResult:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result = RequestResult(ok=False, start=time.perf_counter())
    try:
        async with session.post(f"{url}/v1/completions", json=body) as r:
            if r.status != 200:
                result.error = f"HTTP {r.status}: {(await r.text())[:200]}"
                return result
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    result.chunk_times.append(time.perf_counter())
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
    except (TimeoutError, OSError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.output_tokens = result.output_tokens or len(result.chunk_times)
    result.ok = bool(result.chunk_times)
    return result


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        self._draw()

    def step(self) -> None:
        self.done += 1
        self._draw()

    def _draw(self) -> None:
        width = 30
        filled = width * self.done // max(self.total, 1)
        elapsed = time.perf_counter() - self.t0
        bar = "#" * filled + "." * (width - filled)
        sys.stderr.write(f"\r[{bar}] {self.done}/{self.total} requests, {elapsed:.1f} s")
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()
