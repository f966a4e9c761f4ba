"""Loader: lazy per-expert reads, and one clear line for every bad checkpoint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from experts.checkpoint import Checkpoint, CheckpointError
from serving import load_model

from ..conftest import REPO, write_hf_checkpoint


@pytest.fixture
def good(tmp_path, demo_path):
    target = tmp_path / "ckpt"
    shutil.copytree(demo_path, target)
    return target


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors")


def test_expert_reads_only_that_expert(good, monkeypatch):
    ckpt = Checkpoint(good)
    read = []
    handle = ckpt._handle(ckpt._files["model.embed_tokens.weight"])
    real = handle.get_tensor
    monkeypatch.setattr(
        ckpt,
        "_handle",
        lambda f: type(
            "H", (), {"get_tensor": staticmethod(lambda n: (read.append(n), real(n))[1])}
        )(),
    )
    w1, w3, w2 = ckpt.expert(2, 5, torch.float32)
    assert read == [
        f"model.layers.2.block_sparse_moe.experts.5.{w}.weight" for w in ("w1", "w3", "w2")
    ]
    assert w1.shape == w3.shape == (256, 128) and w2.shape == (128, 256)


def test_transformers5_rope_parameters_and_null_head_dim(good):
    cfg = json.loads((good / "config.json").read_text())
    cfg.pop("rope_theta")
    cfg["rope_parameters"] = {"rope_theta": 12345.0, "rope_type": "default"}
    cfg["head_dim"] = None
    (good / "config.json").write_text(json.dumps(cfg))
    c = Checkpoint(good).config
    assert c.rope_theta == 12345.0 and c.head_dim == 128 // 4


CASES = {
    "missing config": (lambda p: (p / "config.json").unlink(), "config.json: missing file"),
    "missing weights": (
        lambda p: (p / "model.safetensors").unlink(),
        "missing file model.safetensors",
    ),
    "wrong model_type": (lambda p: _edit_config(p, model_type="llama"), "model_type is 'llama'"),
    "missing field": (lambda p: _edit_config(p, hidden_size=None), "hidden_size"),
    "missing tensor": (
        lambda p: _edit_tensors(
            p, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight")
        ),
        "missing tensor model.layers.1.block_sparse_moe.experts.3.w2.weight",
    ),
    "shape mismatch": (
        lambda p: _edit_config(p, intermediate_size=300),
        "config.json implies (300, 128)",
    ),
    "unsupported dtype": (
        lambda p: _edit_tensors(
            p, lambda t: t.update({"model.norm.weight": torch.ones(128, dtype=torch.int8)})
        ),
        "model.norm.weight: unsupported dtype torch.int8",
    ),
    "bad json": (lambda p: (p / "config.json").write_text("{nope"), "config.json: not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_checkpoint_one_line_error(good, case):
    breaker, expected = CASES[case]
    breaker(good)
    with pytest.raises(CheckpointError) as err:
        load_model(good)
    message = str(err.value)
    assert expected in message and "\n" not in message


def test_sharded_index_with_missing_shard(tmp_path):
    target = write_hf_checkpoint(tmp_path / "c", max_shard_size="50KB")
    assert (target / "model.safetensors.index.json").is_file()
    victim = sorted(target.glob("model-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name}: missing file"):
        load_model(target)


def test_cli_prints_one_line_and_exits_nonzero(good):
    _edit_config(good, model_type="llama")
    proc = subprocess.run(
        [sys.executable, "-m", "serving.cli", "generate", "--model", str(good), "--prompt", "hi"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and "model_type is 'llama'" in lines[0] and "Traceback" not in proc.stderr
    )
