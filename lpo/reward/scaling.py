"""Reward accuracy against the amount of preference data: is a world's reward model data-bound?

The pixel reward model (the world's PickScore, the cheapest of its reward models to train) is trained on nested
subsets of the train split's prompts, each time on two labellings of the same pairs: the dataset's noisy labels,
and the judge's noiseless order (ties where the judge's gap is inside the data's tie band). Validation_unique
picks the best weights, as in the DAG's own training; accuracy is measured on test_unique, against the noisy
labels and against the judge's order, with 95% bootstrap intervals over pairs. A curve still rising at the whole
split says more pairs would buy accuracy; the gap between the two labellings is what label noise costs.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lpo.reward.pixel import PixelReward, pixel_pair_scores
from lpo.preference_data import PreferencePairs
from lpo.reward.study import SplitData, accuracy_rows

LABELLINGS = {"dataset": "the dataset's noisy labels", "judge": "the judge's noiseless order"}


@dataclass(frozen=True)
class RewardScalingConfig:
    fractions: tuple[float, ...] = (0.25, 0.5, 1.0)   # shares of the train split's prompts
    bootstrap: int = 1000

    def __post_init__(self):
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions):
            raise ValueError(f"reward_scaling.fractions={list(self.fractions)} must be shares in (0, 1]")


def prompt_subsets(captions: list[str], fractions: tuple[float, ...], seed: int) -> dict[float, np.ndarray]:
    """For each fraction, a mask of the pairs whose prompt is among the first ceil(fraction * prompts) of one
    seeded order of the prompts: smaller subsets lie inside larger ones, and a prompt's pairs stay together."""
    prompts = np.unique(np.asarray(captions, dtype=object))
    order = prompts[np.random.default_rng(seed).permutation(len(prompts))]
    rank = {p: i for i, p in enumerate(order)}
    position = np.array([rank[c] for c in captions])
    return {f: position < max(1, math.ceil(f * len(prompts))) for f in sorted(fractions)}


def judge_labels(judge_gap: np.ndarray, tie_band: float) -> np.ndarray:
    """label_0 of the judge's noiseless order, with the data's tie band."""
    return np.where(np.abs(judge_gap) < tie_band, 0.5, (judge_gap > 0).astype(np.float64))


def scaling_rows(train: PreferencePairs, train_judge_gap: np.ndarray, test: SplitData,
                 fit: Callable[[PreferencePairs], tuple[PixelReward, dict]], config: RewardScalingConfig,
                 tie_band: float, seed: int) -> list[dict]:
    """One row per (labelling, fraction): train pairs and prompts, the best validation step, and test accuracy
    against the labels and against the judge. `fit` trains a pixel model on the pairs it is given."""
    relabelled = {"dataset": train,
                  "judge": dataclasses.replace(train, label_0=judge_labels(train_judge_gap, tie_band))}
    rows = []
    for fraction, mask in prompt_subsets(train.captions, config.fractions, seed).items():
        for labelling, pairs in relabelled.items():
            subset = pairs.take(mask)
            model, metrics = fit(subset)
            scores = pixel_pair_scores(model.eval(), test.pairs)
            every = accuracy_rows("pixel", test.pairs.split, 0, scores, test, config.bootstrap, seed)[0]
            rows.append({"labels": labelling, "fraction": fraction, "train_pairs": len(subset),
                         "train_prompts": len(set(subset.captions)), "best_step": metrics["best_step"],
                         **{k: v for k, v in every.items() if k not in ("model", "split", "timestep", "pair_type")}})
    return rows


def plot_scaling(rows: list[dict], path: str | Path) -> None:
    """Test accuracy against train pairs (log scale), a line per labelling, one panel per reference."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lpo.io import atomic_path
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, (key, title) in zip(axes, (("label", "against the noisy labels"),
                                       ("judge", "against the judge's noiseless order"))):
        for labelling, name in LABELLINGS.items():
            rs = sorted((r for r in rows if r["labels"] == labelling), key=lambda r: r["train_pairs"])
            n = [r["train_pairs"] for r in rs]
            ax.plot(n, [r[f"accuracy_{key}"] for r in rs], marker="o", label=f"trained on {name}")
            ax.fill_between(n, [r[f"{key}_low"] for r in rs], [r[f"{key}_high"] for r in rs], alpha=0.15)
        ax.axhline(0.5, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_title(f"test_unique: {title}", fontsize=10)
        ax.set_xlabel("train pairs")
        ax.set_ylabel("pair accuracy")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_scaling_report(out_dir: Path, world: str, rows: list[dict], label_agreement: float) -> None:
    """reward_scaling.md, .csv and beside them the plot's PNG (written by plot_scaling)."""
    from datetime import date

    from lpo.io import atomic_path
    from lpo.tables import markdown, write_csv
    write_csv(out_dir / "reward_scaling.csv", rows)
    table = [{"trained on": r["labels"], "fraction": r["fraction"], "train pairs": r["train_pairs"],
              "prompts": r["train_prompts"], "best step": r["best_step"],
              "accuracy (labels)": f"{r['accuracy_label']:.3f} [{r['label_low']:.3f}, {r['label_high']:.3f}]",
              "accuracy (judge)": f"{r['accuracy_judge']:.3f} [{r['judge_low']:.3f}, {r['judge_high']:.3f}]",
              "pairs": r["pairs_label"]} for r in rows]
    text = (f"# Reward accuracy against preference data ({world})\n\n"
            f"Generated by `snakemake` (rule `reward_scaling`, not part of `all`) on {date.today().isoformat()}. "
            f"The pixel reward model trained on nested shares of the train split's prompts, on the dataset's noisy "
            f"labels and on the judge's noiseless order; accuracy on test_unique (decided pairs), 95% bootstrap "
            f"intervals over pairs. The test labels agree with the judge's order on {label_agreement:.3f} of decided "
            f"pairs, so a perfect judge-like model would score about that against the labels.\n\n"
            f"![accuracy against train pairs](reward_scaling.png)\n\n{markdown(table)}\n")
    with atomic_path(out_dir / "reward_scaling.md") as tmp:
        tmp.write_text(text)
