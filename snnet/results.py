"""Per-stitch results: files (JSON/CSV), the Pareto front, choosing a stitch for a budget, a table
and a plot. Pure functions over :class:`StitchResult` lists, shared by the callbacks and the CLI."""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable, Sequence

from snnet.errors import BadFileError, read_json

METRICS: tuple[str, ...] = ("acc1", "acc5", "ppl", "loss")
LOWER_IS_BETTER: frozenset[str] = frozenset({"ppl", "loss"})  # a language model's perplexity and loss
COSTS: dict[str, str] = {"gflops": "flops", "params": "params", "latency_ms": "latency_ms"}


@dataclass
class StitchResult:
    """One configuration's cost (FLOPs per image, 2 per multiply-add; parameters on its path) and scores.

    ``front_anchor``/``end_anchor``: a stitch's pair, the ids of its first and last anchor (None for anchors).
    A language model's row: ``acc1``/``acc5`` are next-token top-1/top-5 accuracy (%), ``loss`` the mean
    next-token cross-entropy (nats), ``ppl`` its exponential; FLOPs are per token.
    """

    id: int
    name: str
    flops: int
    params: int
    is_anchor: bool
    acc1: float | None = None
    acc5: float | None = None
    latency_ms: float | None = None
    front_anchor: int | None = None
    end_anchor: int | None = None
    loss: float | None = None
    ppl: float | None = None

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict) -> "StitchResult":
        """A row read from a file, checked: a NaN accuracy or a negative cost would silently change
        which stitch a budget picks, so every value must be of its kind and in its range."""
        names = {f.name for f in fields(cls)}
        missing = {"id", "name", "flops", "params"} - set(row)
        if missing:
            raise ValueError(f"result row {row!r} lacks {sorted(missing)}")
        result = cls(**{k: v for k, v in row.items() if k in names})
        result.check()
        return result

    def check(self) -> None:
        """A ValueError naming the first field whose value is not a valid one."""
        def number(value: object, integer: bool = False) -> bool:
            kinds = (int,) if integer else (int, float)
            return isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value) and value >= 0

        where = f"stitch {self.id!r} ({self.name!r})"
        if not number(self.id, integer=True):
            raise ValueError(f"id must be a non-negative integer, got {self.id!r}")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"{where}: name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.is_anchor, bool):
            raise ValueError(f"{where}: is_anchor must be true or false, got {self.is_anchor!r}")
        for key in ("flops", "params"):
            if not number(getattr(self, key)):
                raise ValueError(f"{where}: {key} must be a finite non-negative number, got {getattr(self, key)!r}")
        for key in (*METRICS, "latency_ms"):
            value = getattr(self, key)
            if value is not None and not number(value):
                raise ValueError(f"{where}: {key} must be a finite non-negative number or null, got {value!r}")
        for key in set(METRICS) - LOWER_IS_BETTER:
            if getattr(self, key) is not None and getattr(self, key) > 100:
                raise ValueError(f"{where}: {key} is a percentage, at most 100, got {getattr(self, key)!r}")
        if self.ppl is not None and self.ppl < 1:
            raise ValueError(f"{where}: ppl is a perplexity, at least 1, got {self.ppl!r}")
        for key in ("front_anchor", "end_anchor"):
            if getattr(self, key) is not None and not number(getattr(self, key), integer=True):
                raise ValueError(f"{where}: {key} must be an anchor id or null, got {getattr(self, key)!r}")


def save_results(
    results: Sequence[StitchResult], json_path: str | os.PathLike, csv_path: str | os.PathLike | None = None,
    figures: dict | None = None,
) -> None:
    """A JSON list of rows, or with ``figures`` (see :mod:`snnet.front`) ``{"figures": ..., "stitches": rows}``."""
    rows = [r.to_dict() for r in results]
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(rows if figures is None else {"figures": figures, "stitches": rows}, indent=1))
    if csv_path is not None:
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(StitchResult)])
            writer.writeheader()
            writer.writerows(rows)


def load_results(path: str | os.PathLike) -> list[StitchResult]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path} (write one with `snnet validate` or `snnet stitches --json`)")
    rows = read_json(path, "results file ")
    if isinstance(rows, dict):  # written with figures
        rows = rows.get("stitches")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise BadFileError(f"results file {path}: expected a non-empty JSON list of stitch results (objects), "
                           "or an object with a 'stitches' list")
    results = []
    for i, row in enumerate(rows):
        try:
            results.append(StitchResult.from_dict(row))
        except (ValueError, TypeError) as e:
            raise BadFileError(f"results file {path}: row {i}: {e}") from e
    ids = [r.id for r in results]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise BadFileError(f"results file {path}: stitch ids {repeated} appear more than once")
    return results


def load_figures(path: str | os.PathLike) -> dict | None:
    """The front figures a results file holds (written by ``snnet fit/validate``), or None: for
    tools that rewrite the file (``snnet bench latency``) and must keep them."""
    rows = json.loads(Path(path).read_text())
    return rows.get("figures") if isinstance(rows, dict) else None


def gflops(value: float, digits: int = 3) -> str:
    """GFLOPs to ``digits`` decimals, or to ``digits`` significant digits below 0.01 (a language
    model's GFLOPs per token, which fixed decimals would print as 0.000)."""
    return f"{value:.{digits}f}" if value >= 0.01 or value == 0 else f"{value:.{digits}g}"


def better(metric: str) -> float:
    """+1 where a higher ``metric`` is better (accuracy), -1 where lower is (perplexity, loss)."""
    return -1.0 if metric in LOWER_IS_BETTER else 1.0


def metric_value(r: StitchResult, metric: str) -> float:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
    value = getattr(r, metric)
    if value is None:
        raise ValueError(f"stitch {r.id} ({r.name}) has no {metric}: select from results written by `snnet validate`")
    return value


def pareto_front(results: Iterable[StitchResult], cost: str = "flops", metric: str = "acc1") -> list[StitchResult]:
    """Stitches no other stitch beats on both cost (lower) and score (better), cheapest first."""
    sign = better(metric)
    ranked = sorted(results, key=lambda r: (getattr(r, cost), -sign * metric_value(r, metric)))
    front, best = [], -math.inf
    for r in ranked:
        score = sign * metric_value(r, metric)
        if score > best:
            front.append(r)
            best = score
    return front


def check_budgets(budgets: dict[str, float | None]) -> dict[str, float]:
    """The given budgets (None dropped), each a finite positive number: the one check of the command
    line, the Python API and the server."""
    given = {k: v for k, v in budgets.items() if v is not None}
    for key, value in given.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{key} must be a finite positive number, got {value!r}")
    return given


def select_stitch(
    results: Sequence[StitchResult],
    max_gflops: float | None = None,
    max_params: float | None = None,
    max_latency_ms: float | None = None,
    metric: str = "acc1",
) -> StitchResult:
    """The best-scoring stitch (most accurate, or lowest perplexity) within every given budget (ties: the cheaper in FLOPs)."""
    given = check_budgets({"max_gflops": max_gflops, "max_params": max_params, "max_latency_ms": max_latency_ms})
    budgets = {k.removeprefix("max_"): v for k, v in given.items()}
    if not budgets:
        raise ValueError("give at least one budget: max_gflops, max_params or max_latency_ms")
    if "latency_ms" in budgets and any(r.latency_ms is None for r in results):
        raise ValueError("these results have no latency_ms: measure it with `snnet bench latency` first")

    def cost(r: StitchResult, key: str) -> float:
        return r.gflops if key == "gflops" else getattr(r, COSTS[key])

    fits = [r for r in results if all(cost(r, k) <= v for k, v in budgets.items())]
    if not fits:
        parts = []
        for key, limit in budgets.items():
            cheapest = min(results, key=lambda r: cost(r, key))
            if cost(cheapest, key) > limit:
                parts.append(f"max {key} {limit:g} is below the cheapest stitch {cheapest.id} ({cheapest.name}) at {cost(cheapest, key):g} {key}")
        if not parts:  # each budget alone is met, not all together
            given = ", ".join(f"max {k} {v:g}" for k, v in budgets.items())
            parts.append(f"each of {given} is met by some stitch, but no stitch meets all of them at once; "
                         "relax one of them")
        raise ValueError("no stitch fits the budget: " + "; ".join(parts))
    return max(fits, key=lambda r: (better(metric) * metric_value(r, metric), -r.flops))


def format_rows(results: Sequence[StitchResult], front: Iterable[int] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the human-readable table (GFLOPs, M params, accuracies where measured);
    ``front`` (ids) adds a column marking the configurations on the measured front."""
    header = ["id", "name", "GFLOPs", "params (M)"]
    extra = [(k, label) for k, label in (("acc1", "top-1 %"), ("acc5", "top-5 %"), ("loss", "loss"), ("ppl", "ppl"), ("latency_ms", "latency ms"))
             if any(getattr(r, k) is not None for r in results)]
    header += [label for _, label in extra]
    rows = []
    for r in results:
        row = [str(r.id), r.name + (" (anchor)" if r.is_anchor else ""), gflops(r.gflops, 4), f"{r.params / 1e6:.3f}"]
        row += ["-" if getattr(r, k) is None else f"{getattr(r, k):.2f}" for k, _ in extra]
        rows.append(row)
    if front is not None:
        on = set(front)
        header.append("front")
        for r, row in zip(results, rows):
            row.append("*" if r.id in on else "")
    return header, rows


def print_table(results: Sequence[StitchResult], title: str | None = None, front: Iterable[int] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    header, rows = format_rows(results, front)
    table = Table(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 1 else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=max(120, Console().width)).print(table)


def markdown_table(results: Sequence[StitchResult], before: Sequence[StitchResult] | None = None, metric: str = "acc1") -> str:
    """The table as Markdown; ``before`` (matched by id) adds its ``metric`` and the change."""
    header, rows = format_rows(results)
    if before is not None:
        earlier = {r.id: r for r in before}
        missing = sorted({r.id for r in results} - set(earlier))
        if missing:
            raise ValueError(f"before-results lack stitch ids {missing}")
        header += [f"{metric} before", "change"]
        for r, row in zip(results, rows):
            old, new = metric_value(earlier[r.id], metric), metric_value(r, metric)
            row += [f"{old:.2f}", f"{new - old:+.2f}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def plot_pareto(
    results: Sequence[StitchResult], path: str | os.PathLike, metric: str = "acc1", title: str | None = None,
    before: Sequence[StitchResult] | None = None, front: Iterable[int] | None = None,
) -> Path:
    """Accuracy vs GFLOPs of every stitch, anchors marked, Pareto front drawn; ``before`` adds a
    second series (e.g. after least-squares init, before training); ``front`` (ids) rings the
    configurations on the measured front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    series = [(before, "before training", "tab:gray"), (results, "stitches", "tab:blue")] if before else [(results, "stitches", "tab:blue")]
    for rs, label, color in series:
        scored = [r for r in rs if getattr(r, metric) is not None]
        ax.scatter([r.gflops for r in scored], [metric_value(r, metric) for r in scored], s=14, color=color, alpha=0.7, label=label)
    scored = [r for r in results if getattr(r, metric) is not None]
    line = pareto_front(scored, metric=metric)
    ax.plot([r.gflops for r in line], [metric_value(r, metric) for r in line], color="tab:blue", lw=1, label="Pareto front")
    if front is not None:
        on = set(front)
        ringed = [r for r in scored if r.id in on]
        ax.scatter([r.gflops for r in ringed], [metric_value(r, metric) for r in ringed], s=60, facecolors="none",
                   edgecolors="tab:green", lw=1.2, label=f"on the front ({sum(not r.is_anchor for r in ringed)} stitches)", zorder=2)
    anchors = [r for r in scored if r.is_anchor]
    ax.scatter([r.gflops for r in anchors], [metric_value(r, metric) for r in anchors], marker="*", s=140, color="tab:red", label="anchors", zorder=3)
    ax.set_xlabel("GFLOPs per token" if metric in LOWER_IS_BETTER else "GFLOPs per image")
    ax.set_ylabel(f"{metric} (lower is better)" if metric in LOWER_IS_BETTER else f"{metric} (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right" if metric in LOWER_IS_BETTER else "lower right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
