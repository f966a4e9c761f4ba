"""Releasing the compiled fan-out while nobody uses it.

The actors of a Ray compiled graph poll their input channels while they wait for work: each idle
ExpertShard holds a whole CPU core, and a server with no traffic would keep every shard's core
busy (ARCHITECTURE.md section 7). After `idle_s` with no layer sent, the pool tears its graph down
(the shards then wait in Ray's ordinary task queue, using no CPU); the next layer sent goes
through plain actor calls and starts compiling the graph again in the background.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class IdleRelease:
    """Calls `release()` (True when it released something) once no `touch()` came for `idle_s`;
    the first `touch()` after a release calls `recompile()` on a background thread."""

    def __init__(
        self, idle_s: float, release: Callable[[], bool], recompile: Callable[[], None]
    ) -> None:
        self.idle_s = idle_s
        self._release, self._recompile = release, recompile
        self._last = time.monotonic()
        self.released = False
        # Between the watcher and the forward thread: a release and a touch never interleave,
        # so a graph released just as traffic resumes is always compiled again.
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._watch, daemon=True, name="idle-release").start()

    def touch(self) -> None:
        """A layer is being sent."""
        with self._lock:
            self._last = time.monotonic()
            if not self.released:
                return
            self.released = False
        threading.Thread(target=self._recompile, daemon=True).start()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.idle_s / 4)):
            with self._lock:
                if not self.released and time.monotonic() - self._last > self.idle_s:
                    self.released = self._release()

    def stop(self) -> None:
        self._stop.set()
