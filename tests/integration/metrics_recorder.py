"""A Ray actor that records every moe-serve metric through serving.metrics.Metrics, as the app and
the controller will: once on demand, or every `period_s` in a thread (so that rates have data)."""

from __future__ import annotations

import threading


class Recorder:
    def __init__(self) -> None:
        from serving.control.metrics import Metrics

        self.metrics = Metrics()
        self.count = 0
        self._stop = threading.Event()

    def record_once(self) -> int:
        """One sample of every metric; values vary so that rates and quantiles are non-trivial."""
        m, n = self.metrics, self.count + 1
        m.set_targets(target=10.0, ceiling=30.0, phase_number=1, phase_name="phase 1")
        m.record_throughput(8.0 + n % 3)
        m.record_load(cv=0.2, max_over_mean=1.5)
        m.record_step(batch_tokens=64 + n % 7, queue_depth=n % 5, kv_cache_usage=0.5)
        m.record_request(ttft_s=0.05 * (1 + n % 4), e2e_s=1.0 + n % 3, tpot_s=0.02)
        m.record_overflow_totals(split=3 * n, rerouted=n, dropped=n)
        fractions = {"dense": 0.4, "expert": 0.3, "transport": 0.15, "imbalance": 0.1}
        factors = {"kernel": 0.5, "communication": 0.2, "load_imbalance": 0.1}
        m.record_efficiency(fractions | {"bubble": 0.05}, 0.3, factors | {"pipeline_bubbles": 0.05})
        m.count_action("hold")
        m.count_action("rebalance" if n % 2 else "scale_out")
        m.refresh()
        self.count = n
        return n

    def start(self, period_s: float = 0.5) -> None:
        def loop() -> None:
            while not self._stop.wait(period_s):
                self.record_once()

        threading.Thread(target=loop, daemon=True).start()

    def stop(self) -> int:
        self._stop.set()
        return self.count


def start_recorder(ray):
    """A Recorder actor (no CPU reserved: it only records)."""
    return ray.remote(num_cpus=0)(Recorder).remote()
