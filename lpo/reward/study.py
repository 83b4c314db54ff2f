"""Reward accuracy against noise: the study the paper lacks (its users asked for it, Kwai-Kolors/LPO#2).

Every reward model is given the *same* noisy latents of each pair at each timestep of the sampling grid: the LRM
scores them directly, the pixel reward model scores the VAE-decoded predicted clean image, and the SPM scores
that image knowing the timestep. Pair accuracy is measured against the noisy labels (ties left out) and against
the judge's noiseless order, with 95% bootstrap intervals over pairs. Aes-Corr / CLIP-Corr / VQA-Corr are the
Pearson correlations of a model's winner-minus-loser gap with the side scorers' gaps (paper Sec. 5.1, Table 18).
Every number is given for all pairs and, where the dataset records its sources, for same-source and cross-source
pairs apart, beside the oracle: the judge's own noiseless order scored against the labels on the same pairs, the
ceiling that label noise leaves any reward model.

Beyond the paper (issue 16): the noise-calibrated LRM is one more scorer; the LRM is also scored with noise
ensembling at high noise (`ensemble_scores_at`: the mean over M noisings of each clean latent); the calibration
table gives each model's expected calibration error of P(a > b) under its own likelihood per timestep; the
high-noise table pools accuracy over t >= high_noise_from per pair and bootstraps the paired differences (and the
ratio of calibration errors) over pairs.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lpo.reward.lrm_training import LatentEncoder, add_pair_noise
from lpo.preference_data import PreferencePairs, concatenate_pairs
from lpo.stats import bootstrap, calibration_error

# (noisy latents (N, C, h, w), timestep, captions (N,)) -> rewards (N,)
LatentScorer = Callable[[torch.Tensor, int, list[str]], torch.Tensor]
# pairs -> (scores of images_0, of images_1) from the clean images (e.g. the world-CLIP zero-shot)
CleanScorer = Callable[[PreferencePairs], tuple[np.ndarray, np.ndarray]]
# (scores of images_0, of images_1, timestep) -> P(image 0 preferred) under the model's likelihood
PairProbability = Callable[[np.ndarray, np.ndarray, int], np.ndarray]
ORACLE = "oracle (judge's order)"
CALIBRATED = "LRM (calibrated)"  # the noise-calibrated LRM (lpo.reward.lrm.CalibratedLRMConfig)


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
    ensemble_draws: tuple[int, ...] = (4, 16)   # the LRM's noise ensembling: M > 1 beside its single draw
    high_noise_from: int = 501                  # ensembling rows and the high-noise comparisons: t >= this
    calibration_bins: int = 10                  # equal-width bins of P(a > b) for the expected calibration error

    def __post_init__(self):
        if any(m < 2 for m in self.ensemble_draws):
            raise ValueError(f"reward_study.ensemble_draws={list(self.ensemble_draws)}: every M must be >= 2 (the "
                             f"LRM's own row is the single draw, M = 1); [] turns ensembling off")
        if self.calibration_bins < 1:
            raise ValueError(f"reward_study.calibration_bins={self.calibration_bins} must be >= 1")


def ensemble_name(model: str, draws: int) -> str:
    return f"{model} (M = {draws})"


@dataclass
class StudyResult:
    rows: list[dict]         # accuracy for every model x split x timestep x pair type, the oracle's beside
    table18: list[dict]      # the lowest timestep on all splits, with correlations (paper Table 18)
    calibration: list[dict]  # expected calibration error of P(a > b) per model and timestep, all splits
    high_noise: list[dict]   # accuracy at t >= high_noise_from, pooled, and paired differences between models


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
    by_draws = ensemble_scores_at(scorers, encoder, pairs, timestep, seed, batch_size, (draws,))
    return {name: scores[draws] for name, scores in by_draws.items()}


@torch.no_grad()
def ensemble_scores_at(scorers: dict[str, LatentScorer], encoder: LatentEncoder, pairs: PreferencePairs,
                       timestep: int, seed: int, batch_size: int, draws: Sequence[int]
                       ) -> dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """{scorer: {M: (s_0, s_1)}} for every M of `draws`: the mean over the first M noisings (draw 0 is the study's
    single draw), so the Ms share their draws and cost max(draws) scorer passes."""
    if not draws or min(draws) < 1:
        raise ValueError(f"noise ensembling needs M >= 1 draws, got {list(draws)}")
    out = {name: {m: ([], []) for m in draws} for name in scorers}
    for start in range(0, len(pairs), batch_size):
        rows = np.arange(start, min(start + batch_size, len(pairs)))
        batch = pairs.take(rows)
        t = torch.full((len(rows),), timestep)
        captions = batch.captions + batch.captions
        clean = encoder.latents(np.concatenate([batch.images_0, batch.images_1]))
        sums = dict.fromkeys(scorers, 0.0)
        for draw in range(max(draws)):
            keys = [noise_key(seed, timestep, int(pairs.rows[r]), draw) for r in rows]
            latents = add_pair_noise(encoder, clean, t, keys)
            for name, scorer in scorers.items():
                sums[name] = sums[name] + scorer(latents, timestep, captions).float().cpu().numpy()
                if draw + 1 in draws:
                    scores = sums[name] / (draw + 1)  # exact for one draw
                    out[name][draw + 1][0].append(scores[:len(rows)])
                    out[name][draw + 1][1].append(scores[len(rows):])
    return {name: {m: (np.concatenate(a), np.concatenate(b)) for m, (a, b) in by_m.items()}
            for name, by_m in out.items()}


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
              lowest_only: frozenset[str] = frozenset(), ensembled: str | None = None,
              probabilities: dict[str, PairProbability] | None = None,
              compared: tuple[tuple[str, str], ...] = ()) -> StudyResult:
    """Every scorer at every timestep of `grid` on every split, from the same noisy latents. The scorers named in
    `lowest_only` (the LRM ablations, whose tables are at the lowest timestep) are scored there only. The scorer
    `ensembled` is also scored with M-fold noise ensembling (config.ensemble_draws) at t >= high_noise_from, its
    M = 1 being its own row. `probabilities` give a model's P(image 0 preferred) from its scores, for the
    calibration table; `compared`: (model, baseline) pairs whose accuracy difference at t >= high_noise_from is
    bootstrapped over pairs (each ensembled M is compared with the single draw as well)."""
    rows, lowest = [], {name: ([], []) for name in scorers}
    high = [t for t in grid if t >= config.high_noise_from]
    kept = {}  # (model, split, t) -> scores, for the calibration and high-noise tables
    steps = [(split, t) for split in splits for t in grid]
    for split, t in tqdm(steps, desc="reward study", mininterval=2):
        data = splits[split]
        now = {name: f for name, f in scorers.items() if t == min(grid) or name not in lowest_only}
        ensemble = {}
        if ensembled in now and t in high and config.ensemble_draws:
            ensemble = ensemble_scores_at({ensembled: now.pop(ensembled)}, encoder, data.pairs, t, seed,
                                          config.batch_size, (1, *config.ensemble_draws))[ensembled]
        scores = pair_scores_at(now, encoder, data.pairs, t, seed, config.batch_size)
        scores |= {ensembled: ensemble[1]} if ensemble else {}
        scores |= {ensemble_name(ensembled, m): ensemble[m] for m in config.ensemble_draws if ensemble}
        for name, s in {**scores, ORACLE: data.oracle()}.items():
            rows += accuracy_rows(name, split, t, s, data, config.bootstrap, seed)
            kept[name, split, t] = s
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

    def stacked(model: str, timesteps: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(pairs of all splits, timesteps) scores of images 0 and 1."""
        return tuple(np.stack([np.concatenate([kept[model, split, t][i] for split in splits]) for t in timesteps],
                              axis=1) for i in (0, 1))

    label = merged.pairs.label_0
    calibration, pooled = [], {}
    for model, probability in (probabilities or {}).items():
        p = np.stack([probability(*(s[:, j] for s in stacked(model, grid)), t) for j, t in enumerate(grid)], 1)
        rows_of_model, pooled[model] = calibration_rows(model, grid, high, p, label, config, seed)
        calibration += rows_of_model
    pairs = [*compared, *((ensemble_name(ensembled, m), ensembled) for m in config.ensemble_draws if high)]
    high_noise = high_noise_rows({m: stacked(m, high) for m in dict.fromkeys(x for c in pairs for x in c)},
                                 pairs, label, high, config.bootstrap, seed) if high else []
    for model, baseline in compared:
        if model in pooled and baseline in pooled and pooled[model] is not None:
            # The pairs resampled are the same for both (one seed, one count), so the ratio's draws are paired.
            (ece, draws), (base, base_draws) = pooled[model], pooled[baseline]
            ratio = base_draws / draws
            high_noise.append({"statistic": "ECE ratio (baseline / model)", "model": model, "baseline": baseline,
                               "timesteps": f">={min(high)}", "estimate": base / ece,
                               "low": float(np.quantile(ratio, 0.025)), "high": float(np.quantile(ratio, 0.975)),
                               "pairs": int((label != 0.5).sum())})
    return StudyResult(rows, table18, calibration, high_noise)


def calibration_rows(model: str, grid: list[int], high: list[int], probability: np.ndarray, label: np.ndarray,
                     config: RewardStudyConfig, seed: int) -> tuple[list[dict], tuple[float, np.ndarray] | None]:
    """The expected calibration error of `probability` (pairs, timesteps) = P(image 0 preferred) against the
    decided labels per timestep, and pooled over the `high` timesteps with a bootstrap interval over pairs; and
    that pooled ECE with its bootstrap draws (None without high timesteps)."""
    decided = label != 0.5
    p, outcome = probability[decided], (label[decided] == 1.0).astype(float)
    rows = [{"model": model, "timestep": t, "ece": calibration_error(p[:, j], outcome, config.calibration_bins),
             "mean_confidence": float(np.abs(p[:, j] - 0.5).mean() + 0.5), "pairs": int(decided.sum())}
            for j, t in enumerate(grid)]
    if not high:
        return rows, None
    columns = [grid.index(t) for t in high]
    ece, draws = pooled_calibration_error(p[:, columns], outcome, config, seed)
    rows.append({"model": model, "timestep": f">={min(high)}", "ece": ece,
                 "ece_low": float(np.quantile(draws, 0.025)), "ece_high": float(np.quantile(draws, 0.975)),
                 "mean_confidence": float(np.abs(p[:, columns] - 0.5).mean() + 0.5), "pairs": int(decided.sum())})
    return rows, (ece, draws)


def pooled_calibration_error(p: np.ndarray, outcome: np.ndarray, config: RewardStudyConfig, seed: int
                             ) -> tuple[float, np.ndarray]:
    """ECE of the (pairs, timesteps) predictions pooled, and its bootstrap draws over pairs (the same resampled
    pairs for every model given the same seed)."""
    rng = np.random.default_rng(seed)

    def ece(rows):
        return calibration_error(p[rows].ravel(), np.repeat(outcome[rows], p.shape[1]), config.calibration_bins)
    draws = np.array([ece(rng.integers(0, len(outcome), len(outcome))) for _ in range(config.bootstrap)])
    return ece(np.arange(len(outcome))), draws


def high_noise_rows(scores: dict[str, tuple[np.ndarray, np.ndarray]], compared: list[tuple[str, str]],
                    label: np.ndarray, high: list[int], n_bootstrap: int, seed: int) -> list[dict]:
    """Accuracy against the labels pooled over the `high` timesteps (a pair's mean over them, then the mean over
    decided pairs) for every model (`estimate`, no baseline), and each (model, baseline) difference of accuracy on
    the same pairs (`estimate` = model - baseline), bootstrapped over pairs. scores: model -> (pairs, timesteps)
    scores of images 0 and 1."""
    decided = label != 0.5
    right = {m: _right(s0, s1, (label == 1.0)[:, None])[decided].mean(1) for m, (s0, s1) in scores.items()}
    where = f">={min(high)}"
    rows = []
    for model, values in right.items():
        e = bootstrap(values, n=n_bootstrap, seed=seed)
        rows.append({"statistic": "accuracy", "model": model, "baseline": "", "timesteps": where,
                     "estimate": e.mean, "low": e.low, "high": e.high, "pairs": int(decided.sum())})
    for model, baseline in compared:
        e = bootstrap(right[model] - right[baseline], n=n_bootstrap, seed=seed)
        rows.append({"statistic": "accuracy difference", "model": model, "baseline": baseline, "timesteps": where,
                     "estimate": e.mean, "low": e.low, "high": e.high, "pairs": int(decided.sum())})
    return rows


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
