"""The judge: the Shapes world's hidden human.

A small CNN that recognises every attribute of a render (one classification head per attribute) and measures
how strongly each defect is present. It is trained on renders of *all* scenes, held-out combinations included,
because the human it stands for knows every combination. From its outputs, `judge_images` derives what the
preference data needs for an (image, prompt) pair: an alignment score, an aesthetic score and an overall
preference. Nothing that is trained on the judge's labels ever sees the judge itself.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lpo.io import atomic_path, require_exists
from lpo.world.grammar import ATTRIBUTES, Grammar, Scene, Vocabulary, attribute_plural
from lpo.world.images import to_tensor
from lpo.world.render import DEFECTS, random_defects, render_batch

_MISSING_HINT = "run the `world judge` stage to train it"


@dataclass(frozen=True)
class JudgeConfig:
    steps: int = 1500
    batch_size: int = 128
    learning_rate: float = 2e-3
    width: int = 32
    defect_rate: float = 0.5          # share of training renders given random defects
    alignment_weight: float = 1.0     # overall = alignment_weight*alignment + aesthetic_weight*aesthetic
    aesthetic_weight: float = 1.0
    defect_threshold: float = 0.3     # a defect "is present" when its predicted severity exceeds this

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.width < 2:
            raise ValueError("judge.steps and judge.batch_size must be >= 1 and judge.width >= 2")
        if not 0.0 <= self.defect_rate <= 1.0:
            raise ValueError(f"judge.defect_rate={self.defect_rate} must be in [0, 1]")


def conv_encoder(width: int, features: int) -> nn.Sequential:
    """Images (N, 3, H, W) in [-1, 1] -> (N, features).

    Strided convolutions down to a 4x4 map that is flattened rather than pooled, so where things are (the
    position attribute) survives; the first layer sees full resolution, where noise and blur show. About 2 M
    multiply-adds per 32x32 image, which is what lets a judge train in a minute on one CPU core.
    """
    half = max(1, width // 2)
    return nn.Sequential(
        nn.Conv2d(3, half, 4, stride=2, padding=1), nn.GELU(),
        nn.Conv2d(half, width, 3, padding=1), nn.GELU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
        nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        nn.Linear(2 * width * 16, features), nn.GELU(),
    )


class Judge(nn.Module):
    def __init__(self, vocabulary: Vocabulary, image_size: int, width: int):
        super().__init__()
        self.vocabulary, self.image_size, self.width = vocabulary, image_size, width
        hidden = 4 * width
        self.encoder = conv_encoder(width, hidden)
        self.attribute_heads = nn.ModuleDict(
            {a: nn.Linear(hidden, len(vocabulary.values(a))) for a in ATTRIBUTES})
        self.defect_head = nn.Linear(hidden, len(DEFECTS))

    def raw(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Attribute logits and defect logits (training takes losses on logits, for numerical stability)."""
        h = self.encoder(x)
        return {**{a: head(h) for a, head in self.attribute_heads.items()}, "defects": self.defect_head(h)}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.raw(x)
        out["defects"] = torch.sigmoid(out["defects"])
        return out


@dataclass
class Verdict:
    """The judge's view of (image, prompt) pairs; numpy arrays, one row per image."""
    probs_correct: np.ndarray   # (N, n_attributes) P(recognised value == prompted value), ATTRIBUTES order
    correct: np.ndarray         # (N, n_attributes) bool, argmax == prompted value
    alignment: np.ndarray       # (N,) mean of probs_correct (soft alignment, in [0, 1])
    aligned: np.ndarray         # (N,) bool, every attribute correct
    defects: np.ndarray         # (N, 5) predicted severities, DEFECTS order
    defective: np.ndarray       # (N,) bool, any severity > defect_threshold
    aesthetic: np.ndarray       # (N,) in [0, 1]: 1 - clip(sum of severities, 0, 1)
    overall: np.ndarray         # (N,) alignment_weight * alignment + aesthetic_weight * aesthetic


# ---------------------------------------------------------------------------------------------------- data

def scene_labels(scenes: list[Scene], vocabulary: Vocabulary) -> dict[str, torch.Tensor]:
    """Class index of each scene's value, per attribute; a value outside the vocabulary is an error."""
    labels = {}
    for a in ATTRIBUTES:
        index = {v: i for i, v in enumerate(vocabulary.values(a))}
        unknown = sorted({getattr(s, a) for s in scenes} - set(index))
        if unknown:
            raise ValueError(f"{a} value(s) {unknown} are not in the judge's vocabulary "
                             f"(world.vocabulary.{attribute_plural(a)}: {list(index)})")
        labels[a] = torch.tensor([index[getattr(s, a)] for s in scenes])
    return labels


def severity_matrix(defects: list[dict[str, float]]) -> np.ndarray:
    return np.array([[d.get(name, 0.0) for name in DEFECTS] for d in defects], dtype=np.float32).reshape(-1, len(DEFECTS))


def render_examples(scenes: list[Scene], rng: np.random.Generator, image_size: int, defect_rate: float):
    """Renders of `scenes`, a `defect_rate` share with random defects; returns (uint8 images, severities)."""
    defects = [random_defects(rng) if rng.random() < defect_rate else {} for _ in scenes]
    return render_batch(scenes, rng, image_size, defects), severity_matrix(defects)


def add_nuisance(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Imperfections milder than any defect (blur sigma <= 0.5, noise std <= 4/255 levels, a slight colour
    cast), which a generative model makes all the time; trained as clean so that a slightly soft but clean
    image is not called defective."""
    n = x.shape[0]

    def uniform(*shape):
        return torch.rand(*shape, generator=generator)

    sigma = 0.5 * uniform(n)
    taps = torch.exp(-torch.tensor([1.0, 0.0, 1.0]) / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    taps = taps / taps.sum(1, keepdim=True)
    kernel = (taps[:, :, None] * taps[:, None, :]).repeat_interleave(3, 0)[:, None]  # (3N, 1, 3, 3)
    padded = F.pad(x.reshape(1, 3 * n, *x.shape[2:]), (1, 1, 1, 1), mode="replicate")
    x = F.conv2d(padded, kernel, groups=3 * n).reshape(x.shape)
    gain = 1.0 + 0.06 * (uniform(n, 3, 1, 1) - 0.5)
    offset = 0.06 * (uniform(n, 3, 1, 1) - 0.5)
    noise = torch.randn(x.shape, generator=generator) * (4.0 / 127.5) * uniform(n, 1, 1, 1)
    return (x * gain + offset + noise).clamp(-1.0, 1.0)


# ------------------------------------------------------------------------------------------------ training

def train_judge(grammar: Grammar, image_size: int, config: JudgeConfig, seed: int) -> tuple[Judge, dict]:
    """Train on renders drawn afresh every step from all scenes; deterministic for a fixed seed."""
    torch.manual_seed(seed)
    judge = Judge(grammar.vocabulary, image_size, config.width)
    rng = np.random.default_rng([seed, 0])
    generator = torch.Generator().manual_seed(seed)
    scenes = grammar.scenes()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.learning_rate, total_steps=config.steps,
                                                   pct_start=0.1)
    history = {"attribute_loss": [], "defect_loss": []}
    start = time.perf_counter()
    judge.train()
    for _ in tqdm(range(config.steps), desc="train judge", mininterval=2.0):
        batch = [scenes[i] for i in rng.integers(len(scenes), size=config.batch_size)]
        images, severities = render_examples(batch, rng, image_size, config.defect_rate)
        out = judge.raw(add_nuisance(to_tensor(images), generator))
        labels = scene_labels(batch, grammar.vocabulary)
        # Attributes are learnt on defective renders too: a blurred red circle is still a red circle, and a
        # clipped shape is still at its prompted position.
        attribute_loss = sum(F.cross_entropy(out[a], labels[a]) for a in ATTRIBUTES)
        defect_loss = F.binary_cross_entropy_with_logits(out["defects"], torch.from_numpy(severities))
        loss = attribute_loss + len(DEFECTS) * defect_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        history["attribute_loss"].append(attribute_loss.item())
        history["defect_loss"].append(defect_loss.item())
    judge.eval()
    tail = max(1, config.steps // 20)
    return judge, {"steps": config.steps, "train_seconds": time.perf_counter() - start,
                   "final_attribute_loss": float(np.mean(history["attribute_loss"][-tail:])),
                   "final_defect_loss": float(np.mean(history["defect_loss"][-tail:]))}


# ----------------------------------------------------------------------------------------------- inference

@torch.no_grad()
def predict(judge: Judge, images: np.ndarray, batch_size: int = 512) -> dict[str, np.ndarray]:
    """Per-attribute class probabilities and defect severities for uint8 images (N, H, W, 3)."""
    if images.ndim != 4 or images.shape[1:3] != (judge.image_size, judge.image_size):
        raise ValueError(f"the judge reads {judge.image_size}x{judge.image_size} images, got shape {images.shape}")
    judge.eval()
    chunks = []
    for i in range(0, len(images), batch_size):
        out = judge(to_tensor(images[i:i + batch_size]))
        chunks.append({k: (v if k == "defects" else v.softmax(-1)).numpy() for k, v in out.items()})
    keys = [*ATTRIBUTES, "defects"]
    if not chunks:
        return {k: np.zeros((0, len(DEFECTS) if k == "defects" else len(judge.vocabulary.values(k))),
                            np.float32) for k in keys}
    return {k: np.concatenate([c[k] for c in chunks]) for k in keys}


def judge_images(judge: Judge, images: np.ndarray, scenes: list[Scene], config: JudgeConfig) -> Verdict:
    """Score each image against the scene its prompt asks for."""
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images but {len(scenes)} scenes")
    out = predict(judge, images)
    labels = scene_labels(scenes, judge.vocabulary)
    rows = np.arange(len(scenes))
    probs_correct = np.stack([out[a][rows, labels[a].numpy()] for a in ATTRIBUTES], 1).reshape(len(scenes), -1)
    correct = np.stack([out[a].argmax(1) == labels[a].numpy() for a in ATTRIBUTES], 1).reshape(len(scenes), -1)
    alignment = probs_correct.mean(1)
    defects = out["defects"]
    aesthetic = 1.0 - np.clip(defects.sum(1), 0.0, 1.0)
    return Verdict(probs_correct=probs_correct, correct=correct, alignment=alignment, aligned=correct.all(1),
                   defects=defects, defective=(defects > config.defect_threshold).any(1), aesthetic=aesthetic,
                   overall=config.alignment_weight * alignment + config.aesthetic_weight * aesthetic)


# ---------------------------------------------------------------------------------------------- evaluation

def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half); nan when one class is absent."""
    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        return float("nan")
    order = np.sort(neg)
    below = np.searchsorted(order, pos, side="left")
    equal = np.searchsorted(order, pos, side="right") - below
    return float((below + 0.5 * equal).sum() / (len(pos) * len(neg)))


def evaluate_judge(judge: Judge, grammar: Grammar, image_size: int, seed: int, n: int = 2000,
                   config: JudgeConfig = JudgeConfig()) -> dict:
    """Attribute accuracy on fresh clean renders of all scenes (held-out combinations included, reported
    apart too) and defect detection on renders with random defects (every severity >= 0.4)."""
    if image_size != judge.image_size:
        raise ValueError(f"image_size={image_size} but the judge was trained at {judge.image_size}")
    rng = np.random.default_rng([seed, 1])  # a stream training never draws from, whatever the seed
    scenes = grammar.scenes()
    clean_scenes = [scenes[i] for i in rng.integers(len(scenes), size=n)]
    clean = judge_images(judge, render_batch(clean_scenes, rng, image_size), clean_scenes, config)
    heldout = np.array([grammar.is_heldout(s) for s in clean_scenes], dtype=bool)
    metrics = {
        "n": n,
        "accuracy": {a: float(clean.correct[:, j].mean()) for j, a in enumerate(ATTRIBUTES)},
        "all_correct": float(clean.aligned.mean()),
        "clean_defective_rate": float(clean.defective.mean()),
        "clean_aesthetic": float(clean.aesthetic.mean()),
    }
    if heldout.any():
        metrics["heldout_accuracy"] = {a: float(clean.correct[heldout, j].mean()) for j, a in enumerate(ATTRIBUTES)}

    bad_scenes = [scenes[i] for i in rng.integers(len(scenes), size=n)]
    bad_images, severities = render_examples(bad_scenes, rng, image_size, defect_rate=1.0)
    bad = judge_images(judge, bad_images, bad_scenes, config)
    # Negatives for a defect are the clean renders and the renders carrying only other defects.
    predicted = np.concatenate([clean.defects, bad.defects])
    truth = np.concatenate([np.zeros_like(severities), severities]) > 0
    metrics["defects"] = {
        name: {"auc": auc(predicted[:, k], truth[:, k]),
               "accuracy": float(((predicted[:, k] > config.defect_threshold) == truth[:, k]).mean()),
               "severity_mae": float(np.abs(bad.defects[:, k] - severities[:, k])[truth[n:, k]].mean())}
        for k, name in enumerate(DEFECTS)}
    metrics["defective_detected"] = float(bad.defective.mean())
    metrics["accuracy_under_defects"] = {a: float(bad.correct[:, j].mean()) for j, a in enumerate(ATTRIBUTES)}
    return metrics


# ------------------------------------------------------------------------------------------------- storage

def save_judge(judge: Judge, config: JudgeConfig, path) -> None:
    state = {"state_dict": judge.state_dict(), "image_size": judge.image_size, "width": judge.width,
             "vocabulary": {attribute_plural(a): list(judge.vocabulary.values(a)) for a in ATTRIBUTES},
             "config": dataclasses.asdict(config)}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_judge(path) -> tuple[Judge, JudgeConfig]:
    path = require_exists(path, "judge", _MISSING_HINT)
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        judge = Judge(Vocabulary.from_dict(state["vocabulary"]), state["image_size"], state["width"])
        judge.load_state_dict(state["state_dict"])
        config = JudgeConfig(**state["config"])
    except Exception as e:  # torch.load and load_state_dict raise many unrelated types
        raise ValueError(f"cannot read the judge at '{path}' ({e}): {_MISSING_HINT} again") from e
    return judge.eval(), config
