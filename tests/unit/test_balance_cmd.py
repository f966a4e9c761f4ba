"""`moe-serve balance` in-process: the Zipf goal, trace input, readable and JSON output, errors."""

from __future__ import annotations

import json

import pytest
import torch

from router.balancer import ExpertLoadBalancer
from router.gating import top_k_gating
from router.placement import initial_placement
from serving.cli.command import main

GOAL = ["--simulate", "zipf:1.2", "--experts", "64", "--shards", "8", "--redundant", "16"]


def _run_json(capsys, *args: str) -> dict:
    assert main(["balance", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_zipf_goal(capsys):
    r = _run_json(capsys, *GOAL, "--layers", "2", "--tokens", "8192")
    assert r["cv_before"] > 0.5 and r["max_over_mean_before"] > 1.5  # the problem is real
    assert r["cv_after"] <= 0.15 and r["max_over_mean_after"] <= 1.10
    # The next window, from the same distribution, is served almost as evenly.
    assert r["cv_after_fresh"] <= 0.15 and r["max_over_mean_after_fresh"] <= 1.10
    assert r["meets_target_cv"] is True and r["target_cv"] == 0.15
    assert r["slots_per_shard"] == [10] * 8
    assert len(r["per_layer"]) == 2 and sum(r["per_layer"][0]["replica_counts"]) == 80
    assert r["pairs_per_layer"] == [16384.0, 16384.0]


def test_seed_makes_it_reproducible(capsys):
    args = ["--simulate", "zipf:1.0", "--experts", "16", "--shards", "4", "--tokens", "512"]
    assert _run_json(capsys, *args, "--seed", "3") == _run_json(capsys, *args, "--seed", "3")


def test_readable_output(capsys):
    assert main(["balance", *GOAL, "--layers", "1", "--tokens", "4096"]) == 0
    out = capsys.readouterr().out
    assert "CV across shards" in out and "max/mean" in out and "target 0.15: met" in out
    assert not out.lstrip().startswith("{")


def test_trace_from_the_balancer_export(tmp_path, capsys):
    balancer = ExpertLoadBalancer([initial_placement(6, 4)] * 2)
    for layer in range(2):
        g = torch.Generator().manual_seed(layer)
        bias = -2.0 * torch.log(torch.arange(1, 7, dtype=torch.float32))
        gating = top_k_gating(torch.randn(256, 6, generator=g) + bias, 2)
        balancer.assign(layer, gating.experts, gating.weights)
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps(balancer.trace()))
    r = _run_json(capsys, "--trace", str(trace), "--shards", "4", "--redundant", "1")
    assert (r["experts"], r["layers"], r["source"]) == (6, 2, str(trace))
    assert sorted(r["slots_per_shard"]) == [1, 2, 2, 2]  # 7 slots on 4 shards
    assert r["cv_after"] < r["cv_before"]
    assert "cv_after_fresh" not in r


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "t.json"
    path.write_text(text)
    return str(path)


BAD = [
    (["--simulate", "zipf:abc", "--experts", "8", "--shards", "2"], "--simulate"),
    (["--simulate", "gauss:1", "--experts", "8", "--shards", "2"], "--simulate"),
    (["--simulate", "zipf:-1", "--experts", "8", "--shards", "2"], "--simulate"),
    (["--simulate", "zipf:1", "--shards", "2"], "--experts"),
    (["--simulate", "zipf:1", "--experts", "8", "--shards", "2", "--tokens", "0"], "--tokens"),
    (["--simulate", "zipf:1", "--experts", "8", "--shards", "0"], "--shards"),
    (
        ["--simulate", "zipf:1", "--experts", "8", "--shards", "2", "--redundant", "9"],
        "--redundant",
    ),
    (
        ["--simulate", "zipf:1", "--experts", "8", "--shards", "2", "--redundant", "-1"],
        "--redundant",
    ),
    (["--shards", "2"], "--trace"),
    (["--simulate", "zipf:1", "--trace", "x.json", "--shards", "2"], "--trace"),
    (["--trace", "/nonexistent/trace.json", "--shards", "2"], "--trace"),
    (["--trace", "@{not json", "--shards", "2"], "not valid JSON"),
    (["--trace", '@{"tokens_per_expert": [[1, 2], [3]]}', "--shards", "2"], "--trace"),
    (["--trace", '@{"tokens_per_expert": []}', "--shards", "2"], "--trace"),
    (["--trace", "@[[1, 2]]", "--shards", "2"], "--trace"),
    (["--trace", '@{"tokens_per_expert": [[1, -2]]}', "--shards", "2"], "non-negative"),
    (["--trace", '@{"tokens_per_expert": [[1, "a"]]}', "--shards", "2"], "non-negative"),
    (
        ["--trace", '@{"tokens_per_expert": [[1, 2]]}', "--shards", "2", "--experts", "3"],
        "--experts",
    ),
]


@pytest.mark.parametrize(("args", "needle"), BAD)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, needle):
    args = [_write(tmp_path, a[1:]) if a.startswith("@") else a for a in args]
    assert main(["balance", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe-serve balance: error: ")
    assert needle in lines[0]
