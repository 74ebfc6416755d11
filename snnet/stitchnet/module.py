"""StitchNet (Teerapittayanon et al. 2023, arXiv 2301.01947): compose a network from pretrained
fragments with no backpropagation, guided by CKA; and its zero-epoch LightningModule.

Algorithm 1 of the paper, as implemented by :func:`compose`:

1. Every fragment that takes the input starts a partial network (score 1).
2. A partial network is extended by the fragments not yet on it, ranked by the linear CKA between
   its current output and the activations each candidate normally receives (its own network's
   activation at that point, on the same samples). Activations are compared with spatial positions
   as samples and channels as features, after bringing the current output onto the candidate's
   grid -- a random subset (``cka_rows``) of the very rows the bridge is fitted on (as the paper's
   code does, resizing instead of flattening); only the sampled rows are interpolated
   (:meth:`~snnet.stitching.StitchingLayer.fit_rows_at`), not whole maps. At most ``span`` (K)
   candidates are kept per step, and only those whose score --
   the product of CKAs along the path -- stays above ``threshold`` (T; the paper's code prunes on
   this product, ``totalThreshold``, which also drops any single step below T).
3. A fragment that produces the output finishes a network; more than ``max_fragments`` fragments
   is a dead end.

Bridges: the next fragment's own predecessor is connected directly (it receives what it was
trained on); any other fragment gets a least-squares affine map (1x1 conv / linear, float64 normal
equations) from the current output to the activations it normally receives, after token<->map
conversion and bilinear resize (:class:`~snnet.stitching.StitchingLayer`), fitted on the same
samples. ``fuse=True`` folds the bridge into the next fragment's first Conv2d / Linear where there
is one (layer granularity; residual blocks use their input twice, so nothing can be folded into
them); a padded conv gets an exact position-dependent bias map for the bridge's bias.

Where we depart from the paper, and why:

* Search order is best-first (highest score first) instead of depth-first. The tree -- and so
  the set of networks once it is exhausted (``max_networks: null``) -- is the same; the order
  matters only under the cap ``max_networks`` (ours; the paper has none), which then keeps the
  highest-scoring networks instead of the first ones one branch of the DFS reaches. With residual
  CIFAR pools the full tree has thousands of leaves (neighbouring blocks' inputs have CKA ~0.9),
  so a cap is needed.
* No SGD clean-up of the bridges after the least-squares fit (the paper's code runs one epoch at
  lr 1e-6): composition stays backpropagation-free.
* New tasks get a closed-form head (:mod:`snnet.stitchnet.heads`, ridge by default) instead of KNN on
  the 1000-d outputs.
"""
from __future__ import annotations

import dataclasses
import heapq
import json
import logging
import time
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import lightning as L
import torch
import torch.nn as nn
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy
from tqdm.auto import tqdm

from snnet.cka import ReferenceFeatures
from snnet.config import as_config
from snnet.lstsq import AffineLstsq
from snnet.metrics import StitchScores
from snnet.prefix_tree import PrefixTree
from snnet.profiling import count_flops
from snnet.results import StitchResult
from snnet.stitching import StitchingLayer, channels_last, from_channels_last
from snnet.stitchnet.fragments import (
    Fragment,
    FragmentPool,
    Granularity,
    PoolActivations,
    Steps,
    build_fragment_pool,
    pool_activations,
    run_batched,
)
from snnet.stitchnet.heads import HEADS, fit_head

log = logging.getLogger(__name__)

HeadChoice = Literal["auto", "original", "ridge", "class_means"]


@dataclass
class ComposeConfig:
    """StitchNet search settings; span, threshold and max_fragments default to the paper's.

    ``max_networks``: stop after this many finished networks (best-first, so the best-scoring
    ones); null explores the whole tree. ``cka_rows``: rows (sample x position) drawn once at random
    for each CKA, null for all; bridges are always fitted on all rows. ``head``: ``original`` (the
    last fragment's classifier; with a class subset, its logits of those classes), ``ridge`` or
    ``class_means`` (closed form from the samples, see :mod:`snnet.stitchnet.heads`), or ``auto`` (original
    when the task's classes are the pool's, else ridge). ``memory_mb``: activations of partial
    networks kept during the search (least recently used ones are recomputed when needed).
    """

    span: int = 2
    threshold: float = 0.5
    max_fragments: int = 16
    max_networks: int | None = 32
    fuse: bool = False
    cka_rows: int | None = 2048
    bridge_ridge: float = 0.0
    head: HeadChoice = "auto"
    head_ridge: float | None = None  # None: chosen by leave-one-out on the samples
    batch_size: int = 64
    memory_mb: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if self.span < 1:
            raise ValueError(f"span (K) must be >= 1, got {self.span}")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold (T) must be in [0, 1), got {self.threshold}")
        if self.max_fragments < 1:
            raise ValueError(f"max_fragments must be >= 1, got {self.max_fragments}")
        if self.max_networks is not None and self.max_networks < 1:
            raise ValueError(f"max_networks must be >= 1 or null, got {self.max_networks}")
        if self.memory_mb < 1:
            raise ValueError(f"memory_mb must be >= 1, got {self.memory_mb}")
        if self.cka_rows is not None and self.cka_rows < 2:
            raise ValueError(f"cka_rows must be >= 2 or null, got {self.cka_rows}")
        if self.head not in ("auto", *HEADS):
            raise ValueError(f"unknown head {self.head!r}; choose one of {('auto', *HEADS)}")


class NoCompositionError(ValueError):
    """The search finished no network; the message says what stopped it."""


# --- bridges ----------------------------------------------------------------------------------
Spec = tuple[str, tuple[int, ...], int]  # layout, shape without batch, prefix tokens


def out_spec(f: Fragment) -> Spec:
    return f.out_layout, f.out_shape, f.out_prefix_tokens


def in_spec(f: Fragment) -> Spec:
    return f.in_layout, f.in_shape, f.in_prefix_tokens


def make_bridge(src: Spec, dst: Spec) -> StitchingLayer:
    """An (unfitted) bridge between two activation specs; raises ValueError when none exists."""
    (in_layout, in_shape, in_prefix), (out_layout, out_shape, out_prefix) = src, dst
    return StitchingLayer(in_shape, out_shape, in_layout, out_layout, in_prefix, out_prefix)


def target_rows(x: Tensor, layout: str) -> Tensor:
    """(samples x positions, channels) rows of a fragment's input in its own layout."""
    x = channels_last(x, layout)
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def fit_bridge(bridge: StitchingLayer, source: Tensor, target: Tensor, target_layout: str, ridge: float = 0.0,
               batch_size: int = 64) -> StitchingLayer:
    """Least-squares fit of ``bridge`` mapping ``source`` activations onto ``target`` ones."""
    system = AffineLstsq(1, bridge.in_features, bridge.out_features, device=source.device)
    for src, tgt in zip(source.split(batch_size), target.split(batch_size)):
        system.update(0, bridge.fit_rows(src), target_rows(tgt, target_layout))
    weight, bias = system.solve(ridge)
    bridge.set_affine(weight[0], bias[0])
    return bridge.to(source.dtype)


class FoldedConv(nn.Module):
    """conv(A x + b) as conv'(x) + B: conv' has the weights K A; B = conv(b broadcast over the grid),
    a fixed map, exact at the zero-padded borders too (where conv of a constant is not constant)."""

    def __init__(self, conv: nn.Conv2d, bias_map: Tensor) -> None:
        super().__init__()
        self.conv = conv
        self.register_buffer("bias_map", bias_map)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) + self.bias_map


def _aligned(bridge: StitchingLayer) -> Callable[[Tensor], Tensor]:
    return lambda x: from_channels_last(bridge.align(x), bridge.out_layout)


@torch.no_grad()
def fuse_bridge(bridge: StitchingLayer, fragment: Fragment) -> nn.Module | None:
    """``fragment`` with ``bridge`` folded into its first Conv2d/Linear, or None where it has none
    (blocks of residual nets, output fragments) or the op is grouped."""
    first = fragment.first_op
    weight, bias = bridge.proj.weight.flatten(1), bridge.proj.bias  # (out_b, in_b), (out_b,)
    if isinstance(first, nn.Linear):
        folded: nn.Module = nn.Linear(weight.shape[1], first.out_features, device=weight.device, dtype=weight.dtype)
        folded.weight.copy_(first.weight @ weight)
        folded.bias.copy_(first.weight @ bias + (first.bias if first.bias is not None else 0.0))
    elif isinstance(first, nn.Conv2d) and first.groups == 1:
        conv = nn.Conv2d(weight.shape[1], first.out_channels, first.kernel_size, first.stride, first.padding,
                         first.dilation, bias=False, padding_mode=first.padding_mode, device=weight.device, dtype=weight.dtype)
        conv.weight.copy_(torch.einsum("ockl,ci->oikl", first.weight, weight))
        constant = bias.reshape(1, -1, 1, 1).expand(1, -1, *fragment.in_shape[1:])
        folded = FoldedConv(conv, first(constant)[0])
    else:
        return None
    already_aligned = bridge.in_layout == "vector" or (bridge.direct and bridge.in_layout == "nchw")
    align: list[Callable[[Tensor], Tensor]] = [] if already_aligned else [_aligned(bridge)]
    return Steps([*align, folded, *fragment.rest], [folded, *[m for m in fragment.rest if isinstance(m, nn.Module)]])


# --- the search -------------------------------------------------------------------------------
@dataclass(eq=False)
class _Node:
    id: int
    fragment: int
    parent: "_Node | None"
    cka: float
    score: float
    depth: int
    native: bool  # the fragment follows its own predecessor: connected directly, no bridge
    pure: bool  # one network's own chain from its start: activations come from the cache
    bridge: StitchingLayer | None = None  # fitted the first time the node's output is computed
    features: Tensor | None = None  # finished networks: pre-logits features on the samples, for the head

    def path(self) -> list["_Node"]:
        nodes, node = [], self
        while node is not None:
            nodes.append(node)
            node = node.parent
        return nodes[::-1]

    def used(self) -> set[int]:
        return {n.fragment for n in self.path()}


@dataclass
class SearchStats:
    samples: int
    expansions: int = 0
    nodes: int = 0
    dead_ends: int = 0
    incompatible_pairs: int = 0
    rank_deficient_bridges: int = 0  # dead or duplicate channels: minimum-norm least squares
    best_rejected: tuple[float, str] | None = None  # best score that fell below T, and where
    seconds: float = 0.0


class _Search:
    def __init__(self, pool: FragmentPool, acts: PoolActivations, cfg: ComposeConfig) -> None:
        self.pool, self.acts, self.cfg = pool, acts, cfg
        self.n = acts.inputs[0].shape[0]
        self.stats = SearchStats(samples=self.n)
        self._aligners: dict[tuple[Spec, Spec], StitchingLayer | None] = {}
        self._rows: dict[int, Tensor] = {}
        self._outputs: OrderedDict[int, Tensor] = OrderedDict()
        self._bytes = 0
        self._refs: dict[Spec, tuple[list[int], ReferenceFeatures, int]] | None = None
        self._ids = 0

    # -- CKA ------------------------------------------------------------------------------------
    def aligner(self, src: Spec, dst: Spec) -> StitchingLayer | None:
        key = (src, dst)
        if key not in self._aligners:
            try:
                self._aligners[key] = make_bridge(src, dst)
            except ValueError:
                self._aligners[key] = None
        return self._aligners[key]

    def row_index(self, total: int, device: torch.device) -> Tensor | None:
        if self.cfg.cka_rows is None or total <= self.cfg.cka_rows:
            return None
        if total not in self._rows:
            gen = torch.Generator().manual_seed(self.cfg.seed)
            self._rows[total] = torch.randperm(total, generator=gen)[: self.cfg.cka_rows].sort().values
        return self._rows[total].to(device)

    def references(self) -> dict[Spec, tuple[list[int], ReferenceFeatures, int]]:
        """Candidates grouped by the activation they normally receive, their (sub-sampled) rows
        centred once, and the group's row count: every later CKA against a group is one batched
        matmul."""
        if self._refs is None:
            groups: dict[Spec, list[int]] = {}
            for j, g in enumerate(self.pool.fragments):
                if not g.takes_input:
                    groups.setdefault(in_spec(g), []).append(j)
            self._refs = {}
            for spec, members in groups.items():
                rows = [target_rows(self.acts.inputs[j], spec[0]) for j in members]
                idx = self.row_index(rows[0].shape[0], rows[0].device)
                self._refs[spec] = (members, ReferenceFeatures([r if idx is None else r[idx] for r in rows], "float32"),
                                    rows[0].shape[0])
        return self._refs

    def ckas(self, node: _Node) -> dict[int, float]:
        """CKA between the node's output and every unused candidate's usual input."""
        used, src = node.used(), out_spec(self.pool.fragments[node.fragment])
        out: dict[int, float] = {}
        for spec, (members, refs, total) in self.references().items():
            aligner = self.aligner(src, spec)
            if aligner is None:
                self.stats.incompatible_pairs += sum(j not in used for j in members)
                continue
            output = self.output(node)
            idx = self.row_index(total, output.device)  # the references' rows: only those are aligned
            rows = aligner.fit_rows(output) if idx is None else aligner.fit_rows_at(output, idx)
            values = torch.nan_to_num(refs.cka(rows), nan=0.0)
            out.update((j, v) for j, v in zip(members, values.tolist()) if j not in used)
        successor = self.pool.successor(node.fragment)
        if node.pure and successor is not None:
            out[successor] = 1.0  # exactly: the current output *is* its own next fragment's input
        return out

    # -- nodes ----------------------------------------------------------------------------------
    def new_node(self, fragment: int, parent: _Node | None, cka: float) -> _Node:
        """A frontier entry: its score is known from the parent's CKA; its output is computed only
        if it is ever popped, so children left on the frontier cost nothing."""
        native = parent is not None and self.pool.successor(parent.fragment) == fragment
        node = _Node(
            id=self._ids, fragment=fragment, parent=parent, cka=cka, score=(parent.score if parent else 1.0) * cka,
            depth=(parent.depth + 1) if parent else 1, native=native, pure=parent is None or (parent.pure and native),
        )
        self._ids += 1
        self.stats.nodes += 1
        return node

    def output(self, node: _Node) -> Tensor:
        """The node's output on the samples (pre-logits features for output fragments).

        Pure chains read the activation cache. Other outputs live in a least-recently-used store of
        ``memory_mb``; an evicted one is recomputed from its nearest stored ancestor with the
        bridges already fitted, so memory stays bounded however large the frontier grows.
        """
        f = self.pool.fragments[node.fragment]
        if node.pure:
            return self.acts.features[node.fragment] if f.produces_output else self.acts.outputs[node.fragment]
        stored = self._outputs.get(node.id)
        if stored is not None:
            self._outputs.move_to_end(node.id)
            return stored
        x = self.output(node.parent)
        if not node.native:
            if node.bridge is None:
                node.bridge = self.fit_bridge(node, x)
            x = run_batched(node.bridge, x, self.cfg.batch_size)
        out = run_batched(f.module.features if f.produces_output else f.module, x, self.cfg.batch_size)
        self._outputs[node.id] = out
        self._bytes += out.numel() * out.element_size()
        while self._bytes > self.cfg.memory_mb * 2**20 and len(self._outputs) > 1:
            _, old = self._outputs.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()
        return out

    def fit_bridge(self, node: _Node, x: Tensor) -> StitchingLayer:
        g = self.pool.fragments[node.fragment]
        bridge = make_bridge(out_spec(self.pool.fragments[node.parent.fragment]), in_spec(g)).to(x.device)
        with warnings.catch_warnings(record=True) as caught:  # counted in the stats, not one warning per bridge
            warnings.simplefilter("always")
            bridge = fit_bridge(bridge, x, self.acts.inputs[node.fragment], g.in_layout, self.cfg.bridge_ridge, self.cfg.batch_size)
        self.stats.rank_deficient_bridges += any("rank-deficient" in str(w.message) for w in caught)
        return bridge

    def note_rejected(self, score: float, parent: _Node, j: int) -> None:
        if self.stats.best_rejected is None or score > self.stats.best_rejected[0]:
            where = f"{self.pool.fragments[parent.fragment].name} -> {self.pool.fragments[j].name}"
            self.stats.best_rejected = (score, where)

    @torch.no_grad()
    def run(self, progress: bool) -> list[_Node]:
        start = time.perf_counter()
        cfg = self.cfg
        frontier: list[tuple[float, int, int, _Node]] = []

        def push(node: _Node) -> None:
            heapq.heappush(frontier, (-node.score, -node.depth, node.id, node))

        for i, f in enumerate(self.pool.fragments):
            if f.takes_input:
                push(self.new_node(i, None, 1.0))
        finished: list[_Node] = []
        bar = tqdm(desc="StitchNet search", unit=" expansions", disable=not progress, mininterval=2.0)
        while frontier and (cfg.max_networks is None or len(finished) < cfg.max_networks):
            node = heapq.heappop(frontier)[-1]
            if self.pool.fragments[node.fragment].produces_output:
                node.features = self.output(node)
                finished.append(node)
                bar.set_postfix(networks=len(finished), best=f"{finished[0].score:.3f}")
                continue
            if node.depth >= cfg.max_fragments:  # a dead end: never computed
                self.stats.dead_ends += 1
                continue
            ranked = sorted(self.ckas(node).items(), key=lambda item: -item[1])
            for j, cka in ranked[: cfg.span]:
                if node.score * cka > cfg.threshold:
                    push(self.new_node(j, node, cka))
                else:
                    self.note_rejected(node.score * cka, node, j)
            if not ranked:
                self.stats.dead_ends += 1
            self.stats.expansions += 1
            bar.update()
        bar.close()
        self.stats.seconds = time.perf_counter() - start
        return finished


# --- composed candidates ----------------------------------------------------------------------
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

    def node_step(self, node: _Node) -> Any:
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

    def feature_shape(self, node: _Node) -> tuple[int, ...]:
        return tuple(node.features.shape[1:])

    def head_step(self, node: _Node, rank: int, labels: Tensor | None) -> Any | None:
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

    def candidate(self, rank: int, node: _Node, labels: Tensor | None) -> Candidate:
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
    search = _Search(pool, acts, cfg)
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


# --- the zero-epoch LightningModule -----------------------------------------------------------
@dataclass
class PoolConfig:
    """Which pretrained networks to cut: timm names, hub weights or local checkpoints (one per model)."""

    models: list[str]
    checkpoints: list[str | None] | None = None
    pretrained: bool = True
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    granularity: Granularity = "block"
    input_size: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("pool.models is empty: list at least one timm model name")
        if self.checkpoints and len(self.checkpoints) != len(self.models):
            raise ValueError(f"pool.checkpoints has {len(self.checkpoints)} entries for {len(self.models)} models {self.models}")


def build_pool(cfg: PoolConfig) -> FragmentPool:
    from snnet.anchors import create_anchor

    checkpoints = cfg.checkpoints or [None] * len(cfg.models)
    models = {
        name: create_anchor(name, pretrained=cfg.pretrained and ckpt is None, checkpoint=ckpt, **cfg.model_kwargs)
        for name, ckpt in zip(cfg.models, checkpoints)
    }
    return build_fragment_pool(models, cfg.granularity, cfg.input_size)


class StitchNetModule(L.LightningModule):
    """StitchNet as a zero-epoch Lightning run (``trainer.max_epochs: 0``): the networks are
    composed in ``setup`` from ``samples`` un-augmented training images of the datamodule (its
    ``classes`` subset, if any, is the task), with no optimizer; validation scores every candidate
    and reports them ranked by CKA score (``results`` for :class:`~snnet.callbacks.StitchReport`,
    plus ``stitchnet_candidates.json`` with fragments, CKAs and bridges)."""

    def __init__(self, pool: PoolConfig, compose: ComposeConfig = ComposeConfig(), samples: int = 32,
                 cache: bool = True, out_dir: str | None = None) -> None:
        super().__init__()
        self.pool_cfg, self.compose_cfg = as_config(PoolConfig, pool), as_config(ComposeConfig, compose)
        if samples < 2:
            raise ValueError(f"samples must be >= 2 (CKA and the bridges are fitted on them), got {samples}")
        self.samples, self.cache, self.out_dir = samples, cache, out_dir
        self.save_hyperparameters({"pool": asdict(self.pool_cfg), "compose": asdict(self.compose_cfg), "samples": samples,
                                   "cache": cache, "out_dir": out_dir})
        self.pool = build_pool(self.pool_cfg)
        self.pool_models = nn.ModuleDict(self.pool.models)
        self.composition: Composition | None = None
        self.val_acc1 = nn.ModuleList()
        self.val_acc5 = nn.ModuleList()
        self.results: list[StitchResult] = []

    @property
    def data_config(self) -> dict[str, Any]:
        """timm data config of the first pool model, sized to the pool's input, for the datamodule."""
        from timm.data import resolve_data_config

        cfg = resolve_data_config(model=next(iter(self.pool.models.values())))
        cfg["input_size"] = self.pool.input_size
        return cfg

    def setup(self, stage: str) -> None:
        if self.composition is not None:
            return
        if stage == "fit" and self.trainer.max_epochs != 0:
            raise ValueError(f"StitchNet composes without training: set trainer.max_epochs: 0 (got {self.trainer.max_epochs})")
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "calibration_batch"):
            raise RuntimeError("StitchNet needs a datamodule with calibration_batch(n) for its samples")
        x, y = dm.calibration_batch(self.samples)
        classes = getattr(dm, "classes", None)
        device = self.trainer.strategy.root_device
        self.to(device)
        self.composition = compose(self.pool, x.to(device), y.to(device), self.compose_cfg, classes=classes,
                                   num_classes=None if classes else dm.num_classes, cache=self.cache)
        k = self.composition.num_classes
        self.val_acc1 = nn.ModuleList(MulticlassAccuracy(k, top_k=1, average="micro") for _ in self.composition.candidates)
        self.val_acc5 = nn.ModuleList(MulticlassAccuracy(k, top_k=min(5, k), average="micro") for _ in self.composition.candidates)
        self.results = self.composition.results()
        if self.trainer.global_rank == 0:
            print_candidates(self.composition)
        self._save(None)

    def forward(self, x: Tensor, candidate: int = 0) -> Tensor:
        return self.composition(x, candidate)

    def configure_optimizers(self) -> None:
        return None  # nothing is trained

    def training_step(self, batch: Any, batch_idx: int) -> None:
        """Never runs with ``max_epochs: 0``; Lightning only requires that it exists."""
        raise RuntimeError("StitchNet composes without training: run with trainer.max_epochs: 0")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        for i, logits in self.composition.forward_many(x).items():
            self.val_acc1[i].update(logits, y)
            self.val_acc5[i].update(logits, y)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            for metric in [*self.val_acc1, *self.val_acc5]:
                metric.reset()
            return
        for c, a1, a5 in zip(self.composition.candidates, self.val_acc1, self.val_acc5):
            c.acc1, c.acc5 = float(a1.compute()) * 100, float(a5.compute()) * 100
            a1.reset()
            a5.reset()
        self.results = self.composition.results()
        stage = "test" if self.trainer.state.fn == "test" else "val"
        self.log_dict({f"{stage}/acc1_candidate_{c.id:03d}": c.acc1 for c in self.composition.candidates})
        if self.trainer.global_rank == 0:
            print_candidates(self.composition)
        self._save(stage)

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    def _save(self, stage: str | None) -> None:
        if self.trainer.global_rank != 0:
            return
        root = Path(self.out_dir or self.trainer.log_dir or self.trainer.default_root_dir)
        name = f"{stage}_stitchnet_candidates.json" if stage else "stitchnet_candidates.json"
        path = save_candidates(self.composition, root / name, {"samples": self.samples})
        log.info("StitchNet candidates written to %s", path)
