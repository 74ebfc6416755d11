"""Shapes, FLOPs and parameters of every part of an anchor, from one probe forward.

FLOPs follow ``torch.utils.flop_counter.FlopCounterMode``: one multiply-add counts as 2 FLOPs,
per image. (The SN-Net paper's "FLOPs" are multiply-adds: divide ours by 2 to compare.)
Fused attention (``scaled_dot_product_attention``) has no FLOP formula on CPU, so attention is
switched to timm's explicit path while counting.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from snnet.families import AnchorView, default_input_size


@contextmanager
def unfused_attention(model: nn.Module) -> Iterator[None]:
    """Temporarily route timm attention (``fused_attn``) and transformers attention (the config's
    attention implementation) through explicit matmuls so FLOPs are counted."""
    fused = [m for m in model.modules() if getattr(m, "fused_attn", False)]
    hf_impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    switch_hf = hf_impl not in (None, "eager") and hasattr(model, "set_attn_implementation")
    for m in fused:
        m.fused_attn = False
    if switch_hf:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        for m in fused:
            m.fused_attn = True
        if switch_hf:
            model.set_attn_implementation(hf_impl)


def count_flops(fn: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, int]:
    with FlopCounterMode(display=False) as counter:
        y = fn(x)
    return y, counter.get_total_flops()


def num_params(modules: list[nn.Module]) -> int:
    seen = {id(p): p for m in modules for p in m.parameters()}
    return sum(p.numel() for p in seen.values())


def num_shared_params(a: list[nn.Module], b: list[nn.Module]) -> int:
    """Parameters held by modules of both lists (tied weights)."""
    in_b = {id(p) for m in b for p in m.parameters()}
    return sum(p.numel() for p in {id(p): p for m in a for p in m.parameters() if id(p) in in_b}.values())


@dataclass
class AnchorProfile:
    """Costs per sample, or per token (``flops_divisor``: the probe's tokens) for a language model."""

    input_size: tuple[int, ...]
    stem_shape: tuple[int, ...]  # without batch
    block_shapes: list[tuple[int, ...]]
    stem_flops: int
    block_flops: list[int]
    head_flops: int
    stem_params: int
    block_params: list[int]
    head_params: int
    flops_divisor: int = 1
    tied_params: int = 0  # counted in both stem_params and head_params (an embedding tied to the output layer)

    def per_unit(self, flops: int) -> int:
        """FLOPs of a probe forward in this profile's unit (per sample, or per token)."""
        return round(flops / self.flops_divisor)

    @property
    def flops(self) -> int:
        return self.stem_flops + sum(self.block_flops) + self.head_flops

    @property
    def params(self) -> int:
        return self.end_params(stem=True, head=True) + sum(self.block_params)

    def end_params(self, stem: bool, head: bool) -> int:
        """Parameters of the stem and/or the head, a tensor they share counted once."""
        return self.stem_params * stem + self.head_params * head - self.tied_params * (stem and head)


@torch.no_grad()
def profile_anchor(view: AnchorView, input_size: tuple[int, ...] | None = None) -> AnchorProfile:
    """Run one sample through the view, recording each part's output shape and FLOPs (per token for
    a ``per_token`` view: a language model's FLOPs at the probe's sequence length, divided by it)."""
    model = view.model
    input_size = tuple(input_size or view.input_size or default_input_size(model))
    divisor = input_size[0] if view.per_token else 1
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with unfused_attention(model):
            x = torch.zeros(1, *input_size, device=param.device, dtype=view.input_dtype or param.dtype)
            x, stem_flops = count_flops(view.stem, x)
            stem_shape = tuple(x.shape[1:])
            shapes, flops = [], []
            for block in view.blocks:
                x, f = count_flops(block, x)
                shapes.append(tuple(x.shape[1:]))
                flops.append(f)
            _, head_flops = count_flops(view.head, x)
    finally:
        model.train(was_training)
    block_params = [num_params([b]) for b in view.blocks]
    head_params = num_params(view.head_modules)
    total = num_params([model])
    tied = num_shared_params(view.stem_modules, view.head_modules) if view.stem_modules is not None else 0
    return AnchorProfile(
        input_size=input_size, stem_shape=stem_shape, block_shapes=shapes, stem_flops=round(stem_flops / divisor),
        block_flops=[round(f / divisor) for f in flops], head_flops=round(head_flops / divisor),
        stem_params=total - sum(block_params) - head_params + tied, block_params=block_params, head_params=head_params,
        flops_divisor=divisor, tied_params=tied,
    )
