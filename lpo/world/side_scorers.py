"""MPCF's side scorers in the Shapes world: the counterparts of the LAION aesthetic predictor, CLIP score and
VQAScore that the paper uses to filter Pick-a-Pic pairs.

They are models of the world that are *not* the judge, and imperfect in the ways the real ones are:
- aesthetic: fixed image statistics (sharpness, contrast, colourfulness, noise, framing), no training; it
  knows nothing about the prompt and sees some defects better than others.
- clipscore: a tiny contrastive image/text model trained on the base corpus, noisy captions included, with a
  bag-of-words text tower; score = cosine similarity.
- vqascore: per-attribute recognisers trained on what the corpus captions say (errors included), smaller and
  shorter-trained than the judge; score = mean over attributes of P(answer == prompted value).
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lpo.io import atomic_path, read_weights, write_weights
from lpo.world.corpus import Corpus
from lpo.world.grammar import ATTRIBUTES, Grammar, Scene, Vocabulary, attribute_plural
from lpo.images import to_tensor
from lpo.world.judge import conv_encoder, scene_labels

_MISSING_HINT = "run the `world side-scorers` stage to train them"
_WIDTH = 16      # image towers a quarter of the judge's cost: the side scorers are deliberately weaker
_FEATURES = 64
_HOLDOUT = 0.1   # share of the corpus kept out of training, for the metrics


@dataclass(frozen=True)
class SideScorerConfig:
    clip_steps: int = 600
    vqa_steps: int = 600
    batch_size: int = 128
    learning_rate: float = 2e-3
    embed_dim: int = 32

    def __post_init__(self):
        if min(self.clip_steps, self.vqa_steps, self.batch_size, self.embed_dim) < 1:
            raise ValueError("side_scorers.clip_steps, vqa_steps, batch_size and embed_dim must be >= 1")


# ----------------------------------------------------------------------------------------------- aesthetic

_LAPLACIAN = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float32)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def image_statistics(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image statistics of uint8 images (N, H, W, 3), each (N,); the background is taken to be the
    median colour, which holds for the Shapes world's single-object scenes."""
    x = images.astype(np.float32) / 255.0
    n, h, w, _ = x.shape
    distance = np.linalg.norm(x - np.median(x.reshape(n, -1, 3), axis=1)[:, None, None], axis=-1)
    contrast = np.percentile(distance.reshape(n, -1), 99, axis=1)
    gx = np.linalg.norm(np.diff(x, axis=2), axis=-1)[:, :-1, :]
    gy = np.linalg.norm(np.diff(x, axis=1), axis=-1)[:, :, :-1]
    gradient = np.sort(np.hypot(gx, gy).reshape(n, -1), axis=1)
    edges = gradient[:, -max(1, gradient.shape[1] // 100):].mean(1)
    gray = x @ _LUMA
    laplacian = sum(_LAPLACIAN[i, j] * gray[:, i:h - 2 + i, j:w - 2 + j] for i in range(3) for j in range(3))
    rg = (x[..., 0] - x[..., 1]).reshape(n, -1)
    yb = (0.5 * (x[..., 0] + x[..., 1]) - x[..., 2]).reshape(n, -1)
    rim = np.concatenate([distance[:, 0], distance[:, -1], distance[:, :, 0], distance[:, :, -1]], 1)
    floor = np.maximum(contrast, 0.1)
    return {
        "contrast": contrast,
        # Strongest edges relative to the contrast: ~1 for an anti-aliased step, lower when blurred.
        "sharpness": edges / floor,
        # Immerkaer's estimate via the median, so that the few object edges do not count as noise.
        "noise": np.median(np.abs(laplacian).reshape(n, -1), axis=1) / (0.6745 * 6),
        # Hasler and Suesstrunk's colourfulness.
        "colourfulness": np.hypot(rg.std(1), yb.std(1)) + 0.3 * np.hypot(rg.mean(1), yb.mean(1)),
        # Share of the image's rim covered by something other than background: an object cut by the frame.
        "border": (rim > 0.5 * floor[:, None]).mean(1),
    }


def aesthetic_score(images: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """A fixed combination of image statistics on a 0-10 scale like the LAION aesthetic predictor's:
    clean renders score about 6.5, renders with strong defects 2-5."""
    scores = []
    for i in range(0, len(images), chunk):
        s = image_statistics(images[i:i + chunk])
        z = (-2.9 + 2.0 * np.clip(s["sharpness"], 0, 1) + 1.5 * np.clip(s["contrast"], 0, 1)
             + 2.0 * np.clip(s["colourfulness"], 0, 0.6) - s["noise"] / 0.02 - 8.0 * np.clip(s["border"], 0, 0.2))
        scores.append(10.0 / (1.0 + np.exp(-z)))
    return np.concatenate(scores) if scores else np.zeros(0)


# ------------------------------------------------------------------------------------------------- models

def caption_words(caption: str) -> list[str]:
    return re.findall(r"[a-z]+", caption.lower())


class ClipLike(nn.Module):
    """Image tower (small CNN) and text tower (mean of word embeddings), both projected to embed_dim."""

    def __init__(self, words: list[str], embed_dim: int):
        super().__init__()
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        self.image_tower = nn.Sequential(conv_encoder(_WIDTH, _FEATURES), nn.Linear(_FEATURES, embed_dim))
        self.word_embeddings = nn.EmbeddingBag(max(1, len(self.words)), embed_dim, mode="mean")
        self.text_projection = nn.Linear(embed_dim, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_tower(x), dim=-1)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        # Unknown words are dropped; a caption with no known word gets the zero vector (cosine 0 to anything).
        ids = [[self.index[w] for w in caption_words(t) if w in self.index] for t in texts]
        offsets = torch.tensor([0, *np.cumsum([len(i) for i in ids])[:-1]], dtype=torch.long)
        bags = self.word_embeddings(torch.tensor([i for row in ids for i in row], dtype=torch.long), offsets)
        return F.normalize(self.text_projection(bags), dim=-1) * torch.tensor([[float(bool(i))] for i in ids])


class VqaLike(nn.Module):
    def __init__(self, vocabulary: Vocabulary):
        super().__init__()
        self.vocabulary = vocabulary
        self.encoder = conv_encoder(_WIDTH, _FEATURES)
        self.heads = nn.ModuleDict({a: nn.Linear(_FEATURES, len(vocabulary.values(a))) for a in ATTRIBUTES})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.encoder(x)
        return {a: head(h) for a, head in self.heads.items()}


class SideScorers:
    def __init__(self, clip: ClipLike, vqa: VqaLike, image_size: int, config: SideScorerConfig):
        self.clip, self.vqa = clip.eval(), vqa.eval()
        self.image_size, self.config = image_size, config
        self._grammar = Grammar(vqa.vocabulary, 0, 0)  # only parses: which pairs are held out is irrelevant

    def _batches(self, images: np.ndarray, batch_size: int = 512):
        size = self.image_size
        if images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(f"side scorers read uint8 images of shape (N, {size}, {size}, 3), got {images.shape}")
        return (to_tensor(images[i:i + batch_size]) for i in range(0, max(len(images), 1), batch_size))

    @torch.no_grad()
    def image_embeddings(self, images: np.ndarray) -> torch.Tensor:
        return torch.cat([self.clip.encode_images(x) for x in self._batches(images)])

    @torch.no_grad()
    def answer_probs(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """The VQA-like scorer's answer distribution per attribute, (N, n_values) each."""
        outs = [self.vqa(x) for x in self._batches(images)]
        return {a: torch.cat([o[a] for o in outs]).softmax(-1).numpy() for a in ATTRIBUTES}

    @torch.no_grad()
    def score(self, images: np.ndarray, prompts: list[str]) -> dict[str, np.ndarray]:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        answers = scene_labels([self._grammar.parse(p) for p in prompts], self.vqa.vocabulary)
        probs = self.answer_probs(images)
        rows = np.arange(len(prompts))
        texts = self.clip.encode_texts(prompts) if prompts else torch.zeros(0, self.config.embed_dim)
        return {"aesthetic": aesthetic_score(images),
                "clipscore": (self.image_embeddings(images) * texts).sum(-1).numpy(),
                "vqascore": np.mean([probs[a][rows, answers[:, j]] for j, a in enumerate(ATTRIBUTES)], 0)
                .reshape(len(prompts))}

    def save(self, path) -> None:
        """Write the scorers as a directory (the pipeline's output for the stage): weights and config.json."""
        vocabulary = self.vqa.vocabulary
        meta = {"words": self.clip.words, "image_size": self.image_size, "config": dataclasses.asdict(self.config),
                "vocabulary": {attribute_plural(a): list(vocabulary.values(a)) for a in ATTRIBUTES}}
        state = {**{f"clip.{k}": v for k, v in self.clip.state_dict().items()},
                 **{f"vqa.{k}": v for k, v in self.vqa.state_dict().items()}}
        with atomic_path(path) as tmp:
            tmp.mkdir()
            write_weights(tmp, state, meta)

    @classmethod
    def load(cls, path) -> "SideScorers":
        state, meta = read_weights(path, "the MPCF side scorers",
                                   f"{_MISSING_HINT} (`snakemake ... --forcerun world_side_scorers`)")
        config = SideScorerConfig(**meta["config"])
        clip = ClipLike(meta["words"], config.embed_dim)
        clip.load_state_dict({k[len("clip."):]: v for k, v in state.items() if k.startswith("clip.")})
        vqa = VqaLike(Vocabulary.from_dict(meta["vocabulary"]))
        vqa.load_state_dict({k[len("vqa."):]: v for k, v in state.items() if k.startswith("vqa.")})
        return cls(clip, vqa, meta["image_size"], config)


# ----------------------------------------------------------------------------------------------- training

def _optimise(model: nn.Module, loss_fn: Callable[[], torch.Tensor], steps: int, learning_rate: float,
              desc: str) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps, pct_start=0.1)
    losses = []
    for _ in tqdm(range(steps), desc=desc, mininterval=2.0):
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


def _tail(losses: list[float]) -> float:
    return float(np.mean(losses[-max(1, len(losses) // 20):]))


def train_clip(corpus: Corpus, train: np.ndarray, config: SideScorerConfig, rng: np.random.Generator):
    words = sorted({w for i in train for w in caption_words(corpus.captions[i])})
    clip = ClipLike(words, config.embed_dim)

    def loss_fn():
        rows = rng.choice(train, size=min(config.batch_size, len(train)), replace=False)
        captions = [corpus.captions[i] for i in rows]
        logits = clip.logit_scale.clamp(max=math.log(100.0)).exp() * (
            clip.encode_images(to_tensor(corpus.images[rows])) @ clip.encode_texts(captions).T)
        # A caption repeated within the batch is a positive for each of its images, not a negative.
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
        targets = same / same.sum(1, keepdim=True)
        return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))

    losses = _optimise(clip, loss_fn, config.clip_steps, config.learning_rate, "train clip-like scorer")
    return clip, losses


def train_vqa(corpus: Corpus, answers: np.ndarray, train: np.ndarray, vocabulary: Vocabulary,
              config: SideScorerConfig, rng: np.random.Generator):
    vqa = VqaLike(vocabulary)
    targets = torch.from_numpy(answers)

    def loss_fn():
        rows = rng.choice(train, size=min(config.batch_size, len(train)), replace=False)
        out = vqa(to_tensor(corpus.images[rows]))
        return sum(F.cross_entropy(out[a], targets[rows, j]) for j, a in enumerate(ATTRIBUTES))

    losses = _optimise(vqa, loss_fn, config.vqa_steps, config.learning_rate, "train vqa-like scorer")
    return vqa, losses


def train_side_scorers(corpus: Corpus, grammar: Grammar, config: SideScorerConfig,
                       seed: int) -> tuple[SideScorers, dict]:
    """Train the CLIP-like and VQA-like scorers on the corpus as captioned; deterministic for a fixed seed.
    Metrics are measured on a held-out share of the corpus, against its captions and against the truth."""
    start = time.perf_counter()
    if len(corpus) < 2:
        raise ValueError(f"the corpus has {len(corpus)} image(s): the side scorers need at least 2")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    order = rng.permutation(len(corpus))
    n_held = min(len(corpus) - 1, max(1, round(_HOLDOUT * len(corpus))))
    held, train = np.sort(order[:n_held]), np.sort(order[n_held:])
    captioned = [grammar.parse(c) for c in corpus.captions]
    answers = scene_labels(captioned, grammar.vocabulary)
    clip, clip_losses = train_clip(corpus, train, config, rng)
    vqa, vqa_losses = train_vqa(corpus, answers, train, grammar.vocabulary, config, rng)
    scorers = SideScorers(clip, vqa, corpus.images.shape[1], config)
    metrics = {"clip_final_loss": _tail(clip_losses), "vqa_final_loss": _tail(vqa_losses),
               **heldout_metrics(scorers, corpus, held, grammar, np.random.default_rng([seed, 1])),
               "train_seconds": time.perf_counter() - start}
    return scorers, metrics


@torch.no_grad()
def heldout_metrics(scorers: SideScorers, corpus: Corpus, held: np.ndarray, grammar: Grammar,
                    rng: np.random.Generator) -> dict:
    """How informative and how wrong each scorer is on corpus images it was not trained on."""
    images = corpus.images[held]
    captions = [corpus.captions[i] for i in held]
    truths = [corpus.scenes[i] for i in held]
    # Retrieval: the best-scoring caption among all distinct captions of the corpus.
    candidates = sorted(set(corpus.captions))
    retrieved = (scorers.image_embeddings(images) @ scorers.clip.encode_texts(candidates).T).argmax(1).numpy()
    retrieved = [candidates[i] for i in retrieved]
    probs = scorers.answer_probs(images)
    answers = np.stack([probs[a].argmax(1) for a in ATTRIBUTES], 1)
    # Pair test, as MPCF uses the scores: the drawn scene's prompt against the same prompt with one attribute
    # changed; a scorer that prefers the former has the right sign.
    wrong = [_changed(s, grammar.vocabulary, rng).prompt for s in truths]
    right = scorers.score(images, [s.prompt for s in truths])
    altered = scorers.score(images, wrong)
    defective = corpus.defects[held].sum(1) > 0
    aesthetic = right["aesthetic"]

    def accuracy(scenes):
        return dict(zip(ATTRIBUTES, (answers == scene_labels(scenes, grammar.vocabulary)).mean(0).tolist()))

    return {
        "clip_retrieval_caption": float(np.mean([r == c for r, c in zip(retrieved, captions)])),
        "clip_retrieval_truth": float(np.mean([r == s.prompt for r, s in zip(retrieved, truths)])),
        "vqa_accuracy_caption": accuracy([grammar.parse(c) for c in captions]),
        "vqa_accuracy_truth": accuracy(truths),
        "clipscore_pair_accuracy": float(np.mean(right["clipscore"] > altered["clipscore"])),
        "vqascore_pair_accuracy": float(np.mean(right["vqascore"] > altered["vqascore"])),
        "aesthetic_clean_mean": float(aesthetic[~defective].mean()) if (~defective).any() else None,
        "aesthetic_defective_mean": float(aesthetic[defective].mean()) if defective.any() else None,
    }


def _changed(scene: Scene, vocabulary: Vocabulary, rng: np.random.Generator) -> Scene:
    options = [(a, v) for a in ATTRIBUTES for v in vocabulary.values(a) if v != getattr(scene, a)]
    if not options:
        raise ValueError("every attribute of the vocabulary has a single value: no prompt can be wrong")
    return scene.replace(*options[rng.integers(len(options))])
