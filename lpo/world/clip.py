"""The world-CLIP: the Shapes world's CLIP-H, an image-text model pretrained contrastively on the base model's
captioned corpus (wrong captions and defective images included), as CLIP was pretrained on web pairs. The world's
pixel reward model ("PickScore") and through it SPO's SPM are fine-tuned from it, as PickScore is from CLIP-H.

score(image, caption) = exp(logit_scale) * cos(V(image), T(caption)), logit_scale initialised to 2.6592 (CLIP's).
- Image tower: the world's small conv encoder (`lpo.world.judge.conv_encoder`) on [-1, 1] NCHW images, then a
  linear projection. Optionally (the SPM) a timestep embedding gives, after every normalisation of the tower and on
  its output features, a per-channel scale and shift (AdaLN), zero-initialised so that it starts as the identity.
- Text tower: a small CLIPTextModel over the world's real CLIP tokenizer, pooled at the end-of-text token, then a
  linear projection. Word order carries meaning here ("a red circle on a gray background" is not "a gray circle
  on a red background") and BPE tokenises any caption, so no word is ever unknown.
Training: the symmetric InfoNCE loss over a batch, a caption repeated in the batch counting as a positive of each of
its images (the corpus draws every scene many times); AdamW, cosine decay after warm-up, logit scale capped at 100
(CLIP's). Batches and everything random are seeded per step, so a run resumed from its checkpoint ends with the
weights of an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.optimization import get_cosine_schedule_with_warmup
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lpo.checkpoint import Checkpoint, fingerprint
from lpo.images import to_tensor
from lpo.io import META, WEIGHTS, atomic_path, load_or_explain, require_exists, write_weights
from lpo.seeding import batch_indices
from lpo.world.base_model import TextEncoderConfig, build_text_encoder
from lpo.world.judge import conv_encoder
from lpo.world.tokenizer import MAX_LENGTH

LOGIT_SCALE_INIT = 2.6592
MAX_LOGIT_SCALE = math.log(100.0)
HELDOUT_FRACTION = 0.05
LOSS_EVERY = 50
_TOKENIZER = "tokenizer"
_KIND = "world_clip"
_MISSING_HINT = "run the `world clip` stage to pretrain it"


@dataclass(frozen=True)
class CLIPArchitecture:
    width: int = 32        # image tower (conv_encoder) width; its features are 4 * width
    embed_dim: int = 64    # the joint image-text space
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4

    def __post_init__(self):
        if self.width < 2 or min(self.embed_dim, self.text_layers, self.text_heads) < 1:
            raise ValueError("world_clip: width must be >= 2, embed_dim, text_layers and text_heads >= 1")
        if self.text_width % self.text_heads:
            raise ValueError(f"world_clip.text_width={self.text_width} must be a multiple of "
                             f"world_clip.text_heads={self.text_heads}")

    @property
    def features(self) -> int:
        return 4 * self.width


@dataclass(frozen=True)
class WorldCLIPConfig:
    steps: int = 1500
    batch_size: int = 256
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 1e-4
    checkpoint_every: int = 500
    width: int = 32
    embed_dim: int = 64
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4

    def __post_init__(self):
        self.architecture()  # checks the tower sizes
        if min(self.steps, self.batch_size, self.checkpoint_every) < 1:
            raise ValueError("world_clip: steps, batch_size and checkpoint_every must be >= 1")
        if self.learning_rate <= 0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("world_clip: learning_rate must be > 0, warmup_steps and weight_decay >= 0")

    def architecture(self) -> CLIPArchitecture:
        names = {f.name for f in dataclasses.fields(CLIPArchitecture)}
        return CLIPArchitecture(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


# ---------------------------------------------------------------------------------------------------- model

class ImageTower(nn.Module):
    """conv_encoder features of [-1, 1] images; with `time_dim`, AdaLN modulation by a timestep embedding."""

    def __init__(self, width: int, features: int, time_dim: int | None = None):
        super().__init__()
        self.encoder = conv_encoder(width, features)
        self.modulations = nn.ModuleList()
        if time_dim is not None:
            channels = [m.num_features for m in self.encoder if isinstance(m, nn.BatchNorm2d)] + [features]
            self.modulations.extend(nn.Linear(time_dim, 2 * c) for c in channels)
            for m in self.modulations:  # scale = shift = 0: the identity, whatever the timestep
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, time: torch.Tensor | None = None) -> torch.Tensor:
        modulations = iter(self.modulations if time is not None else ())
        for layer in self.encoder:
            x = layer(x)
            if isinstance(layer, nn.BatchNorm2d) and time is not None:
                x = _modulate(x, next(modulations)(time))
        return x if time is None else _modulate(x, next(modulations)(time))


def _modulate(x: torch.Tensor, scale_shift: torch.Tensor) -> torch.Tensor:
    scale, shift = scale_shift.chunk(2, dim=1)
    extra = (1,) * (x.dim() - 2)
    return x * (1 + scale.reshape(*scale.shape, *extra)) + shift.reshape(*shift.shape, *extra)


class WorldCLIP(nn.Module):
    """score(images in [-1, 1] NCHW, captions or token ids) = exp(logit_scale) * cosine."""

    def __init__(self, architecture: CLIPArchitecture, tokenizer: CLIPTokenizer, time_dim: int | None = None,
                 text_encoder: CLIPTextModel | None = None):
        super().__init__()
        self.architecture, self.tokenizer = architecture, tokenizer
        self.image_tower = ImageTower(architecture.width, architecture.features, time_dim)
        self.visual_projection = nn.Linear(architecture.features, architecture.embed_dim, bias=False)
        self.text_encoder = text_encoder or build_text_encoder(TextEncoderConfig(
            hidden_size=architecture.text_width, layers=architecture.text_layers, heads=architecture.text_heads))
        self.text_projection = nn.Linear(self.text_encoder.config.hidden_size, architecture.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        # Padded to the longest caption: the causal text transformer's end-of-text state, which is pooled, does not
        # depend on the padding after it.
        return self.tokenizer(list(captions), padding="longest", max_length=MAX_LENGTH, truncation=True,
                              return_tensors="pt").input_ids

    def encode_texts(self, texts: list[str] | torch.Tensor) -> torch.Tensor:
        ids = self.tokenize(texts) if isinstance(texts, (list, tuple)) else texts
        pooled = self.text_encoder(ids.to(self.logit_scale.device)).pooler_output
        return F.normalize(self.text_projection(pooled), dim=-1)

    def image_features(self, images: torch.Tensor, time: torch.Tensor | None = None) -> torch.Tensor:
        """The image tower's features before the projection (what the reward stage's probes read)."""
        return self.image_tower(images, time)

    def encode_images(self, images: torch.Tensor, time: torch.Tensor | None = None) -> torch.Tensor:
        return F.normalize(self.visual_projection(self.image_features(images, time)), dim=-1)

    def forward(self, images: torch.Tensor, texts: list[str] | torch.Tensor) -> torch.Tensor:
        return self.logit_scale.exp() * (self.encode_images(images) * self.encode_texts(texts)).sum(-1)

    @torch.no_grad()
    def score(self, images: np.ndarray, captions: list[str], batch_size: int = 256) -> np.ndarray:
        """Scores of uint8 images (N, H, W, 3) for their captions."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        self.eval()
        device = self.logit_scale.device
        return np.concatenate([self(to_tensor(images[i:i + batch_size]).to(device), captions[i:i + batch_size])
                               .cpu().numpy() for i in range(0, len(images), batch_size)] or [np.zeros(0)])

    def save(self, path: str | os.PathLike, kind: str = _KIND, **meta) -> None:
        """A directory: config.json, model.safetensors (all weights) and the tokenizer."""
        meta = {"kind": kind, "architecture": dataclasses.asdict(self.architecture),
                "text_encoder": self.text_encoder.config.to_dict(), **meta}
        with atomic_path(path) as tmp:
            tmp.mkdir()
            write_weights(tmp, self.state_dict(), meta)
            self.tokenizer.save_pretrained(tmp / _TOKENIZER)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "WorldCLIP":
        meta, tokenizer, text_encoder, weights = read_saved(path, _KIND, "world-CLIP", _MISSING_HINT)
        model = cls(CLIPArchitecture(**meta["architecture"]), tokenizer, text_encoder=text_encoder)
        return load_weights(model, weights, path, _MISSING_HINT)


def read_saved(path: str | os.PathLike, kind: str, what: str, hint: str):
    """(meta, tokenizer, an untrained text encoder of the saved shape, weights) of a model `save` wrote."""
    path = require_exists(path, what, hint)
    for name in (META, WEIGHTS, _TOKENIZER):
        require_exists(path / name, f"{what} file {name}", f"'{path}' is not a complete {what}; {hint} again")

    def config(file: Path):
        meta = json.loads(file.read_text())
        if meta.get("kind") != kind:
            raise ValueError(f"it describes a {meta.get('kind')!r}, not a {kind!r}")
        return meta, CLIPTextModel(CLIPTextConfig.from_dict(meta["text_encoder"]))

    again = f"{hint} again"
    meta, text_encoder = load_or_explain(path / META, f"the {what}'s config", again, config)
    tokenizer = load_or_explain(path / _TOKENIZER, f"the {what}'s tokenizer", again,
                                lambda folder: CLIPTokenizer.from_pretrained(folder, local_files_only=True))
    weights = load_or_explain(path / WEIGHTS, f"the {what}'s weights", again, lambda file: load_file(str(file)))
    return meta, tokenizer, text_encoder, weights


def load_weights(model: nn.Module, weights: dict, path, hint: str) -> nn.Module:
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"the weights at '{path}' do not fit their config.json ({e}): {hint} again") from e
    return model.eval()


def load_tokenizer(tokenizer: CLIPTokenizer | str | os.PathLike) -> CLIPTokenizer:
    if isinstance(tokenizer, CLIPTokenizer):
        return tokenizer
    hint = "point it at the world's tokenizer/ folder (the `world tokenizer` stage writes one)"
    path = require_exists(tokenizer, "CLIP tokenizer", hint)
    return load_or_explain(path, "the CLIP tokenizer", hint,
                           lambda folder: CLIPTokenizer.from_pretrained(folder, local_files_only=True))


# ---------------------------------------------------------------------------------------------------- training

def contrastive_loss(model: WorldCLIP, images: torch.Tensor, caption_ids: torch.Tensor,
                     caption_rows: np.ndarray) -> torch.Tensor:
    """Symmetric InfoNCE of images against the batch's distinct captions (`caption_rows` index `caption_ids`)."""
    distinct, column = np.unique(caption_rows, return_inverse=True)
    logits = model.logit_scale.exp() * model.encode_images(images) @ model.encode_texts(caption_ids[distinct]).T
    column = torch.from_numpy(column)
    positives = F.one_hot(column, len(distinct)).T.float()  # (captions, images)
    image_to_text = F.cross_entropy(logits, column)
    text_to_image = -(F.log_softmax(logits.T, dim=1) * positives).sum(1) / positives.sum(1)
    return 0.5 * (image_to_text + text_to_image.mean())


def train_world_clip(images: np.ndarray, captions: list[str], tokenizer: CLIPTokenizer | str | os.PathLike,
                     config: WorldCLIPConfig, seed: int, out: str | os.PathLike | None = None
                     ) -> tuple[WorldCLIP, dict]:
    """Pretrain on (image, caption) pairs, 5% held out for the metrics. With `out`, training is checkpointed to
    `<out>.ckpt/` every `checkpoint_every` steps and resumed from there, and the model is saved to `out`."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if len(images) < 2:
        raise ValueError(f"the world-CLIP needs at least 2 captioned images, got {len(images)}")
    start = time.time()
    tokenizer = load_tokenizer(tokenizer)
    torch.manual_seed(seed)
    model = WorldCLIP(config.architecture(), tokenizer).train()
    vocabulary, caption_index = np.unique(np.asarray(captions, dtype=object), return_inverse=True)
    ids = model.tokenize(list(vocabulary))
    order = np.random.default_rng([seed, 1]).permutation(len(images))
    n_heldout = max(1, round(HELDOUT_FRACTION * len(images)))
    heldout, train = order[:n_heldout], order[n_heldout:]
    batch_size = min(config.batch_size, len(train))

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(config.warmup_steps, config.steps), config.steps)
    settings = {**dataclasses.asdict(config), "checkpoint_every": None}  # how often to save changes no weight
    checkpoint = None if out is None else Checkpoint(out, fingerprint(settings, seed, images, ids, caption_index),
                                                     "steps")
    first, curve, window = 0, [], []
    saved = None if checkpoint is None else checkpoint.load()
    if saved is not None:
        first, state = saved
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        curve, window = state["curve"], state["window"]
    for step in tqdm(range(first, config.steps), initial=first, total=config.steps, desc="world-CLIP",
                     mininterval=2):
        rows = train[batch_indices(len(train), batch_size, seed, step)]
        loss = contrastive_loss(model, to_tensor(images[rows]), ids, caption_index[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        window.append(loss.item())
        if (step + 1) % LOSS_EVERY == 0 or step + 1 == config.steps:
            curve.append([step + 1, float(np.mean(window))])
            window = []
        if checkpoint is not None and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            checkpoint.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "schedule": schedule.state_dict(), "curve": curve, "window": window}, step + 1)
    model.eval()
    metrics = {"steps": config.steps, "resumed_from_step": first, "images": len(images),
               "unique_captions": len(vocabulary), "heldout_images": int(n_heldout), "loss_curve": curve,
               "final_loss": curve[-1][1] if curve else math.nan,
               "heldout_loss": heldout_loss(model, images[heldout], ids, caption_index[heldout], batch_size),
               "logit_scale": model.logit_scale.exp().item(), "train_seconds": time.time() - start}
    if checkpoint is not None:
        model.save(out)
        checkpoint.remove()  # only once the model is saved: a kill before that still resumes
    return model, metrics


@torch.no_grad()
def heldout_loss(model: WorldCLIP, images: np.ndarray, ids: torch.Tensor, caption_rows: np.ndarray,
                 batch_size: int) -> float:
    """The contrastive loss on held-out images, in batches of the training size (the loss depends on it)."""
    was_training = model.training
    model.eval()
    losses = [contrastive_loss(model, to_tensor(images[i:i + batch_size]), ids, caption_rows[i:i + batch_size]).item()
              for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return float(np.mean(losses))
