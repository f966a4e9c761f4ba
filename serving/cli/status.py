"""`moe-serve status`: the controller's live view, read from a running server.

It asks `GET {url}/v1/moe/status` (the JSON of serving/control/controller_loop.py `StatusReport`) and prints
live tokens/ms per device against the phase target and the ceiling, the phase, the expert load CV
and max/mean, where the recent steps' time went (dense, expert, transport, imbalance, bubble), the
measured efficiency factors beside the plan's, and the last controller actions; `--json` prints
the report as the server sent it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.error
import urllib.request

from pydantic import ValidationError

from serving.api.protocol import STATUS_PATH
from serving.control.controller_loop import StatusReport
from serving.errors import UserError

DEFAULT_URL = "http://127.0.0.1:8000"


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    """Register `moe-serve status` on the CLI's subparsers."""
    p = sub.add_parser(
        "status",
        help="live tokens/ms, target, ceiling, phase, load CV and the controller's last actions",
        description="Print the controller's live view of a running moe-serve server.",
    )
    p.add_argument("--url", default=DEFAULT_URL, help=f"the server (default {DEFAULT_URL})")
    p.add_argument("--api-key", help="the server's API key (default: MOE_SERVE_API_KEY)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default 5)")
    p.add_argument("--json", action="store_true", help="print the status report as JSON")
    p.set_defaults(func=run)


def fetch_status(url: str, api_key: str | None = None, timeout: float = 5.0) -> StatusReport:
    """GET the status report; any failure is one UserError line naming the URL."""
    endpoint = url.rstrip("/") + STATUS_PATH
    request = urllib.request.Request(endpoint, headers={"Accept": "application/json"})
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        hint = " (give --api-key or MOE_SERVE_API_KEY)" if exc.code == 401 else ""
        raise UserError(f"{endpoint}: HTTP {exc.code} {exc.reason}{hint}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(
            f"{endpoint}: unreachable ({reason}); is `moe-serve up` running there?"
        ) from None
    try:
        return StatusReport.model_validate_json(body)
    except ValidationError as exc:
        raise UserError(f"{endpoint}: not a moe-serve status report ({_first(exc)})") from None


def _first(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"


def _num(value: float | None, fmt: str = ".3g") -> str:
    return "-" if value is None else format(value, fmt)


def render(report: StatusReport, now: float | None = None) -> str:
    """The report as text, one figure per line, then the actions newest first."""
    now = time.time() if now is None else now
    live, target = report.tokens_per_ms_per_device, report.target_tokens_per_ms
    share = f" ({live / target:.0%} of target)" if live is not None and target else ""
    lines = [
        f"tokens/ms per device  {_num(live)}{share}",
        f"target                {_num(target)} ({report.phase or 'no phase'})",
        f"ceiling               {_num(report.ceiling_tokens_per_ms)}",
        f"expert load CV        {_num(report.expert_load_cv, '.3f')}",
        f"max/mean              {_num(report.max_over_mean, '.2f')}",
        f"queue depth           {_num(report.queue_depth, 'd')}",
        f"devices               {_num(report.devices, 'd')}",
        f"batch strategy        {report.batch_strategy or '-'} (fallback level "
        f"{report.fallback_level})",
    ]
    lines += _efficiency_lines(report.efficiency or {})
    lines += _overflow_lines(report.overflow)
    if report.shard_nodes:
        nodes = ", ".join(f"{i}:{n[:8]}" for i, n in enumerate(report.shard_nodes))
        lines.append(f"shard nodes           {nodes} ({len(set(report.shard_nodes))} nodes)")
    if report.expert_transport:
        lines.append(f"expert transport      {report.expert_transport}")
    for label, cpus in (("engine forward pass", report.engine_cpus),
                        ("engine event loop", report.loop_cpus)):  # fmt: skip
        if cpus:
            lines.append(f"{label:<22}on CPU {', '.join(map(str, cpus))}")
    if report.max_engine_replicas > 1:
        upto = report.max_engine_replicas
        most = f" of at most {upto}" if upto > report.engine_replicas else ""
        lines.append(
            f"engine replicas       {report.engine_replicas}{most} "
            "(efficiency: the first's; overflow: all)"
        )
    if report.last_decision is not None:
        d = report.last_decision
        lines.append(f"last decision         {d.action}: {d.reason}")
    lines.append("actions:" if report.actions else "actions: none yet")
    for a in reversed(report.actions):
        lines.append(f"  {_ago(now - a.time):>8}  {a.action:<15} {a.reason}")
    return "\n".join(lines) + "\n"


def _overflow_lines(overflow: dict | None) -> list[str]:
    """Pairs over slot capacity per layer, under the deployment's policy."""
    if not overflow:
        return []
    lines = [f"overflow ({overflow['policy']}): split / rerouted / dropped per layer"]
    for i, c in enumerate(overflow["layers"]):
        lines.append(f"  layer {i:<3} {c['split']:>8} {c['rerouted']:>8} {c['dropped']:>8}")
    return lines


FACTORS = ("kernel", "communication", "load_imbalance", "pipeline_bubbles")


def _efficiency_lines(e: dict) -> list[str]:
    """The step-time breakdown of the engine's window, then measured vs planned factors."""
    fractions, measured, planned = e.get("fractions"), e.get("measured"), e.get("planned")
    if not fractions:
        return ["step time             no steps in the last window"]
    steps = f", {measured['steps']} steps" if measured else ""
    lines = [f"step time (last {e.get('window_s', 0):.0f} s{steps}):"]
    lines += [f"  {part:<19} {share:6.1%}" for part, share in fractions.items()]
    if measured is None:
        return lines + ["  (no plan for this hardware: factors not measured)"]
    lines.append(f"  {'factor':<19} {'measured':>9}  planned")
    for name in FACTORS:
        plan = f"{planned['factors'][name]:.3g} ({planned['sources'][name]})" if planned else "-"
        lines.append(f"  {name:<19} {measured['factors'][name]:>9.3g}  {plan}")
    plan_eff = f"{planned['efficiency']:.3g}" if planned else "-"
    lines.append(f"  {'efficiency':<19} {measured['efficiency']:>9.3g}  {plan_eff}")
    rate = measured["tokens_per_ms_per_device"]
    lines.append(
        f"  = {rate:.3g} tokens/ms per device / ceiling {measured['ceiling_tokens_per_ms']:.3g}"
    )
    return lines


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.0f}h ago"


def run(args: argparse.Namespace) -> int:
    api_key = args.api_key or os.environ.get("MOE_SERVE_API_KEY") or None
    report = fetch_status(args.url, api_key, args.timeout)
    if args.json:
        print(json.dumps(report.model_dump(mode="json"), indent=2))
    else:
        print(render(report), end="")
    return 0
