"""Randomness as a pure function of where it is used, so a killed and resumed run draws what an
uninterrupted one draws.

Saving and restoring global RNG states is not enough for that: after a resume, Lightning's sanity
check, the creation of data-loader iterators (each draws a base seed) and every worker process
draw from, or start, generators that the uninterrupted run never touched at that point. Instead,
every consumer reseeds from a key before it draws: a training batch from ``(seed, epoch, batch, rank)``
(dropout, mixup, drop-path), a training sample from ``(seed, epoch, index)`` (augmentation, in
whichever worker process loads it), the data order from ``(seed, epoch)``.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

# streams: distinct keys for independent uses of one user seed
STEP, SAMPLE, ORDER, CALIBRATION = 0, 1, 2, 3


def derive_seed(*key: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence: nearby keys give unrelated seeds)."""
    words = np.random.SeedSequence([int(k) & (2**64 - 1) for k in key]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def seed_global_rngs(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), numpy and Python's ``random`` from one seed."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@contextmanager
def global_rngs_kept() -> Iterator[None]:
    """Whatever the block draws from torch's (CPU), numpy's and Python's global generators, they are
    as before after it: for work that must leave no trace on a run's randomness."""
    states = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.random.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


class SeededSamples(Dataset):
    """Wraps a dataset so that loading ``(index, seed)`` seeds the worker's RNGs first: the sample's
    augmentation depends on its key only, not on the worker, ``num_workers`` or what ran before.
    Plain integer indices load unseeded (evaluation)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if isinstance(key, tuple):
            index, seed = key
            seed_global_rngs(seed)
            return self.dataset[index]
        return self.dataset[key]
