"""A same-node channel from the engine to one ExpertShard: shared memory for the rows, a pipe to
wake the other side. No Ray here.

Shape legend: n rows of the shard's work, s its slots, D hidden.

Why: Ray's compiled graph reads its channels by polling (yielding the core between polls but
staying runnable), in the shards while they wait for a layer and in the engine while it waits for
the answers. Where the engine and its shards share the cores, every waiter takes CPU from the one
computing (measured: the engine's dense work 1.7x slower beside two polling shards on 2 cores).
Here each side blocks in `read` on a FIFO instead, which costs no CPU, and the rows go through a
file in /dev/shm that both map. It works only where both ends see the same /dev/shm: one node.

Layout of the shared file (`capacity` bytes): the request in the first half, the answer in the
second, each a 64-byte header of int64/float64 fields followed by the arrays.
  request: version, layer, n, s, D, dtype code; then counts [s] int64; then x [n, D]
  answer:  status (0 ok, 1 error), n, seconds (float64), message length; then y [n, D] or the
           error message (UTF-8)
"""

from __future__ import annotations

import mmap
import os
import select
import shutil
import tempfile
import uuid
from collections.abc import Callable

import numpy as np

HEADER = 64
DTYPES = ["<f4", "<f2", "<i2", "<f8"]  # codes: float32, float16, bfloat16 bits, float64
SHM_DIR = "/dev/shm"


class ChannelClosed(RuntimeError):
    """The shard's end is gone (its process died) or did not answer in time."""


def available() -> bool:
    """Whether this machine has a shared-memory filesystem and FIFOs (Linux)."""
    return os.path.isdir(SHM_DIR) and hasattr(os, "mkfifo")


def _align(n: int) -> int:
    return (n + 63) // 64 * 64


class EngineEnd:
    """The engine's side: `send` a layer's rows, `recv` the answer. Creates the files; `close`
    removes them."""

    def __init__(self, capacity: int) -> None:
        self.capacity = _align(capacity)
        self.half = self.capacity // 2
        self.path = tempfile.mkdtemp(prefix=f"moe-serve-{uuid.uuid4().hex[:8]}-", dir=SHM_DIR)
        data = os.path.join(self.path, "data")
        with open(data, "wb") as f:
            f.truncate(self.capacity)
        os.mkfifo(os.path.join(self.path, "request"))
        os.mkfifo(os.path.join(self.path, "answer"))
        fd = os.open(data, os.O_RDWR)
        self.buf = mmap.mmap(fd, self.capacity)
        os.close(fd)
        # Opened before the shard opens its end for writing: a shard that dies then closes it,
        # and the next read here returns at once with nothing (EOF), not after a timeout.
        self.answers = os.open(os.path.join(self.path, "answer"), os.O_RDONLY | os.O_NONBLOCK)
        self.requests: int | None = None

    def fits(self, rows: int, slots: int, row_bytes: int) -> bool:
        """Whether a layer's rows (and the answer) fit in each half."""
        return HEADER + _align(8 * slots) + rows * row_bytes <= self.half

    def connect(self, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> None:
        """Open the request pipe once the shard listens on it (its `serve` opened the other end);
        raises ChannelClosed after `timeout_s` or when `alive()` turns False."""
        path = os.path.join(self.path, "request")
        waited = 0.0
        while True:
            try:
                self.requests = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
                os.set_blocking(self.requests, True)
                return
            except OSError:  # ENXIO: nobody reads it yet
                if waited >= timeout_s or not alive():
                    raise ChannelClosed(
                        f"the shard did not open its channel in {timeout_s} s"
                    ) from None
                select.select([], [], [], 0.01)
                waited += 0.01

    def send(self, version: int, layer: int, x: np.ndarray, counts: np.ndarray) -> None:
        """x [n, D] rows grouped by the shard's slots, counts [s] rows per slot."""
        n, d = x.shape
        s = counts.shape[0]
        code = DTYPES.index(x.dtype.str)
        np.frombuffer(self.buf, np.int64, 6, 0)[:] = (version, layer, n, s, d, code)
        np.frombuffer(self.buf, np.int64, s, HEADER)[:] = counts
        start = HEADER + _align(8 * s)
        np.frombuffer(self.buf, x.dtype, n * d, start).reshape(n, d)[:] = x
        os.write(self.requests, b"\1")

    def recv(self, timeout_s: float, dtype: np.dtype) -> tuple[np.ndarray, float]:
        """The answer: (y [n, D] copied out of shared memory, the shard's compute seconds).
        Raises ChannelClosed when the shard is gone or silent for `timeout_s`, RuntimeError
        with the shard's message when its compute raised."""
        ready, _, _ = select.select([self.answers], [], [], timeout_s)
        if not ready:
            raise ChannelClosed(f"no answer in {timeout_s} s")
        if os.read(self.answers, 1) != b"\1":
            raise ChannelClosed("the shard's end of the channel closed")
        status, n, _, length = np.frombuffer(self.buf, np.int64, 4, self.half)
        seconds = float(np.frombuffer(self.buf, np.float64, 1, self.half + 16)[0])
        if status != 0:
            raise RuntimeError(
                bytes(self.buf[self.half + HEADER : self.half + HEADER + length]).decode()
            )
        d = int(np.frombuffer(self.buf, np.int64, 1, 32)[0])
        y = np.frombuffer(self.buf, dtype, int(n) * d, self.half + HEADER)
        return y.reshape(int(n), d).copy(), seconds

    def close(self) -> None:
        """Close the pipes (the shard's `serve` then returns) and remove the files."""
        for fd in (self.requests, self.answers):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.requests = self.answers = None
        try:
            self.buf.close()
        except (BufferError, ValueError):
            pass  # a view still refers to it: the mapping goes with the last one
        shutil.rmtree(self.path, ignore_errors=True)


def serve(path: str, compute: Callable[[int, int, np.ndarray, np.ndarray], tuple]) -> None:
    """The shard's side, until the engine closes its end (or removes the files): for each
    request, `compute(version, layer, x [n, D], counts [s])` -> (y [n, D], seconds) into the
    answer half. An exception is sent back as the answer, and the loop goes on."""
    # The answer pipe first (the engine reads it already, so this does not wait): once the engine
    # has connected, a shard that dies closes it and the engine's wait ends at once.
    answers = os.open(os.path.join(path, "answer"), os.O_WRONLY)
    requests = os.open(os.path.join(path, "request"), os.O_RDONLY)  # waits for the engine
    fd = os.open(os.path.join(path, "data"), os.O_RDWR)
    buf = mmap.mmap(fd, 0)
    os.close(fd)
    half = len(buf) // 2
    try:
        while os.read(requests, 1) == b"\1":
            version, layer, n, s, d, code = (int(v) for v in np.frombuffer(buf, np.int64, 6, 0))
            counts = np.frombuffer(buf, np.int64, s, HEADER).copy()
            dtype = np.dtype(DTYPES[code])
            x = np.frombuffer(buf, dtype, n * d, HEADER + _align(8 * s)).reshape(n, d)
            try:
                y, seconds = compute(version, layer, x, counts)
                np.frombuffer(buf, dtype, n * d, half + HEADER)[:] = np.asarray(y).reshape(-1)
                np.frombuffer(buf, np.int64, 2, half)[:] = (0, n)
                np.frombuffer(buf, np.float64, 1, half + 16)[:] = seconds
            except Exception as exc:  # the engine sees it as this layer's failure
                message = f"{type(exc).__name__}: {exc}".encode()[: half - HEADER]
                np.frombuffer(buf, np.int64, 4, half)[:] = (1, 0, 0, len(message))
                buf[half + HEADER : half + HEADER + len(message)] = message
            os.write(answers, b"\1")
    finally:
        os.close(requests)
        os.close(answers)
        try:
            buf.close()
        except BufferError:
            pass  # a view still refers to it: the mapping goes with the last one
