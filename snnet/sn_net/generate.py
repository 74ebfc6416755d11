"""Text generation along one stitch's path of a stitchable language model.

Each step runs the path's own steps (first anchor's stem, blocks, stitching layers, last anchor's
head) on the new tokens only: every anchor on the path keeps its own transformers KV cache, indexed
by its layers' own ``layer_idx``, and a stitching layer maps just the new tokens' hidden states
(it is per token). Positions and masks follow the attention mask, so prompts of different lengths
run as one left-padded batch. On an anchor's path this is the transformers model's own computation,
so greedy decoding gives exactly the tokens of its ``generate``; ``use_cache=False`` recomputes the
whole sequence at every step instead (the reference a cached stitched path must equal).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor

from snnet.families.lm import DecodeState, context_length, lm_context
from snnet.sn_net.network import StitchableNetwork


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the last position's logits (float32): ``temperature`` 0
    is greedy (argmax); otherwise a sample at that temperature from the ``top_k`` most likely tokens
    (0: no limit) cut to the smallest set whose probability reaches ``top_p`` (1: no cut)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0 or self.temperature == float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0: no limit), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1: no cut), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def filter(self, logits: Tensor) -> Tensor:
        """``logits`` (B, V) at the temperature, the tokens outside top-k / top-p set to -inf."""
        logits = logits / self.temperature
        if 0 < self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(-1)
            before = probs.cumsum(-1) - probs  # probability of the more likely tokens
            drop = torch.zeros_like(before, dtype=torch.bool).scatter(-1, order, before >= self.top_p)
            logits = logits.masked_fill(drop, float("-inf"))
        return logits

    def choose(self, logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The next token of each row of ``logits`` (B, V) float32, as int64 (B,)."""
        if self.greedy:
            return logits.argmax(-1)
        return torch.multinomial(self.filter(logits).softmax(-1), 1, generator=generator)[:, 0]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Prompts of different lengths as one batch: token ids (B, T) int64 padded on the left with
    ``pad_id`` and the attention mask (B, T) int64, 0 on the padding."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError(f"need at least one prompt and at least one token per prompt; got lengths {[len(p) for p in prompts]}")
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.int64, device=device)
    mask = torch.zeros((len(prompts), length), dtype=torch.int64, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.int64, device=device)
        mask[row, length - len(prompt):] = 1
    return ids, mask


def path_context_length(net: StitchableNetwork, stitch: int) -> int:
    """The longest sequence every anchor on ``stitch``'s path reads (tokens)."""
    return min(context_length(net.anchors[a]) for a in net.configs[net.check_id(stitch)].anchors)


def _check_prompt(net: StitchableNetwork, ids: Tensor, mask: Tensor | None, stitch: int, max_new_tokens: int) -> Tensor:
    if not net.is_language_model:
        raise ValueError(f"generation needs a language model; this network's anchors are {type(net.anchors[0]).__name__}")
    if ids.ndim != 2 or ids.dtype != torch.int64 or ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be token ids (B, T) int64 with T >= 1, got {tuple(ids.shape)} {ids.dtype}")
    if mask is None:
        mask = torch.ones_like(ids)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask {tuple(mask.shape)} must have the prompt's shape {tuple(ids.shape)}")
    mask = mask.to(device=ids.device, dtype=torch.int64)
    if not bool((mask[:, -1] == 1).all() and (mask.diff(dim=-1) >= 0).all()):
        raise ValueError("attention_mask must be left padding: 0s then 1s in every row, ending in a 1 (see left_pad)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    limit = path_context_length(net, stitch)
    if ids.shape[1] + max_new_tokens - 1 > limit:
        raise ValueError(f"a prompt of {ids.shape[1]} tokens plus {max_new_tokens} new tokens is longer than stitch {stitch}'s "
                         f"context of {limit} tokens; ask for at most {max(limit - ids.shape[1] + 1, 0)} new tokens")
    return mask


@torch.no_grad()
def stream(
    net: StitchableNetwork,
    prompt_ids: Tensor,
    stitch: int | None = None,
    max_new_tokens: int = 32,
    attention_mask: Tensor | None = None,
    sampling: Sampling = Sampling(),
    stop_tokens: Sequence[int] = (),
    pad_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[Tensor]:
    """Yield every row's next token (B,) int64, one step at a time, on ``stitch``'s path (None:
    the active stitch). A row that produced one of ``stop_tokens`` yields ``pad_id`` afterwards
    (default: the first stop token); the steps end after ``max_new_tokens`` or once every row
    stopped. ``prompt_ids`` (B, T) with ``attention_mask`` (B, T), 0 on left padding (see
    :func:`left_pad`). Call ``net.eval()`` first, as for any inference."""
    stitch = net.check_id(net.stitch_id if stitch is None else stitch)
    device = next(net.parameters()).device
    ids = prompt_ids.to(device)
    mask = _check_prompt(net, ids, attention_mask, stitch, max_new_tokens)
    anchors = list(dict.fromkeys(net.configs[stitch].anchors))
    contexts = [lm_context(net.views[a]) for a in anchors]
    steps = net.path_modules(stitch)
    stem, body, head = steps[0], steps[1:-1], steps[-1]
    stops = torch.as_tensor(list(stop_tokens), dtype=torch.int64, device=device)
    pad = torch.as_tensor(pad_id if pad_id is not None else (stop_tokens[0] if stop_tokens else 0), dtype=torch.int64, device=device)
    caches = [_new_cache(net.anchors[a]) if use_cache else None for a in anchors]
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    tokens = ids  # what the next step reads: the new tokens (cached) or the whole sequence
    try:
        for step in range(max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, mask.shape[1] - tokens.shape[1]:]
            for context, cache in zip(contexts, caches):
                context.state = DecodeState(mask, positions, cache)
            x = stem(tokens)
            for module in body:
                x = module(x)
            logits = head(x[:, -1:])[:, 0].float()
            new = torch.where(finished, pad, sampling.choose(logits, generator))
            yield new
            if len(stops):
                finished |= torch.isin(new, stops)
                if bool(finished.all()):
                    return
            ids = torch.cat([ids, new[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            tokens = new[:, None] if use_cache else ids
    finally:
        for context in contexts:
            context.state = None


def generate(net: StitchableNetwork, prompt_ids: Tensor, stitch: int | None = None, max_new_tokens: int = 32,
             **options) -> Tensor:
    """The new tokens (B, N) int64 of :func:`stream` (same options), N <= ``max_new_tokens``."""
    tokens = list(stream(net, prompt_ids, stitch, max_new_tokens, **options))
    if not tokens:
        return torch.zeros((prompt_ids.shape[0], 0), dtype=torch.int64, device=prompt_ids.device)
    return torch.stack(tokens, dim=1)


def _new_cache(model: torch.nn.Module):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)
