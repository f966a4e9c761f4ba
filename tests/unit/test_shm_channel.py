"""The same-node shared-memory channel (experts/shm_channel.py) on its own: answers equal the
compute's, errors come back as errors, either side going away ends the other's wait at once."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time

import numpy as np
import pytest

from experts import shm_channel

pytestmark = pytest.mark.skipif(not shm_channel.available(), reason="needs /dev/shm and FIFOs")


def double(version, layer, x, counts):
    if layer < 0:
        raise ValueError(f"no layer {layer}")
    return x * 2 + version + counts.sum(), 0.25


def serving(end: shm_channel.EngineEnd, compute=double) -> threading.Thread:
    thread = threading.Thread(target=shm_channel.serve, args=(end.path, compute), daemon=True)
    thread.start()
    end.connect(10)
    return thread


@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_answers_equal_the_compute_and_errors_come_back(dtype):
    end = shm_channel.EngineEnd(1 << 16)
    thread = serving(end)
    try:
        for n in (5, 1, 17):  # sizes change between calls
            x = (np.arange(n * 8) % 50).astype(dtype).reshape(n, 8)
            counts = np.array([n - 1, 1, 0], dtype=np.int64)
            end.send(3, 1, x, counts)
            y, seconds = end.recv(10, np.dtype(dtype))
            assert np.array_equal(y, x * 2 + 3 + n) and seconds == 0.25
        end.send(0, -1, x, counts)
        with pytest.raises(RuntimeError, match="ValueError: no layer -1"):
            end.recv(10, np.dtype(dtype))
        end.send(0, 0, x, counts)  # the loop went on after the error
        assert np.array_equal(end.recv(10, np.dtype(dtype))[0], x * 2 + 17)
        assert not end.fits(10_000, 3, 8 * x.itemsize)  # too big for the buffer: refused
    finally:
        end.close()
    thread.join(10)
    assert not thread.is_alive()  # the engine closed its end: serve returned
    assert not os.path.exists(end.path)


def slow(version, layer, x, counts):
    time.sleep(60)


def test_a_dead_shard_ends_the_wait_at_once():
    end = shm_channel.EngineEnd(1 << 16)
    process = multiprocessing.get_context("fork").Process(
        target=shm_channel.serve, args=(end.path, slow), daemon=True
    )
    process.start()
    try:
        end.connect(10)
        end.send(0, 0, np.zeros((2, 4), np.float32), np.array([2], np.int64))
        process.kill()
        began = time.monotonic()
        with pytest.raises(shm_channel.ChannelClosed):
            end.recv(30, np.dtype(np.float32))
        assert time.monotonic() - began < 10  # EOF, not the 30 s timeout
    finally:
        process.kill()
        end.close()


def test_connect_gives_up_when_nobody_serves():
    end = shm_channel.EngineEnd(1 << 16)
    try:
        with pytest.raises(shm_channel.ChannelClosed):
            end.connect(10, alive=lambda: False)
    finally:
        end.close()
