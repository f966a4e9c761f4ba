"""Calibration check (issue 8): calibrate the plan on some batch sizes, predict another, measure it.

On one deployment (`moe-serve up`, started here on 127.0.0.1 and stopped by its pid at the end):
  1. `moe-serve bench --json` at each --concurrency (the decode batch: every request is in flight
     at once up to that many), one report per level;
  2. for every level B: `moe-serve plan --calibrate A.json [--calibrate A2.json ...] --check B.json`
     with every other level pooled as the calibration (the sweep), and with each other level A
     alone: the step model fitted on those steps predicts tokens/ms per device at B's batch, and is
     compared with what B measured.
Goal: within 15% for a batch other than the calibration's.

Prints one JSON object. Usage:
  python scripts/check_calibration.py [--concurrency 2,8,16] [--shards 2] [--prompts 48]
      [--input-len 16] [--output-len 48] [--port 8011] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PYTHON = sys.executable


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"moe-serve up exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).close()
            return
        except OSError:
            time.sleep(1.0)
    raise SystemExit(f"{url} not healthy within {timeout_s:.0f} s")


def cli(*args: str) -> str:
    out = subprocess.run([PYTHON, "-m", "serving.cli", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"moe-serve {' '.join(args)} failed: {out.stderr.strip()[-500:]}")
    return out.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="2,8,16")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--input-len", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=48)
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--keep", help="directory to keep the bench reports in")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    out = Path(args.keep or tempfile.mkdtemp(prefix="moe-calibration-"))
    out.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen(
        [PYTHON, "-m", "serving.cli", "up", "--port", str(args.port),
         "--expert-shards", str(args.shards), "--hardware", "cpu"],
        stdout=subprocess.DEVNULL, stderr=(out / "server.log").open("w"),
    )  # fmt: skip
    try:
        wait_healthy(url, server)
        cli("bench", "--url", url, "--num-prompts", "8", "--json")  # warm up
        reports = {}
        for c in levels:
            text = cli("bench", "--url", url, "--num-prompts", str(args.prompts),
                       "--max-concurrency", str(c), "--input-len", str(args.input_len),
                       "--output-len", str(args.output_len), "--json")  # fmt: skip
            (out / f"c{c}.json").write_text(text)
            reports[c] = json.loads(text)
    finally:
        os.kill(server.pid, signal.SIGINT)  # moe-serve up drains and stops Ray on Ctrl-C
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
    from serving.engine.demo import demo_checkpoint

    model = str(demo_checkpoint() / "config.json")
    pairs = []
    for b in levels:
        others = [a for a in levels if a != b]
        for calibration in ([others] if len(others) > 1 else []) + [[a] for a in others]:
            flags = [x for a in calibration for x in ("--calibrate", str(out / f"c{a}.json"))]
            plan = json.loads(cli("plan", "--model", model, "--hardware", "cpu", *flags,
                                  "--check", str(out / f"c{b}.json"), "--json"))  # fmt: skip
            check = plan["calibration"]["check"]
            pairs.append({
                "calibrated_at": calibration,
                "checked_at": b,
                "inside_calibrated_range": min(calibration) < b < max(calibration),
                "decode_rows_per_step": round(check["decode_rows_per_step"], 2),
                "predicted_tokens_per_ms_per_device": round(check["predicted_tokens_per_ms_per_device"], 4),
                "measured_tokens_per_ms_per_device": round(check["measured_tokens_per_ms_per_device"], 4),
                "relative_error": round(check["relative_error"], 4),
            })  # fmt: skip
    runs = {
        c: {
            "decode_rows_per_step": round(r["efficiency"]["measured"]["decode_rows_per_step"], 2),
            "tokens_per_ms_per_device": round(
                r["efficiency"]["measured"]["tokens_per_ms_per_device"], 4
            ),
            "identity_ratio": round(r["efficiency"]["identity_ratio"], 4),
            "fractions": {k: round(v, 4) for k, v in r["efficiency"]["fractions"].items()},
        }
        for c, r in reports.items()
    }
    print(json.dumps({
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "shards": args.shards,
        "runs": runs,
        "checks": pairs,
        "goal": "relative_error <= 0.15",
        "reports": str(out),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
