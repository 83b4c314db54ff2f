"""One seed per stage, derived from the config's top-level seed, so stages are reproducible alone."""
from __future__ import annotations

import random
import zlib

import numpy as np
import torch


def stage_seed(seed: int, stage: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(stage.encode())) % 2**31


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.Generator().manual_seed(seed)


def keyed_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator for one (seed, keys...) stream: draws keyed by step or row repeat whatever the batching."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0]))


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Batch `step` of an endless sequence of seeded per-epoch permutations of range(n); a pure function of
    (seed, step), so resuming needs no sampler state and every process can compute the global batch."""
    positions = step * batch_size + np.arange(batch_size)
    epochs, offsets = np.divmod(positions, n)
    return np.concatenate([np.random.default_rng([seed, int(e)]).permutation(n)[offsets[epochs == e]]
                           for e in np.unique(epochs)])
