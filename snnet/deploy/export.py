"""One stitch as a standalone model: only the weights its path uses, a rebuild recipe, a torch.export program.

``extract_stitch`` copies the anchors on the stitch's path with every tensor the path does not use
left out (the copy never touches them: they are mapped to ``None`` in ``deepcopy``'s memo), plus
the stitching layers it uses. Keeping each anchor's own module tree, rather than re-assembling its
parts, lets the family adapter (``families.anchor_view``) supply stem and head, which may be
functions over several modules (a ViT stem reads ``patch_embed``, ``cls_token``, ``pos_embed``...).
The same trimming rebuilds the module from ``stitch.json`` at load time, so both agree by construction.

Files written by ``export_stitch``: ``model.safetensors`` (the weights), ``stitch.json`` (the
recipe: anchors' specs or timm names and kwargs, which parts of each anchor, the stitching layers' shapes,
the step order, input size, FLOPs, params) and ``program.pt2`` (``torch.export``).
"""
from __future__ import annotations

import copy
import json
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import timm
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch import Tensor

import snnet.models  # noqa: F401  (registers the CIFAR ResNets in timm)
from snnet.families import AnchorView, anchor_view, copy_with_view
from snnet.sn_net.network import StitchableNetwork
from snnet.stitching import StitchingLayer

FORMAT = "snnet-stitch/1"
WEIGHTS, RECIPE, PROGRAM = "model.safetensors", "stitch.json", "program.pt2"


@dataclass
class AnchorPart:
    """Which parts of one anchor a path runs, and how to rebuild it: ``spec`` (the anchor's
    :class:`~snnet.anchors.AnchorSpec` without weights: ``name``, ``source``, ``kwargs``, ``blocks``)
    where the network was built from specs, else ``model`` (a timm architecture) with the recipe's
    ``model_kwargs`` (recipes written before specs hold only this)."""

    model: str
    stem: bool
    blocks: list[int]
    head: bool
    spec: dict[str, Any] | None = None


@dataclass
class LayerRecipe:
    """``StitchingLayer`` constructor arguments (shapes without the batch dimension)."""

    in_shape: list[int]
    out_shape: list[int]
    in_layout: str
    out_layout: str
    in_prefix_tokens: int = 0
    out_prefix_tokens: int = 0


@dataclass
class StitchRecipe:
    """Everything ``load_stitch`` needs to rebuild the module without the other anchors.

    ``steps`` run after the first anchor's stem and before the head of ``anchors[head_anchor]``:
    ``["block", anchor, block]`` (anchor: index into ``anchors``) or ``["layer", layer]``. Each
    anchor is listed once, in path order, even when a route returns to it (SN-Netv2's L->S->L).
    """

    id: int
    name: str
    flops: int
    params: int
    is_anchor: bool
    input_size: list[int]
    anchors: list[AnchorPart]
    layers: list[LayerRecipe]
    steps: list[list]
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    head_anchor: int = -1
    format: str = FORMAT

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StitchRecipe":
        if d.get("format") != FORMAT:
            raise ValueError(f"not an snnet stitch recipe: format {d.get('format')!r}, expected {FORMAT!r}")
        return cls(**{**d, "anchors": [AnchorPart(**a) for a in d["anchors"]], "layers": [LayerRecipe(**l) for l in d["layers"]]})


def _tensors(modules: Sequence[nn.Module]) -> set[int]:
    return {id(t) for m in modules for t in [*m.parameters(), *m.buffers()]}


def trimmed_copy(model: nn.Module, part: AnchorPart) -> nn.Module:
    """A copy of ``model`` holding only the tensors of ``part``; every other parameter/buffer is ``None``.

    The stem is the view's ``stem_modules`` where it names them (an embedding tied to the head), else
    whatever the model holds outside its blocks and head modules (as in ``profile_anchor``).
    """
    view = anchor_view(model)
    blocks, head = _tensors(view.blocks), _tensors(view.head_modules)
    keep = _tensors([view.blocks[b] for b in part.blocks]) | (head if part.head else set())
    if part.stem:
        keep |= _tensors([model]) - blocks - head
        keep |= _tensors(view.stem_modules or [])
    # non-persistent buffers (rotary frequencies every decoder layer reads) are derived, not weights:
    # kept, they cost nothing in the file
    keep |= _tensors([model]) - {id(t) for t in model.state_dict(keep_vars=True).values()}
    dropped = {i: None for i in _tensors([model]) - keep}
    return copy_with_view(model, memo=dropped)


class StitchModule(nn.Module):
    """One configuration as a plain ``nn.Module``: ``stem(anchors[0])``, the steps, ``head(anchors[head_anchor])``."""

    def __init__(
        self, anchors: Sequence[nn.Module], layers: Sequence[StitchingLayer], steps: Sequence[Sequence], head_anchor: int = -1
    ) -> None:
        super().__init__()
        self.anchors = nn.ModuleList(anchors)
        self.stitch_layers = nn.ModuleList(layers)
        views: list[AnchorView] = [anchor_view(m) for m in self.anchors]
        # a tuple, not attributes: a generic view's stem and head are modules over the anchors' own
        # modules, and registering them would put every tensor in the state twice
        self._ends = (views[0].stem, views[head_anchor].head)
        self._steps: list[Callable[[Tensor], Tensor]] = [
            views[step[1]].blocks[step[2]] if step[0] == "block" else self.stitch_layers[step[1]] for step in steps
        ]

    def forward(self, x: Tensor) -> Tensor:
        stem, head = self._ends
        x = stem(x)
        for step in self._steps:
            x = step(x)
        return head(x)


def stitch_recipe(net: StitchableNetwork, stitch: int, model_kwargs: dict[str, Any] | None = None) -> StitchRecipe:
    """The path of ``stitch`` in ``net`` as parts of anchors, stitching layers and steps."""
    config = net.configs[net.check_id(stitch)]
    unique = list(dict.fromkeys(config.anchors))  # a two-hop route may come back to its first anchor
    local = {a: i for i, a in enumerate(unique)}
    blocks: dict[int, list[int]] = {a: [] for a in unique}
    layers: list[int] = []
    steps: list[list] = []
    for anchor, start, stop, layer in net._segments(config):
        blocks[anchor] += range(start, stop)
        steps += [["block", local[anchor], b] for b in range(start, stop)]
        if layer is not None:
            steps.append(["layer", len(layers)])
            layers.append(layer)
    parts = [_part(net, a, stem=a == config.anchors[0], blocks=sorted(blocks[a]), head=a == config.anchors[-1]) for a in unique]
    info = net.infos[config.id]
    return StitchRecipe(
        id=info.id, name=info.name, flops=info.flops, params=info.params, is_anchor=info.is_anchor,
        input_size=list(net.profiles[config.anchors[0]].input_size), anchors=parts,
        layers=[_layer_recipe(net, layer) for layer in layers], steps=steps, model_kwargs=dict(model_kwargs or {}),
        head_anchor=local[config.anchors[-1]],
    )


def _part(net: StitchableNetwork, anchor: int, stem: bool, blocks: list[int], head: bool) -> AnchorPart:
    spec = net.anchor_specs[anchor]
    if spec is None:
        return AnchorPart(_architecture(net.anchors[anchor], net.anchor_names[anchor]), stem, blocks, head)
    kwargs = dict(spec.kwargs)
    if spec.source == "transformers":  # the architecture itself, so the export needs no model directory or hub
        kwargs = {"config": net.anchors[anchor].config.to_dict()}
    rebuild = {"name": spec.name, "source": spec.source, "kwargs": kwargs, "blocks": spec.blocks}
    return AnchorPart(spec.name, stem, blocks, head, spec=rebuild)


def _architecture(model: nn.Module, name: str) -> str:
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not arch or not timm.is_model(arch):
        raise ValueError(f"anchor {name!r} ({type(model).__name__}) is not a registered timm model: it cannot be rebuilt by name")
    return arch


def _layer_recipe(net: StitchableNetwork, layer: int) -> LayerRecipe:
    spec, module = net.layer_specs[layer], net.stitch_layers[layer]
    j, k = spec.pairs[0]
    (_, in_prefix), (_, out_prefix) = net.layer_layouts(spec)
    return LayerRecipe(
        in_shape=list(net.profiles[spec.front].block_shapes[j]), out_shape=list(net._end_input_shape(spec.end, k)),
        in_layout=module.in_layout, out_layout=module.out_layout,
        in_prefix_tokens=in_prefix, out_prefix_tokens=out_prefix,
    )


def extract_stitch(net: StitchableNetwork, stitch: int) -> StitchModule:
    """Configuration ``stitch`` of ``net`` as a standalone module (copies: ``net`` is untouched).

    Its parameters are exactly those of the path (``net.infos[stitch].params`` of them).
    """
    recipe = stitch_recipe(net, stitch)
    config = net.configs[recipe.id]
    with net.path_statistics(stitch):  # the copies keep this path's own BatchNorm statistics
        anchors = [trimmed_copy(net.anchors[a], part) for a, part in zip(dict.fromkeys(config.anchors), recipe.anchors)]
    used_layers = [h.layer for h in config.hops]
    layers = [copy.deepcopy(net.stitch_layers[l].merged()) for l in used_layers]  # LoRA merged: a plain affine map
    module = StitchModule(anchors, layers, recipe.steps, recipe.head_anchor)
    params = sum(p.numel() for p in module.parameters())
    if params != recipe.params:
        raise RuntimeError(
            f"stitch {stitch} extracted with {params} parameters but its path has {recipe.params}: the family "
            "adapter's stem, blocks and head do not partition the anchor's parameters"
        )
    return module.train(net.training)


def _rebuild(part: AnchorPart, recipe: StitchRecipe) -> nn.Module:
    """The whole anchor of ``part``, random weights, split as it was in the network."""
    if part.spec is None:
        return timm.create_model(part.model, pretrained=False, **recipe.model_kwargs)
    from snnet.anchors import AnchorSpec, create_from_spec

    spec = AnchorSpec(**part.spec)
    model = create_from_spec(spec, pretrained=False, model_kwargs={})
    anchor_view(model, blocks=spec.blocks, input_size=tuple(recipe.input_size))  # a generic view is cached: trimmed_copy keeps it
    return model


def build_stitch(recipe: StitchRecipe) -> StitchModule:
    """The module of a recipe with freshly initialised weights: only the anchors on its path are created."""
    anchors = [trimmed_copy(_rebuild(p, recipe), p) for p in recipe.anchors]
    return StitchModule(anchors, [StitchingLayer(**asdict(l)) for l in recipe.layers], recipe.steps, recipe.head_anchor)


def export_stitch(
    net: StitchableNetwork,
    stitch: int,
    out_dir: str | os.PathLike,
    model_kwargs: dict[str, Any] | None = None,
    example_input: Tensor | None = None,
) -> Path:
    """Write ``model.safetensors``, ``stitch.json`` and ``program.pt2`` for ``stitch`` into ``out_dir``.

    Anchors built from specs (:func:`snnet.anchors.build_network`: timm, torchvision or class_path,
    their own kwargs and named blocks) are recorded with their specs. ``model_kwargs``: for anchors
    without one (a network built from models directly), the ``timm.create_model`` kwargs they were
    built with (e.g. ``num_classes``, ``img_size``), needed to rebuild them by name.
    ``example_input`` (default: two random images, or sequences of token ids, of the network's input size) traces the program;
    its batch dimension is exported as dynamic.
    """
    recipe = stitch_recipe(net, stitch, model_kwargs)
    module = extract_stitch(net, stitch).eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    aliases = _aliases(module)
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items() if k not in aliases}
    save_file(state, out / WEIGHTS, metadata={"format": "pt", "snnet": FORMAT})
    (out / RECIPE).write_text(json.dumps(asdict(recipe), indent=1))
    if example_input is None:
        example_input = net.example_input(2)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(module, (example_input,), dynamic_shapes=({0: batch},))
    torch.export.save(program, out / PROGRAM)
    return out


def _aliases(module: nn.Module) -> dict[str, str]:
    """State names whose tensor an earlier name holds (tied weights), mapped to that name:
    safetensors stores each tensor once, loading fills the aliases back in."""
    first: dict[int, str] = {}
    aliases = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return aliases


def load_recipe(out_dir: str | os.PathLike) -> StitchRecipe:
    path = Path(out_dir) / RECIPE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {out_dir} a folder written by `snnet export`?")
    return StitchRecipe.from_dict(json.loads(path.read_text()))


def load_stitch(out_dir: str | os.PathLike, device: str | torch.device = "cpu") -> StitchModule:
    """The exported stitch as an ``nn.Module`` (eval mode), rebuilt from ``stitch.json`` and its weights."""
    recipe = load_recipe(out_dir)
    module = build_stitch(recipe)
    state = OrderedDict(load_file(Path(out_dir) / WEIGHTS, device=str(device)))
    for alias, name in _aliases(module).items():
        if name in state:
            state[alias] = state[name]
    # current module versions: without them BatchNorm "upgrades" the state by adding num_batches_tracked
    # for every BatchNorm, including those of blocks the path does not use
    state._metadata = module.state_dict()._metadata  # type: ignore[attr-defined]
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"{out_dir}: the weights do not fit the rebuilt anchors {[p.spec or p.model for p in recipe.anchors]} with "
            f"model_kwargs {recipe.model_kwargs} (were the anchors built with other timm kwargs?): {e}"
        ) from e
    return module.to(device).eval()


def load_program(out_dir: str | os.PathLike) -> torch.export.ExportedProgram:
    """The exported ``torch.export`` program (call ``.module()`` to run it)."""
    path = Path(out_dir) / PROGRAM
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {out_dir} a folder written by `snnet export`?")
    return torch.export.load(path)
