"""scripts/bench_moe_layer.py on CUDA, small: it exits 0 and prints one JSON line per case with
every field it promises.

The script has no small CUDA setting (`--tiny` runs on the CPU; its CUDA run is the issue's shapes,
minutes of work): the subprocess loads it, swaps its SHAPES and TOKENS for one small layer, and runs
its own main() with `--iters 2`, so the CUDA bf16 code path is the one `gpu_check.sh` measures.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

from tests.conftest import REPO

SMOKE = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("bench_moe_layer", "scripts/bench_moe_layer.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
bench.SHAPES = {"smoke-layer": (256, 512, 8, 2)}
bench.TOKENS = [64, 512]
sys.argv = ["bench_moe_layer.py", "--iters", "2"]
bench.main()
"""
IMPLS = ("ours", "eager", "grouped_mm", "dense")
FIELDS = {
    "case",
    "tokens",
    "max_abs_diff_vs_transformers",
    "gflop",
    "hbm_bound_ms",
    "ours_over_hbm_bound",
    "grouped_mm_over_hbm_bound",
    "ours_over_dense",
    *(f"{impl}_ms" for impl in IMPLS),
    *(f"{impl}_tflops" for impl in IMPLS),
}


def test_bench_moe_layer_smoke_on_cuda():
    proc = subprocess.run(
        [sys.executable, "-c", SMOKE], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert [(r["case"], r["tokens"]) for r in rows] == [("smoke-layer", 64), ("smoke-layer", 512)]
    for row in rows:
        assert FIELDS <= row.keys(), f"missing {sorted(FIELDS - row.keys())}"
        for impl in IMPLS:
            assert row[f"{impl}_ms"] > 0 and row[f"{impl}_tflops"] > 0, (impl, row)
        assert math.isfinite(row["max_abs_diff_vs_transformers"])
        assert row["hbm_bound_ms"] > 0
