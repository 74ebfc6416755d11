"""The stitchable network: a family of anchors plus stitching layers, switchable at runtime."""
from __future__ import annotations

import functools
import logging
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from snnet.errors import StitchIdError
from snnet.families import AnchorView, anchor_view
from snnet.lstsq import AffineLstsq
from snnet.prefix_tree import PrefixTree
from snnet.profiling import AnchorProfile, count_flops, num_params, profile_anchor
from snnet.sn_net.batchnorm import BatchNormBank, batchnorms
from snnet.sn_net.stitch_configs import (
    AnchorDepths,
    LayerSpec,
    StitchConfig,
    config_name,
    generate_stitch_configs,
)
from snnet.stitching import StitchingLayer, channels_last

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StitchInfo:
    id: int
    name: str
    flops: int  # per image (per token for a language model), FlopCounterMode convention (2 per multiply-add)
    params: int  # parameters on this path only
    is_anchor: bool


@dataclass
class _Path:
    """A configuration resolved to callables: stem, then modules in order, then head."""

    stem: Callable[[Tensor], Tensor]
    modules: list[Callable[[Tensor], Tensor]]
    head: Callable[[Tensor], Tensor]


class StitchableNetwork(nn.Module):
    """SN-Net over pretrained anchors.

    Anchors are ordered fast-to-slow by FLOPs whatever order they are given in. Configuration ids
    are stable: anchors first (0..A-1), then stitches in the reference generator's order.
    ``set_stitch(id)`` switches the active path with no allocation; ``forward(x, stitch=id)``
    overrides it for one call. ``two_way``: SN-Netv2's space (both directions, two-hop routes);
    ``stitch_lora_rank``: LoRA stitching layers of that rank (0: plain affine layers).
    """

    def __init__(
        self,
        anchors: Sequence[nn.Module],
        names: Sequence[str] | None = None,
        kernel_size: int = 2,
        stride: int = 1,
        nearest: bool = True,
        stitch_stages: Sequence[int] | None = None,
        input_size: tuple[int, ...] | None = None,
        two_way: bool = False,
        stitch_lora_rank: int = 0,
    ) -> None:
        super().__init__()
        if not anchors:
            raise ValueError("need at least one anchor")
        names = list(names) if names is not None else [type(a).__name__.lower() for a in anchors]
        if len(names) != len(anchors):
            raise ValueError(f"got {len(anchors)} anchors but {len(names)} names")
        views = [anchor_view(a) for a in anchors]
        if any(v.per_token for v in views):
            from snnet.families.lm import check_same_vocabulary

            check_same_vocabulary(list(anchors), names)
        profiles = [profile_anchor(v, input_size) for v in views]
        order = sorted(range(len(anchors)), key=lambda i: (profiles[i].flops, profiles[i].params))
        self.anchors = nn.ModuleList([anchors[i] for i in order])
        self.views: list[AnchorView] = [views[i] for i in order]
        self.profiles: list[AnchorProfile] = [profiles[i] for i in order]
        self.anchor_names = _unique([names[i] for i in order])
        # How to rebuild each anchor (an snnet.anchors.AnchorSpec), for export; build_network sets them.
        self.anchor_specs: list[Any] = [None] * len(order)

        depths = [
            AnchorDepths(v.stage_depths, tuple(stitch_stages) if stitch_stages is not None else v.stitch_stages, v.isotropic)
            for v in self.views
        ]
        self.stitch_lora_rank = stitch_lora_rank
        self.configs, self.layer_specs = generate_stitch_configs(depths, kernel_size, stride, nearest, two_way)
        self.stitch_layers = nn.ModuleList([self._make_layer(spec) for spec in self.layer_specs])
        keys = [self._path_keys(c) for c in self.configs]
        self.bn_bank = BatchNormBank()
        self._slots: dict[tuple, int] = {}  # path prefix -> BatchNorm statistics slot of its last step
        steps: dict[tuple, Callable[[Tensor], Tensor]] = {}  # path prefix -> its last step, made once

        def step_of(prefix: tuple) -> Callable[[Tensor], Tensor]:
            if prefix not in steps:
                steps[prefix] = self._step(prefix)
            return steps[prefix]

        self._prefix_tree = PrefixTree(keys, step_of)
        self.bn_bank.finish()
        self._paths = [_Path(fns[0], fns[1:-1], fns[-1]) for fns in self._prefix_tree.path_steps]
        self.stitch_id = 0
        self.infos = [self._info(c) for c in self.configs]

    # --- construction ---------------------------------------------------------------------
    def _make_layer(self, spec: LayerSpec) -> StitchingLayer:
        j, k = spec.pairs[0]
        (in_layout, in_prefix), (out_layout, out_prefix) = self.layer_layouts(spec)
        return StitchingLayer(
            in_shape=self.profiles[spec.front].block_shapes[j],
            out_shape=self._end_input_shape(spec.end, k),
            in_layout=in_layout, out_layout=out_layout,
            in_prefix_tokens=in_prefix, out_prefix_tokens=out_prefix,
            lora_rank=self.stitch_lora_rank,
        )

    def layer_layouts(self, spec: LayerSpec) -> tuple[tuple[str, int], tuple[str, int]]:
        """(layout, prefix tokens) a stitching layer reads (the front's block j output) and writes (the
        end's block k input), per block: a view's layout may change along its blocks."""
        j, k = spec.pairs[0]
        return self.views[spec.front].layout_at(j + 1), self.views[spec.end].layout_at(k)

    def _end_input_shape(self, anchor: int, block: int) -> tuple[int, ...]:
        p = self.profiles[anchor]
        return p.stem_shape if block == 0 else p.block_shapes[block - 1]

    def _segments(self, config: StitchConfig) -> list[tuple[int, int, int, int | None]]:
        """(anchor, first block, stop block, stitching layer after or None) per anchor on the path."""
        if config.is_anchor:
            a = config.anchors[0]
            return [(a, 0, len(self.views[a].blocks), None)]
        segments, start = [], 0
        for hop in config.hops:
            segments.append((hop.front, start, hop.front_block + 1, hop.layer))
            start = hop.end_block
        last = config.anchors[-1]
        segments.append((last, start, len(self.views[last].blocks), None))
        return segments

    def _path_keys(self, config: StitchConfig) -> tuple[tuple, ...]:
        """The path as hashable steps, so paths that share a prefix share its computation."""
        keys: list[tuple] = [("stem", config.anchors[0])]
        for anchor, start, stop, layer in self._segments(config):
            keys.extend(("block", anchor, b) for b in range(start, stop))
            if layer is not None:
                keys.append(("layer", layer))
        keys.append(("head", config.anchors[-1]))
        return tuple(keys)

    def _key_module(self, key: tuple) -> Callable[[Tensor], Tensor]:
        kind, index = key[0], key[1]
        if kind == "stem":
            return self.views[index].stem
        if kind == "block":
            return self.views[index].blocks[key[2]]
        if kind == "layer":
            return self.stitch_layers[index]
        return self.views[index].head

    def _key_batchnorms(self, key: tuple) -> list[nn.Module]:
        kind, index = key[0], key[1]
        if kind == "layer":
            return []
        view = self.views[index]
        if kind == "block":
            return batchnorms([view.blocks[key[2]]])
        if kind == "head":
            return batchnorms(view.head_modules)
        return batchnorms([view.model], exclude=[*view.blocks, *view.head_modules])  # the stem: the rest

    def _step(self, prefix: tuple) -> Callable[[Tensor], Tensor]:
        """The last step of ``prefix`` as a callable; one with BatchNorm layers gets a slot of
        statistics of its own (the prefix decides its input, so paths sharing it share the slot)."""
        fn = self._key_module(prefix[-1])
        layers = self._key_batchnorms(prefix[-1])
        if not layers:
            return fn
        slot = self._slots[prefix] = self.bn_bank.add(layers)
        return functools.partial(self.bn_bank.run, slot, fn)

    @torch.no_grad()
    def _info(self, config: StitchConfig) -> StitchInfo:
        first, last = self.profiles[config.anchors[0]], self.profiles[config.anchors[-1]]
        flops = first.stem_flops + last.head_flops
        same = config.anchors[0] == config.anchors[-1]
        params = first.end_params(stem=True, head=same) + (0 if same else last.end_params(stem=False, head=True))
        for anchor, start, stop, layer in self._segments(config):
            p = self.profiles[anchor]
            flops += sum(p.block_flops[start:stop])
            params += sum(p.block_params[start:stop])
            if layer is not None:
                flops += self._layer_flops(layer)
                params += num_params([self.stitch_layers[layer].merged()])  # deployed: LoRA merged
        name = config_name(config, self.anchor_names, [len(v.blocks) for v in self.views])
        return StitchInfo(config.id, name, flops, params, config.is_anchor)

    def _layer_flops(self, layer: int) -> int:
        spec = self.layer_specs[layer]
        shape = self.profiles[spec.front].block_shapes[spec.pairs[0][0]]
        module = self.stitch_layers[layer].merged()
        param = module.proj.weight
        _, flops = count_flops(module, torch.zeros(1, *shape, device=param.device, dtype=param.dtype))
        return self.profiles[spec.front].per_unit(flops)

    # --- runtime --------------------------------------------------------------------------
    @property
    def num_configs(self) -> int:
        return len(self.configs)

    @property
    def num_anchors(self) -> int:
        return len(self.anchors)

    def check_id(self, stitch: int) -> int:
        if not 0 <= stitch < len(self.configs):
            raise StitchIdError(f"stitch id {stitch} out of range: valid ids are 0..{len(self.configs) - 1}")
        return stitch

    def set_stitch(self, stitch: int) -> None:
        """Make ``stitch`` the active configuration (no re-instantiation, no allocation)."""
        self.stitch_id = self.check_id(stitch)

    def forward(self, x: Tensor, stitch: int | None = None) -> Tensor:
        path = self._paths[self.stitch_id if stitch is None else self.check_id(stitch)]
        x = path.stem(x)
        for module in path.modules:
            x = module(x)
        return path.head(x)

    def forward_many(self, x: Tensor, stitches: Sequence[int]) -> dict[int, Tensor]:
        """Outputs of several configurations on one batch, each shared prefix computed once.

        Same operations on the same inputs as ``forward(x, s)`` per stitch, so the same results;
        the saving is every stem, block and stitching layer that several paths share (a front
        anchor up to block j is computed once for all its stitches, anchors come for free).
        """
        return self._prefix_tree.run(x, [self.check_id(s) for s in stitches])

    def forward_rows(self, x: Tensor, stitches: Sequence[int]) -> Tensor:
        """Row ``r`` of ``x`` through configuration ``stitches[r]``, for serving a batch whose requests
        chose different stitches: each shared prefix step runs once, on just the rows whose paths share
        it (a mixed batch costs no more than its rows' own paths, their common prefixes counted once)."""
        if len(stitches) != x.shape[0]:
            raise ValueError(f"got {len(stitches)} stitch ids for a batch of {x.shape[0]} rows")
        return self._prefix_tree.run_rows(x, [self.check_id(s) for s in stitches])

    def forward_many_flops(self, stitches: Sequence[int]) -> int:
        """FLOPs per image of ``forward_many(x, stitches)``: every distinct prefix step counted once
        (one stitch at a time costs ``sum(self.infos[s].flops)``)."""
        steps = self._prefix_tree.steps([self.check_id(s) for s in stitches])
        layer_flops = {key[1]: self._layer_flops(key[1]) for key in steps if key[0] == "layer"}
        return sum(self._key_flops(key, layer_flops) for key in steps)

    def _key_flops(self, key: tuple, layer_flops: dict[int, int]) -> int:
        kind, index = key[0], key[1]
        if kind == "layer":
            return layer_flops[index]
        profile = self.profiles[index]
        if kind == "block":
            return profile.block_flops[key[2]]
        return profile.stem_flops if kind == "stem" else profile.head_flops

    # --- least-squares initialisation ------------------------------------------------------
    @torch.no_grad()
    def anchor_features(self, anchor: int, x: Tensor) -> list[Tensor]:
        """Stem output followed by every block's output: entry k is block k's input."""
        view = self.views[anchor]
        feats = [view.stem(x)]
        for block in view.blocks:
            feats.append(block(feats[-1]))
        return feats

    @torch.no_grad()
    def init_stitches_lstsq(self, batches: Iterable[Tensor], ridge: float = 0.0) -> int:
        """Fit every stitching layer in closed form on the images in ``batches``.

        A layer shared by several (j, k) pairs is solved once over all of its pairs' data.
        Accumulation is float64 on the network's device; returns the number of images used.
        """
        if not self.layer_specs:
            return 0
        device = next(self.parameters()).device
        groups: dict[tuple[int, int, int], list[int]] = {}  # layers of equal shape: one batched system
        for i, spec in enumerate(self.layer_specs):
            groups.setdefault((spec.front, spec.end, spec.stage), []).append(i)
        systems = {
            key: AffineLstsq(len(ids), self.stitch_layers[ids[0]].in_features, self.stitch_layers[ids[0]].out_features, device)
            for key, ids in groups.items()
        }
        was_training = self.training
        self.eval()
        images = 0
        try:
            for x in batches:
                x = x.to(device)
                images += x.shape[0]
                feats = [self.anchor_features(a, x) for a in range(self.num_anchors)]
                for (front, end, stage), ids in groups.items():
                    for local, i in enumerate(ids):
                        layer = self.stitch_layers[i]
                        for j, k in self.layer_specs[i].pairs:
                            target = channels_last(feats[end][k], self.views[end].layout_at(k)[0])
                            systems[(front, end, stage)].update(
                                local, layer.fit_rows(feats[front][j + 1]), target.reshape(-1, layer.out_features)
                            )
        finally:
            self.train(was_training)
        if images == 0:
            raise ValueError("least-squares initialisation received no images")
        for key, ids in groups.items():
            weights, biases = systems[key].solve(ridge)
            for local, i in enumerate(ids):
                self.stitch_layers[i].set_affine(weights[local], biases[local])
        log.info("least-squares initialised %d stitching layers on %d images", len(self.layer_specs), images)
        return images

    @property
    def has_batchnorm(self) -> bool:
        return self.bn_bank.num_slots > 0

    @torch.no_grad()
    def calibrate_batchnorm(self, batches: Iterable[Tensor], anchors: bool = True) -> int:
        """Re-estimate the BatchNorm statistics of every configuration's path on the images in
        ``batches`` (training images; ``SNNetModule`` passes augmented ones), kept per path in ``bn_bank``; returns the number
        of images used (0 for a family without BatchNorm, whose batches are not read).

        ``anchors=False`` leaves the anchors' own paths (every step before a stitching layer) on the
        layers' running statistics: frozen anchors must evaluate exactly as pretrained. Equal-sized
        batches give each one the same weight; the layers' own buffers are not written.
        """
        slots = [s for prefix, s in self._slots.items() if anchors or any(key[0] == "layer" for key in prefix)]
        if not slots:
            return 0
        device = next(self.parameters()).device
        ids = list(range(self.num_configs))
        was_training = self.training
        self.eval()
        images = 0
        try:
            with self.bn_bank.calibration(slots) as next_batch:
                for t, x in enumerate(batches):
                    next_batch(t)
                    self._prefix_tree.run(x.to(device), ids)
                    images += x.shape[0]
                if images == 0:
                    raise ValueError("BatchNorm calibration received no images")
        finally:
            self.train(was_training)
        log.info("calibrated the BatchNorm statistics of %d path steps on %d images", len(slots), images)
        return images

    @contextmanager
    def path_statistics(self, stitch: int) -> Iterator[None]:
        """Inside the block, the BatchNorm layers on ``stitch``'s path hold its calibrated statistics
        as their own buffers (for export: a copy made here normalises as the path does)."""
        keys = self._prefix_tree.paths[self.check_id(stitch)]
        slots = [self._slots[keys[:n]] for n in range(1, len(keys) + 1) if keys[:n] in self._slots]
        with ExitStack() as stack:
            for slot in slots:
                if self.bn_bank.ready[slot]:
                    stack.enter_context(self.bn_bank.swapped(slot))
            yield

    def path_parameters(self, stitch: int) -> list[nn.Parameter]:
        """The parameters configuration ``stitch`` uses (first anchor's stem, blocks, stitching
        layers, last anchor's head), each once: what training that sub-network alone would update."""
        config = self.configs[self.check_id(stitch)]
        first, last = self.views[config.anchors[0]], self.views[config.anchors[-1]]
        not_stem = {id(p) for m in [*first.blocks, *first.head_modules] for p in m.parameters()}
        params = {id(p): p for p in first.model.parameters() if id(p) not in not_stem}
        for anchor, start, stop, layer in self._segments(config):
            modules = self.views[anchor].blocks[start:stop] + ([self.stitch_layers[layer]] if layer is not None else [])
            params.update((id(p), p) for m in modules for p in m.parameters())
        params.update((id(p), p) for m in last.head_modules for p in m.parameters())
        return list(params.values())

    def path_modules(self, stitch: int) -> list[Callable[[Tensor], Tensor]]:
        """Configuration ``stitch``'s steps in order (first anchor's stem, blocks and stitching
        layers, last anchor's head) as the anchors' own callables: what the sub-network alone runs,
        its BatchNorm layers on their own buffers rather than the path's statistics in ``bn_bank``."""
        return [self._key_module(key) for key in self._prefix_tree.paths[self.check_id(stitch)]]

    @property
    def is_language_model(self) -> bool:
        """A family of causal language models (token views): inputs are token ids, costs per token."""
        return self.views[0].per_token

    def example_input(self, batch_size: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Tensor:
        """A random batch of the network's input size: images of ``dtype`` (default: the parameters'),
        or token ids (int64, uniform over the vocabulary) for a language model; on the model's device by default."""
        param = next(self.parameters())
        device = param.device if device is None else device
        size = (batch_size, *self.profiles[0].input_size)
        if self.is_language_model:
            return torch.randint(0, int(self.anchors[0].config.vocab_size), size, device=device)
        return torch.randn(size, device=device, dtype=dtype or param.dtype)

    def data_config(self) -> dict:
        """timm data config (mean/std, interpolation, crop) of the first anchor at the network's input
        size: what the datamodules and the server preprocess with. A language-model family's:
        the sequence length (``input_size``, (T,)) and the vocabulary size, for the text datamodule."""
        if self.is_language_model:
            return {"input_size": self.profiles[0].input_size, "vocab_size": int(self.anchors[0].config.vocab_size)}
        from timm.data import resolve_data_config

        cfg = resolve_data_config(model=self.anchors[0])
        cfg["input_size"] = self.profiles[0].input_size
        return cfg

    def table(self) -> list[StitchInfo]:
        return list(self.infos)


def _unique(names: list[str]) -> list[str]:
    counts: dict[str, int] = {}
    out = []
    for n in names:
        out.append(n if n not in counts else f"{n}#{counts[n]}")
        counts[n] = counts.get(n, 0) + 1
    return out
