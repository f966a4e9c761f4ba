"""Which transport `auto` stands for (linked only where NCCL can give every rank its own GPU), and
a served model's transport refused without shards, in one line naming the field."""

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


def test_a_chosen_transport_needs_shards():
    from serving.config import ServeConfig, config_from_args
    from serving.errors import UserError

    assert ServeConfig(expert_shards=2, expert_transport="linked").expert_transport == "linked"
    assert ServeConfig().expert_transport == "auto"
    with pytest.raises(UserError, match=r"^args: expert_transport: 'linked' needs expert_shards"):
        config_from_args({"expert_transport": "linked"})
    with pytest.raises(UserError, match="expert_transport"):
        config_from_args({"expert_shards": 2, "expert_transport": "nccl"})


def test_up_announces_the_transport_it_chose(capsys):
    from serving.cli.up import _announce
    from serving.config import ServeConfig

    _announce(ServeConfig(expert_shards=2))
    assert "experts on 2 ExpertShards, transport: compiled" in capsys.readouterr().out
    _announce(ServeConfig(expert_shards=2, expert_transport="plain"))
    assert "transport: plain" in capsys.readouterr().out
    _announce(ServeConfig())
    assert "transport" not in capsys.readouterr().out  # experts in process: no transport
