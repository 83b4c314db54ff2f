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
