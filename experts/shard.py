"""ExpertShard: one device's share of the experts, for every MoE layer. A plain class, no Ray.

Shape legend: n rows (token-expert pairs) sent to this shard, s local slots, D hidden.

A shard holds, per layer, an ordered list of physical slots, each a copy of one logical expert,
stacked as ExpertWeights in slot order. Placements are versioned: `prepare(v, ...)` loads version v
beside the one serving, `compute` names the version it wants, `free(v)` drops an old one. That is
what lets the pool rebalance or replace shards between two batches without a pause.

Arrays cross process boundaries as numpy (zero-copy in Ray's object store; torch tensors would be
pickled, 3-13x slower); bfloat16, which numpy lacks, travels as its raw int16 bits.
"""

from __future__ import annotations

import os
import threading
import time
import warnings

import numpy as np
import torch

from experts import prefetch
from experts.checkpoint import Checkpoint
from experts.ffn import ExpertWeights, grouped_swiglu
from experts.link import Link

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def to_numpy(x: torch.Tensor) -> np.ndarray:
    """A CPU numpy view of x; bfloat16 as its int16 bit pattern."""
    x = x.detach().contiguous().cpu()
    return x.view(torch.int16).numpy() if x.dtype == torch.bfloat16 else x.numpy()


def from_numpy(
    a: np.ndarray, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Inverse of to_numpy, without a copy. Arrays from Ray's object store are read-only views of
    shared memory: the tensor must only be read (every caller here reads it once)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": we never write it
        t = torch.from_numpy(a)
    if dtype == torch.bfloat16:
        t = t.view(torch.bfloat16)
    return t.to(device)


class ExpertShard:
    """The experts of one shard. Thread-safe for one `compute` beside one `prepare`/`free`."""

    _delay_s = 0.0  # see set_delay
    _link: Link | None = None  # the linked transport's group, once joined
    _hidden = 0

    def __init__(self, checkpoint: str, dtype: str = "float32", device: str = "cpu") -> None:
        self._path = checkpoint
        self._dtype = DTYPES[dtype]
        self._device = torch.device(device)
        self._versions: dict[int, list[ExpertWeights]] = {}  # version -> per-layer stacked slots
        self._experts: dict[int, list[list[int]]] = {}  # version -> per-layer logical experts
        self._tokens: dict[int, list[np.ndarray]] = {}  # version -> per-layer tokens per slot
        self._lock = threading.Lock()

    def pid(self) -> int:
        return os.getpid()

    def prepare(self, version: int, layer_experts: list[list[int]]) -> int:
        """Load placement `version`: layer_experts[l] lists the logical expert of each local slot.

        Experts already held (by any version) are copied, the rest are read from the checkpoint,
        one expert at a time. Returns how many experts were read from disk.
        """
        read = 0
        ckpt = None
        layers = []
        for layer, experts in enumerate(layer_experts):
            tensors = []
            for e in experts:
                held = self._held(layer, e)
                if held is None:
                    ckpt = ckpt or Checkpoint(self._path)
                    w1, w3, w2 = ckpt.expert(layer, e, self._dtype)
                    held = (torch.cat([w1, w3]), w2)
                    read += 1
                tensors.append(held)
            w13 = torch.stack([t[0] for t in tensors]) if tensors else torch.empty(0)
            w2 = torch.stack([t[1] for t in tensors]) if tensors else torch.empty(0)
            layers.append(ExpertWeights(w13.to(self._device), w2.to(self._device)).packed_for_cpu())
        prefetch.tune_once(layers[0])  # the kernel's prefetch, where it pays here
        with self._lock:
            self._versions[version] = layers
            self._experts[version] = [list(x) for x in layer_experts]
            self._tokens[version] = [np.zeros(len(x), dtype=np.int64) for x in layer_experts]
        return read

    def _held(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        with self._lock:
            for version, experts in self._experts.items():
                if expert in experts[layer]:
                    i = experts[layer].index(expert)
                    w = self._versions[version][layer]
                    w13, w2 = w.expert(i)
                    return w13.cpu(), w2.cpu()
        return None

    def free(self, version: int) -> None:
        with self._lock:
            for table in (self._versions, self._experts, self._tokens):
                table.pop(version, None)

    def versions(self) -> list[int]:
        with self._lock:
            return sorted(self._versions)

    def set_delay(self, seconds: float) -> None:
        """Test-only fault hook: every later `compute` first sleeps `seconds` (0: off), to make
        this shard a straggler (tests/integration/test_controller_live.py). Never used when
        serving."""
        self._delay_s = max(0.0, float(seconds))

    def compute(
        self, version: int, layer: int, x: np.ndarray, counts: np.ndarray
    ) -> tuple[np.ndarray, float]:
        """x [n, D] rows grouped by local slot, counts [s] rows per local slot -> ([n, D], the
        seconds this shard spent computing them: the step accounting's expert time)."""
        y, seconds = self._compute(version, layer, from_numpy(x, self._dtype, self._device), counts)
        return to_numpy(y), seconds

    def join_link(self, host: str, port: int, rank: int, world: int, name: str, own_host: str,
                  hidden: int, timeout_s: float) -> str:  # fmt: skip
        """Become rank `rank` of the linked transport's group `name` (experts/link.py), whose
        store rank 0 hosts at host:port; blocks until every rank joined. Returns the backend."""
        link = Link(host, port, rank, world, name, str(self._device), own_host, timeout_s)
        self._link, self._hidden = link, hidden
        return link.backend

    def compute_linked(self, version: int, layer: int, counts: np.ndarray) -> float:
        """`compute` with the rows on the linked group: receive x [n, D] from the engine (rank
        0), compute, send y [n, D] back. Returns the compute seconds."""
        rows = int(counts.sum())
        if rows == 0:
            return 0.0
        link = self._link
        x = torch.empty(rows, self._hidden, dtype=self._dtype, device=self._device)  # [n, D]
        link.recv(x, 0).wait()
        y, seconds = self._compute(version, layer, x, counts)
        link.send(y.contiguous(), 0).wait()
        return seconds

    def _compute(
        self, version: int, layer: int, xt: torch.Tensor, counts: np.ndarray
    ) -> tuple[torch.Tensor, float]:
        if self._delay_s:
            time.sleep(self._delay_s)  # a slow device: counted as compute, as it would be
        start = time.perf_counter() - self._delay_s
        weights = self._versions[version][layer]
        self._tokens[version][layer] += counts
        y = grouped_swiglu(xt, torch.tensor(counts, dtype=torch.long), weights)
        if y.is_cuda:
            torch.cuda.synchronize(y.device)  # the copy back would wait anyway: time the kernels
        return y, time.perf_counter() - start

    def token_counts(self, version: int) -> list[list[int]]:
        """Tokens computed per local slot, per layer, since `version` was prepared."""
        with self._lock:
            return [t.tolist() for t in self._tokens[version]]
