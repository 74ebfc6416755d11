"""The generic splitter: any traceable model as ``stem -> blocks -> head`` with no per-family code.

1. **Blocks from the model's own structure** (:func:`discover_blocks`): the elements of its block
   sequences (``blocks``, ``stages.N.blocks``, ``layerN``, ``features``, ``encoder.layers``, ...),
   descending into stages; or block module paths the user names.
2. **Trace** the model with torch.fx, the blocks kept as leaves (with timm's no-trace modules and
   functions), and **cut** the graph only where exactly one tensor is live: right before the first
   block, after each block (glue such as a downsample joins the next block), after the last. Where
   no such point exists between two blocks (dual paths, blocks that also take a size or a rotary
   embedding), they stay together as one coarser unit. Values that depend on no input (constants,
   parameters, a rotary table) are recomputed in each piece that needs them.
3. **Stem, units and head** are fx ``GraphModule`` pieces of that graph sharing the model's modules
   (a unit that is exactly one block call is the block module itself).
4. **Verify** ``stem -> units -> head == model(x)`` (eval, float32, max abs diff < 1e-4) and read
   layout, prefix tokens and stages from the units' output shapes; anything else raises
   :class:`SplitError` naming the model class and the reason.

Python-level branches in the stem and head (``if self.training``) are traced in eval mode; blocks
are the real modules, so their training behaviour (dropout, drop path) is untouched.
"""
from __future__ import annotations

import copy
import math
import operator
import weakref
from collections import Counter
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch import Tensor

from snnet.families.base import (
    AnchorView,
    Layout,
    default_input_size,
    registered_adapter,
)

TOLERANCE = 1e-4
_SEQUENCES = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
# Top-level children that are never part of the trunk of blocks.
_NOT_TRUNK = frozenset({
    "stem", "conv_stem", "patch_embed", "head", "heads", "classifier", "fc", "fc_norm", "head_drop",
    "pre_logits", "global_pool", "conv_head", "final_conv", "attn_pool", "norm",
})


class SplitError(TypeError):
    """A model the generic splitter cannot cut into stem -> blocks -> head (the message says why)."""

    def __init__(self, model: nn.Module, reason: str) -> None:
        super().__init__(
            f"cannot split {type(model).__name__} into stem -> blocks -> head: {reason}. Name its blocks "
            "(anchor_view(model, blocks=[...]) or `blocks:` in the anchor spec) or register a hand adapter "
            "with snnet.families.register_family."
        )


class ProbeError(SplitError):
    """The model itself fails on the probe input (e.g. an input size it was not built for)."""


def _reason(err: Exception) -> str:
    """An exception as one short line (its type, and its message's first line if it has one)."""
    lines = str(err).splitlines()
    return f"{type(err).__name__}: {lines[0][:200]}" if lines else type(err).__name__


# --- 1. blocks from structure ---------------------------------------------------------------
def _primitive(m: nn.Module) -> bool:
    return next(m.children(), None) is None


def _is_sequence(m: nn.Module) -> bool:
    """A container of >= 2 children, or a module made only of >= 2 same-class composite children
    (e.g. RegNet's stage of b1..bN)."""
    kids = list(m.children())
    if len(kids) < 2:
        return False
    if isinstance(m, _SEQUENCES):
        return True
    kinds = {type(k) for k in kids}
    return len(kinds) == 1 and not issubclass(kinds.pop(), _SEQUENCES) and not any(_primitive(k) for k in kids)


def _is_block_sequence(m: nn.Module, allow_primitive: bool) -> bool:
    return _is_sequence(m) and (allow_primitive or not all(_primitive(k) for k in m.children()))


def _is_stage(m: nn.Module, allow_primitive: bool) -> bool:
    """A block sequence, or a module holding one among its direct children (e.g. ConvNeXtStage)."""
    return _is_block_sequence(m, allow_primitive) or any(_is_block_sequence(c, False) for c in m.children())


def _find(module: nn.Module, path: str, allow_primitive: bool) -> list[str]:
    join = (lambda n: f"{path}.{n}") if path else (lambda n: n)
    if _is_block_sequence(module, allow_primitive):
        return [
            p for n, g in module.named_children()
            for p in (_find(g, join(n), False) if _is_stage(g, False) else [join(n)])
        ]
    kids = dict(module.named_children())
    if path and any(_is_block_sequence(c, False) for c in kids.values()):  # a stage: its other children are glue
        kids = {n: c for n, c in kids.items() if _is_block_sequence(c, False) or type(c) in {type(b) for b in kids.values() if _is_block_sequence(b, False)}}
    found = {n: _find(c, join(n), allow_primitive) for n, c in kids.items() if path or n not in _NOT_TRUNK}
    # A stage of one block (RegNet's s1) looks like no sequence: it is a block if a sibling of its class has blocks.
    staged = {type(kids[n]) for n, f in found.items() if f}

    def lone_block(n: str) -> bool:
        return type(kids[n]) in staged and not all(_primitive(k) for k in kids[n].children())

    return [p for n, f in found.items() for p in (f or ([join(n)] if lone_block(n) else []))]


def discover_blocks(model: nn.Module) -> list[str]:
    """Module paths of the model's blocks, in definition order, taken from its structure.

    Sequences of composite blocks first; else sequences of plain layers (VGG's ``features``); else
    the model's top-level children (Inception's ``Mixed_*``). Stems and heads are skipped by name.
    """
    return (
        _find(model, "", allow_primitive=False)
        or _find(model, "", allow_primitive=True)
        or [n for n, c in model.named_children() if n not in _NOT_TRUNK and not _primitive(c)]
    )


# --- 2. trace and cut -------------------------------------------------------------------------
class _Tracer(fx.Tracer):
    def __init__(self, leaves: set[int]) -> None:
        try:
            from timm.models._features_fx import (
                get_notrace_functions,
                get_notrace_modules,
            )

            functions, modules = tuple(get_notrace_functions()), tuple(get_notrace_modules())
        except ImportError:  # timm is optional for the splitter
            functions, modules = (), ()
        super().__init__(autowrap_functions=functions)
        self.leaves, self.leaf_types = leaves, modules

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return id(m) in self.leaves or isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)


class _Image(nn.Module):
    """``model(x)`` alone, so optional forward arguments keep their defaults while tracing."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Any:
        return self.model(x)


def _single_tensor_modules(model: nn.Module, x: Tensor) -> set[int]:
    """Ids of the modules that returned one tensor in a forward of ``x``: only those may be fx
    leaves (a module returning ``(x, size)`` is traced through, so its parts stay separate values)."""
    single: set[int] = set()

    def record(m: nn.Module, _args: Any, out: Any) -> None:
        if isinstance(out, Tensor):
            single.add(id(m))

    handles = [m.register_forward_hook(record) for m in model.modules()]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return single


def _glue_modules(model: nn.Module, block_names: list[str]) -> set[int]:
    """Modules holding no block: traced as leaves, so only the forwards that call blocks are
    traced (a stem with data-dependent Python is then no obstacle)."""
    holders = {""} | {".".join(name.split(".")[:i]) for name in block_names for i in range(1, name.count(".") + 2)}
    return {id(m) for name, m in model.named_modules() if name not in holders}


def _trace(model: nn.Module, names: list[str], leaves: set[int]) -> tuple[fx.GraphModule, nn.Module]:
    """``_Image(model)`` traced with ``leaves`` as leaf modules (targets read ``model.<path>``),
    and that wrapper (the real owner of every target)."""
    tracer = _Tracer(leaves)
    wrapper = _Image(model)
    try:
        graph = tracer.trace(wrapper)
    except Exception as err:  # noqa: BLE001  (fx raises many kinds; the reason goes into the message)
        raise SplitError(model, f"torch.fx cannot trace it ({_reason(err)})") from err
    return fx.GraphModule(wrapper, graph), wrapper


def _is_batch_size(n: fx.Node) -> bool:
    """``t.shape[0]`` or ``t.size(0)``: every activation has the same batch size, so a piece reads it
    from its own input instead of carrying it across a cut (Twins' ``B`` lives through the whole net)."""
    if n.op == "call_method" and n.target == "size" and n.args[1:] == (0,):
        return True
    if n.op == "call_function" and n.target is operator.getitem and n.args[1] == 0:
        src = n.args[0]
        return isinstance(src, fx.Node) and src.op == "call_function" and src.target is getattr and src.args[1] == "shape"
    return False


def _free_nodes(nodes: list[fx.Node]) -> set[fx.Node]:
    """Nodes that depend on no input but the batch size: recomputed wherever needed instead of
    carried across a cut (constants, parameters, a rotary table, ``B * heads``)."""
    free: set[fx.Node] = set()
    for n in nodes:
        if n.op == "get_attr" or _is_batch_size(n) or (
            n.op in ("call_function", "call_method", "call_module") and all(a in free for a in n.all_input_nodes)
        ):
            free.add(n)
    return free


def _live_sets(nodes: list[fx.Node], free: set[fx.Node]) -> list[set[fx.Node]]:
    """``live[p]``: values computed at positions <= p and used after p (free values excluded)."""
    index = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((index[u] for u in n.users), default=index[n]) for n in nodes if n not in free}
    live: list[set[fx.Node]] = []
    current: set[fx.Node] = set()
    for p, n in enumerate(nodes):
        if n in last_use:
            current.add(n)
        current = {v for v in current if last_use[v] > p}
        live.append(set(current))
    return live


def _is_container(n: fx.Node) -> bool:
    """A value only ever unpacked (``x, size = patch_embed(x)``): a tuple, never a cut."""
    return bool(n.users) and all(
        u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int) for u in n.users
    )


def _cuts(nodes: list[fx.Node], live: list[set[fx.Node]], block_pos: list[int]) -> list[int | None]:
    """Cut positions (cut after node p, where one value is live and is not unpacked as a tuple):
    before the first block (latest), after each block (earliest). That the value is a tensor is
    checked when the pieces run."""
    def valid(p: int) -> bool:
        return len(live[p]) == 1 and not _is_container(next(iter(live[p])))

    first = next((p for p in range(block_pos[0] - 1, -1, -1) if valid(p)), None)
    bounds = [*block_pos[1:], len(nodes) - 1]
    return [first] + [next((p for p in range(b, stop) if valid(p)), None) for b, stop in zip(block_pos, bounds)]


class GraphPiece(nn.Module):
    """One piece of the traced model. Buffers are read from the model at every call (so ``.to()``
    and ``load_state_dict`` on the model reach them); trace-time constants follow the input's device."""

    def __init__(self, gm: fx.GraphModule, model: nn.Module) -> None:
        super().__init__()
        self.graph_module = gm
        self._buffers_from: list[tuple[nn.Module, str, Any, str]] = []  # (holder in gm, attr, owner ref, attr)
        self._constants: list[tuple[nn.Module, str]] = []
        for node in gm.graph.nodes:
            if node.op != "get_attr":
                continue
            prefix, _, attr = node.target.rpartition(".")
            holder = gm.get_submodule(prefix)
            value = getattr(holder, attr)
            if isinstance(value, nn.Parameter) or not isinstance(value, Tensor):
                continue
            owner = _owner_of(model, node.target)
            if owner is not None:
                self._buffers_from.append((holder, attr, weakref.ref(owner), attr))
            else:
                self._constants.append((holder, attr))

    def __deepcopy__(self, memo: dict[int, Any]) -> "GraphPiece":
        """A copy whose buffer owners are the copies (in ``memo``) of this piece's owners: copied with
        its model (:func:`copy_with_view`), a piece reads the copied model's buffers."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key == "_buffers_from":
                value = [(copy.deepcopy(holder, memo), attr, weakref.ref(memo.get(id(owner()), owner())), owner_attr)
                         for holder, attr, owner, owner_attr in value]
            else:
                value = copy.deepcopy(value, memo)
            new.__dict__[key] = value
        return new

    def forward(self, x: Tensor) -> Any:
        for holder, attr, owner, owner_attr in self._buffers_from:
            setattr(holder, attr, getattr(owner(), owner_attr))
        for holder, attr in self._constants:
            t = getattr(holder, attr)
            if t.device != x.device:
                setattr(holder, attr, t.to(x.device))
        return self.graph_module(x)


def _owner_of(model: nn.Module, target: str) -> nn.Module | None:
    prefix, _, attr = target.rpartition(".")
    try:
        owner = model.get_submodule(prefix)
    except AttributeError:
        return None
    return owner if attr in owner._buffers else None


def _piece(traced: fx.GraphModule, model: nn.Module, nodes: list[fx.Node], free: set[fx.Node],
           inp: fx.Node | None, out: Any) -> nn.Module:
    """nodes[...] as a module from ``inp`` to ``out``; one bare block call is returned as the block."""
    if len(nodes) == 1 and nodes[0].op == "call_module" and nodes[0].args == (inp,) and not nodes[0].kwargs and out is nodes[0]:
        return traced.get_submodule(nodes[0].target)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}

    def get(n: fx.Node) -> fx.Node:
        if n not in env:
            if n not in free:
                raise AssertionError(f"internal: value {n} crosses a cut")
            if _is_batch_size(n):
                env[n] = graph.call_function(operator.getitem, (graph.call_function(getattr, (env[inp], "shape")), 0))
            else:
                env[n] = graph.node_copy(n, get)
        return env[n]

    if inp is not None:
        env[inp] = graph.placeholder("x")
    for n in nodes:
        if n.op == "placeholder":
            env[n] = graph.placeholder("x")
        elif n not in env:
            env[n] = graph.node_copy(n, get)
    graph.output(fx.map_arg(out, get))
    gm = fx.GraphModule(traced, graph)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return GraphPiece(gm, model)


# --- 3./4. split, verify, read shapes ---------------------------------------------------------
def _input_size(model: nn.Module) -> tuple[int, int, int]:
    try:
        return default_input_size(model)
    except ValueError:
        return (3, 224, 224)


def infer_layout(shape: tuple[int, ...], prefix_attr: int | None = None) -> tuple[Layout, int]:
    """Layout and prefix-token count of one activation shape (without batch): the one rule every
    method uses (a (H, W, C) map with H == W != C is nhwc; tokens keep the prefix that leaves a square grid)."""
    if len(shape) == 1:
        return "vector", 0
    if len(shape) == 2:  # prefix tokens: those that leave a square grid (the model's count, or none, where it says)
        n = shape[0]
        candidates = range(min(9, n)) if prefix_attr is None else (prefix_attr, 0)
        square = next((p for p in candidates if math.isqrt(n - p) ** 2 == n - p), None)
        return "tokens", square if square is not None else (prefix_attr or 0)
    if len(shape) == 3:
        a, b, c = shape
        return ("nhwc" if a == b and b != c else "nchw"), 0
    raise ValueError(f"activation of shape {shape} is none of tokens (N, C), nchw (C, H, W), nhwc (H, W, C), vector (C,)")


def _extent(shape: tuple[int, ...], layout: Layout, prefix: int) -> tuple[int, ...]:
    """The spatial extent of a block output (grid, or token count): where it changes, a stage ends."""
    return {"nchw": shape[1:], "nhwc": shape[:2], "tokens": (shape[0] - prefix,), "vector": ()}[layout]


def _run(model: nn.Module, stem: nn.Module, units: list[nn.Module], x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """``stem`` then ``units`` on ``x``: the final value and the value at every point (the stem's
    output, then every unit's). A piece that fails
    or passes on anything but one tensor raises :class:`SplitError` naming it."""
    h, outs = x, []
    for i, piece in enumerate([stem, *units]):
        where = "its stem" if i == 0 else f"its block {i - 1}"
        try:
            h = piece(h)
        except Exception as err:  # noqa: BLE001  (a piece cut at a wrong point fails in many ways)
            raise SplitError(model, f"{where} fails when run alone ({_reason(err)})") from err
        if not isinstance(h, Tensor):
            raise SplitError(model, f"{where} passes a {type(h).__name__} on, not one tensor")
        outs.append(h)
    return h, outs


_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict[str, Any]]" = weakref.WeakKeyDictionary()


def cached_view(model: nn.Module) -> AnchorView | None:
    """The generic view already made for ``model``, if any."""
    cached = _CACHE.get(model)
    return AnchorView(model=model, **cached["fields"]) if cached is not None else None


def copy_with_view(model: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """``copy.deepcopy(model, memo)`` that keeps its generic view: the copy's stem, blocks and head
    are copies over the copied modules, so a copy (e.g. export's trimmed one, whose unused tensors
    are ``None`` and could not be split again) splits as the original did."""
    memo = {} if memo is None else memo
    copied = copy.deepcopy(model, memo)
    cached = _CACHE.get(model)
    if cached is not None:
        _CACHE[copied] = {"requested": cached["requested"], "fields": copy.deepcopy(cached["fields"], memo)}
    return copied


def generic_view(
    model: nn.Module, blocks: Sequence[str] | None = None, input_size: tuple[int, int, int] | None = None
) -> AnchorView:
    """The verified generic split of ``model`` (cached per model; see the module docstring)."""
    cached = _CACHE.get(model)
    if cached is not None and (blocks is None or cached["requested"] == tuple(blocks)):
        return AnchorView(model=model, **cached["fields"])
    fields = _split(model, blocks, input_size)
    _CACHE[model] = {"requested": tuple(blocks) if blocks is not None else None, "fields": fields}
    return AnchorView(model=model, **fields)


@torch.no_grad()
def _split(model: nn.Module, blocks: Sequence[str] | None, input_size: tuple[int, int, int] | None) -> dict[str, Any]:
    names = list(blocks) if blocks is not None else discover_blocks(model)
    if not names:
        raise SplitError(model, "no block sequence found in its structure")
    modules = []
    for name in names:
        try:
            modules.append(model.get_submodule(name))
        except AttributeError:
            raise SplitError(model, f"block {name!r} is not a submodule") from None
    was_training = model.training
    model.eval()
    try:
        size = tuple(input_size or _input_size(model))
        x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
        try:
            ref = model(x)
        except Exception as err:  # noqa: BLE001
            raise ProbeError(model, f"model(x) itself fails at input size {size} ({_reason(err)})") from err
        try:  # every glue module a leaf: no forward needed before tracing
            traced, root = _trace(model, names, {id(m) for m in modules} | _glue_modules(model, names))
        except SplitError:  # e.g. a patch embed returning (x, size): trace through modules returning more than a tensor
            single = _single_tensor_modules(model, x)
            kept = [(n, m) for n, m in zip(names, modules) if id(m) in single]
            if not kept:
                raise SplitError(model, f"none of its blocks {names[:3]}... returns one tensor") from None
            names, modules = [n for n, _ in kept], [m for _, m in kept]
            traced, root = _trace(model, names, {id(m) for m in modules} | (_glue_modules(model, names) & single))
        nodes = list(traced.graph.nodes)
        free = _free_nodes(nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise SplitError(model, f"its forward takes {len(placeholders)} inputs, not one image tensor")
        targets = {f"model.{name}" for name in names}
        block_pos = [p for p, n in enumerate(nodes) if n.op == "call_module" and n.target in targets]
        called = Counter(nodes[p].target for p in block_pos)
        if not block_pos:
            raise SplitError(model, f"none of its blocks {names[:3]}... is called by forward")
        if max(called.values()) > 1:
            raise SplitError(model, f"block {called.most_common(1)[0][0]!r} is called more than once")
        live = _live_sets(nodes, free)
        cuts = _cuts(nodes, live, block_pos)
        if cuts[0] is None:
            raise SplitError(model, f"more than one value flows into its first block {nodes[block_pos[0]].target!r}")
        if cuts[-1] is None:
            raise SplitError(model, "more than one value flows from its last block into the head")
        kept = [c for c in cuts if c is not None]
        cut_value = {c: next(iter(live[c])) for c in kept}
        output = next(n for n in nodes if n.op == "output").args[0]
        stem = _piece(traced, root, nodes[: kept[0] + 1], free, None, cut_value[kept[0]])
        units = [
            _piece(traced, root, nodes[a + 1: b + 1], free, cut_value[a], cut_value[b]) for a, b in zip(kept, kept[1:])
        ]
        head = _piece(traced, root, nodes[kept[-1] + 1: -1], free, cut_value[kept[-1]], output)
        h, outs = _run(model, stem, units, x)
        _check_output(model, head(h), ref)
        return _describe(model, stem, units, head, [tuple(o.shape[1:]) for o in outs])
    finally:
        model.train(was_training)


def _check_output(model: nn.Module, y: Any, ref: Any) -> None:
    if not isinstance(y, Tensor) or not isinstance(ref, Tensor) or y.shape != ref.shape:
        raise SplitError(model, "its output is not one tensor")
    diff = (y - ref).abs().max().item()
    if not diff < TOLERANCE:
        raise SplitError(model, f"stem -> blocks -> head differs from model(x) by {diff:.3g} (> {TOLERANCE})")


@torch.no_grad()
def check_view(view: AnchorView, input_size: tuple[int, int, int] | None = None) -> float:
    """Raise :class:`SplitError` unless ``stem -> blocks -> head == model(x)`` (eval, float32, any
    adapter, hand-written or generic); returns the max abs difference."""
    model = view.model
    was_training = model.training
    model.eval()
    try:
        x = torch.randn(2, *(input_size or _input_size(model)), generator=torch.Generator().manual_seed(0))
        y, _ = _run(model, view.stem, view.blocks, x)
        y, ref = view.head(y), model(x)
        _check_output(model, y, ref)
        return (y - ref).abs().max().item()
    finally:
        model.train(was_training)


def _describe(model: nn.Module, stem: nn.Module, units: list[nn.Module], head: nn.Module,
              shapes: list[tuple[int, ...]]) -> dict[str, Any]:
    """View fields from the output shapes at every point (stem, then each unit): each point's
    layout and prefix tokens, stages (a new stage wherever the grid or the prefix-token count
    changes, so a vector stage never shares a stage with maps), ``layout`` the most common one."""
    prefix_attr = getattr(model, "num_prefix_tokens", None)
    prefix_attr = prefix_attr if isinstance(prefix_attr, int) else None
    try:
        points = [infer_layout(s, prefix_attr) for s in shapes]
    except ValueError as err:
        raise SplitError(model, str(err)) from None
    blocks = points[1:]
    counts = Counter(blocks)
    layout, prefix = max(reversed(blocks), key=lambda lp: counts[lp])
    keys = [(_extent(s, lay, p), p) for s, (lay, p) in zip(shapes[1:], blocks)]
    stages = [0]
    for prev, cur in zip(keys, keys[1:]):
        stages.append(stages[-1] + (cur != prev))
    n_stages = stages[-1] + 1
    isotropic = n_stages == 1 and len(set(shapes[1:])) == 1 and len(set(blocks)) == 1
    return dict(
        stem=stem, blocks=list(units), head=head, head_modules=[head], block_stages=stages, layout=layout,
        stitch_stages=(0,) if n_stages == 1 else tuple(range(n_stages - 1)), isotropic=isotropic,
        num_prefix_tokens=prefix if layout == "tokens" else 0,
        point_layouts=[lay for lay, _ in points], point_prefix_tokens=[p for _, p in points],
    )


def anchor_view(
    model: nn.Module, blocks: Sequence[str] | None = None, input_size: tuple[int, int, int] | None = None
) -> AnchorView:
    """The block view of ``model``: its hand adapter if one is registered, else the generic splitter.

    ``blocks`` names the block modules (e.g. ``["features.0", "features.3"]``) and always uses the
    generic splitter. Generic views are verified (``stem -> blocks -> head == model(x)``) and cached
    per model, so later calls (export, general stitching) return the same split. ``input_size``
    (C, H, W) is the probe image size for the generic splitter (default: the model's own).
    """
    if blocks is None and (cached := cached_view(model)) is not None:  # e.g. split by user-named blocks
        return cached
    adapter = registered_adapter(model) if blocks is None else None
    return adapter(model) if adapter is not None else generic_view(model, blocks, input_size)
