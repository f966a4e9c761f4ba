"""Cores of its own for a CPU engine's forward pass.

On a CPU machine the engine's forward pass shares the cores with the rest of the serving stack:
Ray's own processes, Serve's HTTP proxy, the ingress, the engine's own event loop and the
clients. Left to the operating system they preempt the forward thread on its core, and every
step waits for them. vLLM's CPU build binds its engine's threads to cores and leaves a core to
the rest; so does `moe-serve up` when it starts Ray for one engine whose experts run in its own
process on a CPU (serving/cli/up.py): the forward thread (and torch's OpenMP threads it starts)
on the first `torch_threads` cores the process may use, everything else on the others.
Measured on 2 cores, the same server bound and unbound in turns: BENCHMARKS.md.

Linux only (`os.sched_setaffinity`); elsewhere `split_cores` finds nothing to split.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serving.config import ServeConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoreSplit:
    """The engine's forward pass on `engine`, everything else on `rest` (CPU ids)."""

    engine: tuple[int, ...]
    rest: tuple[int, ...]


def split_cores(allowed: Iterable[int], engine_threads: int) -> CoreSplit | None:
    """The first `engine_threads` of the `allowed` CPUs for the engine and the others for the
    rest; None when that would leave the rest no core."""
    cores = sorted(set(allowed))
    if engine_threads < 1 or len(cores) <= engine_threads:
        return None
    return CoreSplit(tuple(cores[:engine_threads]), tuple(cores[engine_threads:]))


def split_for(config: ServeConfig, engine_threads: int) -> CoreSplit | None:
    """Cores of its own for the forward pass of an engine started with Ray on this machine: when
    it is the only engine, holds its experts and runs on a CPU, with bind_cpus on and no
    engine_cpus given (those bind the forward pass alone); None otherwise."""
    alone = not config.expert_shards and config.engines_at_most == 1
    if not (config.bind_cpus and alone and config.device == "cpu") or config.engine_cpus:
        return None
    return split_cores(allowed_cores(), engine_threads)


def allowed_cores() -> tuple[int, ...]:
    """The CPUs this thread may run on (none where the OS cannot tell)."""
    if not hasattr(os, "sched_getaffinity"):
        return ()
    return tuple(sorted(os.sched_getaffinity(threading.get_native_id())))


def bind_this_thread(cores: Iterable[int]) -> bool:
    """Keep the calling thread, and the processes and threads it starts from now on, on `cores`.
    False (logged) where that cannot be done: the thread then runs where it did."""
    cores = set(cores)
    try:
        os.sched_setaffinity(threading.get_native_id(), cores)
    except (AttributeError, OSError, ValueError) as exc:
        log.warning("could not keep this thread on CPUs %s: %s", sorted(cores), exc)
        return False
    return True


def loop_cores(engine_cpus: Iterable[int]) -> tuple[int, ...]:
    """Where the engine's event loop should run, given its forward pass's cores: on that core too
    when the forward pass has one, else where it was (empty). The loop's work between two forward
    passes (sampling's bookkeeping, the streams, the next step's plan) waits for nothing else
    there, while on the other cores it queues behind the proxy, the ingress and the clients:
    measured on 2 cores, the gap between forward passes 1.7 -> 0.85 ms (BENCHMARKS.md). With
    several cores the forward pass runs on torch's threads, which the loop would interrupt."""
    cores = tuple(engine_cpus)
    return cores if len(cores) == 1 else ()


def bound_thread(cores: Iterable[int]) -> ThreadPoolExecutor:
    """One worker thread kept on `cores`: where the Engine's scheduler runs its forward passes."""
    cores = tuple(cores)
    return ThreadPoolExecutor(1, "forward", initializer=bind_this_thread, initargs=(cores,))
