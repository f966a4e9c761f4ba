"""`load_model`: a checkpoint directory in, a ready model out."""

from __future__ import annotations

from pathlib import Path

import torch

from experts.checkpoint import Checkpoint
from experts.pool import LocalExpertPool
from serving.model import MixtralModel


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> MixtralModel:
    """Load a Hugging Face Mixtral checkpoint directory (config.json + safetensors).

    Returns a module: `model(input_ids [B, S]) -> logits [B, S, vocab]`.
    """
    ckpt = Checkpoint(path)
    try:
        pool = LocalExpertPool.from_checkpoint(ckpt, dtype, device)
        return MixtralModel.from_checkpoint(ckpt, pool, dtype, device).eval()
    finally:
        ckpt.close()
