"""Loader: lazy per-expert reads, and one clear line for every bad checkpoint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

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


# -- broken downloads: every fault one line naming the file, from the headers, before loading -----

DEMO_FILE = "model.safetensors"
FLOATS = "supported: torch.float32, torch.float16, torch.bfloat16"


def _header_length(file) -> int:
    return int.from_bytes(file.read_bytes()[:8], "little")


def _cut(file, keep) -> None:
    """Keep the first `keep(header_length, size)` bytes of `file`: a partial download."""
    data = file.read_bytes()
    file.write_bytes(data[: keep(_header_length(file), len(data))])


def _json_header(file, text: bytes) -> None:
    file.write_bytes(len(text).to_bytes(8, "little") + text + b"\0" * 64)


def _garbage(size: int) -> bytes:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (size,), generator=generator, dtype=torch.uint8).numpy().tobytes()


def _replace_tensor(path, name, value) -> None:
    _edit_tensors(path, lambda t: t.update({name: value}))


EXPERT_W2 = "model.layers.0.block_sparse_moe.experts.1.w2.weight"
BROKEN = {
    "cut inside the length": (
        lambda p: _cut(p / DEMO_FILE, lambda n, size: 5),
        "truncated or corrupt safetensors file (5 bytes, less than the 8-byte header length)",
    ),
    "cut inside the header": (
        lambda p: _cut(p / DEMO_FILE, lambda n, size: 8 + n // 2),
        "truncated or corrupt safetensors file (invalid header length",
    ),
    "cut inside the data": (
        lambda p: _cut(p / DEMO_FILE, lambda n, size: size - 1000),
        "truncated or corrupt safetensors file (the header describes",
    ),
    "cut at the end of the header": (
        lambda p: _cut(p / DEMO_FILE, lambda n, size: 8 + n),
        "the file holds 0); download it again",
    ),
    "zero bytes": (
        lambda p: (p / DEMO_FILE).write_bytes(b""),
        "truncated or corrupt safetensors file (empty: 0 bytes)",
    ),
    "garbage bytes": (
        lambda p: (p / DEMO_FILE).write_bytes(_garbage(4096)),
        "invalid header length",
    ),
    "invalid JSON header": (
        lambda p: _json_header(p / DEMO_FILE, b"{not json"),
        "header is not valid JSON",
    ),
    "malformed header entry": (
        lambda p: _json_header(p / DEMO_FILE, b'{"a": {"dtype": "F32", "shape": 3}}'),
        "malformed header entry for a",
    ),
    "trailing bytes": (
        lambda p: (p / DEMO_FILE).write_bytes((p / DEMO_FILE).read_bytes() + b"junk"),
        "4 bytes after the tensor data the header describes",
    ),
    "expert of the wrong shape": (
        lambda p: _replace_tensor(p, EXPERT_W2, torch.zeros(256, 128)),
        f"{DEMO_FILE}: {EXPERT_W2}: shape (256, 128), config.json implies (128, 256)",
    ),
    "float64 expert": (
        lambda p: _replace_tensor(p, EXPERT_W2, torch.zeros(128, 256, dtype=torch.float64)),
        f"{EXPERT_W2}: unsupported dtype torch.float64 ({FLOATS})",
    ),
    "int32 attention": (
        lambda p: _replace_tensor(
            p, "model.layers.2.self_attn.k_proj.weight", torch.zeros(64, 128, dtype=torch.int32)
        ),
        f"model.layers.2.self_attn.k_proj.weight: unsupported dtype torch.int32 ({FLOATS})",
    ),
    "layer missing q_proj": (
        lambda p: _edit_tensors(p, lambda t: t.pop("model.layers.3.self_attn.q_proj.weight")),
        f"{DEMO_FILE}: missing tensor model.layers.3.self_attn.q_proj.weight, which config.json "
        "implies (num_hidden_layers=4)",
    ),
    "expert beyond the files": (
        lambda p: _edit_tensors(
            p, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.7.w1.weight")
        ),
        "missing tensor model.layers.1.block_sparse_moe.experts.7.w1.weight, which config.json "
        "implies (num_local_experts=8)",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_download_one_line_naming_the_file(good, case):
    breaker, expected = BROKEN[case]
    breaker(good)
    with pytest.raises(CheckpointError) as err:
        load_model(good)
    message = str(err.value)
    assert DEMO_FILE in message and expected in message and "\n" not in message, message


def test_validate_reads_headers_only(good, monkeypatch):
    import experts.checkpoint as module

    def refuse(*args, **kwargs):
        raise AssertionError("validate opened a file for its tensor data")

    monkeypatch.setattr(module, "safe_open", refuse)
    Checkpoint(good).validate()


def test_library_read_error_names_the_file(good, monkeypatch):
    from safetensors import SafetensorError

    ckpt = Checkpoint(good)

    class Failing:
        def get_tensor(self, name):
            raise SafetensorError("Error while deserializing header: invalid header length")

    monkeypatch.setattr(ckpt, "_handle", lambda file: Failing())
    with pytest.raises(CheckpointError, match=f"{DEMO_FILE}: truncated or corrupt .*invalid"):
        ckpt.tensor("model.norm.weight", (128,), torch.float32)


def test_expert_outside_the_config(good):
    with pytest.raises(CheckpointError, match="config.json: no expert 8 in layer 0"):
        Checkpoint(good).expert(0, 8, torch.float32)


@pytest.fixture(scope="module")
def sharded_source(tmp_path_factory):
    return write_hf_checkpoint(tmp_path_factory.mktemp("sharded") / "c", max_shard_size="50KB")


@pytest.fixture
def sharded(tmp_path, sharded_source):
    target = tmp_path / "sharded"
    shutil.copytree(sharded_source, target)
    return target


def _weight_map(path) -> dict[str, str]:
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]


def test_sharded_truncated_shard(sharded):
    victim = sharded / sorted(set(_weight_map(sharded).values()))[1]
    _cut(victim, lambda n, size: size // 2)
    with pytest.raises(CheckpointError, match=f"{victim.name}: truncated or corrupt safetensors"):
        load_model(sharded)


def test_sharded_index_names_a_tensor_its_shard_lacks(sharded):
    name = "model.layers.1.self_attn.o_proj.weight"
    shard = sharded / _weight_map(sharded)[name]
    tensors = load_file(shard)
    tensors.pop(name)
    save_file(tensors, shard)
    with pytest.raises(CheckpointError) as err:
        load_model(sharded)
    assert str(err.value) == (
        f"{shard.name}: missing tensor {name} (model.safetensors.index.json puts it in this "
        "file); download the file again"
    )


def test_sharded_index_lacks_a_tensor(sharded):
    index = sharded / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"]["model.layers.0.block_sparse_moe.experts.2.w3.weight"]
    index.write_text(json.dumps(data))
    expected = (
        "model.safetensors.index.json: missing tensor "
        "model.layers.0.block_sparse_moe.experts.2.w3.weight, which config.json implies"
    )
    with pytest.raises(CheckpointError, match=expected):
        load_model(sharded)


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serving.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
    )


def _assert_one_line(proc: subprocess.CompletedProcess, command: str, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"moe-serve {command}: error:"), proc.stderr
    assert all(fragment in lines[0] for fragment in fragments), lines[0]


@pytest.mark.parametrize(
    ("case", "fragment"),
    [("cut inside the data", "truncated or corrupt"), ("float64 expert", "torch.float64")],
)
def test_generate_cli_on_a_broken_download(good, case, fragment):
    BROKEN[case][0](good)
    proc = _cli("generate", "--model", str(good), "--prompt", "hi", "--max-tokens", "2")
    _assert_one_line(proc, "generate", DEMO_FILE, fragment)


# The float64 expert is found only by Checkpoint.validate: the config and dense reads pass it.
@pytest.mark.parametrize("case", ["cut inside the data", "float64 expert"])
def test_up_fails_before_ray_on_a_broken_download(good, case):
    BROKEN[case][0](good)
    started = time.monotonic()
    # Were Ray started, `up` would serve until killed: returning at all shows it stopped before.
    proc = _cli("up", "--model", str(good), timeout=60)
    _assert_one_line(proc, "up", DEMO_FILE, BROKEN[case][1])
    assert time.monotonic() - started < 60
