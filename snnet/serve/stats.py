"""What ``GET /stats`` reports: requests, latency percentiles and SLO violations per stitch."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) by linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class ServeStats:
    """Counts since start and the latencies of the last ``window`` requests per stitch."""

    slo_ms: float | None = None
    window: int = 2048
    requests: dict[int, int] = field(default_factory=dict)
    violations: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    latencies: dict[int, deque] = field(default_factory=dict)

    def record(self, stitch: int, latency_ms: float) -> None:
        self.requests[stitch] = self.requests.get(stitch, 0) + 1
        self.latencies.setdefault(stitch, deque(maxlen=self.window)).append(latency_ms)
        if self.slo_ms is not None and latency_ms > self.slo_ms:
            self.violations[stitch] = self.violations.get(stitch, 0) + 1

    def summary(self) -> dict:
        per_stitch = {}
        for stitch in sorted(self.requests):
            values = list(self.latencies[stitch])
            per_stitch[str(stitch)] = {
                "requests": self.requests[stitch],
                "p50_ms": round(percentile(values, 0.5), 3),
                "p95_ms": round(percentile(values, 0.95), 3),
                **({"slo_violations": self.violations.get(stitch, 0)} if self.slo_ms is not None else {}),
            }
        every = [v for d in self.latencies.values() for v in d]
        return {
            "requests": sum(self.requests.values()),
            "errors": self.errors,
            "p50_ms": round(percentile(every, 0.5), 3) if every else None,
            "p95_ms": round(percentile(every, 0.95), 3) if every else None,
            "stitches": per_stitch,
        }
