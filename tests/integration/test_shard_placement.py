"""More shards than free devices: shards share CPUs; a cluster without room for them is reported
while waited for and fails within the placement timeout, in one line."""

from __future__ import annotations

import time

import pytest
import torch

from experts.shard_resources import PlacementTimeout, wait_for_room
from serving import load_model
from tests.support import wait_until

pytestmark = pytest.mark.ray


@pytest.fixture
def two_free_cpus(ray_session):
    """Hold every free CPU of the session's Ray but two, as on a 2-CPU machine."""
    from ray.util.placement_group import placement_group, remove_placement_group

    # Actors of earlier tests may still be giving their CPUs back: a count read meanwhile would
    # grow under the blocker, and the shards would see more than two (seen after
    # test_micro_batches.py). Wait a while for every CPU, then take what is free.
    total, deadline = ray_session.cluster_resources().get("CPU", 0.0), time.monotonic() + 30
    while ray_session.available_resources().get("CPU", 0.0) < total and time.monotonic() < deadline:
        time.sleep(0.2)
    free = ray_session.available_resources().get("CPU", 0.0)
    assert free >= 2, f"the session's Ray has {free} CPUs free"
    pg = placement_group([{"CPU": free - 2}]) if free > 2 else None
    if pg is not None:
        ray_session.get(pg.ready(), timeout=30)
    yield
    if pg is not None:
        remove_placement_group(pg)


def test_three_shards_share_two_cpus_and_match_transformers(two_free_cpus, tmp_path):
    from transformers import MixtralForCausalLM

    from tests.conftest import write_hf_checkpoint

    hf_checkpoint = write_hf_checkpoint(tmp_path / "hf", num_local_experts=6)

    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    ref = MixtralForCausalLM.from_pretrained(hf_checkpoint, dtype=torch.float32).eval()
    model = load_model(hf_checkpoint, expert_shards=3, placement_timeout_s=60)
    try:
        assert model.pool.shard_amount == pytest.approx(2 / 3, abs=1e-3)  # a share of 2 CPUs
        with torch.no_grad():
            expected = ref(ids).logits
        assert (model(ids) - expected).abs().max().item() < 1e-4
    finally:
        model.close()


def test_no_room_fails_within_the_timeout_in_one_line(ray_session, demo_path):
    total = ray_session.cluster_resources()["CPU"]  # two shards of the whole cluster never fit
    start = time.monotonic()
    with pytest.raises(PlacementTimeout) as err:
        load_model(demo_path, expert_shards=2, shard_cpus=total, placement_timeout_s=2)
    assert time.monotonic() - start < 30
    message = str(err.value)
    assert "\n" not in message
    assert f"2 ExpertShard(s) want {total:g} CPU each" in message
    assert "--expert-shards" in message and "--placement-timeout" in message
    # Nothing was left behind: no placement group holds anything.
    from ray.util import placement_group_table

    wait_until(lambda: not pending_groups(placement_group_table()), 10, "no placement group left")


def pending_groups(table: dict) -> list:
    return [pg for pg in table.values() if pg["state"] not in ("REMOVED",)]


def test_missing_gpus_are_reported_while_waited_for(ray_session):
    lines: list[str] = []
    with pytest.raises(PlacementTimeout) as err:
        wait_for_room(3, 1.0, "GPU", timeout_s=2.5, say=lines.append, report_every_s=0.5)
    assert lines, "nothing was said while waiting"
    assert all("waiting for room for 3 ExpertShard(s) of 1 GPU each" in line for line in lines)
    assert "0 GPU free of 0" in lines[0]
    assert "3 ExpertShard(s) want 1 GPU each" in str(err.value)
    assert "--shard-gpus 0.5" in str(err.value)


def test_an_engine_resource_no_node_has_fails_in_one_line(ray_session):
    from serving.cli.up import _check_engine_resource
    from serving.config import ServeConfig
    from serving.errors import UserError

    _check_engine_resource(ServeConfig())  # none asked for: nothing to check
    _check_engine_resource(ServeConfig(engine_resource="CPU"))  # every node has CPUs
    with pytest.raises(UserError, match="engine_resource 'moe_engine': no node") as err:
        _check_engine_resource(ServeConfig(engine_resource="moe_engine"))
    assert "\n" not in str(err.value) and "ray start --resources" in str(err.value)
    with pytest.raises(UserError, match="ingress_resource 'moe_front': no node"):
        _check_engine_resource(ServeConfig(ingress_resource="moe_front"))
    # The session's one node has 8 CPUs: room for 8 engines taking one unit each, not 9.
    _check_engine_resource(ServeConfig(engine_resource="CPU", engine_replicas=8))
    with pytest.raises(UserError, match="9 engine replicas take one each"):
        _check_engine_resource(ServeConfig(engine_resource="CPU", engine_replicas=9))


def test_shards_ask_ray_to_spread_them_over_nodes():
    from experts.shard_resources import ShardResources

    cpu = ShardResources(gpu=False, cpus=0.5).actor_options(0.5)
    assert cpu == {"num_cpus": 0.5, "scheduling_strategy": "SPREAD"}
    assert ShardResources(gpu=True).actor_options(1.0)["scheduling_strategy"] == "SPREAD"
