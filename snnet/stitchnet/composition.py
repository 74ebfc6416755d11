"""StitchNet's composed candidates: the search's networks assembled into modules sharing fragments,
scored, printed and saved; :func:`compose` runs the whole zero-epoch path."""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
from torch import Tensor
from tqdm.auto import tqdm

from snnet.metrics import StitchScores
from snnet.prefix_tree import PrefixTree
from snnet.profiling import count_flops
from snnet.results import StitchResult
from snnet.stitching import StitchingLayer
from snnet.stitchnet.bridges import fuse_bridge
from snnet.stitchnet.fragments import (
    Fragment,
    FragmentPool,
    PoolActivations,
    Steps,
    pool_activations,
)
from snnet.stitchnet.heads import fit_head
from snnet.stitchnet.search import (
    ComposeConfig,
    NoCompositionError,
    Search,
    SearchNode,
    SearchStats,
)

log = logging.getLogger(__name__)


class SelectLogits(nn.Module):
    """The original classifier's logits of a class subset, in the task's label order."""

    def __init__(self, classes: Sequence[int]) -> None:
        super().__init__()
        self.register_buffer("index", torch.as_tensor(list(classes), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        return x.index_select(1, self.index)


@dataclass
class Candidate:
    """One composed network: its fragments, bridges, CKA score, cost and (once evaluated) accuracy."""

    id: int
    name: str
    fragments: list[str]
    ckas: list[float]  # one per connection, in order
    score: float  # product of ckas
    bridges: list[str]
    params: int
    flops: int  # per image, 2 per multiply-add
    is_anchor: bool
    keys: tuple = field(repr=False, default=())
    acc1: float | None = None
    acc5: float | None = None

    def result(self) -> StitchResult:
        return StitchResult(self.id, self.name, self.flops, self.params, self.is_anchor, self.acc1, self.acc5)

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row.pop("keys")
        return row


class Composition(nn.Module):
    """All composed candidates, ranked by score, sharing every common prefix of steps.

    ``forward(x, candidate)`` runs one network; ``forward_many(x, ids)`` runs several on one batch,
    each shared prefix once (the search tree is the prefix tree). Owns the bridges, folded ops and
    heads; the fragments belong to the pool's models.
    """

    def __init__(self, candidates: list[Candidate], steps: dict[Any, Callable[[Tensor], Tensor]], owned: list[nn.Module],
                 stats: SearchStats, head: str, num_classes: int) -> None:
        super().__init__()
        self.candidates, self.stats, self.head, self.num_classes = candidates, stats, head, num_classes
        self.owned = nn.ModuleList(owned)
        self._steps = steps
        self._tree = PrefixTree([c.keys for c in candidates], self._step_ending)

    def _step_ending(self, prefix: tuple) -> Callable[[Tensor], Tensor]:
        return self._steps[prefix[-1]]  # a fragment runs the same whatever came before it

    def forward(self, x: Tensor, candidate: int = 0) -> Tensor:
        for key in self.candidates[candidate].keys:
            x = self._steps[key](x)
        return x

    def forward_many(self, x: Tensor, ids: Sequence[int] | None = None) -> dict[int, Tensor]:
        return self._tree.run(x, list(range(len(self.candidates))) if ids is None else list(ids))

    def results(self) -> list[StitchResult]:
        return [c.result() for c in self.candidates]


def _run_name(fragments: list[Fragment]) -> str:
    """'resnet20[0-3] > resnet32[5-14]': consecutive fragments of one network as a range."""
    runs: list[list[Fragment]] = []
    for f in fragments:
        if runs and runs[-1][-1].source == f.source and runs[-1][-1].position + 1 == f.position:
            runs[-1].append(f)
        else:
            runs.append([f])
    parts = [f"{r[0].source}[{r[0].position}{'-' + str(r[-1].position) if len(r) > 1 else ''}]" for r in runs]
    return " > ".join(parts)


def _bridge_text(src: Fragment, dst: Fragment, bridge: StitchingLayer, fused: bool) -> str:
    grid = "" if bridge.direct else f", {src.out_layout} {src.out_shape} -> {dst.in_layout} {dst.in_shape}"
    return f"{src.name} -> {dst.name}: affine {bridge.in_features}->{bridge.out_features}{grid}{' (fused)' if fused else ''}"


class _Assembler:
    """Turns finished search nodes into step modules, heads, costs and candidates."""

    def __init__(self, pool: FragmentPool, cfg: ComposeConfig, head: str, classes: Sequence[int] | None,
                 num_classes: int, device: torch.device, dtype: torch.dtype) -> None:
        self.pool, self.cfg, self.head, self.num_classes = pool, cfg, head, num_classes
        self.steps: dict[Any, Callable[[Tensor], Tensor]] = {}
        self.step_cost: dict[Any, tuple[int, int]] = {}  # params, flops
        self.owned: list[nn.Module] = []
        self.fused: set[int] = set()
        self.device, self.dtype = device, dtype
        self.select = SelectLogits(classes).to(device) if head == "original" and classes is not None else None
        if self.select is not None:
            self.owned.append(self.select)

    def probe(self, shape: tuple[int, ...]) -> Tensor:
        return torch.zeros(1, *shape, device=self.device, dtype=self.dtype)

    def node_step(self, node: SearchNode) -> Any:
        key = ("node", node.id)
        if key in self.steps:
            return key
        g = self.pool.fragments[node.fragment]
        new_head = g.produces_output and self.head != "original"
        run = g.module.features if new_head else g.module
        params, flops = g.params, g.flops
        if new_head:  # the old classifier is not used: drop its cost (the new head adds its own)
            cls_flops = count_flops(g.module.classifier, self.probe(self.feature_shape(node)))[1]
            params, flops = params - sum(p.numel() for p in g.module.classifier.parameters()), flops - cls_flops
        if node.bridge is None:
            step: Callable[[Tensor], Tensor] = run
        else:
            src = self.pool.fragments[node.parent.fragment]
            fused = fuse_bridge(node.bridge, g) if self.cfg.fuse and not g.produces_output else None
            if fused is not None:
                self.fused.add(node.id)
                first = g.first_op
                folded = fused.owned[0]
                params += sum(p.numel() for p in folded.parameters()) - sum(p.numel() for p in first.parameters())
                flops = count_flops(fused, self.probe(src.out_shape))[1]
                step = fused
            else:
                params += sum(p.numel() for p in node.bridge.parameters())
                flops += count_flops(node.bridge, self.probe(src.out_shape))[1]
                step = Steps([node.bridge, run], [node.bridge, g.module])
            self.owned.append(step if fused is not None else node.bridge)
        self.steps[key] = step
        self.step_cost[key] = (params, flops)
        return key

    def feature_shape(self, node: SearchNode) -> tuple[int, ...]:
        return tuple(node.features.shape[1:])

    def head_step(self, node: SearchNode, rank: int, labels: Tensor | None) -> Any | None:
        if self.head == "original":
            if self.select is None:
                return None
            self.steps.setdefault(("select",), self.select)
            self.step_cost[("select",)] = (0, 0)
            return ("select",)
        head = fit_head(self.head, node.features, labels, self.num_classes, self.cfg.head_ridge).to(self.device)
        key = ("head", rank)
        self.steps[key] = head
        self.owned.append(head)
        self.step_cost[key] = (sum(p.numel() for p in head.parameters()), count_flops(head, self.probe(self.feature_shape(node)))[1])
        return key

    def candidate(self, rank: int, node: SearchNode, labels: Tensor | None) -> Candidate:
        path = node.path()
        frags = [self.pool.fragments[n.fragment] for n in path]
        keys = [self.node_step(n) for n in path]
        head_key = self.head_step(node, rank, labels)
        keys += [head_key] if head_key is not None else []
        params = sum(self.step_cost[k][0] for k in keys)
        flops = sum(self.step_cost[k][1] for k in keys)
        bridges = [
            _bridge_text(self.pool.fragments[n.parent.fragment], self.pool.fragments[n.fragment], n.bridge, n.id in self.fused)
            for n in path if n.bridge is not None
        ]
        return Candidate(rank, _run_name(frags), [f.name for f in frags], [n.cka for n in path[1:]], node.score,
                         bridges, params, flops, node.pure, tuple(keys))


def _resolve_head(head: str, classes: Sequence[int] | None, num_classes: int, pool_classes: int) -> str:
    if head != "auto":
        return head
    return "original" if classes is None and num_classes == pool_classes else "ridge"


def pool_num_classes(pool: FragmentPool) -> int:
    sizes = {f.out_shape[-1] for f in pool.fragments if f.produces_output}
    if len(sizes) != 1:
        raise ValueError(f"the pool's output fragments predict different numbers of classes {sorted(sizes)}")
    return sizes.pop()


@torch.no_grad()
def compose(
    pool: FragmentPool,
    x: Tensor,
    y: Tensor | None = None,
    config: ComposeConfig | None = None,
    classes: Sequence[int] | None = None,
    num_classes: int | None = None,
    activations: PoolActivations | None = None,
    cache: bool = True,
    progress: bool = True,
    **overrides: Any,
) -> Composition:
    """Compose networks from ``pool`` on the samples ``x`` (labels ``y``, needed for fitted heads).

    ``classes``: the task's classes as indices of the pool's classes (a subset, e.g. ``[3, 5]``), or
    None when the task is the pool's own or unrelated (then give ``num_classes``). Settings come from
    ``config`` with keyword ``overrides`` (``compose(pool, x, y, span=3)``). Returns every finished
    network, ranked by score (product of CKAs). Raises :class:`NoCompositionError` when none finishes.
    """
    cfg = dataclasses.replace(config or ComposeConfig(), **overrides)
    if x.ndim < 2 or x.shape[0] < 2:
        raise ValueError(f"StitchNet needs at least 2 samples to compute CKA and fit bridges, got x of shape {tuple(x.shape)}")
    pool_classes = pool_num_classes(pool)
    if classes is not None:
        bad = [c for c in classes if not 0 <= c < pool_classes]
        if bad or len(set(classes)) != len(classes):
            raise ValueError(f"classes {list(classes)} must be distinct indices of the pool's {pool_classes} classes (bad: {bad})")
    k = len(classes) if classes is not None else (num_classes or pool_classes)
    head = _resolve_head(cfg.head, classes, k, pool_classes)
    if head == "original" and classes is None and k != pool_classes:
        raise ValueError(f"head 'original' predicts the pool's {pool_classes} classes, but the task has {k}: "
                         "give classes (a subset of the pool's) or use head 'ridge' / 'class_means'")
    if head != "original":
        if y is None or y.shape != (x.shape[0],):
            raise ValueError(f"head {head!r} is fitted from labelled samples: need y of shape ({x.shape[0]},), got "
                             f"{None if y is None else tuple(y.shape)}")
        if int(y.min()) < 0 or int(y.max()) >= k:
            raise ValueError(f"labels must lie in 0..{k - 1} for a {k}-class task, got {int(y.min())}..{int(y.max())}")
    acts = activations or pool_activations(pool, x, cache=cache, batch_size=cfg.batch_size, progress=progress)
    search = Search(pool, acts, cfg)
    finished = search.run(progress)
    stats = search.stats
    if not finished:
        raise NoCompositionError(_failure_message(cfg, stats, pool))
    assembler = _Assembler(pool, cfg, head, classes, k, x.device, x.dtype)
    candidates = [assembler.candidate(rank, node, y) for rank, node in enumerate(finished)]
    log.info("StitchNet: %d networks from %d expansions in %.1f s", len(candidates), stats.expansions, stats.seconds)
    return Composition(candidates, assembler.steps, assembler.owned, stats, head, k)


def _failure_message(cfg: ComposeConfig, stats: SearchStats, pool: FragmentPool) -> str:
    parts = [f"no network reached an output fragment (threshold T={cfg.threshold}, span K={cfg.span}, "
             f"max_fragments={cfg.max_fragments}, {len(pool)} fragments, {stats.samples} samples, {stats.expansions} expansions)"]
    if stats.best_rejected is not None:
        score, where = stats.best_rejected
        parts.append(f"the best extension below T scored {score:.3f} ({where}): lower the threshold")
    if stats.incompatible_pairs:
        parts.append(f"{stats.incompatible_pairs} fragment pairs had no bridge (vector <-> map activations)")
    if stats.dead_ends:
        parts.append(f"{stats.dead_ends} partial networks hit max_fragments={cfg.max_fragments} or had no candidate")
    return "; ".join(parts)


@torch.no_grad()
def evaluate(composition: Composition, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device | str = "cpu",
             progress: bool = True) -> list[Candidate]:
    """Top-1/top-5 accuracy (%) of every candidate over ``batches``, one pass, shared prefixes once."""
    scores = StitchScores([c.id for c in composition.candidates])
    for x, y in tqdm(batches, desc="evaluating candidates", disable=not progress):
        x, y = x.to(device), y.to(device)
        for i, logits in composition.forward_many(x).items():
            scores.update(i, logits, y)
    accuracies = scores.accuracies()
    for c in composition.candidates:
        c.acc1, c.acc5 = accuracies[c.id]
    return composition.candidates


def print_candidates(composition: Composition, limit: int | None = None) -> None:
    """The ranked candidates with CKA score, cost and accuracy (where measured) as a table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"StitchNet candidates (head: {composition.head}, {composition.stats.samples} samples)")
    for col in ("rank", "network", "score", "min CKA", "bridges", "params (M)", "GFLOPs", "top-1 %"):
        table.add_column(col, justify="left" if col == "network" else "right")
    for c in composition.candidates[:limit]:
        table.add_row(str(c.id), c.name + (" (anchor)" if c.is_anchor else ""), f"{c.score:.3f}",
                      f"{min(c.ckas):.3f}" if c.ckas else "-", str(len(c.bridges)), f"{c.params / 1e6:.3f}",
                      f"{c.flops / 1e9:.4f}", "-" if c.acc1 is None else f"{c.acc1:.2f}")
    Console(width=max(120, Console().width)).print(table)


def save_candidates(composition: Composition, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """The ranked candidates (fragments, CKAs, bridges, cost, accuracy) and search statistics as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"head": composition.head, "num_classes": composition.num_classes, "search": asdict(composition.stats),
               **(extra or {}), "candidates": [c.to_dict() for c in composition.candidates]}
    path.write_text(json.dumps(payload, indent=1))
    return path
