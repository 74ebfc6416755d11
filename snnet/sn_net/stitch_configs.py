"""SN-Net's stitch configuration generator, as pure functions over block depths.

Reproduces the reference generator (sliding windows, nearest pairs, fast-to-slow, stage-local
stitching for hierarchical families, nearest interpolation of block ids for unequal depths) with
two deliberate fixes, both documented in docs/how-it-works.md:

* for unequal depths, stitches that read the same front block share one stitching layer (the
  reference groups them by list position, an accident of ``zip``);
* a stitch that enters the end anchor at block 0 is fitted to the end anchor's stem output (the
  reference reads block ``-1``, i.e. the last block).

``two_way=True`` generates SN-Netv2's space instead (``two_way_configs``): both directions and
two-hop routes within each adjacent pair of isotropic anchors.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AnchorDepths:
    """What the generator needs to know about one anchor."""

    stage_depths: tuple[int, ...]
    stitch_stages: tuple[int, ...]
    isotropic: bool

    def __post_init__(self) -> None:
        bad = [s for s in self.stitch_stages if not 0 <= s < len(self.stage_depths)]
        if bad:
            raise ValueError(
                f"stitch stages {bad} do not exist: these anchors have stages 0..{len(self.stage_depths) - 1} "
                f"with depths {self.stage_depths}"
            )

    def stage_offset(self, stage: int) -> int:
        return sum(self.stage_depths[:stage])


@dataclass(frozen=True)
class LayerSpec:
    """One stitching layer: front anchor's block ``j`` output -> end anchor's block ``k`` input."""

    front: int
    end: int
    stage: int
    pairs: tuple[tuple[int, int], ...]  # global (j, k) block ids that share this layer


@dataclass(frozen=True)
class Hop:
    front: int
    end: int
    front_block: int  # last block the front anchor runs (global id)
    end_block: int  # first block the end anchor runs (global id)
    layer: int  # index into the network's stitching layers


@dataclass(frozen=True)
class StitchConfig:
    id: int
    anchors: tuple[int, ...]
    hops: tuple[Hop, ...]

    @property
    def is_anchor(self) -> bool:
        return not self.hops


def window_pairs(depth: int, kernel_size: int, stride: int, forward_only: bool) -> list[tuple[int, int, int]]:
    """(j, k, layer) for a window of ``kernel_size`` blocks sliding by ``stride``.

    Every new ordered pair in a window is a configuration; a window that adds pairs gets one
    shared stitching layer. ``forward_only`` keeps j < k (hierarchical families).
    """
    seen: set[tuple[int, int]] = set()
    out: list[tuple[int, int, int]] = []
    layer = 0
    for start in range(0, depth, stride):
        ids = range(start, min(start + kernel_size, depth))
        new = [(j, k) for j in ids for k in ids if (j, k) not in seen and (j < k or not forward_only)]
        for j, k in new:
            seen.add((j, k))
            out.append((j, k, layer))
        layer += bool(new)
    return out


def interpolated_pairs(front_depth: int, end_depth: int) -> list[tuple[int, int, int]]:
    """(j, k, layer) for unequal depths: end block k maps to front block j by nearest interpolation.

    Pairs are kept where k maps to j and j < k; pairs reading the same front block share a layer.
    """
    ids = torch.arange(front_depth, dtype=torch.float32, device="cpu")[None, None]  # also under `with torch.device("meta")`
    end_map = F.interpolate(ids, size=end_depth, mode="nearest").long().flatten().tolist()
    pairs = [(j, k) for j in range(front_depth) for k, m in enumerate(end_map) if m == j and j < k]
    layer_of = {j: i for i, j in enumerate(sorted({j for j, _ in pairs}))}
    return [(j, k, layer_of[j]) for j, k in pairs]


def stage_pairs(
    front: AnchorDepths, end: AnchorDepths, stage: int, kernel_size: int, stride: int
) -> list[tuple[int, int, int]]:
    """Stage-local (j, k, layer) pairs between two anchors."""
    d_front, d_end = front.stage_depths[stage], end.stage_depths[stage]
    if d_front == d_end:
        return window_pairs(d_front, kernel_size, stride, forward_only=not (front.isotropic and end.isotropic))
    return interpolated_pairs(d_front, d_end)


def common_stages(front: AnchorDepths, end: AnchorDepths) -> tuple[int, ...]:
    if len(front.stage_depths) != len(end.stage_depths):
        return ()
    return tuple(s for s in front.stitch_stages if s in end.stitch_stages)


def generate_stitch_configs(
    anchors: Sequence[AnchorDepths], kernel_size: int = 2, stride: int = 1, nearest: bool = True, two_way: bool = False
) -> tuple[list[StitchConfig], list[LayerSpec]]:
    """All configurations (anchors first, then stitches) and the stitching layers they use.

    Anchors must be ordered fast-to-slow. ``nearest`` stitches adjacent anchors only; otherwise
    every ordered subset of two or more anchors is a path, stitched once per consecutive pair.
    ``two_way``: SN-Netv2's space (``two_way_configs``) instead of SN-Net's.
    """
    if kernel_size < 1 or stride < 1:
        raise ValueError(f"kernel_size and stride must be >= 1, got kernel_size={kernel_size}, stride={stride}")
    if len(anchors) < 1:
        raise ValueError("need at least one anchor")
    if two_way:
        if (kernel_size, stride, nearest) != (2, 1, True):
            raise ValueError(
                f"two_way stitching has its own hop rule: it supports the defaults kernel_size=2, stride=1, "
                f"nearest=True only, got kernel_size={kernel_size}, stride={stride}, nearest={nearest}"
            )
        return two_way_configs(anchors)
    n = len(anchors)
    pair_list = [(a, a + 1) for a in range(n - 1)] if nearest else list(itertools.combinations(range(n), 2))
    for a, b in pair_list:
        if not common_stages(anchors[a], anchors[b]):
            raise ValueError(
                f"anchors {a} and {b} share no stitchable stage (stages {anchors[a].stage_depths} with "
                f"stitchable {anchors[a].stitch_stages} vs {anchors[b].stage_depths} with {anchors[b].stitch_stages})"
            )

    layers: list[LayerSpec] = []
    paths: list[tuple[Hop, ...]] = []
    hops_by_pair: dict[tuple[int, int], list[Hop]] = {p: [] for p in pair_list}
    stages = sorted({s for a, b in pair_list for s in common_stages(anchors[a], anchors[b])})
    for stage in stages:  # stage-major, as the reference hierarchical code
        for a, b in pair_list:
            if stage not in common_stages(anchors[a], anchors[b]):
                continue
            front, end = anchors[a], anchors[b]
            local = stage_pairs(front, end, stage, kernel_size, stride)
            first_layer = len(layers)
            grouped: dict[int, list[tuple[int, int]]] = {}
            for j, k, layer in local:
                gj, gk = front.stage_offset(stage) + j, end.stage_offset(stage) + k
                grouped.setdefault(layer, []).append((gj, gk))
                hop = Hop(a, b, gj, gk, first_layer + layer)
                hops_by_pair[(a, b)].append(hop)
                paths.append((hop,))
            layers.extend(LayerSpec(a, b, stage, tuple(grouped[i])) for i in sorted(grouped))

    if not nearest:
        for size in range(3, n + 1):
            for combo in itertools.combinations(range(n), size):
                paths.extend(_chains(combo, hops_by_pair))

    configs = [StitchConfig(i, (i,), ()) for i in range(n)]
    configs += [StitchConfig(n + i, tuple([h.front for h in p] + [p[-1].end]), p) for i, p in enumerate(paths)]
    if len(configs) == n and n > 1:
        raise ValueError(
            f"kernel_size={kernel_size}, stride={stride} leave no stitch between anchors with stage depths "
            f"{[a.stage_depths for a in anchors]}"
        )
    return configs, layers


def two_way_hops(shallow: int, deep: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """SN-Netv2's one-hop stitches between a shallow (``shallow`` blocks) and a deep anchor, as
    (last front block, first end block) pairs: ``(down, up)``.

    Down (shallow -> deep): after shallow block ``j`` enter the deep anchor at ``(j + 1) * deep //
    shallow``, for every ``j`` (the last one enters after the deep anchor's last block). Up (deep ->
    shallow): the inverse of every down hop (``two_way_configs`` drops the one into the head). For equal depths and depth ratio 2 (DeiT3-S/B/L) these
    are the reference's hops exactly; for other depths the reference's code does not apply (its
    ``i % 2`` rule is written for ratio 2 and its layer ids overflow), this inverse rule does.
    """
    down = [(j, (j + 1) * deep // shallow) for j in range(shallow)]
    up = [(k - 1, j + 1) for j, k in down]
    return down, up


def two_way_configs(anchors: Sequence[AnchorDepths]) -> tuple[list[StitchConfig], list[LayerSpec]]:
    """SN-Netv2's configuration space (anchors ordered fast-to-slow).

    Per adjacent pair, with S the anchor of fewer blocks (the faster one on a tie) and L the other:
    S->L, L->S, L->S->L, S->L->S routes, in the reference generator's order. Each one-hop stitch has
    its own stitching layer, which the two-hop routes through that hop share. A two-hop route leaves
    its middle anchor at or after the block it entered and does not end on the head alone (the
    reference's ``front != 11`` exclusion; a one-hop S->L into the L head is kept, as the reference).
    Two isotropic anchors of depths (12, 24) give 135 configurations, (12, 12) 135, (24, 24) 555.

    Hierarchical anchors (the reference handles isotropic ones only) get the same hop rule inside
    each stage both may stitch in (a stage's last hop enters the next stage's first block, as a
    hop after a stage's last block must); S must then have at most L's blocks in every such stage.
    """
    layers: list[LayerSpec] = []
    paths: list[tuple[Hop, ...]] = []
    total = [sum(a.stage_depths) for a in anchors]
    for a in range(len(anchors) - 1):
        s, l = (a, a + 1) if total[a] <= total[a + 1] else (a + 1, a)
        stages = common_stages(anchors[s], anchors[l])
        if not stages:
            raise ValueError(
                f"two_way stitching needs anchors with the same number of stages and a common stitchable one: anchors "
                f"{a} and {a + 1} have stage depths {anchors[a].stage_depths} (stitchable {anchors[a].stitch_stages}) "
                f"and {anchors[a + 1].stage_depths} (stitchable {anchors[a + 1].stitch_stages})"
            )
        deeper = [st for st in stages if anchors[s].stage_depths[st] > anchors[l].stage_depths[st]]
        if deeper:
            raise ValueError(
                f"two_way stitching pairs the anchor of fewer blocks with the other stage by stage: anchor {s} "
                f"(stage depths {anchors[s].stage_depths}) is deeper than anchor {l} ({anchors[l].stage_depths}) in "
                f"stages {deeper}; supported: one anchor at most as deep as the other in every stitchable stage"
            )
        sl, ls = [], []
        for stage in stages:
            down, up = two_way_hops(anchors[s].stage_depths[stage], anchors[l].stage_depths[stage])
            for front, end, pairs, out in ((s, l, down, sl), (l, s, up, ls)):
                off_front, off_end = anchors[front].stage_offset(stage), anchors[end].stage_offset(stage)
                for j, k in pairs:
                    if front == l and off_end + k == total[s]:
                        continue  # L->S into the S head alone: not a stitch the reference makes
                    out.append(Hop(front, end, off_front + j, off_end + k, len(layers)))
                    layers.append(LayerSpec(front, end, stage, ((off_front + j, off_end + k),)))

        def two_hop(first: list[Hop], second: list[Hop]) -> list[tuple[Hop, ...]]:
            return [(h1, h2) for h1 in first for h2 in second
                    if h2.front_block >= h1.end_block and h2.end_block < total[h2.end]]

        paths += [(h,) for h in sl] + [(h,) for h in ls] + two_hop(ls, sl) + two_hop(sl, ls)
    n = len(anchors)
    configs = [StitchConfig(i, (i,), ()) for i in range(n)]
    configs += [StitchConfig(n + i, tuple([h.front for h in p] + [p[-1].end]), p) for i, p in enumerate(paths)]
    if len(configs) == n and n > 1:
        raise ValueError(f"two_way stitching leaves no stitch between anchors with stage depths {[a.stage_depths for a in anchors]}")
    return configs, layers


def _chains(combo: tuple[int, ...], hops_by_pair: dict[tuple[int, int], list[Hop]]) -> list[tuple[Hop, ...]]:
    """Multi-anchor paths: each hop leaves the middle anchor at or after the block it entered."""
    chains: list[tuple[Hop, ...]] = [(h,) for h in hops_by_pair[(combo[0], combo[1])]]
    for a, b in zip(combo[1:], combo[2:]):
        chains = [c + (h,) for c in chains for h in hops_by_pair[(a, b)] if h.front_block >= c[-1].end_block]
    return chains


def config_name(config: StitchConfig, anchor_names: Sequence[str], depths: Sequence[int]) -> str:
    """Readable name, e.g. ``deit_tiny[0:5] -> deit_small[5:]``."""
    if config.is_anchor:
        return anchor_names[config.anchors[0]]
    parts, start = [], 0
    for hop in config.hops:
        parts.append(f"{anchor_names[hop.front]}[{start}:{hop.front_block + 1}]")
        start = hop.end_block
    parts.append(f"{anchor_names[config.anchors[-1]]}[{start}:]")
    return " -> ".join(parts)
