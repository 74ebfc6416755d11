"""StitchNet's fragment pool: pretrained networks cut into runnable pieces, and the activations
each piece receives and produces on the target samples (computed once, cached on disk).

Granularity (``granularity=``):

* ``"block"`` -- from the family's :func:`~snnet.families.anchor_view`: the stem is fused into the
  first fragment (which takes the input), the head into the last (which produces the output), every
  block in between is one fragment. Works for every model anchor_view splits (hand adapters, the generic splitter), residual ones included.
* ``"layer"`` -- the paper's cut: one fragment per Conv2d / Linear, together with the
  non-parametric ops, norms and activations that follow it up to the next Conv2d / Linear. This
  is only meaningful for plain feed-forward nets given as ``nn.Sequential`` (e.g.
  ``nn.Sequential(*vgg.features, vgg.avgpool, nn.Flatten(), *vgg.classifier)``): inside a residual
  block a conv's output is not all the rest of the block needs -- the shortcut needs the block
  input -- so a single conv cannot run alone, and the residual block is the finest runnable unit.
  Residual models therefore raise for ``"layer"``; use ``"block"`` for them.

The expensive part of StitchNet is running every source network on the samples; the activations
are cached under ``$SNNET_CACHE_DIR/stitchnet/<key>.pt`` (default ``~/.cache/snnet``), keyed by a
digest of the models' weights, the granularity, the input size and the sample tensor itself, so a
changed checkpoint, random re-initialisation or a different draw of samples never hits a stale file.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Mapping, Sequence

import torch
import torch.nn as nn
from torch import Tensor
from tqdm.auto import tqdm

from snnet.families import AnchorView, Layout, anchor_view, default_input_size, infer_layout
from snnet.profiling import count_flops, num_params, profile_anchor

log = logging.getLogger(__name__)

Granularity = Literal["block", "layer"]
GRANULARITIES: tuple[str, ...] = ("block", "layer")
_SPLIT_OPS = (nn.Conv2d, nn.Linear)


class Steps(nn.Module):
    """Callables run in order. ``owned`` modules are registered (device moves, ``eval()``,
    ``state_dict``); plain functions such as a family's stem only borrow their model's modules."""

    def __init__(self, steps: Sequence[Callable[[Tensor], Tensor]], owned: Sequence[nn.Module] | None = None) -> None:
        super().__init__()
        self.steps = list(steps)
        self.owned = nn.ModuleList(owned if owned is not None else [s for s in steps if isinstance(s, nn.Module)])

    def forward(self, x: Tensor) -> Tensor:
        for step in self.steps:
            x = step(x)
        return x


class OutputFragment(nn.Module):
    """The fragment that produces the network output, kept splittable so that a new task can swap
    the classifier: ``forward = head(body(x))`` (the original logits); ``features(x)`` is what the
    classifier receives (the pooled pre-logits features), read with a hook so that any head built
    around ``classifier`` (pooling, norms) works unchanged."""

    def __init__(self, body: Callable[[Tensor], Tensor], head: Callable[[Tensor], Tensor], classifier: nn.Module,
                 owned: Sequence[nn.Module]) -> None:
        super().__init__()
        self.body, self.head = body, head
        self.classifier = classifier
        self.owned = nn.ModuleList(owned)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    def features(self, x: Tensor) -> Tensor:
        captured: list[Tensor] = []
        handle = self.classifier.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            self.head(self.body(x))
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"the head never called its classifier {type(self.classifier).__name__}")
        return captured[0]


@dataclass(eq=False)
class Fragment:
    """One runnable piece of a pretrained network.

    Shapes are without the batch dimension, in the fragment's own layout. ``params`` and ``flops``
    (per image, 2 per multiply-add) cover this piece only. ``first_op`` is the leading Conv2d/Linear
    where a bridge can be folded into the weights (layer granularity), else None.
    """

    source: str
    position: int
    granularity: Granularity
    module: nn.Module
    in_layout: Layout
    in_shape: tuple[int, ...]
    out_layout: Layout
    out_shape: tuple[int, ...]
    takes_input: bool
    produces_output: bool
    params: int
    flops: int
    in_prefix_tokens: int = 0
    out_prefix_tokens: int = 0
    first_op: nn.Module | None = None
    rest: list[Callable[[Tensor], Tensor]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.source}[{self.position}]"


@dataclass
class FragmentPool:
    """Fragments of every source network, in source order then position order."""

    fragments: list[Fragment]
    models: dict[str, nn.Module]
    granularity: Granularity
    input_size: tuple[int, int, int]
    digest: str  # weights, granularity and input size: half of the activation cache key

    def __len__(self) -> int:
        return len(self.fragments)

    def index(self, source: str, position: int) -> int:
        for i, f in enumerate(self.fragments):
            if f.source == source and f.position == position:
                return i
        raise KeyError(f"no fragment {source}[{position}] in the pool")

    def successor(self, i: int) -> int | None:
        """The fragment that follows fragment ``i`` in its own network, if any."""
        f = self.fragments[i]
        nxt = i + 1
        if nxt < len(self.fragments) and self.fragments[nxt].source == f.source:
            return nxt
        return None

    @property
    def anchor_params(self) -> dict[str, int]:
        """Parameters of every whole source network, for 'size relative to the anchors'."""
        out: dict[str, int] = {}
        for f in self.fragments:
            out[f.source] = out.get(f.source, 0) + f.params
        return out


# --- building the pool ------------------------------------------------------------------------
def _classifier_of(model: nn.Module, view: AnchorView) -> nn.Module:
    """timm's ``get_classifier()``; else (torchvision, your own models) the last Linear in the head."""
    get = getattr(model, "get_classifier", None)
    if get is not None:
        return get()
    linears = [m for owned in view.head_modules for m in owned.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TypeError(f"{type(model).__name__} has no get_classifier() and its head has no nn.Linear: cannot find its classifier")
    return linears[-1]


def _block_fragments(name: str, model: nn.Module, input_size: tuple[int, int, int]) -> list[Fragment]:
    view: AnchorView = anchor_view(model)
    prof = profile_anchor(view, input_size)
    last = len(view.blocks) - 1
    in_shapes = [prof.stem_shape] + prof.block_shapes[:-1]
    head_owned = list(view.head_modules)
    fragments = []
    for i, block in enumerate(view.blocks):
        steps: list[Callable[[Tensor], Tensor]] = [view.stem, block] if i == 0 else [block]
        owned = [model] if i == 0 else [block]  # the stem is a function over the model's modules
        params = prof.block_params[i] + prof.end_params(stem=i == 0, head=i == last)
        flops = prof.block_flops[i] + (prof.stem_flops if i == 0 else 0) + (prof.head_flops if i == last else 0)
        body = Steps(steps, owned)
        in_layout, in_prefix = ("nchw", 0) if i == 0 else view.layout_at(i)  # block i reads point i
        if i == last:
            classifier = _classifier_of(model, view)
            module: nn.Module = OutputFragment(body, view.head, classifier, [body, *head_owned])
            num_classes = getattr(model, "num_classes", None)
            num_classes = num_classes if isinstance(num_classes, int) else classifier.out_features
            out_layout, out_prefix, out_shape = "vector", 0, (num_classes,)
        else:
            (out_layout, out_prefix), out_shape = view.layout_at(i + 1), prof.block_shapes[i]
            module = body
        fragments.append(Fragment(
            source=name, position=i, granularity="block", module=module,
            in_layout=in_layout, in_shape=tuple(input_size) if i == 0 else in_shapes[i],
            out_layout=out_layout, out_shape=tuple(out_shape), takes_input=i == 0, produces_output=i == last,
            params=params, flops=flops, in_prefix_tokens=in_prefix, out_prefix_tokens=out_prefix,
        ))
    return fragments


def _sequential_leaves(module: nn.Module, name: str) -> list[nn.Module]:
    if isinstance(module, nn.Sequential):
        return [leaf for i, child in enumerate(module) for leaf in _sequential_leaves(child, f"{name}.{i}")]
    if not isinstance(module, _SPLIT_OPS) and any(isinstance(m, _SPLIT_OPS) for m in module.modules()):
        raise ValueError(
            f"granularity 'layer': {name} ({type(module).__name__}) hides conv/linear layers inside a non-sequential "
            "module (e.g. a residual block), which cannot be cut per layer; use granularity='block'"
        )
    return [module]


@torch.no_grad()
def _layer_fragments(name: str, model: nn.Module, input_size: tuple[int, int, int]) -> list[Fragment]:
    if not isinstance(model, nn.Sequential):
        try:
            anchor_view(model)
            why = "its residual blocks' convs cannot run alone (the shortcut needs the block input)"
        except TypeError:
            why = "only plain nn.Sequential models can be cut per layer"
        raise ValueError(
            f"granularity 'layer' is not available for {name} ({type(model).__name__}): {why}; "
            f"use granularity='block', or pass a plain net as nn.Sequential. Valid granularities: {GRANULARITIES}"
        )
    leaves = _sequential_leaves(model, name)
    cuts = [i for i, m in enumerate(leaves) if isinstance(m, _SPLIT_OPS)]
    if not cuts or not isinstance(leaves[cuts[-1]], nn.Linear):
        raise ValueError(f"granularity 'layer': {name} needs Conv2d/Linear layers and a final Linear classifier")
    bounds = [0] + cuts[1:] + [len(leaves)]
    param = next(model.parameters())
    x = torch.zeros(1, *input_size, device=param.device, dtype=param.dtype)
    fragments = []
    for k in range(len(bounds) - 1):
        group = leaves[bounds[k]:bounds[k + 1]]
        last = k == len(bounds) - 2
        body = Steps(group)
        in_shape = tuple(x.shape[1:])
        y, flops = count_flops(body, x)
        first = group[cuts[k] - bounds[k]]
        if last:
            split = cuts[k] - bounds[k]
            module: nn.Module = OutputFragment(Steps(group[:split]), Steps(group[split:]), first, group)
        else:
            module = body
        fragments.append(Fragment(
            source=name, position=k, granularity="layer", module=module,
            in_layout=infer_layout(in_shape)[0], in_shape=in_shape, out_layout=infer_layout(tuple(y.shape[1:]))[0],
            out_shape=tuple(y.shape[1:]), takes_input=k == 0, produces_output=last, params=num_params(group), flops=flops,
            first_op=None if (k == 0 or last or cuts[k] != bounds[k]) else first, rest=list(group[1:]),
        ))
        x = y
    return fragments


def _tensor_bytes(t: Tensor) -> bytes:
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _digest(models: Mapping[str, nn.Module], granularity: str, input_size: tuple[int, ...]) -> str:
    """Weights, not file names: random re-initialisation or an edited checkpoint changes the key."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((granularity, tuple(input_size))).encode())
    for name, model in models.items():
        h.update(name.encode())
        for key, t in model.state_dict().items():
            h.update(key.encode())
            h.update(_tensor_bytes(t))
    return h.hexdigest()


def build_fragment_pool(
    models: Mapping[str, nn.Module] | Sequence[nn.Module],
    granularity: Granularity = "block",
    input_size: tuple[int, int, int] | None = None,
) -> FragmentPool:
    """Cut every model into fragments (models are switched to eval mode and frozen).

    ``models``: name -> model, or a list (named ``<class><i>``). ``input_size`` (C, H, W) defaults
    to the models' own (which must agree); it is required for plain ``nn.Sequential`` models.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; choose one of {GRANULARITIES}")
    if not isinstance(models, Mapping):
        models = {f"{type(m).__name__.lower()}{i}": m for i, m in enumerate(models)}
    if not models:
        raise ValueError("the fragment pool needs at least one model")
    if input_size is None:
        sizes = {}
        for name, model in models.items():
            try:
                sizes[name] = tuple(default_input_size(model))
            except ValueError as e:
                raise ValueError(f"model {name!r}: {e}") from e
        if len(set(sizes.values())) != 1:
            raise ValueError(f"the models expect different input sizes {sizes}; pass input_size explicitly")
        input_size = next(iter(sizes.values()))
    input_size = tuple(input_size)
    cut = _block_fragments if granularity == "block" else _layer_fragments
    fragments: list[Fragment] = []
    for name, model in models.items():
        model.eval().requires_grad_(False)
        fragments += cut(name, model, input_size)
    return FragmentPool(fragments, dict(models), granularity, input_size, _digest(models, granularity, input_size))


# --- activations on the samples (cached) ----------------------------------------------------
@dataclass
class PoolActivations:
    """What every fragment receives (``inputs[i]``) and produces (``outputs[i]``; pre-logits
    ``features[i]`` too for output fragments) on the samples, in pool order."""

    inputs: list[Tensor]
    outputs: list[Tensor]
    features: dict[int, Tensor]
    from_cache: bool = False


def cache_dir(root: str | os.PathLike | None = None) -> Path:
    return Path(root or os.environ.get("SNNET_CACHE_DIR", "~/.cache/snnet")).expanduser() / "stitchnet"


def activation_key(pool: FragmentPool, x: Tensor) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(pool.digest.encode())
    h.update(repr((tuple(x.shape), str(x.dtype))).encode())
    h.update(_tensor_bytes(x))
    return h.hexdigest()


@torch.no_grad()
def run_batched(fn: Callable[[Tensor], Tensor], x: Tensor, batch_size: int) -> Tensor:
    """``fn`` over ``x`` in chunks (bounded peak memory), concatenated."""
    return torch.cat([fn(chunk) for chunk in x.split(batch_size)])


@torch.no_grad()
def pool_activations(
    pool: FragmentPool, x: Tensor, cache: bool = True, root: str | os.PathLike | None = None,
    batch_size: int = 64, progress: bool = True,
) -> PoolActivations:
    """Every fragment's input and output on ``x`` (each source network run once), from the cache
    when this pool has already seen exactly these samples."""
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"need a non-empty batch of images (n, C, H, W), got shape {tuple(x.shape)}")
    if tuple(x.shape[1:]) != pool.input_size:
        raise ValueError(f"samples have shape {tuple(x.shape[1:])} but the pool was built for {pool.input_size}")
    path = cache_dir(root) / f"{activation_key(pool, x)}.pt"
    if cache and path.is_file():
        stored = torch.load(path, map_location=x.device, weights_only=True)
        log.info("fragment activations loaded from %s", path)
        return _assemble(pool, x, stored["outputs"], stored["features"], from_cache=True)
    outputs: list[Tensor] = []
    features: dict[int, Tensor] = {}
    current: Tensor | None = None
    for i, f in enumerate(tqdm(pool.fragments, desc="fragment activations", disable=not progress)):
        inp = x if f.takes_input else current
        outputs.append(run_batched(f.module, inp, batch_size))
        if f.produces_output:
            features[i] = run_batched(f.module.features, inp, batch_size)
        current = outputs[-1]
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"outputs": [o.cpu() for o in outputs], "features": {k: v.cpu() for k, v in features.items()}}, tmp)
        tmp.replace(path)  # atomic: a killed run never leaves a half-written cache file
    return _assemble(pool, x, outputs, features, from_cache=False)


def _assemble(pool: FragmentPool, x: Tensor, outputs: list[Tensor], features: dict[int, Tensor], from_cache: bool) -> PoolActivations:
    if len(outputs) != len(pool):
        raise ValueError(f"cached activations hold {len(outputs)} fragments, the pool has {len(pool)}")
    inputs = [x if f.takes_input else outputs[i - 1] for i, f in enumerate(pool.fragments)]
    return PoolActivations(inputs, list(outputs), {int(k): v for k, v in features.items()}, from_cache)
