"""Hugging Face causal language models as block views: token embedding -> decoder layers -> norm + LM head.

A decoder layer needs more than the hidden state: the rotary position embeddings (cos, sin) and the
causal mask, which the transformers model computes once per forward and hands to every layer. Here
each anchor has an :class:`LMContext` that computes them from the hidden state's sequence length
(at most once per length, device, dtype and attention implementation; recomputed only when one of
them changes) and every block wrapper (:class:`DecoderBlock`) reads them from its own anchor's
context. So a stitched path (anchor A's embedding and first layers, then anchor B's layers) runs
B's layers with B's rotary embeddings and mask, and ``stem -> blocks -> head`` equals the
model's logits exactly. The hidden state between blocks is (B, T, C): layout ``tokens``, no prefix
tokens; the input is token ids (B, T), int64; FLOPs are per token at the probe's sequence length.

Sequences are packed (no padding), so positions are ``0..T-1`` and the mask is the plain causal one,
unless a generation step set a :class:`DecodeState` on the context: then positions and masks follow
its attention mask (left padding) and each layer reads and extends the anchor's own KV cache.
Supported architectures: :data:`ARCHITECTURES` (Llama also covers Qwen2/3, Mistral, SmolLM).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from snnet.families.base import AnchorView, register_family

DEFAULT_MAX_PROBE_TOKENS = 1024  # probe length when no input size is configured: min(context, this)


@dataclass(frozen=True)
class LMArchitecture:
    """Where a causal-LM class keeps its parts (attribute names); ``rotary``/``positions``: the base
    model's rotary embedding module or learned position embedding, whichever the family uses."""

    base: str
    embed: str
    layers: str
    norm: str
    head: str
    rotary: str | None = None
    positions: str | None = None
    dropout: str | None = None
    cache_arg: str = "cache"  # the decoder layer's keyword for the KV cache


LLAMA = LMArchitecture(base="model", embed="embed_tokens", layers="layers", norm="norm", head="lm_head", rotary="rotary_emb")
ARCHITECTURES: dict[str, LMArchitecture] = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,
    "Qwen2ForCausalLM": LLAMA,
    "Qwen3ForCausalLM": LLAMA,
    "GPT2LMHeadModel": LMArchitecture(base="transformer", embed="wte", layers="h", norm="ln_f", head="lm_head",
                                      positions="wpe", dropout="drop"),
    "GPTNeoXForCausalLM": LMArchitecture(base="gpt_neox", embed="embed_in", layers="layers", norm="final_layer_norm",
                                         head="lm_head", rotary="rotary_emb", dropout="emb_dropout",
                                         cache_arg="layer_past"),
}


def _mask_kind(config: Any, layer: int) -> str:
    """``full_attention`` or ``sliding_attention`` for decoder layer ``layer``, as the model decides it."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[layer]
    return "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"


def context_length(model: nn.Module) -> int:
    return int(model.config.max_position_embeddings)


@dataclass
class DecodeState:
    """One generation step as an anchor's layers see it: the 2D attention mask over past and new
    tokens (B, past + T; 0 at left padding), the new tokens' positions (B, T), and the anchor's own
    KV cache (a transformers ``Cache``; None: the whole sequence is the input, nothing cached)."""

    attention_mask: Tensor
    position_ids: Tensor
    cache: Any = None
    layer_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)  # per mask kind, made by its first layer


class LMContext:
    """What one anchor's decoder layers share in a forward: positions, rotary embeddings, masks
    (and, while generating, the step's :class:`DecodeState`)."""

    def __init__(self, model: nn.Module, arch: LMArchitecture, name: str) -> None:
        self.model, self.arch, self.name = model, arch, name
        self.base = getattr(model, arch.base)
        self._key: tuple | None = None
        self._value: dict[str, Any] = {}
        self.state: DecodeState | None = None

    def position_ids(self, ids: Tensor) -> Tensor:
        """Positions of the token ids (B, T) the stem embeds: ``0..T-1``, or the generation step's."""
        if self.state is not None:
            self.check_length(self.state.attention_mask.shape[1])
            return self.state.position_ids
        self.check_length(ids.shape[1])
        return torch.arange(ids.shape[1], device=ids.device)[None]

    def check_length(self, length: int) -> None:
        limit = context_length(self.model)
        if length > limit:
            raise ValueError(f"sequence of {length} tokens is longer than anchor {self.name}'s context of {limit} tokens "
                             "(config.max_position_embeddings); use sequences of at most that length")

    def layer_kwargs(self, hidden: Tensor, kind: str, index: int) -> dict[str, Any]:
        """Keyword arguments of decoder layer ``index`` (mask of ``kind``) for hidden states (B, T, C)."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        if self.state is not None:
            return self._step_kwargs(hidden, kind, index)
        config = self.model.config
        key = (hidden.shape[1], hidden.device, hidden.dtype, config._attn_implementation, torch.is_inference_mode_enabled())
        if key != self._key:
            self.check_length(hidden.shape[1])
            positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
            probe = hidden[:1].detach()  # the masks broadcast over the batch: any rows may run (forward_rows)
            value: dict[str, Any] = {"position_ids": positions, "masks": {}}
            kinds = {_mask_kind(config, i) for i in range(config.num_hidden_layers)}
            for k in kinds:
                make = create_sliding_window_causal_mask if k == "sliding_attention" else create_causal_mask
                value["masks"][k] = make(config=config, inputs_embeds=probe, attention_mask=None, cache=None, position_ids=positions)
            if self.arch.rotary is not None:
                value["position_embeddings"] = getattr(self.base, self.arch.rotary)(probe, position_ids=positions)
            self._key, self._value = key, value
        value = self._value
        out = {"attention_mask": value["masks"][kind], "position_ids": value["position_ids"]}
        if "position_embeddings" in value:
            out["position_embeddings"] = value["position_embeddings"]
        return out

    def _step_kwargs(self, hidden: Tensor, kind: str, index: int) -> dict[str, Any]:
        """A generation step's layer arguments: made by the first layer of each mask kind on the path,
        before it extends the cache (so the mask is sized on that layer's past), shared by the rest."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        state = self.state
        if kind not in state.layer_kwargs:
            make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
            probe = hidden.detach()
            mask = make(config=self.model.config, inputs_embeds=probe, attention_mask=state.attention_mask, cache=state.cache,
                        position_ids=state.position_ids, layer_idx=index if state.cache is not None else None)
            kwargs = {"attention_mask": mask, "position_ids": state.position_ids, self.arch.cache_arg: state.cache}
            shared = next(iter(state.layer_kwargs.values()), None)
            if self.arch.rotary is not None:
                kwargs["position_embeddings"] = (shared["position_embeddings"] if shared is not None
                                                 else getattr(self.base, self.arch.rotary)(probe, position_ids=state.position_ids))
            state.layer_kwargs[kind] = kwargs
        return state.layer_kwargs[kind]


class DecoderBlock(nn.Module):
    """One decoder layer as a block ``(B, T, C) -> (B, T, C)``; positions and mask from its anchor's context."""

    def __init__(self, layer: nn.Module, context: LMContext, index: int) -> None:
        super().__init__()
        self.layer = layer
        self.context = [context]  # a list: not a submodule, the context is shared by the anchor's blocks
        self.kind, self.index = _mask_kind(context.model.config, index), index

    def forward(self, x: Tensor) -> Tensor:
        out = self.layer(x, **self.context[0].layer_kwargs(x, self.kind, self.index))
        return out[0] if isinstance(out, tuple) else out


def lm_view(model: nn.Module) -> AnchorView:
    """The block view of a supported transformers causal LM."""
    arch = architecture(model)
    base = getattr(model, arch.base)
    context = LMContext(model, arch, getattr(model.config, "name_or_path", "") or type(model).__name__)
    embed = getattr(base, arch.embed)
    positions = getattr(base, arch.positions) if arch.positions else None
    dropout = getattr(base, arch.dropout) if arch.dropout else nn.Identity()

    def stem(ids: Tensor) -> Tensor:
        if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"a language model takes token ids (B, T) int64, got {tuple(ids.shape)} {ids.dtype}")
        position_ids = context.position_ids(ids)
        x = embed(ids)
        if positions is not None:
            x = x + positions(position_ids)
        return dropout(x)

    norm, head = getattr(base, arch.norm), getattr(model, arch.head)
    layers = list(getattr(base, arch.layers))[: model.config.num_hidden_layers]
    blocks = [DecoderBlock(layer, context, i) for i, layer in enumerate(layers)]
    return AnchorView(
        model=model, stem=stem, blocks=blocks, head=lambda x: head(norm(x)), head_modules=[norm, head],
        block_stages=[0] * len(blocks), layout="tokens", stitch_stages=(0,), isotropic=True,
        input_dtype=torch.int64, input_size=(min(context_length(model), DEFAULT_MAX_PROBE_TOKENS),), per_token=True,
        stem_modules=[embed] + ([positions] if positions is not None else []),
    )


def lm_context(view: AnchorView) -> LMContext:
    """The context an LM view's decoder blocks share (where a generation step sets its state)."""
    block = view.blocks[0] if view.blocks else None
    if not isinstance(block, DecoderBlock):
        raise ValueError(f"{type(view.model).__name__} is not a language model view (its blocks are not decoder layers)")
    return block.context[0]


def architecture(model: nn.Module) -> LMArchitecture:
    name = type(model).__name__
    if name not in ARCHITECTURES:
        raise ValueError(f"{name} is not a supported causal language model; supported: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def _register() -> None:
    import transformers

    classes = [getattr(transformers, name) for name in ARCHITECTURES if hasattr(transformers, name)]
    register_family(*classes)(lm_view)


def load_causal_lm(name: str, config: dict[str, Any] | None = None, pretrained: bool = True, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A causal LM: ``from_pretrained`` of a local directory or hub name, or with ``config`` (a mapping
    with ``model_type``, e.g. ``{"model_type": "llama", "hidden_size": 64, ...}``) random weights.
    ``pretrained=False`` builds the named model's architecture with random weights (its config only).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if config is not None:
        cfg = dict(config)
        model_type = cfg.pop("model_type", None)
        if model_type is None:
            raise ValueError(f"anchor {name!r}: a config needs 'model_type' (e.g. 'llama', 'gpt2', 'gpt_neox'), got keys {sorted(config)}")
        hf_config = AutoConfig.for_model(model_type, **cfg)
        return _causal(AutoModelForCausalLM, hf_config, name, dtype)
    path = Path(os.path.expanduser(os.path.expandvars(name)))
    looks_local = name.startswith((".", "/", "~", "$")) or path.exists()
    if looks_local and not (path / "config.json").is_file():
        raise FileNotFoundError(f"language model directory {path} not found (or has no config.json); "
                                "save one with model.save_pretrained(dir) or give a hub name")
    source = str(path) if looks_local else name
    try:
        hf_config = AutoConfig.from_pretrained(source)
    except OSError as e:  # not a folder here, and not a hub model that can be reached (offline, no such repo)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"language model {name!r}: no such directory (from {os.getcwd()}) and no reachable hub "
                                f"model of that name ({first}); give the directory written by save_pretrained, "
                                "relative to where you run snnet, or a hub name") from None
    if not pretrained:
        return _causal(AutoModelForCausalLM, hf_config, name, dtype)
    _check_causal(hf_config, name)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    architecture(model)
    return model


def _check_causal(hf_config: Any, name: str) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_class = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(hf_config.model_type)
    if model_class is None:
        raise ValueError(f"anchor {name!r} is a {hf_config.model_type!r} model, not a causal language model "
                         f"({AutoModelForCausalLM.__name__} cannot load it); supported: {sorted(ARCHITECTURES)}")
    if model_class not in ARCHITECTURES:
        raise ValueError(f"anchor {name!r}: {model_class} is not a supported causal language model; supported: {sorted(ARCHITECTURES)}")


def _causal(auto: Any, hf_config: Any, name: str, dtype: torch.dtype) -> nn.Module:
    _check_causal(hf_config, name)
    model = auto.from_config(hf_config, dtype=dtype)
    architecture(model)
    return model


def vocab_size(model: nn.Module) -> int:
    return int(model.config.vocab_size)


def check_same_vocabulary(models: list[nn.Module], names: list[str]) -> None:
    """Stitched language models must share one tokenizer: equal vocabulary sizes at least."""
    sizes = [vocab_size(m) for m in models]
    for name, size in zip(names[1:], sizes[1:]):
        if size != sizes[0]:
            raise ValueError(f"anchors {names[0]!r} (vocabulary of {sizes[0]} tokens) and {name!r} ({size} tokens) do not "
                             "share a vocabulary; stitched language models need one tokenizer")


_register()
