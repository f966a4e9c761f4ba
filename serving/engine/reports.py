"""What the engine tells its observer after every step: plain numbers, no state. The engine's
monitor (serving/control/monitor.py) turns them into metrics and the step accounting; it is the
one way control sees a step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from experts.timing import ExpertTime


@dataclass(frozen=True)
class RequestTiming:
    """Latencies of one request that finished normally (seconds)."""

    ttft_s: float  # submit to first token: queueing + prefill
    e2e_s: float  # submit to last token
    tpot_s: float | None  # mean time per output token after the first; None for one token


@dataclass(frozen=True)
class StepReport:
    """What one step did, for an observer (the engine's monitor: metrics and the step
    accounting, serving/control/); plain numbers, no state."""

    batch_tokens: int  # prefill + decode tokens run
    new_tokens: int  # tokens sampled (streamed) this step
    queue_depth: int  # requests waiting for a slot
    slots_used: int
    slots: int  # KV cache slots allocated
    finished: tuple[RequestTiming, ...]
    # Where the time went: the step's interval (the previous step's end, or waking, to this
    # step's end), the forward passes within it, and what the expert pool measured meanwhile.
    interval_s: float = 0.0
    forward_s: float = 0.0
    expert: ExpertTime = field(default_factory=ExpertTime)
    decode_rows: int = 0
    prefill_tokens: int = 0
    prefill_chunks: int = 0


# Called on the event loop after every step, between two forward passes (the model is idle).
StepObserver = Callable[[StepReport], None]
