"""Reward accuracy against noise: the study the paper lacks (its users asked for it, Kwai-Kolors/LPO#2).

Every reward model is given the *same* noisy latents of each pair at each timestep of the sampling grid: the LRM
scores them directly, the pixel reward model scores the VAE-decoded predicted clean image, and the SPM scores
that image knowing the timestep. Pair accuracy is measured against the noisy labels (ties left out) and against
the judge's noiseless order, with 95% bootstrap intervals over pairs. Aes-Corr / CLIP-Corr / VQA-Corr are the
Pearson correlations of a model's winner-minus-loser gap with the side scorers' gaps (paper Sec. 5.1, Table 18).
Every number is given for all pairs and, where the dataset records its sources, for same-source and cross-source
pairs apart, beside the oracle: the judge's own noiseless order scored against the labels on the same pairs, the
ceiling that label noise leaves any reward model.
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
# pairs -> (scores of images_0, of images_1) from the clean images (e.g. the world-CLIP zero-shot)
CleanScorer = Callable[[PreferencePairs], tuple[np.ndarray, np.ndarray]]
ORACLE = "oracle (judge's order)"


class SharedCleanImages:
    """The decoded x0_hat of the batch being scored, computed once for every scorer that reads it (the pixel model
    and the SPM): the guided UNet pass and the VAE decode are ~90% of those scorers' cost. The last batch's latents
    are held, so `is` cannot match a new tensor that reuses a freed one's id; a batch's captions come with its
    latents."""

    def __init__(self, predictor):
        self.predictor = predictor
        self._latents, self._timestep, self._images = None, None, None

    def __call__(self, latents: torch.Tensor, timestep: int, captions: list[str]) -> torch.Tensor:
        if latents is not self._latents or timestep != self._timestep:
            self._latents, self._timestep = latents, timestep
            self._images = self.predictor.from_latents(latents, timestep, captions)
        return self._images


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
    same_source: np.ndarray | None = None  # per pair; None when the dataset records no sources

    def pair_types(self) -> dict[str, np.ndarray]:
        """Masks of the pairs each table row is about."""
        everything = np.ones(len(self.pairs), bool)
        if self.same_source is None:
            return {"all": everything}
        return {"all": everything, "same_source": self.same_source, "cross_source": ~self.same_source}

    def oracle(self) -> tuple[np.ndarray, np.ndarray]:
        return self.judge_gap, np.zeros_like(self.judge_gap)


def noise_key(seed: int, timestep: int, row: int, draw: int = 0) -> tuple[int, ...]:
    """The generator key of a pair's noise at a timestep; draw 0 is the study's one shared draw, the others the
    extra re-noisings of noise ensembling."""
    return (seed, timestep, row) if draw == 0 else (seed, timestep, row, draw)


@torch.no_grad()
def pair_scores_at(scorers: dict[str, LatentScorer], encoder: LatentEncoder, pairs: PreferencePairs,
                   timestep: int, seed: int, batch_size: int, draws: int = 1
                   ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every scorer's (s_0, s_1) for all pairs at one timestep, from shared draws of noisy latents: with
    draws = M > 1, each score is the mean over M independent noisings of the clean latent (noise ensembling, a
    test-time compute knob costing M scorer passes); M = 1 is the single draw."""
    if draws < 1:
        raise ValueError(f"noise ensembling needs M >= 1 draws, got {draws}")
    out = {name: ([], []) for name in scorers}
    for start in range(0, len(pairs), batch_size):
        rows = np.arange(start, min(start + batch_size, len(pairs)))
        batch = pairs.take(rows)
        t = torch.full((len(rows),), timestep)
        captions = batch.captions + batch.captions
        sums = dict.fromkeys(scorers, 0.0)
        for draw in range(draws):
            keys = [noise_key(seed, timestep, int(pairs.rows[r]), draw) for r in rows]
            latents = noisy_pair_latents(encoder, batch, t, keys)
            for name, scorer in scorers.items():
                sums[name] = sums[name] + scorer(latents, timestep, captions).float().cpu().numpy()
        for name, total in sums.items():
            scores = total / draws  # exact for one draw
            out[name][0].append(scores[:len(rows)])
            out[name][1].append(scores[len(rows):])
    return {name: (np.concatenate(a), np.concatenate(b)) for name, (a, b) in out.items()}


def _right(s0: np.ndarray, s1: np.ndarray, first_better: np.ndarray) -> np.ndarray:
    return np.where(s0 == s1, 0.5, ((s0 > s1) == first_better).astype(float))


def accuracy_rows(model: str, split: str, timestep: int, scores: tuple[np.ndarray, np.ndarray],
                  data: SplitData, n_bootstrap: int, seed: int, with_correlations: bool = False) -> list[dict]:
    """One row per pair type with decided pairs: accuracy against the labels and against the judge's order."""
    s0, s1 = scores
    label = data.pairs.label_0
    rows = []
    for pair_type, mask in data.pair_types().items():
        decided, ordered = mask & (label != 0.5), mask & (data.judge_gap != 0)
        if not decided.any() or not ordered.any():
            continue
        vs_label = bootstrap(_right(s0, s1, label == 1.0)[decided], n=n_bootstrap, seed=seed)
        vs_judge = bootstrap(_right(s0, s1, data.judge_gap > 0)[ordered], n=n_bootstrap, seed=seed)
        row = {"model": model, "split": split, "timestep": timestep, "pair_type": pair_type,
               "accuracy_label": vs_label.mean, "label_low": vs_label.low, "label_high": vs_label.high,
               "accuracy_judge": vs_judge.mean, "judge_low": vs_judge.low, "judge_high": vs_judge.high,
               "pairs_label": int(decided.sum()), "pairs_judge": int(ordered.sum())}
        rows.append(row | (correlations(scores, data, mask) if with_correlations else {}))
    return rows


def correlations(scores: tuple[np.ndarray, np.ndarray], data: SplitData, mask: np.ndarray) -> dict[str, float]:
    """Pearson correlation of the model's winner-minus-loser gap with each side scorer's gap, decided pairs."""
    s0, s1 = scores
    label = data.pairs.label_0
    decided = (label != 0.5) & mask
    gap = np.where(label == 1.0, s0 - s1, s1 - s0)[decided]
    out = {}
    for name, side in data.side_gaps.items():
        other = side[decided]
        ok = gap.std() > 0 and other.std() > 0
        out[f"{name}_corr"] = float(np.corrcoef(gap, other)[0, 1]) if ok else float("nan")
    return out


def run_study(scorers: dict[str, LatentScorer], encoder: LatentEncoder, splits: dict[str, SplitData],
              grid: list[int], config: RewardStudyConfig, seed: int,
              clean_scorers: dict[str, CleanScorer] | None = None,
              lowest_only: frozenset[str] = frozenset()) -> tuple[list[dict], list[dict]]:
    """(accuracy rows for every model x split x timestep x pair type, the oracle's at every timestep for the
    plot's ceiling; Table 18 rows at the lowest timestep on all splits, the clean-image scorers' and the oracle's
    beside them). The scorers named in `lowest_only` (the LRM ablations, whose tables are at the lowest timestep)
    are scored there only; every scorer at a timestep sees the same noisy latents either way."""
    rows, lowest = [], {name: ([], []) for name in scorers}
    steps = [(split, t) for split in splits for t in grid]
    for split, t in tqdm(steps, desc="reward study", mininterval=2):
        data = splits[split]
        now = {name: f for name, f in scorers.items() if t == min(grid) or name not in lowest_only}
        scores = pair_scores_at(now, encoder, data.pairs, t, seed, config.batch_size)
        for name, s in {**scores, ORACLE: data.oracle()}.items():
            rows += accuracy_rows(name, split, t, s, data, config.bootstrap, seed)
            if t == min(grid) and name in lowest:
                lowest[name][0].append(s[0])
                lowest[name][1].append(s[1])
    merged = _merge(list(splits.values()))
    both = {name: (np.concatenate(a), np.concatenate(b)) for name, (a, b) in lowest.items()}
    both |= {name: scorer(merged.pairs) for name, scorer in (clean_scorers or {}).items()}
    both[ORACLE] = merged.oracle()
    table18 = []
    for name, scores in both.items():
        table18 += accuracy_rows(name, "+".join(splits), min(grid), scores, merged, config.bootstrap, seed,
                                 with_correlations=True)
    return rows, table18


def _merge(parts: list[SplitData]) -> SplitData:
    same = None if any(p.same_source is None for p in parts) else np.concatenate([p.same_source for p in parts])
    return SplitData(concatenate_pairs([p.pairs for p in parts]), np.concatenate([p.judge_gap for p in parts]),
                     {k: np.concatenate([p.side_gaps[k] for p in parts]) for k in parts[0].side_gaps}, same)


def plot_accuracy(rows: list[dict], path: str | Path) -> None:
    """Accuracy against timestep on all pairs, one panel per (split, reference), 95% bands; the oracle dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lpo.io import atomic_path
    rows = [r for r in rows if r.get("pair_type", "all") == "all"]
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
                if model == ORACLE:
                    if key == "label":  # against its own order the oracle is 1 by definition
                        ax.plot(t, [r["accuracy_label"] for r in rs], color="black", ls=":", label=model)
                    continue
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
