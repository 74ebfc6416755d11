"""Which stitch answers a request that names none: a fixed one, or the most accurate that meets a
latency target at the current load (``--policy slo``).

Pure objects over measured numbers (no clock, no server), so their decisions can be tested exactly.
The SLO policy models a request's latency as ``overhead(depth) + queue(stitch, depth)``: ``queue``
drains ``depth`` in-flight requests in batches of at most ``max_batch`` with the latencies measured
per stitch and batch size at start-up; ``overhead(depth) = a + b * depth`` (decoding, transport,
waiting behind the other requests' decoding: everything but the forward) is fitted online to the
latencies the server observes, so the model stays honest on a busy machine and, being a function of
the depth, falls back when the load does.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Protocol, Sequence

from snnet.results import StitchResult, better, metric_value, pareto_front


@dataclass(frozen=True)
class LatencyTable:
    """Forward latency (ms) per stitch for each measured batch size (sizes ascending, the largest is
    the server's ``max_batch``)."""

    batch_sizes: tuple[int, ...]
    ms: dict[int, tuple[float, ...]]  # stitch id -> latency at each of batch_sizes

    def __post_init__(self) -> None:
        if not self.batch_sizes or list(self.batch_sizes) != sorted(set(self.batch_sizes)) or self.batch_sizes[0] < 1:
            raise ValueError(f"batch_sizes must be ascending distinct positive sizes, got {self.batch_sizes}")
        bad = {s: len(v) for s, v in self.ms.items() if len(v) != len(self.batch_sizes)}
        if bad:
            raise ValueError(f"stitches {sorted(bad)} have latencies for {sorted(set(bad.values()))} batch sizes, not {len(self.batch_sizes)}")

    @property
    def max_batch(self) -> int:
        return self.batch_sizes[-1]

    def batch_ms(self, stitch: int, batch: int) -> float:
        """Latency of one batch of ``batch`` rows: the smallest measured size that holds it (conservative)."""
        if stitch not in self.ms:
            raise KeyError(f"no latency measured for stitch {stitch}; measured: {sorted(self.ms)}")
        i = bisect.bisect_left(self.batch_sizes, batch)
        if i == len(self.batch_sizes):  # beyond the largest measured size: scale it linearly
            return self.ms[stitch][-1] * batch / self.max_batch
        return self.ms[stitch][i]

    def queue_ms(self, stitch: int, depth: int) -> float:
        """Time to serve ``depth`` requests with ``stitch`` in batches of at most ``max_batch``."""
        full, rest = divmod(max(depth, 1), self.max_batch)
        return full * self.batch_ms(stitch, self.max_batch) + (self.batch_ms(stitch, rest) if rest else 0.0)

    @classmethod
    def from_results(cls, results: Sequence[StitchResult], batch_sizes: Sequence[int]) -> "LatencyTable":
        """From the results file's batch-1 ``latency_ms`` (``snnet bench latency``), a batch of b
        taken as b times as long (an upper bound on devices that batch well)."""
        missing = [r.id for r in results if r.latency_ms is None]
        if missing:
            raise ValueError(f"the results have no latency_ms for stitches {missing}: run `snnet bench latency` or measure at start-up")
        return cls(tuple(batch_sizes), {r.id: tuple(r.latency_ms * b for b in batch_sizes) for r in results})


class Policy(Protocol):
    """Chooses the stitch for a request that names none, from the load when it arrives."""

    def choose(self, depth: int) -> int: ...

    def observe(self, stitch: int, depth: int, latency_ms: float) -> None: ...

    def describe(self) -> dict: ...


@dataclass
class FixedPolicy:
    """Always the same stitch (a baseline for the SLO policy)."""

    stitch: int

    def choose(self, depth: int) -> int:
        return self.stitch

    def observe(self, stitch: int, depth: int, latency_ms: float) -> None:
        pass

    def describe(self) -> dict:
        return {"policy": "fixed", "stitch": self.stitch}


@dataclass
class OverheadFit:
    """``residual ~ a + b * depth`` by exponentially weighted least squares (newest weight ``alpha``);
    ``a, b >= 0``. One depth seen so far: ``b = 0`` and ``a`` its weighted mean."""

    alpha: float = 0.05
    sums: list[float] = field(default_factory=lambda: [0.0] * 5)  # weight, d, d^2, r, d*r

    def update(self, depth: float, residual: float) -> None:
        terms = (1.0, depth, depth * depth, residual, depth * residual)
        self.sums = [(1 - self.alpha) * s + self.alpha * t for s, t in zip(self.sums, terms)]

    def coefficients(self) -> tuple[float, float]:
        w, d, dd, r, dr = self.sums
        if w == 0:
            return 0.0, 0.0
        det = w * dd - d * d
        b = max(0.0, (w * dr - d * r) / det) if det > 1e-9 * w * w else 0.0
        return max(0.0, (r - b * d) / w), b

    def __call__(self, depth: float) -> float:
        a, b = self.coefficients()
        return a + b * depth


@dataclass
class SLOPolicy:
    """The most accurate stitch (lowest perplexity for ``metric="ppl"``) whose expected latency at the
    current depth meets ``slo_ms * margin``.

    Candidates are the stitches on the latency/accuracy Pareto front (for latency, the batch-1
    column of ``latency``): any other stitch is slower and less accurate than one of them. When none
    meets the target the fastest answers. ``margin`` < 1 leaves room for the spread around the
    expected value, so the 95th percentile, not just the mean, stays under the SLO. The overhead
    follows the observed latency minus the modelled forward time (:class:`OverheadFit`, weight
    ``alpha``).
    """

    results: Sequence[StitchResult]
    latency: LatencyTable
    slo_ms: float
    margin: float = 0.8
    alpha: float = 0.05
    metric: str = "acc1"
    candidates: list[StitchResult] = field(init=False)
    current: int = field(init=False)
    overhead: OverheadFit = field(init=False)

    def __post_init__(self) -> None:
        if not self.slo_ms > 0:
            raise ValueError(f"slo_ms must be positive, got {self.slo_ms}")
        if not 0 < self.margin <= 1:
            raise ValueError(f"margin must be in (0, 1], got {self.margin}")
        timed = [r for r in self.results if r.id in self.latency.ms]
        if not timed:
            raise ValueError("no stitch of the results has a measured latency")
        rows = [dataclasses.replace(r, latency_ms=self.latency.batch_ms(r.id, 1)) for r in timed]
        front = pareto_front(rows, cost="latency_ms", metric=self.metric)
        sign = better(self.metric)  # a perplexity: lower is better
        self.candidates = sorted(front, key=lambda r: -sign * metric_value(r, self.metric))  # most accurate first
        self.current = self.candidates[0].id
        self.overhead = OverheadFit(self.alpha)

    def expected_ms(self, stitch: int, depth: int) -> float:
        return self.overhead(depth) + self.latency.queue_ms(stitch, depth)

    def choose(self, depth: int) -> int:
        target = self.slo_ms * self.margin
        chosen = next((r.id for r in self.candidates if self.expected_ms(r.id, depth) <= target), self.candidates[-1].id)
        self.current = chosen
        return chosen

    def observe(self, stitch: int, depth: int, latency_ms: float) -> None:
        if stitch in self.latency.ms and math.isfinite(latency_ms):
            self.overhead.update(depth, latency_ms - self.latency.queue_ms(stitch, depth))

    def describe(self) -> dict:
        a, b = self.overhead.coefficients()
        return {
            "policy": "slo", "slo_ms": self.slo_ms, "margin": self.margin, "overhead_ms": round(a, 3),
            "overhead_per_request_ms": round(b, 3), "candidates": [r.id for r in self.candidates], "current": self.current,
        }
