"""Shared fixtures: tiny checkpoints written by transformers' own save_pretrained, and the demo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    # The demo checkpoint is written into the test session's own cache, never the user's.
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))


def write_hf_checkpoint(
    path: Path, seed: int = 0, max_shard_size: str | None = None, **config
) -> Path:
    """Save a randomly initialised transformers Mixtral with the given config into `path`.

    Weights are redrawn with a larger scale than transformers' 0.02 init so that routing and
    attention are far from uniform: a wrong expert or position then shows in the logits.
    """
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    defaults = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
    )
    model = MixtralForCausalLM(MixtralConfig(**(defaults | config))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15 if "gate" in name else 0.08)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


HF_CONFIGS = {
    # grouped-query attention, 4 experts, transformers' default rope theta (1e6)
    "gqa-4x": dict(),
    # plain multi-head attention, 8 experts, non-default rope theta, explicit head_dim != D/H,
    # sharded safetensors with an index file
    "mha-8x": dict(
        num_key_value_heads=4,
        num_local_experts=8,
        head_dim=24,
        rope_theta=10000.0,
        max_shard_size="50KB",
    ),
    # a sliding window shorter than the test sequences: keys beyond it must be masked
    "window-8": dict(sliding_window=8),
    # one KV head (multi-query), 6 experts, three layers, tied embeddings
    "mqa-6x": dict(
        num_key_value_heads=1,
        num_local_experts=6,
        num_hidden_layers=3,
        rope_theta=50000.0,
        tie_word_embeddings=True,
    ),
}


@pytest.fixture(scope="session", params=sorted(HF_CONFIGS))
def hf_checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = dict(HF_CONFIGS[request.param])
    shard = config.pop("max_shard_size", None)
    return write_hf_checkpoint(
        tmp_path_factory.mktemp(request.param), max_shard_size=shard, **config
    )


@pytest.fixture(scope="session")
def demo_path() -> Path:
    from serving.engine.demo import demo_checkpoint

    return demo_checkpoint()


# -- the one Ray session of the test run (tests/integration and tests/reliability share it) ------

# Ray sizes its worker pool from logical CPUs; 8 leaves room for shards, Serve replicas and the
# controller on this 2-core machine without pretending they run in parallel.
RAY_NUM_CPUS = 8


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray session for the whole test run (starting Ray costs seconds and ~2 GB)."""
    import ray

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    if not ray.is_initialized():
        ray.init(
            # "local": our own, even where `ray start` or another test cluster runs on the
            # machine (a bare ray.init() would join the cluster it last started).
            address="local",
            num_cpus=RAY_NUM_CPUS,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # Serve may never have started
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_http(ray_session) -> str:
    """Ray Serve's HTTP proxy on 127.0.0.1 at a free port, once per run: its base URL."""
    from ray import serve

    from tests.support import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"
