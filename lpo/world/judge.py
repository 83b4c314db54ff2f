"""The judge: the Shapes world's hidden human.

A small CNN that recognises every attribute of a render (one classification head per attribute) and measures
how strongly each defect is present. It is trained on renders of *all* scenes, held-out combinations included,
because the human it stands for knows every combination. From its outputs, `judge_images` derives what the
preference data needs for an (image, prompt) pair: an alignment score, an aesthetic score and an overall
preference.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lpo.io import atomic_path, read_weights, write_weights
from lpo.world.grammar import ATTRIBUTES, Grammar, Scene, Vocabulary, attribute_plural
from lpo.images import to_tensor, to_uint8
from lpo.world.render import DEFECTS, random_defects, render_batch

_MISSING_HINT = "run the `world judge` stage to train it"


@dataclass(frozen=True)
class JudgeConfig:
    steps: int = 1500
    batch_size: int = 128
    learning_rate: float = 1e-2       # one-cycle peak; detects blur and bleeding better than 2e-3 does
    width: int = 32
    defect_rate: float = 0.5          # share of training renders given random defects
    alignment_weight: float = 1.0     # overall = alignment_weight*alignment + aesthetic_weight*aesthetic
    aesthetic_weight: float = 1.0
    defect_threshold: float = 0.3     # a defect "is present" when its predicted severity exceeds this
    pool_size: int = 16384            # training renders held at once (see render_stream)
    fresh_per_step: int = 32          # of them re-rendered every step

    def __post_init__(self):
        if min(self.steps, self.batch_size, self.pool_size) < 1 or self.width < 2:
            raise ValueError("judge.steps, judge.batch_size and judge.pool_size must be >= 1, judge.width >= 2")
        if not 0 <= self.fresh_per_step <= self.pool_size:
            raise ValueError(f"judge.fresh_per_step={self.fresh_per_step} must be in [0, judge.pool_size]")
        if not 0.0 <= self.defect_rate <= 1.0:
            raise ValueError(f"judge.defect_rate={self.defect_rate} must be in [0, 1]")


def conv_encoder(width: int, features: int, in_channels: int = 3) -> nn.Sequential:
    """Images (N, in_channels, H, W) -> (N, features).

    Strided convolutions down to a 4x4 map that is flattened rather than pooled, so that where things are (the
    position attribute) survives. About 3 M multiply-adds per 32x32 image, which is what lets a judge train in
    about a minute on one CPU core; batch norm is what makes that minute enough.
    """
    half = max(1, width // 2)

    def block(c_in, c_out, kernel, stride):
        return [nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out),
                nn.ReLU()]

    return nn.Sequential(
        *block(in_channels, half, 4, 2), *block(half, width, 3, 1), *block(width, 2 * width, 3, 2),
        *block(2 * width, 2 * width, 3, 2),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(2 * width * 16, features), nn.ReLU(),
    )


class Judge(nn.Module):
    """Images (N, 3, H, W) in [-1, 1] -> attribute logits and defect severities in [0, 1]."""

    def __init__(self, vocabulary: Vocabulary, image_size: int, width: int):
        super().__init__()
        self.vocabulary, self.image_size, self.width = vocabulary, image_size, width
        hidden = 4 * width
        # Channels-last convolutions run about a quarter faster on CPU.
        self.encoder = conv_encoder(width, hidden, in_channels=4).to(memory_format=torch.channels_last)
        self.attribute_heads = nn.ModuleDict(
            {a: nn.Linear(hidden, len(vocabulary.values(a))) for a in ATTRIBUTES})
        self.defect_head = nn.Linear(hidden, len(DEFECTS))

    def raw(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Attribute logits and defect logits (training takes its losses on logits, for stability)."""
        h = self.encoder(with_foreground(x).contiguous(memory_format=torch.channels_last))
        return {**{a: head(h) for a, head in self.attribute_heads.items()}, "defects": self.defect_head(h)}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.raw(x)
        out["defects"] = torch.sigmoid(out["defects"])
        return out


def with_foreground(x: torch.Tensor) -> torch.Tensor:
    """Append each pixel's colour distance from the median colour of the image's rim (the background of a
    one-object scene, even when the object touches a border): a silhouette that looks the same whatever the
    colours and their polarity. Small crosses and diamonds are told apart by it; without it the judge needs
    twice the training to tell them apart as well."""
    rim = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, 1:-1, 0], x[:, :, 1:-1, -1]], 2)
    background = rim.median(2).values[:, :, None, None]
    # Not Tensor.norm, which is ~30x slower on CPU here and would cost a sixth of a training step.
    return torch.cat([x, (x - background).square().sum(1, keepdim=True).sqrt()], 1)


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

def scene_labels(scenes: list[Scene], vocabulary: Vocabulary) -> np.ndarray:
    """(N, n_attributes) class index of each scene's value; a value outside the vocabulary is an error."""
    columns = []
    for a in ATTRIBUTES:
        index = {v: i for i, v in enumerate(vocabulary.values(a))}
        unknown = sorted({getattr(s, a) for s in scenes} - set(index))
        if unknown:
            raise ValueError(f"{a} value(s) {unknown} are not in the model's vocabulary "
                             f"(world.vocabulary.{attribute_plural(a)}: {list(index)})")
        columns.append([index[getattr(s, a)] for s in scenes])
    return np.array(columns, dtype=np.int64).T.reshape(len(scenes), len(ATTRIBUTES))


def render_examples(scenes: list[Scene], rng: np.random.Generator, image_size: int, defect_rate: float):
    """Renders of `scenes`, a `defect_rate` share with random defects: (uint8 images, (N, 5) severities)."""
    defects = [random_defects(rng) if rng.random() < defect_rate else {} for _ in scenes]
    severities = np.array([[d.get(name, 0.0) for name in DEFECTS] for d in defects], dtype=np.float32)
    return render_batch(scenes, rng, image_size, defects), severities.reshape(len(scenes), len(DEFECTS))


def render_stream(grammar: Grammar, image_size: int, config: JudgeConfig,
                  rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Endless training batches (images, severities, labels) of random scenes.

    Rendering a whole fresh batch every step would cost more CPU than the network itself, so batches are
    drawn from a pool of renders of which `fresh_per_step` are replaced by new renders every step: each
    render is seen a few times (under different nuisance), and the data keep changing throughout training.
    """
    scenes = grammar.scenes()

    def draw(n):
        batch = [scenes[i] for i in rng.integers(len(scenes), size=n)]
        images, severities = render_examples(batch, rng, image_size, config.defect_rate)
        return images, severities, scene_labels(batch, grammar.vocabulary)

    # A short run (the smoke world's) gets a pool it draws each render from about 4 times, not one it barely uses.
    size = min(config.pool_size, max(config.batch_size, config.steps * config.batch_size // 4))
    fresh = min(config.fresh_per_step, size)
    pool = draw(size)
    while True:
        slots = rng.choice(size, size=fresh, replace=False)
        for store, new in zip(pool, draw(fresh)):
            store[slots] = new
        rows = rng.integers(size, size=config.batch_size)
        yield tuple(store[rows] for store in pool)


def add_nuisance(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Imperfections milder than any defect (blur sigma <= 0.5, noise std <= 4 grey levels, a slight colour
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
    """Train on renders of all scenes; deterministic for a fixed seed."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    judge = Judge(grammar.vocabulary, image_size, config.width).train()
    generator = torch.Generator().manual_seed(seed)
    stream = render_stream(grammar, image_size, config, np.random.default_rng([seed, 0]))
    optimizer = torch.optim.AdamW(judge.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.learning_rate, total_steps=config.steps,
                                                   pct_start=0.1)
    history = []
    for _ in tqdm(range(config.steps), desc="train judge", mininterval=2.0):
        images, severities, labels = next(stream)
        out = judge.raw(add_nuisance(to_tensor(images), generator))
        labels = torch.from_numpy(labels)
        # Attributes are learnt on defective renders too: a blurred red circle is still a red circle, and a
        # clipped shape is still at its prompted position.
        attribute_loss = sum(F.cross_entropy(out[a], labels[:, j]) for j, a in enumerate(ATTRIBUTES))
        defect_loss = F.binary_cross_entropy_with_logits(out["defects"], torch.from_numpy(severities))
        loss = attribute_loss + len(DEFECTS) * defect_loss  # BCE averages over defects: make it a sum, like CE's
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        history.append((attribute_loss.item(), defect_loss.item()))
    tail = np.mean(history[-max(1, config.steps // 20):], axis=0)
    return judge.eval(), {"steps": config.steps, "train_seconds": time.perf_counter() - start,
                          "final_attribute_loss": float(tail[0]), "final_defect_loss": float(tail[1])}


# ----------------------------------------------------------------------------------------------- inference

@torch.no_grad()
def predict(judge: Judge, images: np.ndarray, batch_size: int = 512) -> dict[str, np.ndarray]:
    """Per-attribute class probabilities and defect severities for uint8 images (N, H, W, 3)."""
    size = judge.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ValueError(f"the judge reads uint8 images of shape (N, {size}, {size}, 3), got {images.shape}")
    judge.eval()
    outs = [judge(to_tensor(images[i:i + batch_size])) for i in range(0, max(len(images), 1), batch_size)]
    return {k: torch.cat([o[k] if k == "defects" else o[k].softmax(-1) for o in outs]).numpy()
            for k in (*ATTRIBUTES, "defects")}


def judge_images(judge: Judge, images: np.ndarray, scenes: list[Scene], config: JudgeConfig) -> Verdict:
    """Score each image against the scene its prompt asks for."""
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images but {len(scenes)} scenes")
    out = predict(judge, images)
    labels = scene_labels(scenes, judge.vocabulary)
    rows = np.arange(len(scenes))
    probs_correct = np.stack([out[a][rows, labels[:, j]] for j, a in enumerate(ATTRIBUTES)], 1)
    correct = np.stack([out[a].argmax(1) == labels[:, j] for j, a in enumerate(ATTRIBUTES)], 1)
    alignment = probs_correct.mean(1)
    defects = out["defects"]
    aesthetic = 1.0 - np.clip(defects.sum(1), 0.0, 1.0)
    return Verdict(probs_correct=probs_correct, correct=correct, alignment=alignment, aligned=correct.all(1),
                   defects=defects, defective=(defects > config.defect_threshold).any(1), aesthetic=aesthetic,
                   overall=config.alignment_weight * alignment + config.aesthetic_weight * aesthetic)


# ---------------------------------------------------------------------------------------------- evaluation

def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half); nan when one class is absent."""
    pos, neg = scores[positive], np.sort(scores[~positive])
    if not len(pos) or not len(neg):
        return float("nan")
    below = np.searchsorted(neg, pos, side="left")
    equal = np.searchsorted(neg, pos, side="right") - below
    return float((below + 0.5 * equal).sum() / (len(pos) * len(neg)))


def evaluate_judge(judge: Judge, grammar: Grammar, image_size: int, seed: int, n: int = 2000,
                   config: JudgeConfig = JudgeConfig()) -> dict:
    """Attribute accuracy on fresh clean renders of all scenes (held-out combinations included, and reported
    apart too), the same under mild nuisance, and defect detection on renders with random defects (every
    severity >= 0.4), where the negatives for a defect are the clean renders and the renders carrying only
    other defects."""
    if image_size != judge.image_size:
        raise ValueError(f"image_size={image_size} but the judge was trained at {judge.image_size}")
    rng = np.random.default_rng([seed, 1])  # a stream training never draws from, whatever the seed
    scenes = grammar.scenes()

    def draw(defect_rate):
        batch = [scenes[i] for i in rng.integers(len(scenes), size=n)]
        return batch, *render_examples(batch, rng, image_size, defect_rate)

    clean_scenes, clean_images, _ = draw(0.0)
    clean = judge_images(judge, clean_images, clean_scenes, config)
    soft_images = to_uint8(add_nuisance(to_tensor(clean_images), torch.Generator().manual_seed(seed)))
    soft = judge_images(judge, soft_images, clean_scenes, config)
    bad_scenes, bad_images, severities = draw(1.0)
    bad = judge_images(judge, bad_images, bad_scenes, config)
    heldout = np.array([grammar.is_heldout(s) for s in clean_scenes], dtype=bool)
    predicted = np.concatenate([clean.defects, bad.defects])
    present = np.concatenate([np.zeros_like(severities), severities]) > 0
    metrics = {
        "n": n,
        "attribute_accuracy": dict(zip(ATTRIBUTES, clean.correct.mean(0).tolist())),
        "heldout_combination_accuracy": (dict(zip(ATTRIBUTES, clean.correct[heldout].mean(0).tolist()))
                                         if heldout.any() else {}),
        "all_correct": float(clean.aligned.mean()),
        "clean_defective_rate": float(clean.defective.mean()),
        "clean_aesthetic": float(clean.aesthetic.mean()),
        # Clean renders under the mild nuisance of training (slight blur, noise, colour cast).
        "nuisance_accuracy": dict(zip(ATTRIBUTES, soft.correct.mean(0).tolist())),
        "nuisance_defective_rate": float(soft.defective.mean()),
        "defective_detected": float(bad.defective.mean()),
        "defective_aesthetic": float(bad.aesthetic.mean()),
        "accuracy_under_defects": dict(zip(ATTRIBUTES, bad.correct.mean(0).tolist())),
        "defects": {},
    }
    for k, name in enumerate(DEFECTS):
        hit = severities[:, k] > 0
        metrics["defects"][name] = {
            "auc": auc(predicted[:, k], present[:, k]),
            "accuracy": float(((predicted[:, k] > config.defect_threshold) == present[:, k]).mean()),
            "severity_mae": float(np.abs(bad.defects[hit, k] - severities[hit, k]).mean()) if hit.any() else None}
    return metrics


# ------------------------------------------------------------------------------------------------- storage

def save_judge(judge: Judge, config: JudgeConfig, path) -> None:
    """Write the judge as a directory (the pipeline's output for the stage): weights and config.json."""
    meta = {"image_size": judge.image_size, "width": judge.width,
            "vocabulary": {attribute_plural(a): list(judge.vocabulary.values(a)) for a in ATTRIBUTES},
            "config": dataclasses.asdict(config)}
    with atomic_path(path) as tmp:
        tmp.mkdir()
        write_weights(tmp, judge.state_dict(), meta)


def load_judge(path) -> tuple[Judge, JudgeConfig]:
    state, meta = read_weights(path, "the judge", f"{_MISSING_HINT} (`snakemake ... --forcerun world_judge`)")
    judge = Judge(Vocabulary.from_dict(meta["vocabulary"]), meta["image_size"], meta["width"])
    judge.load_state_dict(state)
    return judge.eval(), JudgeConfig(**meta["config"])
