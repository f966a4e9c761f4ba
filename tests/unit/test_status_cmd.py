"""`moe-serve status` against a local server that answers GET /v1/moe/status."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from serving.api.protocol import STATUS_PATH
from serving.cli.command import main
from serving.cli.status import render
from serving.control.controller_loop import ActionRecord, StatusReport
from tests.support import free_port

REPORT = StatusReport(
    tokens_per_ms_per_device=8.5,
    target_tokens_per_ms=10.0,
    ceiling_tokens_per_ms=30.0,
    phase="phase 1",
    expert_load_cv=0.21,
    max_over_mean=1.4,
    queue_depth=3,
    devices=2,
    batch_strategy="adaptive",
    fallback_level=1,
    engine_cpus=[0],
    loop_cpus=[0],
    last_decision=ActionRecord(time=1000.0, action="hold", reason="cooldown"),
    actions=[
        ActionRecord(time=900.0, action="rebalance", reason="load CV 0.210 > 0.15"),
        ActionRecord(time=990.0, action="batch_fallback", reason="shortfall, shallow queue 0"),
    ],
)


@pytest.fixture
def server():
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(dict(self.headers))
            status, body = (
                (200, REPORT.model_dump_json()) if self.path == STATUS_PATH else (404, "")
            )
            if self.headers.get("Authorization") == "Bearer bad":
                status, body = 401, json.dumps({"error": {"message": "bad key"}})
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    httpd.shutdown()
    httpd.server_close()


def test_prints_the_live_view(server, capsys):
    url, seen = server
    assert main(["status", "--url", url, "--api-key", "k"]) == 0
    out = capsys.readouterr().out
    assert "8.5 (85% of target)" in out and "10 (phase 1)" in out and "30" in out
    assert "0.210" in out and "1.40" in out
    assert "engine forward pass   on CPU 0" in out
    assert "engine event loop     on CPU 0" in out
    assert out.index("batch_fallback") < out.index("rebalance")  # newest first
    assert seen[0]["Authorization"] == "Bearer k"


def test_json_is_the_report(server, capsys):
    url, _ = server
    assert main(["status", "--url", url, "--json"]) == 0
    assert StatusReport.model_validate_json(capsys.readouterr().out) == REPORT


def test_unreachable_is_one_line(capsys):
    port = free_port()
    assert main(["status", "--url", f"http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unreachable" in err and str(port) in err


def test_unauthorized_says_which_flag(server, capsys):
    url, _ = server
    assert main(["status", "--url", url, "--api-key", "bad"]) == 2
    assert "HTTP 401" in capsys.readouterr().err


def test_empty_report_renders():
    text = render(StatusReport(), now=0.0)
    assert "tokens/ms per device  -" in text and "actions: none yet" in text


def test_breakdown_and_measured_factors_print_beside_the_plan():
    from serving.control.steptime import PARTS

    fractions = dict(zip(PARTS, (0.3, 0.2, 0.35, 0.1, 0.0, 0.05), strict=True))
    factors = {"kernel": 0.0123, "communication": 0.41, "load_imbalance": 0.15,
               "pipeline_bubbles": 0.05}  # fmt: skip
    efficiency = {
        "window_s": 30.0,
        "fractions": fractions,
        "measured": {"steps": 812, "factors": factors, "efficiency": 0.0061,
                     "tokens_per_ms_per_device": 0.09, "ceiling_tokens_per_ms": 14.8},
        "planned": {"factors": {"kernel": 0.9, "communication": 0.42, "load_imbalance": 0.12,
                                "pipeline_bubbles": 0.18},
                    "sources": dict.fromkeys(factors, "given"), "efficiency": 0.377},
    }  # fmt: skip
    text = render(StatusReport(efficiency=efficiency), now=0.0)
    assert "step time (last 30 s, 812 steps):" in text
    assert "transport            35.0%" in text
    assert "  kernel                 0.0123  0.9 (given)" in text
    assert "  efficiency             0.0061  0.377" in text
    empty = render(StatusReport(efficiency={"fractions": None}), now=0.0)
    assert "no steps in the last window" in empty
