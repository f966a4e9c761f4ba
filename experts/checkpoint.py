"""Reading a Hugging Face Mixtral checkpoint directory, lazily.

A checkpoint is `config.json` plus `model.safetensors` or a sharded set listed in
`model.safetensors.index.json`. Tensors are opened with `safetensors.safe_open` and read one at a
time, so an expert shard can load its own experts' slices without reading anyone else's.

Tensor names are the ones transformers' `save_pretrained` writes for Mixtral:
  model.embed_tokens.weight                                   [V, D]
  model.layers.L.input_layernorm.weight                       [D]
  model.layers.L.self_attn.{q,k,v,o}_proj.weight              [H*Dh, D] / [Hkv*Dh, D] / [D, H*Dh]
  model.layers.L.post_attention_layernorm.weight              [D]
  model.layers.L.block_sparse_moe.gate.weight                 [E, D]
  model.layers.L.block_sparse_moe.experts.X.w1/w3.weight      [F, D]   (gate / up)
  model.layers.L.block_sparse_moe.experts.X.w2.weight         [D, F]   (down)
  model.norm.weight                                           [D]
  lm_head.weight                                              [V, D]   (absent when tied)
Every error names the file and the problem in one line (CheckpointError).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from safetensors import SafetensorError, safe_open

# torch only for type hints: serving.errors imports CheckpointError, and the planner runs torch-free.
if TYPE_CHECKING:
    import torch

# safetensors' dtype names -> (torch's name, bytes per element); only the floats are weights.
_DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
SUPPORTED_DTYPES = ("F32", "F16", "BF16")
# safetensors itself refuses headers above 100 MB; garbage bytes usually claim far more.
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be served: the message names the file and the problem.

    Independent of serving.errors (experts must not import serving); serving.errors.USER_ERRORS
    lists it beside UserError so that the CLI shows it as one line."""


class MixtralConfig(BaseModel):
    """The fields of a Mixtral `config.json` that moe-serve uses (others are ignored)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    @field_validator("model_type")
    @classmethod
    def _mixtral_only(cls, value: str) -> str:
        if value != "mixtral":
            raise ValueError(f"model_type is {value!r}; moe-serve serves 'mixtral' checkpoints")
        return value

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> MixtralConfig:
        """Accept both transformers-4 (`rope_theta`) and transformers-5 (`rope_parameters`) layouts."""
        data = dict(raw)
        rope = data.get("rope_parameters")
        if data.get("rope_theta") is None and isinstance(rope, dict) and "rope_theta" in rope:
            data["rope_theta"] = rope["rope_theta"]
        if data.get("rope_theta") is None:
            data.pop("rope_theta", None)
        if data.get("head_dim") is None and "hidden_size" in data and "num_attention_heads" in data:
            data["head_dim"] = data["hidden_size"] // data["num_attention_heads"]
        if data.get("num_key_value_heads") is None and "num_attention_heads" in data:
            data["num_key_value_heads"] = data["num_attention_heads"]
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "config"
            raise CheckpointError(f"{source}: {field}: {err['msg']}") from None


def _open_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing file (expected a Hugging Face Mixtral checkpoint)")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its safetensors header describes it; no data read."""

    dtype: str  # safetensors' name, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # data_offsets, relative to the end of the header
    end: int


def _broken(file: Path, fault: str) -> CheckpointError:
    return CheckpointError(
        f"{file}: truncated or corrupt safetensors file ({fault}); download it again"
    )


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _torch_name(dtype: str) -> str:
    return f"torch.{_DTYPES[dtype][0]}" if dtype in _DTYPES else dtype


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check that the file holds every byte the header promises.

    safe_open accepts some cut files and fails (or maps garbage) only at get_tensor, so the size is
    checked here, at open time. Only the 8-byte length and the JSON header are read.
    """
    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            length = _header_length(file, f.read(8), size)
            raw = f.read(length)
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read ({exc.strerror})") from None
    tensors = _parse_header(file, raw)
    _check_layout(file, tensors, size - 8 - length)
    return tensors


def _header_length(file: Path, prefix: bytes, size: int) -> int:
    if size == 0:
        raise _broken(file, "empty: 0 bytes")
    if size < 8:
        raise _broken(file, f"{size} bytes, less than the 8-byte header length")
    length = int.from_bytes(prefix, "little")
    if length > min(size - 8, _MAX_HEADER):
        raise _broken(file, f"invalid header length {length} for a file of {size} bytes")
    return length


def _parse_header(file: Path, raw: bytes) -> dict[str, TensorInfo]:
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _broken(file, "header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _broken(file, "header is not a JSON object")
    header.pop("__metadata__", None)
    return {name: _tensor_info(file, name, entry) for name, entry in header.items()}


def _tensor_info(file: Path, name: str, entry: object) -> TensorInfo:
    try:
        info = TensorInfo(entry["dtype"], tuple(entry["shape"]), *entry["data_offsets"])
    except (TypeError, KeyError):
        raise _broken(file, f"malformed header entry for {name}") from None
    numbers = (*info.shape, info.begin, info.end)
    valid = all(type(v) is int and v >= 0 for v in numbers) and isinstance(info.dtype, str)
    if not valid or info.begin > info.end:
        raise _broken(file, f"malformed header entry for {name}")
    return info


def _check_layout(file: Path, tensors: dict[str, TensorInfo], data_size: int) -> None:
    """Tensors lie back to back, each as long as its dtype and shape say, and the data section
    holds exactly them: the rules safetensors itself applies, checked without reading any data."""
    end = 0
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        width = _DTYPES.get(info.dtype, ("", 0))[1]  # 0: a dtype we cannot size; skip the length
        length = width * math.prod(info.shape)
        if info.begin != end or (width and info.end - info.begin != length):
            raise _broken(file, f"header entry for {name} does not match the data layout")
        end = info.end
    if end > data_size:
        raise _broken(
            file, f"the header describes {end} bytes of tensor data, the file holds {data_size}"
        )
    if end < data_size:
        raise _broken(file, f"{data_size - end} bytes after the tensor data the header describes")


class Checkpoint:
    """A lazily read Mixtral checkpoint: `config` at once, tensors on demand."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory (expected a Mixtral checkpoint)")
        config_path = self.path / "config.json"
        self.config = MixtralConfig.from_dict(_open_json(config_path), str(config_path))
        self._headers: dict[Path, dict[str, TensorInfo]] = {}
        self._files, self._listing = self._tensor_files()
        self._handles: dict[Path, object] = {}

    def _tensor_files(self) -> tuple[dict[str, Path], Path]:
        """Map every tensor name to the safetensors file that holds it; and the file that says so."""
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            weight_map = _open_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                isinstance(f, str) for f in weight_map.values()
            ):
                raise CheckpointError(f"{index}: no 'weight_map' object of file names")
            files = {name: self.path / fname for name, fname in weight_map.items()}
            for file in set(files.values()):
                if not file.is_file():
                    raise CheckpointError(f"{file}: missing file (listed in {index.name})")
            return files, index
        if single.is_file():
            return dict.fromkeys(self._header(single), single), single
        raise CheckpointError(
            f"{self.path}: missing file model.safetensors (or model.safetensors.index.json)"
        )

    def _header(self, file: Path) -> dict[str, TensorInfo]:
        if file not in self._headers:
            self._headers[file] = read_header(file)
        return self._headers[file]

    def _handle(self, file: Path):
        if file not in self._handles:
            self._header(file)  # a cut or corrupt file fails here, before safe_open maps it
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise _broken(file, _first_line(exc)) from None
        return self._handles[file]

    def has(self, name: str) -> bool:
        return name in self._files

    def validate(self) -> None:
        """Check, from the headers alone (no tensor data is read), that every file is whole and
        every tensor config.json implies is there with its shape and a weight dtype.

        A broken download then fails here, in one line, not halfway through loading or serving.
        """
        for file in sorted(set(self._files.values())):
            self._header(file)
        for name, shape in self.expected_tensors().items():
            self._checked(name, shape)

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        """Every tensor name config.json implies, with its shape (the table at the top)."""
        c = self.config
        d, hd = c.hidden_size, c.num_attention_heads * c.head_dim
        kv = c.num_key_value_heads * c.head_dim
        shapes = {"model.embed_tokens.weight": (c.vocab_size, d)}
        for layer in range(c.num_hidden_layers):
            p = f"model.layers.{layer}"
            shapes |= {
                f"{p}.input_layernorm.weight": (d,),
                f"{p}.self_attn.q_proj.weight": (hd, d),
                f"{p}.self_attn.k_proj.weight": (kv, d),
                f"{p}.self_attn.v_proj.weight": (kv, d),
                f"{p}.self_attn.o_proj.weight": (d, hd),
                f"{p}.post_attention_layernorm.weight": (d,),
                f"{p}.block_sparse_moe.gate.weight": (c.num_local_experts, d),
            }
            for expert in range(c.num_local_experts):
                shapes |= self._expert_shapes(layer, expert)
        shapes["model.norm.weight"] = (d,)
        if not c.tie_word_embeddings:
            shapes["lm_head.weight"] = (c.vocab_size, d)
        return shapes

    def _expert_shapes(self, layer: int, expert: int) -> dict[str, tuple[int, int]]:
        c = self.config
        prefix = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
        fd, df = (c.intermediate_size, c.hidden_size), (c.hidden_size, c.intermediate_size)
        return {f"{prefix}.w1.weight": fd, f"{prefix}.w3.weight": fd, f"{prefix}.w2.weight": df}

    def _locate(self, name: str) -> tuple[Path, TensorInfo]:
        """The file holding `name` and its header entry; a missing one names what was searched."""
        file = self._files.get(name)
        if file is None:
            raise CheckpointError(
                f"{self._listing.name}: missing tensor {name}, which config.json implies"
                f"{self._implied_by(name)}; check config.json or download the checkpoint again"
            )
        info = self._header(file).get(name)
        if info is None:
            raise CheckpointError(
                f"{file.name}: missing tensor {name} ({self._listing.name} puts it in this file); "
                "download the file again"
            )
        return file, info

    def _implied_by(self, name: str) -> str:
        """The config.json field that makes `name` expected, for the error message."""
        c = self.config
        if ".experts." in name:
            return f" (num_local_experts={c.num_local_experts})"
        if name.startswith("model.layers."):
            return f" (num_hidden_layers={c.num_hidden_layers})"
        if name == "lm_head.weight":
            return " (tie_word_embeddings=false)"
        return ""

    def _checked(self, name: str, shape: tuple[int, ...]) -> Path:
        """The file holding `name`, once its header shows a weight dtype and the expected shape."""
        file, info = self._locate(name)
        if info.dtype not in SUPPORTED_DTYPES:
            supported = ", ".join(_torch_name(d) for d in SUPPORTED_DTYPES)
            raise CheckpointError(
                f"{file.name}: {name}: unsupported dtype {_torch_name(info.dtype)} (supported: "
                f"{supported}); convert the weights to one of those"
            )
        if info.shape != tuple(shape):
            raise CheckpointError(
                f"{file.name}: {name}: shape {info.shape}, config.json implies {tuple(shape)}; "
                "check config.json or download the file again"
            )
        return file

    def tensor(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Read one tensor, check its shape and dtype (from the header, first), cast to `dtype`."""
        file = self._checked(name, shape)
        try:
            value = self._handle(file).get_tensor(name)
        except SafetensorError as exc:  # the last line of defence: the header looked whole
            raise _broken(file, f"reading {name}: {_first_line(exc)}") from None
        return value.to(dtype)

    def expert(self, layer: int, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """One expert's (w1 [F, D], w3 [F, D], w2 [D, F]); reads nothing else."""
        c = self.config
        if not (0 <= layer < c.num_hidden_layers and 0 <= expert < c.num_local_experts):
            raise CheckpointError(
                f"{self.path / 'config.json'}: no expert {expert} in layer {layer} "
                f"(num_hidden_layers={c.num_hidden_layers}, num_local_experts={c.num_local_experts})"
            )
        shapes = self._expert_shapes(layer, expert)
        return tuple(self.tensor(name, shape, dtype) for name, shape in shapes.items())

    def close(self) -> None:
        self._handles.clear()
