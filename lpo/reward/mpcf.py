"""MPCF, multi-preference consistent filtering (paper Sec. 4.2, Table 1): keep a win-lose pair only when the
side scorers (aesthetic A, CLIP score C, VQAScore V) do not contradict its label, and a tie only when they agree
it is one.

Gaps are winner minus loser for decided pairs and absolute differences for ties (how the world's score table and,
presumably, the authors' `vqa_aes_clip_score_mp.csv` store them). Inequalities are strict, as the official code
(`step_sd_hf_dataset.py`) has them where the paper writes >=.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GAP_COLUMNS = ("aesthetic_gap", "clipscore_gap", "vqascore_gap", "different_flag")


@dataclass(frozen=True)
class MPCFConfig:
    """Thresholds in the side scorers' own units; the defaults are the paper's (Pick-a-Pic, LAION aesthetic 1-10,
    CLIP-H cosine, VQAScore probability). strategy 0 keeps every pair (no MPCF)."""
    strategy: int = 2
    aesthetic_gap_min: tuple[float, float, float] = (0.0, -0.5, -1.0)  # strategies 1, 2, 3
    clipscore_gap_min: float = 0.0
    vqascore_gap_min: float = 0.0
    tie_aesthetic_max: float = 0.2
    tie_clipscore_max: float = 0.03
    tie_vqascore_max: float = 0.07

    def __post_init__(self):
        if self.strategy not in (0, 1, 2, 3):
            raise ValueError(f"mpcf.strategy={self.strategy!r}: use 0 (no filtering) or the paper's 1, 2, 3")
        if len(self.aesthetic_gap_min) != 3:
            raise ValueError("mpcf.aesthetic_gap_min needs one threshold for each of strategies 1, 2 and 3")


def mpcf_keep(table: dict[str, np.ndarray], config: MPCFConfig) -> dict[str, np.ndarray]:
    """Boolean masks over the rows of a gap table: {"win_lose": ..., "tie": ..., "keep": either}."""
    missing = [c for c in GAP_COLUMNS if c not in table]
    if missing:
        raise ValueError(f"MPCF score table lacks column(s) {', '.join(missing)} (needs {', '.join(GAP_COLUMNS)})")
    a, c, v = (np.asarray(table[k], dtype=np.float64) for k in GAP_COLUMNS[:3])
    decided = np.asarray(table["different_flag"]).astype(bool)
    if config.strategy == 0:
        return {"win_lose": decided, "tie": ~decided, "keep": np.ones_like(decided)}
    win_lose = (decided & (a > config.aesthetic_gap_min[config.strategy - 1])
                & (c > config.clipscore_gap_min) & (v > config.vqascore_gap_min))
    tie = (~decided & (a < config.tie_aesthetic_max) & (c < config.tie_clipscore_max)
           & (v < config.tie_vqascore_max))
    return {"win_lose": win_lose, "tie": tie, "keep": win_lose | tie}


def mpcf_counts(table: dict[str, np.ndarray], config: MPCFConfig) -> dict[str, int]:
    masks = mpcf_keep(table, config)
    return {"strategy": config.strategy, "pairs": int(masks["keep"].size),
            "win_lose_kept": int(masks["win_lose"].sum()), "tie_kept": int(masks["tie"].sum()),
            "kept": int(masks["keep"].sum())}


def mpcf_table(preferences: str, split: str, n_rows: int) -> dict:
    """The side scorers' gap columns of a preference directory's split (lpo.preference_data's MPCF score table)."""
    from lpo.preference_data import MPCF_SCORES, load_side_table
    return load_side_table(preferences, MPCF_SCORES, split, n_rows, GAP_COLUMNS)
