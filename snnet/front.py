"""How well the stitches fill the gap between their anchors: the four figures every run reports.

SN-Net's promise is that after joint training the stitches lie *between* their anchors on the
accuracy/FLOPs plane. These figures say whether a run kept it, and are the same numbers the
reference code's published per-stitch results give (DeiT-Ti/S/B: 37 of 68 on the front, none
more than a point below the lower anchor of its pair, median gap +0.40):

* stitches on the measured Pareto front of every scored configuration (see :func:`front_ids`);
* stitches more than ``margin`` points below the lower (less accurate) anchor of their pair;
* the median signed gap between a stitch's score and the straight line between its pair's two
  anchors at its FLOPs (FLOPs clamped to the anchors' range);

For a lower-is-better metric (a language model's perplexity, :data:`snnet.results.LOWER_IS_BETTER`)
"below" means worse: more than ``margin`` above the worse anchor's perplexity, and a gap is positive
when the stitch's perplexity is under the line; the figures name their metric.
* each anchor's change against its pretrained score (measured before training), when known.

The pair of a stitch is its front and end anchor (``StitchResult.front_anchor/end_anchor``).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Mapping, Sequence

from snnet.results import LOWER_IS_BETTER, StitchResult, better, gflops, metric_value

if TYPE_CHECKING:
    from snnet.sn_net.network import StitchableNetwork


@dataclass
class FrontFigures:
    """The four figures of one set of results (in ``metric``'s units: percent points, or perplexity)."""

    configurations: int
    stitches: int
    min_gflops: float
    max_gflops: float
    on_front: int
    below_lower: int
    median_gap: float | None
    anchor_change: dict[str, float] = field(default_factory=dict)  # anchor name -> score - pretrained score
    metric: str = "acc1"
    margin: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line: what the user got."""
        lower = self.metric in LOWER_IS_BETTER
        if lower:
            worse = f"{self.below_lower} more than {self.margin:g} {self.metric} above the worse anchor of their pair"
            gap = f"median {self.metric} gap under the anchors' line (positive: better) "
        else:
            worse = f"{self.below_lower} more than {self.margin:g} point{'s' * (self.margin != 1)} below the lower anchor of their pair"
            gap = "median gap to the anchors' line "
        parts = [
            f"{self.configurations} configurations from {gflops(self.min_gflops)} to {gflops(self.max_gflops)} GFLOPs per token" if lower
            else f"{self.configurations} configurations from {self.min_gflops:.3f} to {self.max_gflops:.3f} GFLOPs",
            f"{self.on_front} of {self.stitches} stitches on the front" + f" ({self.metric})" * lower,
            worse,
            gap + ("n/a" if self.median_gap is None else f"{self.median_gap:+.2f}"),
        ]
        if self.anchor_change:
            parts.append("anchors vs pretrained " + " ".join(f"{v:+.2f}" for v in self.anchor_change.values()))
        else:
            parts.append("anchors vs pretrained: not measured")
        return ", ".join(parts)


def stitch_result(net: "StitchableNetwork", stitch: int, acc1: float | None = None, acc5: float | None = None,
                  loss: float | None = None, ppl: float | None = None) -> StitchResult:
    """Configuration ``stitch`` of ``net`` as a result row, with its pair when it is a stitch."""
    info, config = net.infos[stitch], net.configs[stitch]
    # a two-hop route (S -> L -> S) is judged against the line between the two anchors it visits
    pair = (None, None) if config.is_anchor else (config.anchors[0], next(a for a in reversed(config.anchors) if a != config.anchors[0]))
    return StitchResult(info.id, info.name, info.flops, info.params, info.is_anchor, acc1, acc5, front_anchor=pair[0], end_anchor=pair[1],
                        loss=loss, ppl=ppl)


def published_results(net: "StitchableNetwork", rows: Mapping[int, Mapping], tolerance: float = 0.01) -> list[StitchResult]:
    """Our result rows carrying a reference's published scores (``rows``: cfg_id -> its jsonl row).

    Configuration ``i`` takes the row of cfg_id ``i`` only after its multiply-adds (fvcore, the
    reference's ``flops``) match ours (FLOPs / 2) within ``tolerance`` (relative), so a generator
    that orders configurations differently fails here instead of mislabelling stitches.
    """
    missing = sorted(set(range(net.num_configs)) - set(rows))
    if missing:
        raise ValueError(f"no published row for configurations {missing} (of {net.num_configs})")
    out = []
    for info in net.table():
        row = rows[info.id]
        if abs(info.flops / 2 - row["flops"]) > tolerance * row["flops"]:
            raise ValueError(f"cfg_id {info.id} ({info.name}): published {row['flops']:.4g} multiply-adds, ours "
                             f"{info.flops / 2:.4g}: not the same configuration (tolerance {tolerance:.1%})")
        out.append(stitch_result(net, info.id, acc1=float(row["acc1"]), acc5=row.get("acc5")))
    return out


def front_ids(results: Sequence[StitchResult], metric: str = "acc1") -> set[int]:
    """Ids on the measured front: no strictly cheaper configuration scores as well or better.

    Configurations of equal FLOPs are each judged only against cheaper ones, the rule behind the
    reference's published counts (SN-Netv2 DeiT3-S/L: 14 stitches on the front, 10 with strict dominance).
    """
    ranked = sorted(results, key=lambda r: r.flops)
    sign = better(metric)
    out, best, i = set(), -math.inf, 0
    while i < len(ranked):
        same = [r for r in ranked[i:] if r.flops == ranked[i].flops]
        out.update(r.id for r in same if sign * metric_value(r, metric) > best)
        best = max(best, max(sign * metric_value(r, metric) for r in same))
        i += len(same)
    return out


def line_gap(stitch: StitchResult, low: StitchResult, high: StitchResult, metric: str = "acc1") -> float:
    """How much better ``stitch`` scores than the straight line between anchors ``low`` and ``high``
    at its FLOPs (clamped to the anchors' FLOPs range, so a stitch dearer than both is held to the
    dearer one): its score minus the line's, sign flipped for a lower-is-better metric."""
    sign = better(metric)
    (f0, s0), (f1, s1) = sorted([(low.flops, sign * metric_value(low, metric)), (high.flops, sign * metric_value(high, metric))])
    if f1 == f0:
        return sign * metric_value(stitch, metric) - max(s0, s1)
    t = min(max((stitch.flops - f0) / (f1 - f0), 0.0), 1.0)
    return sign * metric_value(stitch, metric) - (s0 + t * (s1 - s0))


def front_figures(
    results: Sequence[StitchResult],
    pretrained: Mapping[int, float] | None = None,
    metric: str = "acc1",
    margin: float = 1.0,
) -> FrontFigures:
    """The four figures of scored ``results`` (anchors and stitches, every stitch with its pair).

    ``pretrained``: anchor id -> its score before training; the anchors in ``results`` are compared
    with it. Raises when a stitch has no pair or its pair's anchors are not among ``results``.
    """
    if not results:
        raise ValueError("no results to compute figures on")
    by_id = {r.id: r for r in results}
    stitches = [r for r in results if not r.is_anchor]
    gaps, below = [], 0
    for s in stitches:
        if s.front_anchor is None or s.end_anchor is None:
            raise ValueError(f"stitch {s.id} ({s.name}) has no front_anchor/end_anchor: results written before pairs were recorded")
        missing = [a for a in (s.front_anchor, s.end_anchor) if a not in by_id]
        if missing:
            raise ValueError(f"stitch {s.id} ({s.name}) pairs anchors {missing} that are not among the results (ids {sorted(by_id)})")
        a, b = by_id[s.front_anchor], by_id[s.end_anchor]
        gaps.append(line_gap(s, a, b, metric))
        sign = better(metric)
        below += sign * metric_value(s, metric) < min(sign * metric_value(a, metric), sign * metric_value(b, metric)) - margin
    front = front_ids(results, metric)
    change = {}
    for anchor_id, before in (pretrained or {}).items():
        if anchor_id in by_id and before is not None and not math.isnan(before):
            change[by_id[anchor_id].name] = metric_value(by_id[anchor_id], metric) - before
    return FrontFigures(
        configurations=len(results),
        stitches=len(stitches),
        min_gflops=min(r.gflops for r in results),
        max_gflops=max(r.gflops for r in results),
        on_front=sum(s.id in front for s in stitches),
        below_lower=below,
        median_gap=statistics.median(gaps) if gaps else None,
        anchor_change=change,
        metric=metric,
        margin=margin,
    )
