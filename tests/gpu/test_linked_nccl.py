"""The linked transport between GPUs: rows go engine -> shard -> engine over NCCL, device to device,
and the logits are the in-process model's. NCCL puts one rank on each GPU, so this needs two GPUs
(the engine on the last one, the shards on the others); on one GPU `auto` picks the compiled graph
(tests/unit/test_transport.py) and tests/gpu/test_shards_on_one_gpu.py covers that path.
"""

from __future__ import annotations

import pytest
import torch

from serving import load_model
from serving.engine.generate import generate
from serving.engine.sampling import SamplingParams
from tests.conftest import HF_CONFIGS, write_hf_checkpoint

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    config = dict(HF_CONFIGS["mha-8x"])
    shard = config.pop("max_shard_size")
    return write_hf_checkpoint(tmp_path_factory.mktemp("nccl"), max_shard_size=shard, **config)


def test_linked_over_nccl_matches_in_process(ray_gpu, checkpoint, no_tf32):
    gpus = torch.cuda.device_count()
    if gpus < 2:
        pytest.skip(
            f"NCCL needs a GPU per rank: the engine and one shard need 2 GPUs, found {gpus}"
        )
    device = f"cuda:{gpus - 1}"  # Ray hands the shards the lowest free GPUs
    local = load_model(checkpoint, device=device)
    ids = torch.randint(0, local.config.vocab_size, (3, 24),
                        generator=torch.Generator().manual_seed(5)).to(device)  # fmt: skip
    expected = local(ids)
    prompt = [46, 107, 53, 10, 90, 102, 60, 87, 50, 115]
    want = list(generate(local, prompt, SamplingParams(max_tokens=8)))
    sharded = load_model(checkpoint, device=device, expert_shards=gpus - 1, transport="auto",
                         placement_timeout_s=60, load_timeout_s=120, call_timeout_s=60)  # fmt: skip
    try:
        assert sharded.pool.transport_in_use == "linked (nccl)", sharded.pool.events
        got = sharded(ids)  # prefill-sized
        tokens = list(generate(sharded, prompt, SamplingParams(max_tokens=8)))  # decode steps
        assert sharded.pool.transport_in_use == "linked (nccl)", sharded.pool.events
    finally:
        sharded.close()
    assert got.device == expected.device
    assert (got - expected).abs().max().item() <= 1e-4
    assert tokens == want
