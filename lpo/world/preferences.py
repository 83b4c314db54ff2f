"""The Pick-a-Pic-layout preference dataset of the Shapes world.

As Pick-a-Pic was made from the samples of several SD-family models at several guidance scales, pairs here are
samples of several *sources* for the same prompt: base-model snapshots at different training stages and a range of
CFG scales. Each row records its two sources (`model_0` / `model_1`, and their CFG). A share of the pairs has both
images from the first source, the final base model at the optimisers' CFG: LPO and SPO need a reward that ranks
*those* images, not only "a late snapshot beats an early one".
The judge (the hidden human) scores every image; a Bradley-Terry draw with a temperature turns the score gap
into a noisy label, and gaps inside the tie band become ties (label 0.5 / 0.5), as Pick-a-Pic's users tie.
The judge's noiseless scores and the MPCF side scores are kept beside the dataset, never in it.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lpo.config import from_dict
from lpo.images import png_bytes
from lpo.world.pipeline import load_pipeline

SPLITS = ("train", "validation_unique", "test_unique")
COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "has_label", "are_different",
           "num_example_per_prompt", "image_0_uid", "image_1_uid", "model_0", "model_1",
           "guidance_scale_0", "guidance_scale_1")
FINAL = "final"


@dataclass(frozen=True)
class Source:
    """One "model" of the preference data: a base-model snapshot (a training step the base-model stage saved, or
    "final") sampled at one CFG scale."""
    checkpoint: int | str = FINAL
    guidance_scale: float = 5.0

    @property
    def model(self) -> str:
        """Pick-a-Pic's model_0 / model_1 value."""
        return "base" if self.checkpoint == FINAL else f"base-step{self.checkpoint}"

    @property
    def name(self) -> str:
        return f"{self.model}@cfg{self.guidance_scale:g}"


@dataclass(frozen=True)
class PreferencesConfig:
    sources: tuple[Source, ...] = (Source(),)
    same_source_share: float = 1.0   # pairs with both images from sources[0]; the rest pair two distinct sources
    primary_images: int = 6          # images per train prompt from sources[0] ...
    source_images: int = 2           # ... and from every other source; train pairs are drawn among them
    max_pairs_per_prompt: int = 4    # train prompts get 1..max pairs; the *_unique splits one pair per prompt
    sampling_steps: int = 20
    temperature: float = 0.1         # Bradley-Terry: P(image 0 preferred) = sigmoid(gap / temperature)
    tie_band: float = 0.02           # |gap| below this is a tie
    batch_size: int = 128

    def __post_init__(self):
        sources = tuple(s if isinstance(s, Source) else from_dict(Source, s, f"preferences.sources[{i}]")
                        for i, s in enumerate(self.sources or ()))
        object.__setattr__(self, "sources", sources)
        if not sources:
            raise ValueError("preferences.sources is empty: list at least one {checkpoint, guidance_scale} "
                             "(checkpoint: final or a step in base_model.snapshots)")
        for i, s in enumerate(sources):
            if not s.guidance_scale > 0:
                raise ValueError(f"preferences.sources[{i}].guidance_scale={s.guidance_scale!r} must be > 0")
            if s.checkpoint != FINAL and (isinstance(s.checkpoint, bool) or not isinstance(s.checkpoint, int)
                                          or s.checkpoint < 1):
                raise ValueError(f"preferences.sources[{i}].checkpoint={s.checkpoint!r}: use {FINAL!r} or a "
                                 f"training step listed in base_model.snapshots")
        repeated = [s.name for s, n in Counter(sources).items() if n > 1]
        if repeated:
            raise ValueError(f"preferences.sources lists {', '.join(repeated)} more than once")
        if not 0 <= self.same_source_share <= 1 or (len(sources) == 1 and self.same_source_share != 1):
            raise ValueError(f"preferences.same_source_share={self.same_source_share!r} must be in [0, 1], and 1 "
                             f"with a single source")
        if self.primary_images < 2 or self.source_images < 1:
            raise ValueError(f"preferences.primary_images={self.primary_images} must be >= 2 (a same-source pair "
                             f"needs two) and preferences.source_images={self.source_images} >= 1")
        if self.max_pairs_per_prompt < 1:
            raise ValueError(f"preferences.max_pairs_per_prompt={self.max_pairs_per_prompt} must be >= 1")
        if self.temperature <= 0 or self.tie_band < 0:
            raise ValueError("preferences.temperature must be > 0 and preferences.tie_band >= 0")

    def snapshot_steps(self) -> list[int]:
        return sorted({s.checkpoint for s in self.sources if s.checkpoint != FINAL})


def source_pipeline(source: Source, model_dir: str | os.PathLike, snapshots_dir: str | os.PathLike):
    """The pipeline a source samples: the final base model or its snapshot `<snapshots_dir>/step<N>/`."""
    if source.checkpoint == FINAL:
        return load_pipeline(model_dir)
    path = Path(snapshots_dir) / f"step{source.checkpoint}"
    if not path.is_dir():
        saved = sorted(p.name for p in Path(snapshots_dir).glob("step*")) if Path(snapshots_dir).is_dir() else []
        raise FileNotFoundError(f"preferences.sources names checkpoint {source.checkpoint}, which the base model did "
                                f"not save (saved: {', '.join(saved) or 'none'} in '{snapshots_dir}'): add "
                                f"{source.checkpoint} to base_model.snapshots and rerun the `world base-model` stage")
    return load_pipeline(path)


@dataclass
class SplitPairs:
    """One split's pairs as index arrays into its image table; image r of the table is slot `slot[r]` of source
    `source[r]` for prompt `image_prompt[r]`."""
    prompt: np.ndarray        # (P,) prompt index of each pair
    image_0: np.ndarray       # (P,) image row
    image_1: np.ndarray
    label_0: np.ndarray       # (P,) 1, 0 or 0.5 (filled once the images are judged)
    per_prompt: np.ndarray    # (P,) pairs of that prompt in this split
    image_prompt: np.ndarray  # (I,) prompt of each image row
    source: np.ndarray        # (I,) source index of each image row
    slot: np.ndarray          # (I,) which of that prompt's images of that source

    def same_source(self) -> np.ndarray:
        return self.source[self.image_0] == self.source[self.image_1]


def _slots(config: PreferencesConfig, unique: bool) -> list[tuple[int, int]]:
    """(source, slot) of the images a prompt may draw pairs from: the unique splits' single pair needs two from
    one source or one from each of two."""
    counts = [2 if unique else config.primary_images] + [1 if unique else config.source_images] * (
        len(config.sources) - 1)
    return [(s, k) for s, n in enumerate(counts) for k in range(n)]


def _candidates(config: PreferencesConfig, unique: bool) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Every unordered pair of a prompt's slots whose type the mix allows (same-source only from sources[0]) and
    the probability weight of each, so that a pair is same-source with probability same_source_share."""
    slots = _slots(config, unique)
    # A unique split's second slot of sources[0] only serves its same-source pair, so that every source pair is
    # equally likely there; in train, cross pairs with sources[0] are likelier by its larger pool.
    spare = {(0, 1)} if unique else set()
    pairs = [(a, b) for a in range(len(slots)) for b in range(a + 1, len(slots))
             if (slots[a][0] == slots[b][0] == 0) or (slots[a][0] != slots[b][0] and not {slots[a], slots[b]} & spare)]
    same = np.array([slots[a][0] == slots[b][0] for a, b in pairs])
    weights = np.where(same, config.same_source_share / max(1, same.sum()),
                       (1 - config.same_source_share) / max(1, (~same).sum()))
    return pairs, weights / weights.sum()


def draw_pairs(n_prompts: int, config: PreferencesConfig, unique: bool, rng: np.random.Generator) -> SplitPairs:
    """Which slots each prompt pairs, then an image table holding only the slots some pair uses."""
    slots = _slots(config, unique)
    candidates, weights = _candidates(config, unique)
    available = int(np.count_nonzero(weights))
    chosen = []  # (prompt, slot a, slot b, pairs of the prompt)
    for p in range(n_prompts):
        k = 1 if unique else int(rng.integers(1, min(config.max_pairs_per_prompt, available) + 1))
        for c in rng.choice(len(candidates), size=k, replace=False, p=weights):
            a, b = candidates[c] if rng.random() < 0.5 else candidates[c][::-1]
            chosen.append((p, a, b, k))
    used = sorted({(p, s) for p, a, b, _ in chosen for s in (a, b)})
    row = {key: r for r, key in enumerate(used)}
    return SplitPairs(
        prompt=np.array([c[0] for c in chosen], dtype=np.int64),
        image_0=np.array([row[c[0], c[1]] for c in chosen], dtype=np.int64),
        image_1=np.array([row[c[0], c[2]] for c in chosen], dtype=np.int64),
        label_0=np.zeros(len(chosen)), per_prompt=np.array([c[3] for c in chosen], dtype=np.int64),
        image_prompt=np.array([p for p, _ in used], dtype=np.int64),
        source=np.array([slots[s][0] for _, s in used], dtype=np.int64),
        slot=np.array([slots[s][1] for _, s in used], dtype=np.int64))


def bradley_terry_labels(gap: np.ndarray, config: PreferencesConfig, rng: np.random.Generator) -> np.ndarray:
    """label_0 for each pair from the judge's score gap (score_0 - score_1)."""
    p0 = 0.5 * (1.0 + np.tanh(gap / (2.0 * config.temperature)))  # the logistic sigmoid, without overflow
    label = (rng.random(gap.shape) < p0).astype(np.float64)
    label[np.abs(gap) < config.tie_band] = 0.5
    return label


def label_statistics(pairs: SplitPairs, overall: np.ndarray, mask: np.ndarray | None = None) -> dict:
    """How Pick-a-Pic-like the labels are (of the pairs in `mask`): agreement with the judge's noiseless order
    (decided pairs with a nonzero gap) and the tie rate."""
    mask = np.ones(pairs.label_0.size, bool) if mask is None else mask
    label, prompt = pairs.label_0[mask], pairs.prompt[mask]
    gap = overall[pairs.image_0[mask]] - overall[pairs.image_1[mask]]
    decided = (label != 0.5) & (gap != 0)
    agree = (label[decided] == 1.0) == (gap[decided] > 0)
    n_prompts = np.unique(prompt).size
    return {"pairs": int(label.size), "prompts": int(n_prompts),
            "pairs_per_prompt": float(label.size / max(1, n_prompts)),
            "tie_rate": float(np.mean(label == 0.5)) if label.size else float("nan"),
            "label_agreement": float(agree.mean()) if agree.size else float("nan")}


def source_mix(pairs: SplitPairs, sources: tuple[Source, ...]) -> list[dict]:
    """Pairs per unordered source pair, as the world report tabulates them."""
    names = [s.name for s in sources]
    counts = Counter(tuple(sorted((names[pairs.source[a]], names[pairs.source[b]])))
                     for a, b in zip(pairs.image_0, pairs.image_1))
    return [{"source_a": a, "source_b": b, "pairs": n} for (a, b), n in sorted(counts.items())]


def to_records(split: str, prompts: list[str], images: np.ndarray, pairs: SplitPairs,
               sources: tuple[Source, ...]) -> dict[str, list]:
    encoded = [png_bytes(im) for im in images]
    uid = [f"{split}-{row:06d}" for row in range(len(images))]
    source = [sources[s] for s in pairs.source]
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
        "model_0": [source[i].model for i in pairs.image_0],
        "model_1": [source[i].model for i in pairs.image_1],
        "guidance_scale_0": [float(source[i].guidance_scale) for i in pairs.image_0],
        "guidance_scale_1": [float(source[i].guidance_scale) for i in pairs.image_1],
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
    """sample(source index, prompts, seeds) -> uint8 images; judge(images, prompts) -> Verdict;
    side_scores(images, prompts) -> {name: scores}. Returns (records per split, judge rows, MPCF rows, stats)."""
    rng = np.random.default_rng(seed)
    records, judged, side, stats = {}, [], [], {}
    for index, split in enumerate(SPLITS):
        prompts = prompt_sets[split]
        pairs = draw_pairs(len(prompts), config, unique=split != "train", rng=rng)
        expanded = [prompts[p] for p in pairs.image_prompt]
        # One seed per (split, prompt, source, slot): no two images of the dataset share their initial noise.
        seeds = (seed * 10**9 + index * 10**8 + pairs.image_prompt * 10**4 + pairs.source * 100 + pairs.slot).tolist()
        images = None
        for s in range(len(config.sources)):
            rows = np.flatnonzero(pairs.source == s)
            if rows.size:
                drawn = sample(s, [expanded[r] for r in rows], [seeds[r] for r in rows])
                images = np.zeros((len(expanded), *drawn.shape[1:]), np.uint8) if images is None else images
                images[rows] = drawn
        verdict = judge(images, expanded)
        pairs.label_0 = bradley_terry_labels(verdict.overall[pairs.image_0] - verdict.overall[pairs.image_1],
                                             config, rng)
        records[split] = to_records(split, prompts, images, pairs, config.sources)
        judged += judge_rows(split, pairs, verdict)
        side += side_score_rows(split, pairs, side_scores(images, expanded))
        same = pairs.same_source()
        stats[split] = {**label_statistics(pairs, verdict.overall),
                        "same_source": label_statistics(pairs, verdict.overall, same),
                        "cross_source": label_statistics(pairs, verdict.overall, ~same),
                        "sources": source_mix(pairs, config.sources)}
    return records, judged, side, stats
