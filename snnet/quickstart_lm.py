"""Pretraining the LM quickstart's anchor family offline: three tiny Llamas on the Python standard
library's own sources, byte-level.

Every Python installation ships its standard library, so the corpus needs no download; bytes are
the tokens (256), so no tokenizer either. The three sizes differ in width (and so in FLOPs per
token, more than 2x between neighbours) and share depth, so SN-Net stitches them as an isotropic
family. Each is saved with ``save_pretrained`` (config.json + model.safetensors), the layout a hub
model has, and loaded back by the fit config through the same ``from_pretrained`` code.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from snnet.families.lm import load_causal_lm
from snnet.optim import decay_groups, warmup_cosine
from snnet.text_data import BYTE_VOCAB, TextDataModule

# the task of configs/quickstart_lm.yaml: these must match its data section
QUICKSTART_LM_SEQ_LEN, QUICKSTART_LM_MAX_BYTES = 64, 1_500_000
QUICKSTART_LM_WIDTHS: dict[str, int] = {"llama_s": 32, "llama_m": 64, "llama_l": 128}
QUICKSTART_LM_DEPTH = 4


def quickstart_lm_config(width: int, depth: int = QUICKSTART_LM_DEPTH, seq_len: int = QUICKSTART_LM_SEQ_LEN) -> dict[str, Any]:
    """A tiny byte-level Llama: ``width`` wide (heads of 16), MLP 8/3 x as Llama, context ``seq_len``."""
    return dict(model_type="llama", vocab_size=BYTE_VOCAB, hidden_size=width, intermediate_size=8 * width // 3,
                num_hidden_layers=depth, num_attention_heads=width // 16, num_key_value_heads=width // 16,
                max_position_embeddings=seq_len, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
                pad_token_id=None)


@torch.inference_mode()
def perplexity(model: torch.nn.Module, datamodule: TextDataModule) -> float:
    """Validation perplexity (exp of the mean next-token cross-entropy over every token)."""
    model.eval()
    nll, tokens = 0.0, 0
    for x, y in datamodule.val_dataloader():
        logits = model(x, use_cache=False).logits
        nll += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
        tokens += y.numel()
    return math.exp(nll / tokens)


def pretrain_lm(width: int, datamodule: TextDataModule, steps: int, lr: float, seed: int) -> torch.nn.Module:
    """One anchor from scratch: AdamW, warmup then cosine, ``steps`` batches of the training split."""
    torch.manual_seed(seed)
    model = load_causal_lm(f"llama_w{width}", quickstart_lm_config(width, seq_len=datamodule.seq_len))
    optimizer = torch.optim.AdamW(decay_groups(model.parameters(), 0.05), lr=lr, betas=(0.9, 0.95))
    schedule = warmup_cosine(optimizer, steps, warmup_steps=steps // 20, min_lr=lr / 20)["scheduler"]
    model.train()
    step = 0
    while step < steps:
        for x, y in datamodule.train_dataloader():
            loss = F.cross_entropy(model(x, use_cache=False).logits.flatten(0, 1), y.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            if step == steps:
                break
    return model.eval()


def pretrain_lm_anchors(
    out_dir: str | Path = "outputs/quickstart_lm/anchors",
    widths: dict[str, int] | None = None,
    steps: int = 200,
    lr: float = 3e-3,
    batch_size: int = 32,
    seed: int = 0,
) -> dict[str, float]:
    """Pretrain each anchor and write ``<out_dir>/<name>/`` (``save_pretrained``); returns validation perplexity per anchor."""
    out = Path(out_dir)
    datamodule = TextDataModule(corpus="python_stdlib", max_bytes=QUICKSTART_LM_MAX_BYTES, seq_len=QUICKSTART_LM_SEQ_LEN,
                                batch_size=batch_size, val_limit=256, seed=seed)
    datamodule.setup()
    ppl = {}
    for name, width in (widths or QUICKSTART_LM_WIDTHS).items():
        start = time.perf_counter()
        model = pretrain_lm(width, datamodule, steps, lr, seed)
        model.save_pretrained(out / name)
        ppl[name] = perplexity(model, datamodule)
        print(f"{name} (width {width}): validation perplexity {ppl[name]:.3f} per byte ({time.perf_counter() - start:.0f} s) -> {out / name}")
    return ppl
