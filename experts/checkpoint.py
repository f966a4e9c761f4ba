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
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from safetensors import safe_open

from serving.errors import UserError

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class CheckpointError(UserError):
    """A checkpoint directory that cannot be served: the message names the file and the problem."""


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


class Checkpoint:
    """A lazily read Mixtral checkpoint: `config` at once, tensors on demand."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory (expected a Mixtral checkpoint)")
        config_path = self.path / "config.json"
        self.config = MixtralConfig.from_dict(_open_json(config_path), str(config_path))
        self._files = self._tensor_files()
        self._handles: dict[Path, object] = {}

    def _tensor_files(self) -> dict[str, Path]:
        """Map every tensor name to the safetensors file that holds it."""
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            weight_map = _open_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map' object")
            files = {name: self.path / fname for name, fname in weight_map.items()}
            for file in set(files.values()):
                if not file.is_file():
                    raise CheckpointError(f"{file}: missing file (listed in {index.name})")
            return files
        if single.is_file():
            with safe_open(str(single), framework="pt") as f:
                return {name: single for name in f.keys()}
        raise CheckpointError(
            f"{self.path}: missing file model.safetensors (or model.safetensors.index.json)"
        )

    def _handle(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"{file}: cannot read safetensors ({exc})") from None
        return self._handles[file]

    def has(self, name: str) -> bool:
        return name in self._files

    def tensor(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Read one tensor, check its shape and dtype, and cast it to `dtype`."""
        file = self._files.get(name)
        if file is None:
            raise CheckpointError(f"{self.path}: missing tensor {name}")
        value = self._handle(file).get_tensor(name)
        if value.dtype not in SUPPORTED_DTYPES:
            raise CheckpointError(f"{file.name}: {name}: unsupported dtype {value.dtype}")
        if tuple(value.shape) != tuple(shape):
            raise CheckpointError(
                f"{file.name}: {name}: shape {tuple(value.shape)}, config.json implies {tuple(shape)}"
            )
        return value.to(dtype)

    def expert(self, layer: int, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """One expert's (w1 [F, D], w3 [F, D], w2 [D, F]); reads nothing else."""
        c = self.config
        prefix = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
        fd, df = (c.intermediate_size, c.hidden_size), (c.hidden_size, c.intermediate_size)
        return (
            self.tensor(f"{prefix}.w1.weight", fd, dtype),
            self.tensor(f"{prefix}.w3.weight", fd, dtype),
            self.tensor(f"{prefix}.w2.weight", df, dtype),
        )

    def close(self) -> None:
        self._handles.clear()
