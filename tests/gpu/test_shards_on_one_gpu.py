"""Two ExpertShard actors sharing one GPU (`shard_gpus=0.5`) give the in-process CUDA model's logits.

On a one-GPU machine the pool can only start at all if each shard asks Ray for half a GPU: with a
whole GPU each, the second shard never fits and the placement wait times out (60 s here).
"""

from __future__ import annotations

import pytest
import torch

from serving import load_model
from serving.engine.generate import generate
from serving.engine.sampling import SamplingParams
from tests.conftest import HF_CONFIGS, write_hf_checkpoint

DEVICE = "cuda:0"
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    config = dict(HF_CONFIGS["mha-8x"])  # 8 experts: 4 per shard; sharded safetensors
    shard = config.pop("max_shard_size")
    return write_hf_checkpoint(
        tmp_path_factory.mktemp("gpu-shards"), max_shard_size=shard, **config
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_two_shards_on_one_gpu_match_in_process(ray_gpu, checkpoint, no_tf32, dtype):
    prompt = [46, 107, 53, 10, 90, 102, 60, 87, 50, 115]
    local = load_model(checkpoint, dtype=dtype, device=DEVICE)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, local.config.vocab_size, (3, 24), generator=gen).to(DEVICE)
    expected = local(ids).float()
    want = list(generate(local, prompt, SamplingParams(max_tokens=8)))
    sharded = load_model(
        checkpoint,
        dtype=dtype,
        device=DEVICE,
        expert_shards=2,
        shard_gpus=0.5,
        placement_timeout_s=60,
        load_timeout_s=120,
        call_timeout_s=60,
    )
    try:
        pids = ray_gpu.get([s.pid.remote() for s in sharded.pool.shards], timeout=60)
        assert len(set(pids)) == 2  # two actors, one GPU
        got = sharded(ids)  # prefill-sized: 144 token-expert pairs over both shards
        tokens = list(generate(sharded, prompt, SamplingParams(max_tokens=8)))  # decode steps
    finally:
        sharded.close()
    assert got.device.type == torch.device(DEVICE).type and got.dtype == dtype
    got = got.float()
    assert got.shape == expected.shape
    diff = (got - expected).abs().max().item()
    if dtype == torch.bfloat16:
        scale = expected.abs().max().item()
        assert diff <= 1e-2 * scale, f"bf16: max |diff| {diff:.4f} vs logits' scale {scale:.3f}"
    else:
        assert diff <= 1e-4, f"fp32: max |diff| {diff:.2e}"
        assert tokens == want


def test_two_engines_share_two_shards_on_one_gpu(ray_gpu, checkpoint, no_tf32):
    """experts/shared_pool.py on a GPU: one owner's shards (half a GPU each), two engines calling
    them with plain calls, each engine's fp32 logits and greedy tokens those of the local model."""
    from serving.engine.load import start_shard_owner

    prompt = [46, 107, 53, 10, 90, 102, 60, 87, 50, 115]
    local = load_model(checkpoint, dtype=torch.float32, device=DEVICE)
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(0, local.config.vocab_size, (2, 16), generator=gen).to(DEVICE)
    expected, want = local(ids), list(generate(local, prompt, SamplingParams(max_tokens=8)))
    owner = start_shard_owner(checkpoint, expert_shards=2, device=DEVICE, shard_gpus=0.5,
                              placement_timeout_s=60, load_timeout_s=120)  # fmt: skip
    engines = [load_model(checkpoint, device=DEVICE, shard_owner=owner) for _ in range(2)]
    try:
        for engine in engines:
            assert engine.pool.transport_in_use == "plain (shared)"
            assert (engine(ids) - expected).abs().max().item() <= 1e-4
            assert list(generate(engine, prompt, SamplingParams(max_tokens=8))) == want
    finally:
        for engine in engines:
            engine.close()
        owner.shutdown()
