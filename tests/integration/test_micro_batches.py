"""Two micro-batches in flight on real ExpertShards: the same logits as one batch (1e-5), and the
shards' round trips partly hidden behind the engine's own compute (the accounting sees it)."""

from __future__ import annotations

import pytest
import torch

from serving import load_model
from serving.control.steptime import split_step
from serving.engine.step_batch import step_batch

pytestmark = pytest.mark.ray


@pytest.mark.parametrize(("transport", "shown"), [("compiled", "compiled"), ("plain", "plain"),
                                                   ("linked", "linked (gloo)")])  # fmt: skip
def test_split_step_equals_one_batch_and_overlaps(ray_session, demo_path, transport, shown):
    model = load_model(demo_path, expert_shards=2, transport=transport)
    try:
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (12, 9, 15, 11)]
        caches = [model.new_cache(6, 64), model.new_cache(6, 64)]
        for cache in caches:
            for slot in range(4):
                model(torch.tensor([prompts[slot]]), cache=cache, slots=torch.tensor([slot]))
        decodes = [(p[-1], slot, len(p) - 1) for slot, p in enumerate(prompts)]
        chunks = [(prompts[0], 4, 0, True), (prompts[2], 5, 0, True)]
        model.split_min_tokens = 0  # one batch
        model.pool.step_time()
        whole = model.step(step_batch(decodes, chunks), caches[0])
        blocking = model.pool.step_time()
        model.split_min_tokens = 1  # two micro-batches
        split = model.step(step_batch(decodes, chunks), caches[1])
        overlapped = model.pool.step_time()
        assert (split - whole).abs().max().item() < 1e-5
        assert model.pool.transport_in_use == shown
        # One batch waits for every round trip; two in flight wait for less than theirs.
        assert blocking.waited_s == pytest.approx(blocking.round_trip_s, rel=0.02)
        assert overlapped.waited_s < overlapped.round_trip_s
        parts = split_step(1.0, 0.9, overlapped)
        assert parts.sum() == pytest.approx(1.0) and parts[4] > 0  # "overlapped" is counted
    finally:
        model.close()


def test_a_served_models_overflow_policy_and_transport_reach_its_pool(ray_session, demo_path):
    from serving.api.serving_model import load_serving_model
    from serving.config import ServeConfig

    config = ServeConfig(model=str(demo_path), expert_shards=2, overflow="drop",
                         expert_transport="linked")  # fmt: skip
    model = load_serving_model(config)
    try:
        assert model.pool.balancer.overflow == "drop"
        assert model.pool.transport_in_use == "linked (gloo)"
    finally:
        model.close()
