"""`moe-serve dashboard`: provision moe-serve's Grafana dashboard and its Prometheus data source.

Through grafana-client's GrafanaApi: (1) create the Prometheus data source (uid
`moe-serve-prometheus`; updated in place when it exists), (2) post configs/grafana/moe-serve.json
to `POST /api/dashboards/db` with overwrite on, its `ds` variable pointing at that data source.
Credentials: `--api-key` (a service account token; default GRAFANA_API_KEY) or `user:password@`
in the URL.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
from pathlib import Path
from typing import Any

from serving.errors import UserError

DATASOURCE_UID = "moe-serve-prometheus"
DATASOURCE_NAME = "moe-serve Prometheus"
DEFAULT_PROMETHEUS_URL = "http://127.0.0.1:9090"
DASHBOARD_FILE = "moe-serve.json"
# Grafana's interval variables in the dashboard's PromQL, and what stands for them outside Grafana.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    """Register `moe-serve dashboard` on the CLI's subparsers."""
    p = sub.add_parser(
        "dashboard",
        help="provision the Grafana dashboard and a Prometheus data source",
        description="Provision moe-serve's Grafana dashboard and its Prometheus data source.",
    )
    p.add_argument("--grafana-url", required=True, help="e.g. http://127.0.0.1:3000")
    p.add_argument("--api-key", help="Grafana service account token (default: GRAFANA_API_KEY)")
    p.add_argument(
        "--prometheus-url",
        default=DEFAULT_PROMETHEUS_URL,
        help=f"the Prometheus Grafana queries (default {DEFAULT_PROMETHEUS_URL})",
    )
    p.add_argument("--dashboard", metavar="JSON", help="dashboard file (default: the bundled one)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default 10)")
    p.set_defaults(func=run)


def dashboard_path() -> Path:
    """configs/grafana/moe-serve.json under the working directory, else beside this package."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        path = root / "configs" / "grafana" / DASHBOARD_FILE
        if path.is_file():
            return path
    raise UserError(f"configs/grafana/{DASHBOARD_FILE}: not found; give --dashboard FILE")


def load_dashboard(path: str | Path | None = None) -> dict[str, Any]:
    path = Path(path) if path else dashboard_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read a dashboard ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("panels"), list):
        raise UserError(f"{path}: not a Grafana dashboard (no panels)")
    return data


def dashboard_exprs(dashboard: dict[str, Any], substitute: bool = False) -> list[str]:
    """Every PromQL expression of the dashboard's panels; `substitute` replaces Grafana's
    interval variables so that Prometheus itself can evaluate them."""
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if "expr" in t]
    if substitute:
        pattern = re.compile("|".join(re.escape(v) for v in GRAFANA_VARIABLES))
        exprs = [pattern.sub(lambda m: GRAFANA_VARIABLES[m.group(0)], e) for e in exprs]
    return exprs


def datasource_payload(prometheus_url: str) -> dict[str, Any]:
    return {
        "uid": DATASOURCE_UID,
        "name": DATASOURCE_NAME,
        "type": "prometheus",
        "access": "proxy",  # Grafana's server queries Prometheus; browsers need no route to it
        "url": prometheus_url,
        "isDefault": False,
        "jsonData": {"httpMethod": "POST", "timeInterval": "5s"},
    }


def dashboard_payload(dashboard: dict[str, Any]) -> dict[str, Any]:
    """The POST /api/dashboards/db body: the dashboard bound to our data source, overwriting."""
    dash = copy.deepcopy(dashboard)
    dash["id"] = None  # Grafana matches by uid; a stale numeric id would be refused
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "datasource":
            var["current"] = {"text": DATASOURCE_NAME, "value": DATASOURCE_UID}
    return {"dashboard": dash, "overwrite": True, "message": "provisioned by moe-serve dashboard"}


def provision(api, dashboard: dict[str, Any], prometheus_url: str) -> dict[str, Any]:
    """Steps 1-2 of the module docstring on a GrafanaApi; returns Grafana's dashboard answer."""
    from grafana_client.client import GrafanaClientError

    # 1. The data source: create; when Grafana says it exists (409), update it by uid.
    payload = datasource_payload(prometheus_url)
    try:
        api.datasource.create_datasource(payload)
    except GrafanaClientError as exc:
        if exc.status_code != 409:
            raise
        api.datasource.update_datasource_by_uid(DATASOURCE_UID, payload)
    # 2. The dashboard.
    return api.dashboard.update_dashboard(dashboard_payload(dashboard))


def _one_line(exc: Exception, url: str) -> UserError:
    """A grafana-client or network failure as one line that says what to do."""
    from grafana_client.client import GrafanaException, GrafanaUnauthorizedError

    if isinstance(exc, GrafanaUnauthorizedError):
        return UserError(
            f"{url}: unauthorized; give --api-key TOKEN (an Editor service account token) "
            "or user:password@ in --grafana-url"
        )
    if isinstance(exc, GrafanaException) and exc.status_code:
        return UserError(f"{url}: Grafana refused the request: {exc.message}")
    text = str(getattr(exc, "message", "") or exc)
    # niquests wraps the socket error in a long chain; its "[Errno N] ..." part is what matters.
    errno = re.search(r"\[Errno -?\d+\][^'\")]*", text)
    reason = errno.group(0).strip() if errno else (text.splitlines() or [type(exc).__name__])[0]
    return UserError(f"{url}: Grafana unreachable ({reason}); check --grafana-url")


def _shown(url: str) -> str:
    """The URL without a password, for messages."""
    return re.sub(r"//[^/@]*@", "//", url)


def run(args: argparse.Namespace) -> int:
    from grafana_client import GrafanaApi
    from grafana_client.client import GrafanaException

    dashboard = load_dashboard(args.dashboard)
    api_key = args.api_key or os.environ.get("GRAFANA_API_KEY") or None
    url = args.grafana_url.rstrip("/")
    if not re.match(r"^https?://", url):
        raise UserError(f"--grafana-url {_shown(url)}: expected http://HOST:PORT or https://...")
    api = GrafanaApi.from_url(url, credential=api_key, timeout=args.timeout)
    try:
        answer = provision(api, dashboard, args.prometheus_url)
    except (GrafanaException, OSError) as exc:  # niquests' connection errors are OSErrors
        raise _one_line(exc, _shown(url)) from None
    link = answer.get("url", "") if isinstance(answer, dict) else ""
    print(f"moe-serve dashboard: data source {DATASOURCE_NAME} -> {args.prometheus_url}")
    print(
        f"moe-serve dashboard: provisioned {dashboard.get('title', 'dashboard')} at {_shown(url)}{link}"
    )
    return 0
