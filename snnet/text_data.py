"""Text for language-model stitching: a tokenized corpus packed into fixed-length sequences.

Documents (files) are split into train and validation by a seeded permutation (whole documents,
so no sequence straddles the split), each split's tokens are concatenated and cut into sequences
of ``seq_len + 1`` tokens overlapping by one: a batch is ``(ids[:, :-1], ids[:, 1:])``, inputs and
next-token targets, both (B, T) int64. The sequence length comes from the network's input size
(the CLI links the model's ``data_config``), so FLOPs per token are counted at the length trained on.

Corpora: ``paths`` (files or glob patterns, UTF-8 text) or ``python_stdlib`` (the standard
library's own ``.py`` sources, which ship with every Python: an offline corpus). Tokenizers:
``bytes`` (byte-level, 256 tokens) or a transformers tokenizer (local directory or hub name).
"""
from __future__ import annotations

import glob
import logging
import sysconfig
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from snnet.anchors import expand_path
from snnet.data import EpochDataModule, random_subset
from snnet.determinism import global_rngs_kept

log = logging.getLogger(__name__)

BYTE_VOCAB = 256


def stdlib_sources(max_bytes: int | None = None) -> list[Path]:
    """The standard library's ``.py`` files (sorted; ``site-packages`` and tests left out), up to
    ``max_bytes`` in all: the same list on every machine with the same Python."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if rel[0] in ("site-packages", "dist-packages", "test", "idlelib") or "tests" in rel:
            continue
        files.append(path)
        total += path.stat().st_size
        if max_bytes is not None and total >= max_bytes:
            break
    return files


def corpus_files(paths: list[str] | None, corpus: str | None, max_bytes: int | None) -> list[Path]:
    """The documents of ``paths`` (files or globs, each must match) or of the named ``corpus``."""
    if (paths is None) == (corpus is None):
        raise ValueError(f"give exactly one of paths (files or globs) or corpus ('python_stdlib'), got paths={paths} corpus={corpus!r}")
    if corpus is not None:
        if corpus != "python_stdlib":
            raise ValueError(f"unknown corpus {corpus!r}; choose 'python_stdlib' or give paths")
        return stdlib_sources(max_bytes)
    files: list[Path] = []
    for pattern in paths:
        expanded = str(expand_path(pattern))
        matched = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if Path(p).is_file())
        if not matched:
            raise FileNotFoundError(f"text corpus path {pattern!r} matches no file (expanded to {expanded})")
        files += matched
    return files


class Tokenizer:
    """Byte-level (``bytes``: every UTF-8 byte a token) or a transformers tokenizer by directory/hub name."""

    def __init__(self, name: str = "bytes") -> None:
        self.name = name
        self.hf = None
        if name != "bytes":
            from transformers import AutoTokenizer

            self.hf = AutoTokenizer.from_pretrained(str(expand_path(name)) if Path(expand_path(name)).exists() else name)

    @property
    def vocab_size(self) -> int:
        return BYTE_VOCAB if self.hf is None else len(self.hf)

    def encode(self, text: str) -> Tensor:
        """Token ids (int64) of one document, followed by an end-of-text token where the tokenizer has one."""
        if self.hf is None:
            data = bytearray(text.encode("utf-8"))
            return torch.frombuffer(data, dtype=torch.uint8).to(torch.int64) if data else torch.zeros(0, dtype=torch.int64)
        ids = self.hf(text, add_special_tokens=False)["input_ids"]
        if self.hf.eos_token_id is not None:
            ids = ids + [self.hf.eos_token_id]
        return torch.tensor(ids, dtype=torch.int64)

    @property
    def eos_id(self) -> int | None:
        """The end-of-text token (where generation stops), None for bytes."""
        return None if self.hf is None else self.hf.eos_token_id

    def prompt_ids(self, text: str) -> list[int]:
        """Token ids of a prompt: no end-of-text token after it."""
        if self.hf is None:
            return list(text.encode("utf-8"))
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def decoder(self) -> "IncrementalDecoder":
        """Text of generated tokens as they come, a character only once all its tokens have (a
        multi-byte UTF-8 character may span several byte tokens)."""
        return IncrementalDecoder(self)


class IncrementalDecoder:
    """``feed(ids)`` returns the text the new tokens complete; ``text`` is everything so far."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def _decoded(self) -> str:
        if self.tokenizer.hf is None:
            return bytes(self.ids).decode("utf-8", errors="replace")
        return self.tokenizer.hf.decode(self.ids, skip_special_tokens=True)

    def _advance(self, full: str) -> str:
        new = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += new
        return new

    def feed(self, ids: list[int]) -> str:
        self.ids += ids
        return self._advance(self._decoded().rstrip("\ufffd"))  # an unfinished character is U+FFFD until its last byte

    def flush(self) -> str:
        """The rest at the end (an unfinished character as U+FFFD)."""
        return self._advance(self._decoded())


class PackedSequences(Dataset):
    """Sequence ``i``: tokens ``[i T, i T + T + 1)`` as (inputs, next-token targets), each (T,) int64."""

    def __init__(self, tokens: Tensor, seq_len: int) -> None:
        self.tokens, self.seq_len = tokens, seq_len
        self.length = (len(tokens) - 1) // seq_len

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        chunk = self.tokens[i * self.seq_len : (i + 1) * self.seq_len + 1]
        return chunk[:-1], chunk[1:]


class TextDataModule(EpochDataModule):
    """A tokenized corpus packed into sequences of ``seq_len`` tokens, split into train/validation by document.

    ``seq_len``: None takes the network's input size (``data_config['input_size'][0]``, linked by the
    CLI); given as well, the two must agree. ``val_fraction``: share of documents held out (at least
    one). ``max_bytes``: cap on the ``python_stdlib`` corpus. ``train_limit``/``val_limit``: at most
    that many sequences (a fixed random draw).
    """

    def __init__(
        self,
        paths: list[str] | None = None,
        corpus: str | None = None,
        tokenizer: str = "bytes",
        data_config: dict[str, Any] | None = None,
        seq_len: int | None = None,
        val_fraction: float = 0.1,
        max_bytes: int | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        train_limit: int | None = None,
        val_limit: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.files = corpus_files(paths, corpus, max_bytes)
        if not self.files:
            raise ValueError(f"text corpus {corpus or paths!r} has no documents")
        self.tokenizer_name = tokenizer
        self.data_config = data_config
        self.seq_len = self._seq_len(seq_len, data_config)
        self.val_fraction, self.train_limit, self.val_limit = val_fraction, train_limit, val_limit

    @staticmethod
    def _seq_len(seq_len: int | None, data_config: dict[str, Any] | None) -> int:
        linked = (data_config or {}).get("input_size")
        if linked is not None and seq_len is not None and seq_len != linked[0]:
            raise ValueError(f"data seq_len {seq_len} differs from the network's input_size {tuple(linked)}: "
                             "set network.input_size to the sequence length trained on (FLOPs are counted at it)")
        value = seq_len if seq_len is not None else (linked[0] if linked is not None else None)
        if value is None or value < 1:
            raise ValueError(f"seq_len must be a positive number of tokens (or come from the network's input_size), got {value}")
        return int(value)

    def _tokens(self) -> tuple[Tensor, Tensor]:
        """(train, validation) token streams: documents split by a seeded permutation."""
        tokenizer = Tokenizer(self.tokenizer_name)
        vocab = (self.data_config or {}).get("vocab_size")
        if vocab is not None and tokenizer.vocab_size > vocab:
            raise ValueError(f"tokenizer {self.tokenizer_name!r} has {tokenizer.vocab_size} tokens but the anchors' vocabulary "
                             f"has {vocab}: use the anchors' own tokenizer")
        order = torch.randperm(len(self.files), generator=torch.Generator().manual_seed(self.seed)).tolist()
        n_val = max(1, round(len(self.files) * self.val_fraction)) if len(self.files) > 1 else 0
        splits = (sorted(order[n_val:]), sorted(order[:n_val]))
        streams = []
        for split in splits:
            docs = [tokenizer.encode(self.files[i].read_text(encoding="utf-8", errors="replace")) for i in split]
            streams.append(torch.cat(docs) if docs else torch.zeros(0, dtype=torch.int64))
        if len(self.files) == 1:  # one document: its last val_fraction of tokens is the validation split
            tokens = streams[0]
            cut = len(tokens) - round(len(tokens) * self.val_fraction)
            streams = [tokens[:cut], tokens[cut:]]
        for name, tokens in zip(("training", "validation"), streams):
            if len(tokens) < self.seq_len + 1:
                raise ValueError(f"the {name} split of the text corpus ({len(self.files)} documents) has {len(tokens)} tokens, "
                                 f"fewer than one sequence of seq_len {self.seq_len} + 1; add text or shorten seq_len")
        return streams[0], streams[1]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train, val = self._tokens()
        self.train_set = random_subset(PackedSequences(train, self.seq_len), self.train_limit, self.seed)
        self.val_set = random_subset(PackedSequences(val, self.seq_len), self.val_limit, self.seed)
        log.info("text corpus: %d documents, %d training / %d validation tokens, %d / %d sequences of %d tokens",
                 len(self.files), len(train), len(val), len(self.train_set), len(self.val_set), self.seq_len)

    def calibration_batch(self, n: int, augmented: bool = False) -> tuple[Tensor, Tensor]:
        """``n`` training sequences (a fixed random draw) as (inputs, targets): least-squares init's
        hidden states come from them. ``augmented`` is accepted for the module's call and ignored (text has no augmentation)."""
        if n < 1:
            raise ValueError(f"calibration needs at least 1 sequence, got {n}")
        self.setup()
        subset = random_subset(self.train_set, n, self.seed + 1)
        with global_rngs_kept():
            xs, ys = zip(*(subset[i] for i in range(len(subset))))
        return torch.stack(xs), torch.stack(ys)
