"""The linked transport: a layer's rows go engine -> shard -> engine as tensors over a process group
(NCCL between GPUs, gloo between CPU processes), device to device, never through Ray's object store.

Shape legend: n one shard's rows, D hidden, S shards.

Rank 0 is the engine, rank s + 1 shard s. The compiled graph still starts each shard's call, but it
carries only the row counts; the rows themselves are `send`/`recv` on the group, matched in order
per pair of ranks (every execution sends and receives in the same order on both sides, so no tags
are needed). Ray's compiled graph cannot carry them itself: its accelerator channels never include
the driver, and the engine is the graph's driver.

A group is built for one fixed set of shards, like the compiled graph it rides on, and abandoned
with it: a shard that died or was replaced leaves the pool on plain calls until a new graph and a
new group (under a new name) are built. Imports no Ray: the pool passes addresses in.
"""

from __future__ import annotations

import itertools
import os
from datetime import timedelta

import torch
import torch.distributed as dist

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}
# How the pool reaches its shards. compiled: rows through the compiled graph's shared-memory
# channels; linked: rows over a group of this module, the graph carrying counts only; plain: an
# actor call per shard; auto: see resolve_transport.
TRANSPORTS = ("auto", "compiled", "linked", "plain")
GRAPHS = ("compiled", "linked")  # transports that build a graph over the shards
_names = itertools.count()


def backend_for(device: str) -> str:
    """The process group's backend for tensors on `device` ("cpu", "cuda", "cuda:1")."""
    kind = torch.device(device).type
    if kind not in BACKENDS:
        raise ValueError(f"the linked transport has no backend for {kind!r} tensors")
    return BACKENDS[kind]


def resolve_transport(transport: str, device: str, shard_gpus: float) -> str:
    """The transport `auto` stands for: linked when every rank has a GPU of its own (NCCL cannot
    put two ranks on one GPU), else compiled (faster between CPU processes: BENCHMARKS.md). The
    others stand for themselves."""
    if transport != "auto":
        return transport
    return "linked" if device.startswith("cuda") and shard_gpus >= 1 else "compiled"


def new_name() -> str:
    """A group name unique to this engine process: a rebuilt group never meets an old one's keys."""
    return f"moe-link-{os.getpid()}-{next(_names)}"


def open_store(host: str, world: int, timeout_s: float) -> dist.TCPStore:
    """The rendezvous store, hosted by rank 0 on a free port of `host`."""
    return dist.TCPStore(host, 0, world, True, timedelta(seconds=timeout_s),
                         wait_for_workers=False)  # fmt: skip


class Link:
    """This process's member of one group. Construction blocks until every rank has joined."""

    def __init__(self, host: str, port: int, rank: int, world: int, name: str, device: str,
                 own_host: str, timeout_s: float, store: dist.Store | None = None) -> None:  # fmt: skip
        self.rank, self.world, self.name = rank, world, name
        self.backend = backend_for(device)
        timeout = timedelta(seconds=timeout_s)
        if store is None:
            store = dist.TCPStore(host, port, world, False, timeout)
        self._store = dist.PrefixStore(name, store)
        self.group = self._group(rank, world, device, own_host, timeout)

    def _group(self, rank: int, world: int, device: str, own_host: str, timeout: timedelta):
        if self.backend == "nccl":
            torch.cuda.set_device(torch.device(device))
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            return dist.ProcessGroupNCCL(self._store, rank, world, options)
        options = dist.ProcessGroupGloo._Options()
        options._timeout = timeout
        # The address other ranks reach this process at (the node's IP, not its hostname, which
        # need not resolve on the other nodes).
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=own_host)]
        return dist.ProcessGroupGloo(self._store, rank, world, options)

    def send(self, x: torch.Tensor, peer: int):
        """Start sending x (contiguous) to `peer`; returns the work to wait on (keep x alive)."""
        return self.group.send([x], peer, 0)

    def recv(self, out: torch.Tensor, peer: int):
        """Start receiving into `out` from `peer`; returns the work to wait on."""
        return self.group.recv([out], peer, 0)
