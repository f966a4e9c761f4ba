"""What a `moe-serve bench` run measured: per-request timings summarised into the benchmark's
figures, the engine's step accounting over the run's window, and both as text or a PNG.

serving/cli/bench.py sends the load and reads the server; everything here works on what it
collected and talks to no server, so the same figures come from any list of results (scripts that
drive the load themselves summarise it with `summarize`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from serving.control.efficiency import EfficiencyBasis, fit, measure
from serving.control.steptime import StepTotals
from serving.errors import UserError


@dataclass
class RequestResult:
    """One streamed request as the client saw it (times from time.perf_counter(), in s)."""

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


def efficiency_report(
    before: dict | None, after: dict | None, client_tokens: int, duration_s: float
) -> dict | None:
    """The step accounting of the run's window (after minus before) in planner terms, with the
    identity check against the client's own token count; None without the engine's figures."""
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


def throughput_series(
    results: list[RequestResult], start: float, bins: int = 50
) -> tuple[np.ndarray, np.ndarray]:
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
