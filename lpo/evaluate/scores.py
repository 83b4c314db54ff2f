"""Evaluation of a method's samples: every image scored by the judge and the world's pixel reward model, means
with 95% bootstrap intervals over prompts, and the win rate against the base model on the same (prompt, seed)
pairs, ties counted half. Each prompt set (eval_seen, eval_heldout) is summarised on its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lpo.samples import SampleSet
from lpo.stats import bootstrap
from lpo.world.grammar import ATTRIBUTES

# Summarised per image; "alignment" is the share of images with every attribute right, "soft_alignment" the
# judge's mean probability of the prompted values.
METRICS = ("overall_preference", "alignment", "soft_alignment", *(f"accuracy_{a}" for a in ATTRIBUTES),
           "aesthetic", "defect_rate", "pixel_reward")


@dataclass(frozen=True)
class EvaluateConfig:
    bootstrap: int = 1000    # resamples of prompts for the 95% intervals
    tie_band: float = 0.0    # |overall preference difference| <= tie_band is a tie against the base model
    grid_prompts: int = 8    # prompts shown in each method's sample grid

    def __post_init__(self):
        if self.bootstrap < 1 or self.grid_prompts < 1:
            raise ValueError("evaluate.bootstrap and evaluate.grid_prompts must be >= 1")
        if self.tie_band < 0:
            raise ValueError(f"evaluate.tie_band={self.tie_band} must be >= 0")


def score_rows(samples: SampleSet, verdict, pixel_reward: np.ndarray) -> list[dict]:
    """One row per image: its key (prompt set, prompt index, seed), prompt and every per-image metric."""
    n = len(samples.images)
    if len(verdict.overall) != n or len(pixel_reward) != n:
        raise ValueError(f"{n} images but {len(verdict.overall)} judge verdicts and {len(pixel_reward)} pixel "
                         f"rewards")
    rows = []
    for i in range(n):
        row = {"prompt_set": str(samples.prompt_set[i]), "prompt_index": int(samples.prompt_index[i]),
               "seed": int(samples.seeds[i]), "prompt": str(samples.prompts[i]),
               "overall_preference": float(verdict.overall[i]), "alignment": float(verdict.aligned[i]),
               "soft_alignment": float(verdict.alignment[i])}
        row |= {f"accuracy_{a}": float(verdict.correct[i, j]) for j, a in enumerate(ATTRIBUTES)}
        row |= {"aesthetic": float(verdict.aesthetic[i]), "defect_rate": float(verdict.defective[i]),
                "pixel_reward": float(pixel_reward[i])}
        rows.append(row)
    return rows


def _column(rows: list[dict], name: str) -> np.ndarray:
    return np.array([float(r[name]) for r in rows])


def _key(row: dict) -> tuple:
    return str(row["prompt_set"]), int(row["prompt_index"]), int(row["seed"])


def paired_with_base(rows: list[dict], base_rows: list[dict], what: str = "the method") -> list[dict]:
    """The base model's row for each of `rows`, matched on (prompt set, prompt index, seed)."""
    base = {_key(r): r for r in base_rows}
    missing = [k for k in map(_key, rows) if k not in base]
    if missing:
        raise ValueError(f"{len(missing)} of {what}'s images have no base-model image with the same prompt and seed "
                         f"(first: {missing[0]}): sample both with the same prompt sets, images per prompt and "
                         f"seed")
    return [base[_key(r)] for r in rows]


def win_values(scores: np.ndarray, base_scores: np.ndarray, tie_band: float = 0.0) -> np.ndarray:
    """1 where the method's image beats the base model's, 0 where it loses, 0.5 for a tie (|diff| <= tie_band)."""
    diff = np.asarray(scores, dtype=np.float64) - np.asarray(base_scores, dtype=np.float64)
    return np.where(np.abs(diff) <= tie_band, 0.5, (diff > 0).astype(np.float64))


def summarise(rows: list[dict], base_rows: list[dict] | None, config: EvaluateConfig, seed: int,
              method: str) -> list[dict]:
    """Per prompt set and metric: mean and 95% interval, bootstrapping prompts (all images of a prompt move
    together); plus `win_rate` against the base model when `base_rows` is given."""
    out = []
    for prompt_set in dict.fromkeys(r["prompt_set"] for r in rows):
        chosen = [r for r in rows if r["prompt_set"] == prompt_set]
        groups = np.array([int(r["prompt_index"]) for r in chosen])
        values = {m: _column(chosen, m) for m in METRICS}
        if base_rows is not None:
            base = paired_with_base(chosen, base_rows, method)
            values["win_rate"] = win_values(values["overall_preference"], _column(base, "overall_preference"),
                                            config.tie_band)
        for metric, v in values.items():
            e = bootstrap(v, groups, n=config.bootstrap, seed=seed)
            out.append({"method": method, "prompt_set": prompt_set, "metric": metric, "mean": e.mean,
                        "ci_low": e.low, "ci_high": e.high, "images": len(chosen),
                        "prompts": int(np.unique(groups).size)})
    return out
