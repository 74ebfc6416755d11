"""Which stitch to deploy: an id, or a budget resolved against measured results.

One config shared by ``SNNetModule`` predict, ``snnet export`` and the Python API, so a budget means
the same everywhere: the most accurate measured stitch within it (``results.select_stitch``).
"""
from __future__ import annotations

from dataclasses import dataclass

from snnet.results import StitchResult, check_budgets, load_results, select_stitch
from snnet.sn_net.network import StitchableNetwork


@dataclass
class StitchChoice:
    """``stitch``: a configuration id; or budgets (``max_gflops``, ``max_params``, ``max_latency_ms``)
    with ``results``, a results JSON holding each stitch's accuracy (``snnet validate``) and, for a
    latency budget, its latency (``snnet bench latency``). Nothing given: keep the active stitch."""

    stitch: int | None = None
    max_gflops: float | None = None
    max_params: float | None = None
    max_latency_ms: float | None = None
    results: str | None = None
    metric: str = "acc1"

    def __post_init__(self) -> None:
        check_budgets({"max_gflops": self.max_gflops, "max_params": self.max_params, "max_latency_ms": self.max_latency_ms})
        if self.stitch is not None and self.has_budget:
            raise ValueError(f"give a stitch id ({self.stitch}) or a budget, not both")

    @property
    def has_budget(self) -> bool:
        return any(v is not None for v in (self.max_gflops, self.max_params, self.max_latency_ms))

    def select(self, results: list[StitchResult] | None = None) -> StitchResult:
        """The most accurate stitch within the budgets, from ``results`` or the ``results`` file."""
        if results is None:
            if self.results is None:
                raise ValueError("a budget needs measured accuracies: give results (a JSON written by `snnet validate`)")
            results = load_results(self.results)
        return select_stitch(results, self.max_gflops, self.max_params, self.max_latency_ms, self.metric)

    def resolve(self, net: StitchableNetwork, results: list[StitchResult] | None = None) -> int:
        """The configuration id to run on ``net``: ``stitch``, else the budgets' choice, else the active one.

        The results must name ``net``'s configurations (results of another network would silently
        pick a wrong path).
        """
        if self.stitch is not None:
            return net.check_id(self.stitch)
        if not self.has_budget:
            return net.stitch_id
        if results is None:
            if self.results is None:
                raise ValueError("a budget needs measured accuracies: give results (a JSON written by `snnet validate`)")
            results = load_results(self.results)
        try:
            check_results_match(net, results)  # every row, not only the chosen one: the ranking depends on all
        except (ValueError, IndexError) as e:
            raise ValueError(f"results file {self.results}: {e}" if self.results else str(e)) from None
        return self.select(results).id


def check_results_match(net: StitchableNetwork, results: list[StitchResult]) -> None:
    """Results must describe ``net``'s configurations (same id, same path name): results of another
    network would silently pick or time a wrong path."""
    for r in results:
        info = net.infos[net.check_id(r.id)]
        if info.name != r.name:
            raise ValueError(
                f"the results name stitch {r.id} {r.name!r} but this network's stitch {r.id} is {info.name!r}: "
                "they were measured on another network"
            )
