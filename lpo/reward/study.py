"""Reward accuracy against noise: the study the paper lacks (its users asked for it, Kwai-Kolors/LPO#2).

Every reward model is given the *same* noisy latents of each pair at each timestep of the sampling grid: the LRM
scores them directly, the pixel reward model scores the VAE-decoded predicted clean image, and the SPM scores
that image knowing the timestep. Pair accuracy is measured against the noisy labels (ties left out) and against
the judge's noiseless order, with 95% bootstrap intervals over pairs. Aes-Corr / CLIP-Corr / VQA-Corr are the
Pearson correlations of a model's winner-minus-loser gap with the side scorers' gaps (paper Sec. 5.1, Table 18).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lpo.reward.lrm_training import LatentEncoder, noisy_pair_latents
from lpo.preference_data import PreferencePairs, concatenate_pairs
from lpo.stats import bootstrap

# (noisy latents (N, C, h, w), timestep, captions (N,)) -> rewards (N,)
LatentScorer = Callable[[torch.Tensor, int, list[str]], torch.Tensor]


@dataclass(frozen=True)
class RewardStudyConfig:
    bootstrap: int = 1000
    batch_size: int = 128
    mpcf_strategies: tuple[int, ...] = (0, 1, 2, 3)   # LRM ablation of paper Table 7
    vfe_scales: tuple[float, ...] = (1.0, 3.0, 7.5, 10.0)  # LRM ablation of paper Table 8


@dataclass
class SplitData:
    pairs: PreferencePairs
    judge_gap: np.ndarray        # overall_0 - overall_1 of the judge, per pair
    side_gaps: dict[str, np.ndarray]  # winner-minus-loser side-score gaps (aesthetic, clipscore, vqascore)


@torch.no_grad()
def pair_scores_at(scorers: dict[str, LatentScorer], encoder: LatentEncoder, pairs: PreferencePairs,
                   timestep: int, seed: int, batch_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every scorer's (s_0, s_1) for all pairs at one timestep, from one shared draw of noisy latents."""
    out = {name: ([], []) for name in scorers}
    for start in range(0, len(pairs), batch_size):
        rows = np.arange(start, min(start + batch_size, len(pairs)))
        batch = pairs.take(rows)
        t = torch.full((len(rows),), timestep)
        latents = noisy_pair_latents(encoder, batch, t, [(seed, timestep, int(pairs.rows[r])) for r in rows])
        captions = batch.captions + batch.captions
        for name, scorer in scorers.items():
            scores = scorer(latents, timestep, captions).float().cpu().numpy()
            out[name][0].append(scores[:len(rows)])
            out[name][1].append(scores[len(rows):])
    return {name: (np.concatenate(a), np.concatenate(b)) for name, (a, b) in out.items()}


def _right(s0: np.ndarray, s1: np.ndarray, first_better: np.ndarray) -> np.ndarray:
    return np.where(s0 == s1, 0.5, ((s0 > s1) == first_better).astype(float))


def accuracy_rows(model: str, split: str, timestep: int, scores: tuple[np.ndarray, np.ndarray],
                  data: SplitData, n_bootstrap: int, seed: int) -> dict:
    s0, s1 = scores
    label = data.pairs.label_0
    decided = label != 0.5
    vs_label = bootstrap(_right(s0, s1, label == 1.0)[decided], n=n_bootstrap, seed=seed)
    ordered = data.judge_gap != 0
    vs_judge = bootstrap(_right(s0, s1, data.judge_gap > 0)[ordered], n=n_bootstrap, seed=seed)
    return {"model": model, "split": split, "timestep": timestep,
            "accuracy_label": vs_label.mean, "label_low": vs_label.low, "label_high": vs_label.high,
            "accuracy_judge": vs_judge.mean, "judge_low": vs_judge.low, "judge_high": vs_judge.high,
            "pairs_label": int(decided.sum()), "pairs_judge": int(ordered.sum())}


def correlations(scores: tuple[np.ndarray, np.ndarray], data: SplitData) -> dict[str, float]:
    """Pearson correlation of the model's winner-minus-loser gap with each side scorer's gap, decided pairs."""
    s0, s1 = scores
    label = data.pairs.label_0
    decided = label != 0.5
    gap = np.where(label == 1.0, s0 - s1, s1 - s0)[decided]
    out = {}
    for name, side in data.side_gaps.items():
        other = side[decided]
        ok = gap.std() > 0 and other.std() > 0
        out[f"{name}_corr"] = float(np.corrcoef(gap, other)[0, 1]) if ok else float("nan")
    return out


def run_study(scorers: dict[str, LatentScorer], encoder: LatentEncoder, splits: dict[str, SplitData],
              grid: list[int], config: RewardStudyConfig, seed: int) -> tuple[list[dict], list[dict]]:
    """(accuracy rows for every model x split x timestep, Table 18 rows at the lowest timestep on all splits)."""
    rows, lowest = [], {name: ([], []) for name in scorers}
    steps = [(split, t) for split in splits for t in grid]
    for split, t in tqdm(steps, desc="reward study", mininterval=2):
        data = splits[split]
        scores = pair_scores_at(scorers, encoder, data.pairs, t, seed, config.batch_size)
        for name, s in scores.items():
            rows.append(accuracy_rows(name, split, t, s, data, config.bootstrap, seed))
            if t == min(grid):
                lowest[name][0].append(s[0])
                lowest[name][1].append(s[1])
    merged = _merge(list(splits.values()))
    table18 = []
    for name, (a, b) in lowest.items():
        scores = (np.concatenate(a), np.concatenate(b))
        row = accuracy_rows(name, "+".join(splits), min(grid), scores, merged, config.bootstrap, seed)
        table18.append({**row, **correlations(scores, merged)})
    return rows, table18


def _merge(parts: list[SplitData]) -> SplitData:
    return SplitData(concatenate_pairs([p.pairs for p in parts]), np.concatenate([p.judge_gap for p in parts]),
                     {k: np.concatenate([p.side_gaps[k] for p in parts]) for k in parts[0].side_gaps})


def plot_accuracy(rows: list[dict], path: str | Path) -> None:
    """Accuracy against timestep, one panel per (split, reference), 95% bands."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lpo.io import atomic_path
    splits = list(dict.fromkeys(r["split"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(splits), 2, figsize=(11, 3.6 * len(splits)), squeeze=False, sharey=True)
    for i, split in enumerate(splits):
        for j, (key, title) in enumerate((("label", "against the noisy labels"),
                                          ("judge", "against the judge's noiseless order"))):
            ax = axes[i][j]
            for model in models:
                rs = sorted((r for r in rows if r["split"] == split and r["model"] == model),
                            key=lambda r: r["timestep"])
                t = [r["timestep"] for r in rs]
                ax.plot(t, [r[f"accuracy_{key}"] for r in rs], marker="o", ms=3, label=model)
                ax.fill_between(t, [r[f"{key}_low"] for r in rs], [r[f"{key}_high"] for r in rs], alpha=0.15)
            ax.axhline(0.5, color="gray", lw=0.8, ls="--")
            ax.set_title(f"{split}: {title}", fontsize=10)
            ax.set_xlabel("timestep t of the noisy latent")
            ax.set_ylabel("pair accuracy")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
