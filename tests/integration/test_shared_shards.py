"""Several engines sharing one set of ExpertShards (experts/shared_pool.py): each engine's model
equals the local one, the owner places experts from every engine's load, a placement switch or a
new shard reaches every engine, an engine still on the old version finishes its step, and a lost
shard is replaced once for all."""

from __future__ import annotations

import threading
import time

import pytest
import ray
import torch

from serving import load_model
from serving.engine.load import start_shard_owner
from tests.support import wait_until

pytestmark = pytest.mark.ray

IDS = torch.randint(3, 500, (3, 21), generator=torch.Generator().manual_seed(0))
OTHER = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(demo_path):
    local = load_model(demo_path)
    return local(IDS), local(OTHER)


@pytest.fixture
def owner(ray_session, demo_path):
    owner = start_shard_owner(demo_path, expert_shards=2, redundant_experts=2)
    yield owner
    owner.shutdown()


def engines(demo_path, owner, n: int = 2, poll_s: float = 0.1) -> list:
    return [load_model(demo_path, shard_owner=owner, poll_s=poll_s) for _ in range(n)]


def close(models: list) -> None:
    for m in models:
        m.close()


def test_engines_sharing_shards_equal_local_also_at_once(owner, demo_path, reference):
    models = engines(demo_path, owner)
    try:
        for m in models:
            assert m.pool.transport_in_use == "plain (shared)"
            assert [_id(a) for a in m.pool.shards] == [_id(a) for a in owner.shards]
            assert (m(IDS) - reference[0]).abs().max().item() < 1e-5
        out: dict[int, torch.Tensor] = {}
        threads = [threading.Thread(target=lambda i=i: out.update({i: models[i](IDS)}))
                   for i in range(2)]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all((out[i] - reference[0]).abs().max().item() < 1e-5 for i in range(2))
    finally:
        close(models)


def test_owner_places_from_every_engines_load(owner, demo_path, reference):
    a, b = engines(demo_path, owner)
    try:
        a(IDS)
        b(OTHER)
        expected = a.pool.balancer.tokens_per_expert() + b.pool.balancer.tokens_per_expert()
        assert (
            a.pool.balancer.tokens_per_expert().sum() != b.pool.balancer.tokens_per_expert().sum()
        )
        wait_until(lambda: torch.equal(owner.load_window(), expected), 10, "merged load window")
        owner.reconfigure("rebalance", wait=True)
        wait_until(lambda: owner.view("test", None).version == 1, 10, "owner switched")
        for m, ids, ref in ((a, IDS, reference[0]), (b, OTHER, reference[1])):
            wait_until(lambda m=m: m.pool._next is not None and m.pool._next.version == 1, 10,
                       "engine saw version 1")  # fmt: skip
            assert (m(ids) - ref).abs().max().item() < 1e-5
            assert m.pool.version == 1
    finally:
        close([a, b])


def test_an_engine_behind_the_switch_finishes_on_the_old_version(owner, demo_path, reference):
    (slow,) = engines(demo_path, owner, n=1, poll_s=3600)  # never polls during the test
    (fast,) = engines(demo_path, owner, n=1)
    try:
        fast(IDS)
        fast.pool.add_shard(wait=True)
        wait_until(lambda: len(owner.view("test", None).shards) == 3, 10, "owner on 3 shards")
        wait_until(lambda: fast.pool._next is not None and fast.pool._next.version == 1, 10,
                   "the engine saw version 1")  # fmt: skip
        assert (fast(IDS) - reference[0]).abs().max().item() < 1e-5
        assert fast.pool.num_shards == 3 and fast.pool.version == 1
        # Still version 0 over two shards: loaded until retire_after_s, so it computes.
        assert slow.pool.version == 0 and slow.pool.num_shards == 2
        assert (slow(IDS) - reference[0]).abs().max().item() < 1e-5
        assert not slow.pool._dead
    finally:
        close([slow, fast])


def test_a_lost_shard_is_served_around_and_replaced_once(ray_session, demo_path, reference):
    owner = start_shard_owner(demo_path, expert_shards=2, redundant_experts=8)  # two of each
    a, b = engines(demo_path, owner)
    try:
        lost = owner.shards[0]
        ray.kill(lost)
        assert (a(IDS) - reference[0]).abs().max().item() < 1e-5  # from the other copies
        assert any(e.startswith("shard 0 failed") for e in a.pool.events)
        wait_until(lambda: any(e == "shard 0 replaced" for e in owner.events), 60, "replaced")
        assert sum(e.startswith("shard 0 failed") for e in owner.events) == 1
        for m in (a, b):
            wait_until(lambda m=m: m.pool._next is not None
                       and _id(m.pool._next.shards[0]) != _id(lost), 10, "new view")  # fmt: skip
            assert (m(IDS) - reference[0]).abs().max().item() < 1e-5
            assert _id(m.pool.shards[0]) != _id(lost) and not m.pool._dead
    finally:
        close([a, b])
        owner.shutdown()


def _id(actor) -> str:
    return actor._actor_id.hex()


def test_freed_at_once_the_old_version_fails_an_engine_behind_and_replaces_no_shard(
    ray_session, demo_path
):
    # The control for the test above: with nothing kept after the switch, the engine still on
    # version 0 cannot compute; its failure (a shard alive, raising) replaces no shard.
    from experts.pool import ExpertUnavailableError

    owner = start_shard_owner(demo_path, expert_shards=2, redundant_experts=2, retire_after_s=0)
    (slow,) = engines(demo_path, owner, n=1, poll_s=3600)
    (fast,) = engines(demo_path, owner, n=1)
    try:
        fast.pool.rebalance(wait=True)
        wait_until(lambda: owner.view("test", None).version == 1, 10, "owner switched")
        before = [_id(a) for a in owner.shards]
        time.sleep(1.0)  # the old version's free reaches the shards
        with pytest.raises(ExpertUnavailableError):
            slow(IDS)
        time.sleep(1.0)
        assert [_id(a) for a in owner.shards] == before
        assert not any("failed" in e for e in owner.events), owner.events
    finally:
        close([slow, fast])
        owner.shutdown()
