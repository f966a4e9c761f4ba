"""`moe-serve bench`: load-test an OpenAI-compatible server, in the manner of `vllm bench serve`.

Random token-id prompts of a fixed length are sent as streamed completions with `ignore_eos`, so
every request produces exactly `--output-len` tokens; arrivals follow a Poisson process at
`--request-rate` (inf: all at once), at most `--max-concurrency` in flight. Reported: output
tokens/ms, request throughput, TTFT / TPOT / ITL percentiles, goodput (requests/s meeting both
SLOs), and optionally a PNG of tokens/ms over time.

Against a moe-serve server it also reads the router's step accounting (GET /v1/moe/status) before
and after the run, and reports for exactly the run's window where the step time went, the measured
efficiency factors, the fitted step model (what `moe-serve plan --calibrate` reads) and the
identity check: the factors' product against the tokens this client counted over its own wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from serving.efficiency import EfficiencyBasis, fit, measure
from serving.errors import UserError
from serving.steptime import StepTotals


@dataclass
class RequestResult:
    ok: bool
    start: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrival of each token chunk
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start

    @property
    def latency(self) -> float:
        return self.chunk_times[-1] - self.start

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


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


async def read_accounting(session, url: str) -> dict | None:
    """The router's `efficiency` section of GET /v1/moe/status; None from other servers."""
    try:
        async with session.get(f"{url}/v1/moe/status") as r:
            if r.status != 200:
                return None
            body = await r.json(content_type=None)
    except (OSError, ValueError):
        return None
    section = body.get("efficiency") if isinstance(body, dict) else None
    return section if isinstance(section, dict) and section.get("totals") else None


def efficiency_report(
    before: dict | None, after: dict | None, client_tokens: int, duration_s: float
) -> dict | None:
    """The step accounting of the run's window (after minus before) in planner terms, with the
    identity check against the client's own token count; None without the router's figures."""
    if before is None or after is None:
        return None
    totals = StepTotals.from_json(after["totals"]) - StepTotals.from_json(before["totals"])
    basis = EfficiencyBasis.model_validate(after["basis"]) if after.get("basis") else None
    measured = measure(totals, basis) if basis else None
    model = fit(totals)
    report = {
        "totals": totals.to_json(),
        "fractions": totals.fractions(),
        "basis": basis.model_dump() if basis else None,
        "measured": measured.model_dump() if measured else None,
        "step_model": model.model_dump() if model else None,
    }
    if measured is not None and duration_s > 0:
        client = client_tokens / (duration_s * 1000.0) / basis.devices
        report["client_tokens_per_ms_per_device"] = client
        # M3's identity: the product of the factors against what the client saw, over the
        # ceiling. Near 1 when the accounting covers the run's time.
        report["identity_ratio"] = measured.efficiency / (client / basis.ceiling_tokens_per_ms)
    return report


async def model_card(session, url: str, model: str | None) -> tuple[str, int]:
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
    session,
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
    session, url: str, model: str, prompt: list[int], output_len: int
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


def _pcts(values: list[float], name: str) -> dict:
    arr = np.asarray(values, dtype=float) * 1000.0  # seconds -> ms
    if arr.size == 0:
        return {f"mean_{name}_ms": None, f"p50_{name}_ms": None, f"p99_{name}_ms": None}
    return {
        f"mean_{name}_ms": round(float(arr.mean()), 3),
        f"p50_{name}_ms": round(float(np.percentile(arr, 50)), 3),
        f"p99_{name}_ms": round(float(np.percentile(arr, 99)), 3),
    }


def summarize(
    results: list[RequestResult], duration: float, slo_ttft_ms: float, slo_tpot_ms: float
) -> dict:
    """The benchmark's figures from per-request results and the wall-clock duration (s)."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    itls = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False)]
    tpots = [t for r in ok if (t := r.tpot) is not None]
    good = [
        r
        for r in ok
        if r.ttft * 1000 <= slo_ttft_ms and (r.tpot is None or r.tpot * 1000 <= slo_tpot_ms)
    ]
    summary = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": round(duration, 3),
        "total_input_tokens": sum(r.prompt_tokens for r in ok),
        "total_output_tokens": out_tokens,
        "output_tokens_per_ms": round(out_tokens / (duration * 1000), 4) if duration else 0.0,
        "request_throughput_per_s": round(len(ok) / duration, 4) if duration else 0.0,
        "goodput_per_s": round(len(good) / duration, 4) if duration else 0.0,
        "slo_ttft_ms": slo_ttft_ms,
        "slo_tpot_ms": slo_tpot_ms,
    }
    summary |= _pcts([r.ttft for r in ok], "ttft")
    summary |= _pcts(tpots, "tpot")
    summary |= _pcts(itls, "itl")
    return summary


def format_summary(s: dict) -> str:
    rows = [("Successful requests", s["completed"]), ("Failed requests", s["failed"])]
    rows += [(k, s[k]) for k in s if k not in ("completed", "failed", "errors", "efficiency")]
    lines = ["=" * 22 + " Serving Benchmark Result " + "=" * 22]
    lines += [f"{k.replace('_', ' '):<46}{v}" for k, v in rows]
    lines += [f"error: {e}" for e in s["errors"]]
    lines += _efficiency_lines(s.get("efficiency"))
    return "\n".join(lines + ["=" * 70])


def _efficiency_lines(e: dict | None) -> list[str]:
    if not e or not e.get("fractions"):
        return []
    lines = ["-" * 24 + " Where step time went " + "-" * 24]
    lines += [f"{part:<46}{share:.1%}" for part, share in e["fractions"].items()]
    m = e.get("measured")
    if m:
        lines += [f"{name.replace('_', ' ') + ' (measured)':<46}{value:.4g}"
                  for name, value in m["factors"].items()]  # fmt: skip
        lines.append(f"{'measured efficiency':<46}{m['efficiency']:.4g}")
        lines.append(f"{'tokens/ms per device (router)':<46}{m['tokens_per_ms_per_device']:.4g}")
        lines.append(
            f"{'tokens/ms per device (client)':<46}{e['client_tokens_per_ms_per_device']:.4g}"
        )
        lines.append(f"{'identity ratio (1 = consistent)':<46}{e['identity_ratio']:.3f}")
    return lines


def throughput_series(results: list[RequestResult], start: float, bins: int = 50):
    """Output tokens/ms over time: (bin centres in s since start, tokens/ms per bin)."""
    times = np.asarray([t - start for r in results if r.ok for t in r.chunk_times])
    if times.size == 0:
        return np.zeros(0), np.zeros(0)
    edges = np.linspace(0.0, float(times.max()) + 1e-9, bins + 1)
    counts, _ = np.histogram(times, edges)
    width_ms = (edges[1] - edges[0]) * 1000.0
    return (edges[:-1] + edges[1:]) / 2, counts / width_ms


def plot_throughput(
    results: list[RequestResult], start: float, path: str, fractions: dict | None = None
) -> None:
    """Tokens/ms over time; beside it, where the step time went (when the server said)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install matplotlib") from None
    x, y = throughput_series(results, start)
    if fractions:
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), width_ratios=(4, 1))
        _plot_breakdown(bx, fractions)
    else:
        fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(x, y, drawstyle="steps-mid")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("output tokens/ms")
    ax.set_title("moe-serve bench: output throughput over time")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_breakdown(ax, fractions: dict[str, float]) -> None:
    """One stacked bar: each part's share of the run's step time."""
    bottom = 0.0
    for part, share in fractions.items():
        ax.bar(0, share, bottom=bottom, label=f"{part} {share:.0%}")
        bottom += share
    ax.set_xticks([])
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of step time")
    ax.set_title("where step time went")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.02))


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
