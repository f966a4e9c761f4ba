"""Which transport `auto` stands for: linked only where NCCL can give every rank its own GPU."""

from __future__ import annotations

import pytest

from experts.link import backend_for, resolve_transport


@pytest.mark.parametrize(
    ("device", "shard_gpus", "expected"),
    [("cpu", 1.0, "compiled"), ("cuda", 1.0, "linked"), ("cuda:0", 2.0, "linked"),
     ("cuda", 0.5, "compiled")],  # two shards on one GPU: NCCL cannot link them
)  # fmt: skip
def test_auto(device, shard_gpus, expected):
    assert resolve_transport("auto", device, shard_gpus) == expected


@pytest.mark.parametrize("transport", ["compiled", "linked", "plain"])
def test_a_chosen_transport_stands(transport):
    assert resolve_transport(transport, "cuda", 0.5) == transport


def test_backends():
    assert backend_for("cpu") == "gloo" and backend_for("cuda:1") == "nccl"
    with pytest.raises(ValueError, match="no backend for 'meta'"):
        backend_for("meta")
