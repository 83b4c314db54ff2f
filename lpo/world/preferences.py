"""The Pick-a-Pic-layout preference dataset of the Shapes world.

As Pick-a-Pic was made from SD-family samples, pairs are the base model's own samples for the same prompt.
The judge (the hidden human) scores every image; a Bradley-Terry draw with a temperature turns the score gap
into a noisy label, and gaps inside the tie band become ties (label 0.5 / 0.5), as Pick-a-Pic's users tie.
The judge's noiseless scores and the MPCF side scores are kept beside the dataset, never in it.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from lpo.images import png_bytes

SPLITS = ("train", "validation_unique", "test_unique")
COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "has_label", "are_different",
           "num_example_per_prompt", "image_0_uid", "image_1_uid")


@dataclass(frozen=True)
class PreferencesConfig:
    images_per_prompt: int = 4
    max_pairs_per_prompt: int = 4   # train prompts get 1..max pairs; the *_unique splits one pair per prompt
    sampling_steps: int = 20
    guidance_scale: float = 7.5
    temperature: float = 0.1        # Bradley-Terry: P(image 0 preferred) = sigmoid(gap / temperature)
    tie_band: float = 0.02          # |gap| below this is a tie
    batch_size: int = 128

    def __post_init__(self):
        if self.images_per_prompt < 2:
            raise ValueError(f"preferences.images_per_prompt={self.images_per_prompt}: a pair needs >= 2 images")
        if self.max_pairs_per_prompt < 1:
            raise ValueError(f"preferences.max_pairs_per_prompt={self.max_pairs_per_prompt} must be >= 1")
        if self.temperature <= 0 or self.tie_band < 0:
            raise ValueError("preferences.temperature must be > 0 and preferences.tie_band >= 0")


@dataclass
class SplitPairs:
    """One split's pairs as index arrays into its image table (images are rows prompt-major)."""
    prompt: np.ndarray       # (P,) prompt index of each pair
    image_0: np.ndarray      # (P,) image row
    image_1: np.ndarray
    label_0: np.ndarray      # (P,) 1, 0 or 0.5
    per_prompt: np.ndarray   # (P,) pairs of that prompt in this split


def draw_pairs(n_prompts: int, config: PreferencesConfig, unique: bool, rng: np.random.Generator):
    combos = list(itertools.combinations(range(config.images_per_prompt), 2))
    prompt, first, second, per_prompt = [], [], [], []
    for p in range(n_prompts):
        k = 1 if unique else int(rng.integers(1, min(config.max_pairs_per_prompt, len(combos)) + 1))
        for c in rng.choice(len(combos), size=k, replace=False):
            a, b = combos[c] if rng.random() < 0.5 else combos[c][::-1]
            prompt.append(p)
            first.append(p * config.images_per_prompt + a)
            second.append(p * config.images_per_prompt + b)
            per_prompt.append(k)
    return np.array(prompt), np.array(first), np.array(second), np.array(per_prompt)


def bradley_terry_labels(gap: np.ndarray, config: PreferencesConfig, rng: np.random.Generator) -> np.ndarray:
    """label_0 for each pair from the judge's score gap (score_0 - score_1)."""
    p0 = 0.5 * (1.0 + np.tanh(gap / (2.0 * config.temperature)))  # the logistic sigmoid, without overflow
    label = (rng.random(gap.shape) < p0).astype(np.float64)
    label[np.abs(gap) < config.tie_band] = 0.5
    return label


def make_split_pairs(overall: np.ndarray, n_prompts: int, config: PreferencesConfig, unique: bool,
                     rng: np.random.Generator) -> SplitPairs:
    prompt, i0, i1, per_prompt = draw_pairs(n_prompts, config, unique, rng)
    labels = bradley_terry_labels(overall[i0] - overall[i1], config, rng)
    return SplitPairs(prompt, i0, i1, labels, per_prompt)


def label_statistics(pairs: SplitPairs, overall: np.ndarray) -> dict:
    """How Pick-a-Pic-like the labels are: agreement with the judge's noiseless order (decided pairs with a
    nonzero gap) and the tie rate."""
    gap = overall[pairs.image_0] - overall[pairs.image_1]
    decided = (pairs.label_0 != 0.5) & (gap != 0)
    agree = (pairs.label_0[decided] == 1.0) == (gap[decided] > 0)
    return {"pairs": int(pairs.label_0.size), "prompts": int(np.unique(pairs.prompt).size),
            "pairs_per_prompt": float(pairs.label_0.size / max(1, np.unique(pairs.prompt).size)),
            "tie_rate": float(np.mean(pairs.label_0 == 0.5)),
            "label_agreement": float(agree.mean()) if agree.size else float("nan")}


def to_records(split: str, prompts: list[str], images: np.ndarray, pairs: SplitPairs) -> dict[str, list]:
    encoded = [png_bytes(im) for im in images]
    uid = [f"{split}-{row:06d}" for row in range(len(images))]
    return {
        "caption": [prompts[p] for p in pairs.prompt],
        "jpg_0": [encoded[i] for i in pairs.image_0],
        "jpg_1": [encoded[i] for i in pairs.image_1],
        "label_0": pairs.label_0.tolist(),
        "label_1": (1.0 - pairs.label_0).tolist(),
        "has_label": [1] * len(pairs.prompt),
        "are_different": [int(encoded[a] != encoded[b]) for a, b in zip(pairs.image_0, pairs.image_1)],
        "num_example_per_prompt": pairs.per_prompt.tolist(),
        "image_0_uid": [uid[i] for i in pairs.image_0],
        "image_1_uid": [uid[i] for i in pairs.image_1],
    }


def side_score_rows(split: str, pairs: SplitPairs, scores: dict[str, np.ndarray]) -> list[dict]:
    """MPCF's per-pair table, row-aligned with the split. Gaps are winner minus loser for decided pairs and
    absolute differences for ties (the paper's |G| tie rule); different_flag marks decided pairs."""
    rows = []
    for row in range(pairs.label_0.size):
        a, b = pairs.image_0[row], pairs.image_1[row]
        label = pairs.label_0[row]
        record = {"split": split, "row": row, "different_flag": int(label != 0.5)}
        for name, s in scores.items():
            record[f"{name}_0"], record[f"{name}_1"] = float(s[a]), float(s[b])
            diff = s[a] - s[b]
            record[f"{name}_gap"] = float(abs(diff) if label == 0.5 else (diff if label == 1.0 else -diff))
        rows.append(record)
    return rows


def judge_rows(split: str, pairs: SplitPairs, verdict) -> list[dict]:
    """The judge's noiseless scores of each pair, for measuring reward models against the hidden truth."""
    rows = []
    for row in range(pairs.label_0.size):
        a, b = pairs.image_0[row], pairs.image_1[row]
        record = {"split": split, "row": row}
        for name in ("overall", "alignment", "aesthetic"):
            values = getattr(verdict, name)
            record[f"{name}_0"], record[f"{name}_1"] = float(values[a]), float(values[b])
        rows.append(record)
    return rows


def build_preference_data(prompt_sets: dict[str, list[str]], sample, judge, side_scores,
                          config: PreferencesConfig, seed: int):
    """sample(prompts, seeds) -> uint8 images; judge(images, prompts) -> Verdict;
    side_scores(images, prompts) -> {name: scores}. Returns (records per split, judge rows, MPCF rows, stats)."""
    rng = np.random.default_rng(seed)
    records, judged, side, stats = {}, [], [], {}
    for index, split in enumerate(SPLITS):
        prompts = prompt_sets[split]
        expanded = [p for p in prompts for _ in range(config.images_per_prompt)]
        # Seeds disjoint across splits so no two images of the dataset share their initial noise.
        seeds = [seed * 10_000_000 + index * 1_000_000 + i for i in range(len(expanded))]
        images = sample(expanded, seeds)
        verdict = judge(images, expanded)
        pairs = make_split_pairs(verdict.overall, len(prompts), config, unique=split != "train", rng=rng)
        records[split] = to_records(split, prompts, images, pairs)
        judged += judge_rows(split, pairs, verdict)
        side += side_score_rows(split, pairs, side_scores(images, expanded))
        stats[split] = label_statistics(pairs, verdict.overall)
    return records, judged, side, stats
