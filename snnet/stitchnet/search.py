"""StitchNet's search (Algorithm 1): best-first over partial networks, ranked by CKA, with its settings."""
from __future__ import annotations

import heapq
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from snnet.cka import ReferenceFeatures
from snnet.stitching import StitchingLayer
from snnet.stitchnet.bridges import (
    Spec,
    fit_bridge,
    in_spec,
    make_bridge,
    out_spec,
    target_rows,
)
from snnet.stitchnet.fragments import (
    FragmentPool,
    PoolActivations,
    run_batched,
)
from snnet.stitchnet.heads import HEADS

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


@dataclass(eq=False)
class SearchNode:
    id: int
    fragment: int
    parent: "SearchNode | None"
    cka: float
    score: float
    depth: int
    native: bool  # the fragment follows its own predecessor: connected directly, no bridge
    pure: bool  # one network's own chain from its start: activations come from the cache
    bridge: StitchingLayer | None = None  # fitted the first time the node's output is computed
    features: Tensor | None = None  # finished networks: pre-logits features on the samples, for the head

    def path(self) -> list["SearchNode"]:
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


class Search:
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

    def ckas(self, node: SearchNode) -> dict[int, float]:
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
    def new_node(self, fragment: int, parent: SearchNode | None, cka: float) -> SearchNode:
        """A frontier entry: its score is known from the parent's CKA; its output is computed only
        if it is ever popped, so children left on the frontier cost nothing."""
        native = parent is not None and self.pool.successor(parent.fragment) == fragment
        node = SearchNode(
            id=self._ids, fragment=fragment, parent=parent, cka=cka, score=(parent.score if parent else 1.0) * cka,
            depth=(parent.depth + 1) if parent else 1, native=native, pure=parent is None or (parent.pure and native),
        )
        self._ids += 1
        self.stats.nodes += 1
        return node

    def output(self, node: SearchNode) -> Tensor:
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

    def fit_bridge(self, node: SearchNode, x: Tensor) -> StitchingLayer:
        g = self.pool.fragments[node.fragment]
        bridge = make_bridge(out_spec(self.pool.fragments[node.parent.fragment]), in_spec(g)).to(x.device)
        with warnings.catch_warnings(record=True) as caught:  # counted in the stats, not one warning per bridge
            warnings.simplefilter("always")
            bridge = fit_bridge(bridge, x, self.acts.inputs[node.fragment], g.in_layout, self.cfg.bridge_ridge, self.cfg.batch_size)
        self.stats.rank_deficient_bridges += any("rank-deficient" in str(w.message) for w in caught)
        return bridge

    def note_rejected(self, score: float, parent: SearchNode, j: int) -> None:
        if self.stats.best_rejected is None or score > self.stats.best_rejected[0]:
            where = f"{self.pool.fragments[parent.fragment].name} -> {self.pool.fragments[j].name}"
            self.stats.best_rejected = (score, where)

    @torch.no_grad()
    def run(self, progress: bool) -> list[SearchNode]:
        start = time.perf_counter()
        cfg = self.cfg
        frontier: list[tuple[float, int, int, SearchNode]] = []

        def push(node: SearchNode) -> None:
            heapq.heappush(frontier, (-node.score, -node.depth, node.id, node))

        for i, f in enumerate(self.pool.fragments):
            if f.takes_input:
                push(self.new_node(i, None, 1.0))
        finished: list[SearchNode] = []
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
