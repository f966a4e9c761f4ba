"""Model and hardware descriptions for the planner, from files, names or a measurement.

Models: a YAML in configs/models/ (ModelSpec fields, Hugging Face names), a Hugging Face
`config.json` (or a checkpoint directory holding one), or a bare name such as `seed-4b`.
Hardware: a YAML in configs/hardware/, a bare name such as `h200`, or `cpu`, measured on the spot.
Every mistake in a file becomes one UserError line that names the file and the field. Used by
`moe-serve plan` and by a deployment's controller (its targets come from the plan).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from serving.control.capacity import HardwareSpec, ModelSpec
from serving.errors import UserError


def validate(cls: type[BaseModel], data: dict, source: str) -> BaseModel:
    """Build a pydantic model; its first error becomes one line naming the source and field."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        msg = {"Field required": "missing (required field)"}.get(msg, msg)
        msg = {"Extra inputs are not permitted": "unknown field"}.get(msg, msg)
        raise UserError(f"{source}: {field + ': ' if field else ''}{msg}") from None


def _config_dirs(kind: str) -> list[Path]:
    """configs/<kind>/ under the working directory, then beside this package (a source checkout)."""
    return [Path.cwd() / "configs" / kind, Path(__file__).resolve().parents[2] / "configs" / kind]


def _resolve(arg: str, kind: str, flag: str) -> Path:
    path = Path(arg).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path / "config.json"
    if path.is_file():
        return path
    for folder in _config_dirs(kind):
        if "/" not in arg and (folder / f"{arg}.yaml").is_file():
            return folder / f"{arg}.yaml"
    known = sorted({p.stem for d in _config_dirs(kind) if d.is_dir() for p in d.glob("*.yaml")})
    extra = ", cpu" if kind == "hardware" else ""
    raise UserError(f"{flag} {arg}: no such file or known name (known: {', '.join(known)}{extra})")


def _read_mapping(path: Path) -> dict:
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: cannot read ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of fields")
    return data


def load_model_spec(arg: str) -> ModelSpec:
    """A model YAML, a Hugging Face Mixtral config.json (or its directory), or a bare name."""
    path = _resolve(arg, "models", "--model")
    data = _read_mapping(path)
    if path.suffix == ".json" or "model_type" in data:
        # A Hugging Face config: Mixtral only; keep the fields the planner uses, ignore the rest.
        if data.get("model_type") != "mixtral":
            raise UserError(f"{path}: model_type: {data.get('model_type')!r}, expected 'mixtral'")
        name = data.get("_name_or_path") or path.parent.name
        keys = set(ModelSpec.model_fields) - {"name", "active_params", "total_params"}
        data = {k: v for k, v in data.items() if k in keys} | {"name": name}
    data.setdefault("name", path.stem)
    return validate(ModelSpec, data, str(path))


def load_hardware_spec(arg: str, seconds: float = 2.0) -> HardwareSpec:
    """A hardware YAML or bare name; `cpu` is measured here and now."""
    if arg == "cpu":
        return measure_cpu(seconds)
    path = _resolve(arg, "hardware", "--hardware")
    data = _read_mapping(path)
    data.setdefault("name", path.stem)
    return validate(HardwareSpec, data, str(path))


def _rate(step: Callable[[], object], work: float, seconds: float) -> float:
    """Work units per second of `step`, repeated for about `seconds` after one warm-up."""
    step()
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or count == 0:
        step()
        count += 1
    return work * count / elapsed


def measure_cpu(seconds: float = 2.0) -> HardwareSpec:
    """This machine as a 'GPU': fp32 matmul FLOP/s and copy bandwidth, measured for `seconds`."""
    import torch  # here, so that `moe-serve plan` on a YAML never pays for importing torch

    # 1. Dense fp32 GEMM rate: what the CPU's kernels reach, the analogue of a measured GPU peak.
    n = 512
    a, b = torch.randn(n, n), torch.randn(n, n)
    flops = _rate(lambda: torch.mm(a, b), 2.0 * n**3, seconds / 2)
    # 2. Memory bandwidth: a 64 MB copy reads and writes every byte once.
    src = torch.empty(16 * 2**20)
    dst = torch.empty_like(src)
    bandwidth = _rate(lambda: dst.copy_(src), 2.0 * src.nbytes, seconds / 2) / 1e9
    # 3. Capacity: physical memory. One process is one "node": links are memory copies.
    ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return HardwareSpec(
        name="cpu",
        peak_flops=flops,  # no spec figure for a CPU: the measured rate stands in
        measured_flops=flops,
        flops_dtype="fp32",
        hbm_gb=ram_gb,
        hbm_bandwidth_gb_s=bandwidth,
        effective_hbm_bandwidth_gb_s=bandwidth,
        intra_node_gb_s=bandwidth,
        inter_node_gb_s=bandwidth,
        gpus_per_node=1,
    )
