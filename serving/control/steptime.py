"""Step accounting: where the wall-clock time of every model step goes.

Shape legend: P parts (PARTS), R regressors of the step model (REGRESSORS), S expert shards.

A step is the scheduler's unit of work: one batch of decode rows and prefill chunks, run as one or
more forward calls. Its interval runs from the end of the previous step (or, after the scheduler
sat idle, from the moment work arrived) to the end of this one, and is split into five parts that
add up to it:

  dense      engine forward time outside the expert fan-outs: embeddings, attention, norms,
             gating, the balancer, dispatch and combine, lm_head
  expert     per MoE layer, the mean over shards of each shard's own compute time
  imbalance  per MoE layer, the slowest shard's compute minus that mean: the wait on the straggler
  transport  per MoE layer, the fan-out's round trip minus the slowest shard's compute:
             serialisation, object store, RPC, both ways
  overlapped engine compute that ran while the shards worked on the other micro-batch: the
             fan-out time two micro-batches in flight hid
  bubble     the rest of the interval: scheduling, sampling, streaming tokens out, thread hand-offs

With two micro-batches in flight, expert, imbalance and transport count only the time the engine
sat waiting for the shards (the exposed part, split in the proportions of a blocking fan-out),
and dense only the engine's compute that nothing overlapped.

With the experts in the engine's process, `expert` is the pool's compute time and transport and
imbalance are zero. Time the scheduler sits idle with no work is in no step and counts nowhere.

Totals are additive (cumulative sums), so the figures of any window are the difference of two
readings: the engine keeps them from its start, a benchmark diffs the readings taken before and
after it ran. Besides the seconds per part they hold the least-squares moments of each part's
seconds per step against REGRESSORS (a constant, decode rows, prefill forward calls, prefill
tokens), from which serving/control/efficiency.py fits the step-time model that calibration extrapolates
to other batch sizes. Prefill calls are a regressor of their own because each prompt chunk is a
forward call of its own, with a fixed cost per MoE layer that no per-token term captures.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from experts.timing import ExpertTime

PARTS = ("dense", "expert", "transport", "imbalance", "overlapped", "bubble")
REGRESSORS = ("step", "decode_rows", "prefill_calls", "prefill_tokens")
R = len(REGRESSORS)


@dataclass
class StepTotals:
    """Cumulative sums over steps; subtract two readings for the figures of a window."""

    steps: int = 0
    wall_s: float = 0.0  # the steps' intervals: the sum of every part
    decode_rows: int = 0
    prefill_calls: int = 0
    prefill_tokens: int = 0
    seconds: np.ndarray = field(default_factory=lambda: np.zeros(len(PARTS)))  # [P]
    moments: np.ndarray = field(default_factory=lambda: np.zeros((R, R)))  # [R, R] sum r r^T
    cross: np.ndarray = field(default_factory=lambda: np.zeros((R, len(PARTS))))  # [R, P] sum r y
    shard_s: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [S]

    @property
    def tokens(self) -> int:
        return self.decode_rows + self.prefill_tokens

    def part(self, name: str) -> float:
        return float(self.seconds[PARTS.index(name)])

    def fractions(self) -> dict[str, float] | None:
        """Each part's share of the accounted wall time (None before any step)."""
        if self.wall_s <= 0:
            return None
        return {p: float(s) / self.wall_s for p, s in zip(PARTS, self.seconds, strict=True)}

    def add_step(
        self, parts: np.ndarray, decode_rows: int, prefill_calls: int, prefill: int, shard_s
    ) -> None:
        r = np.array([1.0, decode_rows, prefill_calls, prefill])  # [R]
        self.steps += 1
        self.wall_s += float(parts.sum())
        self.decode_rows += decode_rows
        self.prefill_calls += prefill_calls
        self.prefill_tokens += prefill
        self.seconds += parts
        self.moments += np.outer(r, r)
        self.cross += np.outer(r, parts)
        if shard_s:
            if len(shard_s) > self.shard_s.size:
                self.shard_s = np.pad(self.shard_s, (0, len(shard_s) - self.shard_s.size))
            self.shard_s[: len(shard_s)] += shard_s

    def copy(self) -> StepTotals:
        arrays = ("seconds", "moments", "cross", "shard_s")
        return replace(self, **{name: getattr(self, name).copy() for name in arrays})

    def __sub__(self, earlier: StepTotals) -> StepTotals:
        return self._combine(earlier, -1)

    def __add__(self, other: StepTotals) -> StepTotals:
        """Two windows pooled (e.g. two benchmark runs of one deployment)."""
        return self._combine(other, 1)

    def _combine(self, other: StepTotals, sign: int) -> StepTotals:
        n = max(self.shard_s.size, other.shard_s.size)
        pad = lambda a: np.pad(a, (0, n - a.size))  # noqa: E731 (shards added since: 0 before)
        return StepTotals(
            steps=self.steps + sign * other.steps,
            wall_s=self.wall_s + sign * other.wall_s,
            decode_rows=self.decode_rows + sign * other.decode_rows,
            prefill_calls=self.prefill_calls + sign * other.prefill_calls,
            prefill_tokens=self.prefill_tokens + sign * other.prefill_tokens,
            seconds=self.seconds + sign * other.seconds,
            moments=self.moments + sign * other.moments,
            cross=self.cross + sign * other.cross,
            shard_s=pad(self.shard_s) + sign * pad(other.shard_s),
        )

    def to_json(self) -> dict:
        return {
            "steps": self.steps,
            "wall_s": self.wall_s,
            "decode_rows": self.decode_rows,
            "prefill_calls": self.prefill_calls,
            "prefill_tokens": self.prefill_tokens,
            "seconds": dict(zip(PARTS, self.seconds.tolist(), strict=True)),
            "moments": self.moments.tolist(),
            "cross": self.cross.tolist(),
            "shard_s": self.shard_s.tolist(),
        }

    @classmethod
    def from_json(cls, data: dict) -> StepTotals:
        """Inverse of to_json; raises KeyError or ValueError on a malformed mapping."""
        # Reports from before the `overlapped` part have none: it was zero then.
        seconds = np.array([float(data["seconds"].get(p, 0.0)) for p in PARTS])
        moments = np.asarray(data["moments"], dtype=float).reshape(R, R)
        cross = np.asarray(data["cross"], dtype=float).reshape(R, -1)
        if cross.shape[1] == len(PARTS) - 1:
            cross = np.insert(cross, PARTS.index("overlapped"), 0.0, axis=1)
        return cls(
            steps=int(data["steps"]),
            wall_s=float(data["wall_s"]),
            decode_rows=int(data["decode_rows"]),
            prefill_calls=int(data["prefill_calls"]),
            prefill_tokens=int(data["prefill_tokens"]),
            seconds=seconds,
            moments=moments,
            cross=cross,
            shard_s=np.asarray(data.get("shard_s", []), dtype=float),
        )


def split_step(interval_s: float, forward_s: float, expert: ExpertTime) -> np.ndarray:
    """One step's interval -> seconds per part [P], in PARTS order; they sum to the interval
    (clamps only guard against timer jitter between processes)."""
    forward = min(forward_s, interval_s)
    waited = min(expert.waited_s, forward)  # the exposed fan-out time
    own = forward - waited  # the engine's compute
    overlapped = min(max(0.0, expert.round_trip_s - expert.waited_s), own)
    round_trip = max(expert.round_trip_s, 1e-12)
    slowest = min(expert.slowest_s, round_trip)
    mean = min(expert.mean_s, slowest)
    exposed = waited / round_trip  # the waited share of the fan-outs, split as they are
    return np.array(
        [
            own - overlapped,  # dense: the engine's own compute that nothing overlapped
            mean * exposed,  # expert
            (round_trip - slowest) * exposed,  # transport
            (slowest - mean) * exposed,  # imbalance
            overlapped,
            interval_s - forward,  # bubble
        ]
    )


class StepAccounting:
    """The scheduler records every step here; readers take totals and windows.

    Readings of the cumulative totals are kept about once a second for `window_s` seconds, so a
    window's figures cost one subtraction, never a pass over its steps.
    """

    def __init__(self, window_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self.totals = StepTotals()
        self._clock = clock
        self._readings: deque[tuple[float, StepTotals]] = deque()

    def record(
        self,
        interval_s: float,
        forward_s: float,
        expert: ExpertTime,
        decode_rows: int,
        prefill_tokens: int,
        prefill_calls: int = 0,
    ) -> None:
        parts = split_step(interval_s, forward_s, expert)
        self.totals.add_step(parts, decode_rows, prefill_calls, prefill_tokens, expert.shard_s)
        now = self._clock()
        if not self._readings or now - self._readings[-1][0] >= 1.0:
            self._readings.append((now, self.totals.copy()))
        # Keep one reading at or before the window's start, so the window is fully covered.
        while len(self._readings) > 1 and self._readings[1][0] <= now - self.window_s:
            self._readings.popleft()

    def window(self) -> StepTotals:
        """The totals of the last `window_s` seconds (all steps while the accounting is younger;
        empty after a window without steps)."""
        cutoff = self._clock() - self.window_s
        start = None
        for t, reading in self._readings:  # oldest first; at most ~window_s of them
            if t > cutoff:
                break
            start = reading
        return self.totals.copy() if start is None else self.totals - start
