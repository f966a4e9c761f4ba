"""`moe-serve plan`: files in, report out, and one-line errors for bad inputs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from serving.cli import command as cli
from serving.control.capacity import PlanOptions, plan
from serving.control.specs import load_hardware_spec, load_model_spec, measure_cpu
from serving.errors import UserError

REPO = Path(__file__).resolve().parents[2]
SEED = [
    "plan",
    "--model",
    str(REPO / "configs/models/seed-4b.yaml"),
    "--hardware",
    str(REPO / "configs/hardware/seed-240tflops.yaml"),
    "--target",
    "100",
]
HW_OK = """\
name: test
peak_flops: 1.0e+15
hbm_gb: 80
hbm_bandwidth_gb_s: 3000
intra_node_gb_s: 450
inter_node_gb_s: 50
gpus_per_node: 8
"""


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def assert_seed_verdict(result: dict) -> None:
    assert result["ceiling_tokens_per_ms"] == pytest.approx(30.0)
    assert round(result["efficiency"], 3) == 0.377
    assert round(result["realistic_tokens_per_ms"], 1) == 11.3
    assert 8.8 <= result["required_scaling"] <= 8.9
    assert result["feasible"] is False and result["risk"] == "critical"
    assert any("333%" in line for line in result["proof"])


def test_seed_json_in_process(capsys):
    code, out, _ = run_cli([*SEED, "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    assert_seed_verdict(result)
    assert set(result["efficiency_factors"]) == {
        "kernel",
        "communication",
        "load_imbalance",
        "pipeline_bubbles",
    }
    assert result["target_tokens_per_ms"] == 100.0
    for phase in result["phases"]:
        assert set(phase) == {"name", "tokens_per_ms", "conditions", "feasible"}
    row_keys = {"seq_len", "weights_gb", "kv_cache_gb", "activations_gb", "total_gb"}
    assert all(row_keys | {"checkpointing"} <= set(row) for row in result["memory"])
    assert result["formulas"][0].lstrip().startswith("F1 ceiling")


def test_seed_json_through_the_installed_entry_point():
    exe = Path(sys.executable).parent / "moe-serve"
    assert exe.exists(), "the test command installs moe-serve into .venv (scripts/bootstrap.sh)"
    proc = subprocess.run([str(exe), *SEED, "--json"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert_seed_verdict(json.loads(proc.stdout))


def test_seed_phase_2_claim_is_flagged(capsys):
    code, out, _ = run_cli([*SEED, "--claim", "seed phase 2=44", "--json"], capsys)
    phases = {p["name"]: p for p in json.loads(out)["phases"]}
    assert code == 0 and phases["claimed: seed phase 2"]["feasible"] is False


def test_aggregate_target_gives_gpu_count(capsys):
    args = [a for a in SEED if a not in ("--target", "100")]
    code, out, _ = run_cli([*args, "--aggregate-target", "100", "--json"], capsys)
    assert code == 0 and json.loads(out)["gpus_needed"] == 9


def test_text_and_markdown_reports(capsys, tmp_path):
    report = tmp_path / "plan.md"
    code, out, _ = run_cli([*SEED, "--markdown", str(report)], capsys)
    assert code == 0
    assert "INFEASIBLE" in out and "critical" in out and "333%" in out
    markdown = report.read_text()
    assert "| phase | tokens/ms | feasible | conditions |" in markdown and "333%" in markdown


def test_derive_and_factor_overrides(capsys):
    flags = ["--derive", "--ep", "8", "--kernel", "0.8", "--pipeline-bubbles", "0", "--json"]
    code, out, _ = run_cli([*SEED, *flags], capsys)
    result = json.loads(out)
    assert code == 0 and result["efficiency_factors"]["kernel"] == 0.8
    assert result["efficiency_factor_sources"]["communication"] == "derived"
    assert result["efficiency_factors"]["pipeline_bubbles"] == 0.0  # an explicit 0 wins
    assert result["efficiency_factor_sources"]["pipeline_bubbles"] == "given"


@pytest.mark.parametrize("model", ["seed-4b", "mixtral-8x7b", "tiny"])
@pytest.mark.parametrize("hardware", ["seed-240tflops", "h200", "h100", "a100"])
def test_every_shipped_config_loads_and_plans(model, hardware):
    p = plan(load_model_spec(model), load_hardware_spec(hardware), PlanOptions(ep=2))
    assert p.ceiling_tokens_per_ms > p.realistic_tokens_per_ms > 0 and len(p.memory) == 5


def test_h200_uses_its_measured_peak():
    hw = load_hardware_spec("h200")
    assert hw.peak() == (792e12, "measured") and hw.peak_flops == 989e12


def test_hugging_face_config_json(tmp_path):
    config = {
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "vocab_size": 510,  # as configs/models/tiny.yaml and the demo
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": None,  # -> hidden / heads = 32
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "tie_word_embeddings": False,
        "rope_theta": 1e6,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = load_model_spec(str(tmp_path))  # a checkpoint directory works too
    assert spec.head_size == 32
    assert spec.params() == load_model_spec("tiny").params()
    (tmp_path / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))
    with pytest.raises(UserError, match="model_type"):
        load_model_spec(str(tmp_path / "config.json"))


def test_cpu_is_measured_on_the_spot():
    hw = measure_cpu(seconds=0.1)
    assert hw.flops_dtype == "fp32" and hw.peak()[1] == "measured"
    assert hw.measured_flops > 1e8 and hw.hbm_gb > 0 and hw.hbm_bandwidth_gb_s > 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (HW_OK.replace("peak_flops: 1.0e+15\n", ""), "peak_flops: missing"),
        (HW_OK.replace("1.0e+15", "-5"), "peak_flops: Input should be greater than 0"),
        (HW_OK + "nvlink: 900\n", "nvlink: unknown field"),
        ("- not a mapping\n", "expected a mapping"),
    ],
)
def test_bad_hardware_file_is_one_line_and_exit_2(capsys, tmp_path, text, expected):
    path = tmp_path / "x.yaml"
    path.write_text(text)
    args = ["plan", "--model", "tiny", "--hardware", str(path)]
    code, out, err = run_cli(args, capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and f"{path}: {expected}" in err


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--hardware", "no-such-gpu"], "--hardware no-such-gpu: no such file"),
        (["--hardware", "h200", "--model", "nope.yaml"], "--model nope.yaml: no such file"),
        (["--hardware", "h200", "--ep", "0"], "--ep: Input should be greater than 0"),
        (["--hardware", "h200", "--seq-lens", "128,x"], "--seq-lens 128,x: expected integers"),
        (["--hardware", "h200", "--gpus", "4"], "gpus: only meaningful"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(capsys, flags, expected):
    code, _, err = run_cli(["plan", "--model", "tiny", *flags], capsys)
    assert code == 2 and err.count("\n") == 1 and expected in err
