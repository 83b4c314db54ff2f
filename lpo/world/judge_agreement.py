"""How far the world's preferences are a property of the images: the ceiling any reward model of images faces.

The world's judge is one network, trained from one seed. Where the base model's images are ambiguous (a blob
between a circle and a square), its calls are partly its seed's: another judge, trained exactly as it was on
another seed, calls some of them the other way. Such judges are the world's inter-rater agreement (Pick-a-Pic's
raters disagree too): their accuracy against the dataset's labels is about the best a reward model that learns
*what the images show* can reach, however much data it gets, while the oracle row (the world's own judge against
its labels) is the ceiling that label noise alone leaves. The gap between the two is the part of the labels that
is the world judge's idiosyncrasy.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lpo.preference_data import PreferencePairs, concatenate_pairs
from lpo.stats import bootstrap
from lpo.world.grammar import ATTRIBUTES, Grammar
from lpo.world.judge import Judge, JudgeConfig, judge_images
from lpo.world.preferences import SPLITS

WORLD_JUDGE = "world judge (oracle)"


@dataclass(frozen=True)
class JudgeAgreementConfig:
    judges: int = 2                   # judges trained as the world's is, each on its own seed
    splits: tuple[str, ...] = ("validation_unique", "test_unique")
    bootstrap: int = 1000

    def __post_init__(self):
        if self.judges < 1:
            raise ValueError(f"judge_agreement.judges={self.judges} must be >= 1")
        if not self.splits or not set(self.splits) <= set(SPLITS):
            raise ValueError(f"judge_agreement.splits={list(self.splits)}: name preference splits to score, of "
                             f"{list(SPLITS)}")


@dataclass
class JudgedPairs:
    """Pairs with what one judge makes of them."""
    gap: np.ndarray        # overall_0 - overall_1, per pair
    correct_0: np.ndarray  # (N, attributes): whether each attribute of images_0 is as prompted
    correct_1: np.ndarray

    @property
    def correct(self) -> np.ndarray:
        return np.concatenate([self.correct_0, self.correct_1])


def judge_pairs(judge: Judge, config: JudgeConfig, pairs: PreferencePairs, grammar: Grammar) -> JudgedPairs:
    scenes = [grammar.parse(caption) for caption in pairs.captions]
    first = judge_images(judge, np.asarray(pairs.images_0), scenes, config)
    second = judge_images(judge, np.asarray(pairs.images_1), scenes, config)
    return JudgedPairs(first.overall - second.overall, first.correct, second.correct)


def agreement_study(world: Judge, others: dict[str, Judge], config: JudgeConfig, splits: dict[str, PreferencePairs],
                    sources: dict[str, np.ndarray | None], grammar: Grammar, n_bootstrap: int, seed: int
                    ) -> tuple[list[dict], list[dict]]:
    """(agreement_rows of every split and, with several, of all of them together; attribute_agreement on the
    last of those)."""
    judged = {split: (judge_pairs(world, config, pairs, grammar),
                      {name: judge_pairs(other, config, pairs, grammar) for name, other in others.items()})
              for split, pairs in splits.items()}
    splits, sources = dict(splits), dict(sources)
    if len(splits) > 1:  # the splits together, as the reward study's targets are stated
        def joined(parts: list[JudgedPairs]) -> JudgedPairs:
            return JudgedPairs(*(np.concatenate([getattr(p, f) for p in parts])
                                 for f in ("gap", "correct_0", "correct_1")))
        name = "+".join(splits)
        judged[name] = (joined([w for w, _ in judged.values()]),
                        {o: joined([of_split[o] for _, of_split in judged.values()]) for o in others})
        parts = list(sources.values())
        sources[name] = None if any(s is None for s in parts) else np.concatenate(parts)
        splits[name] = concatenate_pairs(list(splits.values()))
    rows = [row for split, (world_judged, others_judged) in judged.items()
            for row in agreement_rows(split, splits[split], world_judged, others_judged, sources[split],
                                      n_bootstrap, seed)]
    return rows, attribute_agreement(*judged[list(judged)[-1]])


def agreement_rows(split: str, pairs: PreferencePairs, world: JudgedPairs, others: dict[str, JudgedPairs],
                   same_source: np.ndarray | None, n_bootstrap: int, seed: int) -> list[dict]:
    """Per judge and pair type with decided pairs: accuracy against the labels and agreement with the world
    judge's order (pairs both judges order), with 95% bootstrap intervals over prompts; the world judge's own row
    is the oracle."""
    label, prompts = pairs.label_0, np.asarray(pairs.captions)
    types = {"all": np.ones(len(pairs), bool)}
    if same_source is not None:
        types |= {"same_source": same_source, "cross_source": ~same_source}
    rows = []
    for name, judged in {WORLD_JUDGE: world, **others}.items():
        for pair_type, mask in types.items():
            decided = mask & (label != 0.5) & (judged.gap != 0)
            if not decided.any():
                continue
            right = bootstrap(((judged.gap > 0) == (label == 1.0))[decided], prompts[decided], n_bootstrap, seed)
            ordered = mask & (judged.gap != 0) & (world.gap != 0)
            same = bootstrap(((judged.gap > 0) == (world.gap > 0))[ordered], prompts[ordered], n_bootstrap, seed)
            rows.append({"split": split, "judge": name, "pair_type": pair_type,
                         "accuracy_label": right.mean, "label_low": right.low, "label_high": right.high,
                         "order_agreement": same.mean, "agreement_low": same.low, "agreement_high": same.high,
                         "pairs": int(decided.sum())})
    return rows


def attribute_agreement(world: JudgedPairs, others: dict[str, JudgedPairs]) -> list[dict]:
    """Per judge: the share of images on which it and the world judge agree whether each attribute is as
    prompted, beside the share the world judge finds correct."""
    rows = [{"judge": WORLD_JUDGE + ": share correct",
             **{a: float(v) for a, v in zip(ATTRIBUTES, world.correct.mean(0))}}]
    for name, judged in others.items():
        rows.append({"judge": name, **{a: float(v) for a, v in
                                       zip(ATTRIBUTES, (judged.correct == world.correct).mean(0))}})
    return rows


def write_agreement_report(out_dir: Path, world_name: str, rows: list[dict], attributes: list[dict],
                           config: JudgeAgreementConfig) -> None:
    """judge_agreement.md and .csv."""
    from datetime import date

    from lpo.io import atomic_path
    from lpo.tables import markdown, write_csv
    write_csv(out_dir / "judge_agreement.csv", rows)

    def cell(r, key, low, high):
        return f"{r[key]:.3f} [{r[low]:.3f}, {r[high]:.3f}]"

    table = [{"split": r["split"], "judge": r["judge"], "pairs": r["pair_type"],
              "accuracy vs labels": cell(r, "accuracy_label", "label_low", "label_high"),
              "order agrees with the world judge": cell(r, "order_agreement", "agreement_low", "agreement_high"),
              "decided pairs": r["pairs"]} for r in rows]
    shares = [{"judge": r["judge"], **{a: f"{r[a]:.3f}" for a in ATTRIBUTES}} for r in attributes]
    text = (f"# Judge agreement ({world_name})\n\n"
            f"Generated by `snakemake` (rule `world_judge_agreement`, not part of `all`) on "
            f"{date.today().isoformat()}. {config.judges} judge(s) trained exactly as the world's judge (its "
            f"`judge` settings), each on its own seed, score the preference pairs of {', '.join(config.splits)}. "
            f"A judge's accuracy against the labels is what a reward model that learns what the images show can "
            f"hope for; the world judge's own row (the oracle) is the ceiling label noise leaves. Accuracy on "
            f"decided pairs the judge orders; 95% bootstrap intervals over prompts.\n\n{markdown(table)}\n\n"
            f"## Whether each attribute is as prompted\n\nOn {rows[-1]['split']} (both images of every pair): the "
            f"world judge's share of correct attributes, then each other judge's agreement with it on that call.\n\n"
            f"{markdown(shares)}\n")
    with atomic_path(out_dir / "judge_agreement.md") as tmp:
        tmp.write_text(text)
