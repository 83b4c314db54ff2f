"""The pixel reward model: the Shapes world's "PickScore", and (timestep-conditioned) the image scorer of SPO's SPM.

A world-CLIP (lpo.world.clip) fine-tuned on preference pairs, as PickScore is CLIP-H fine-tuned on Pick-a-Pic:
score(image, caption) = exp(logit_scale) * cos(V(image), T(caption)). The step-aware variant (for the SPM) adds a
sinusoidal timestep embedding and an MLP that drive the image tower's AdaLN; they are zero-initialised, so the
step-aware model starts as exactly the pixel model it is initialised from.

Training follows the official reward-model trainers: the pair loss (ties, per-prompt weighting), AdamW with linear
warm-up then linear decay, gradient clipping at 1.0, pair accuracy on validation_unique every `validate_every`
steps, and the best validated weights kept. Given its output path, training state goes to `<out>.ckpt/` every
`checkpoint_every` steps; a rerun resumes from it and ends with the weights an uninterrupted run would have.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from lpo.images import to_tensor
from lpo.preference_data import PreferencePairs
from lpo.reward.pair_loss import pair_accuracy, pair_loss
from lpo.reward.pair_training import decided_pairs, fit, training_checkpoint, weight_parts
from lpo.world.clip import CLIPArchitecture, WorldCLIP, load_weights, read_saved

_KIND = "pixel_reward"
_MISSING_HINT = "run the `reward pixel` stage to train it"


@dataclass(frozen=True)
class PixelRewardConfig:
    steps: int = 2000
    batch_size: int = 64
    learning_rate: float = 1e-4     # fine-tuning the world-CLIP (PickScore's 3e-6 fine-tunes CLIP-H)
    warmup_steps: int = 100
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    validate_every: int = 100
    checkpoint_every: int = 500

    def __post_init__(self):
        if min(self.steps, self.batch_size, self.validate_every, self.checkpoint_every) < 1:
            raise ValueError("pixel_reward: steps, batch_size, validate_every and checkpoint_every must be >= 1")
        if self.learning_rate <= 0 or self.warmup_steps < 0 or self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise ValueError("pixel_reward: learning_rate and max_grad_norm must be > 0, warmup_steps and "
                             "weight_decay >= 0")


# ---------------------------------------------------------------------------------------------------- model

class PixelReward(WorldCLIP):
    """score(images in [-1, 1] NCHW, captions or token ids[, timesteps]) = exp(logit_scale) * cosine."""

    def __init__(self, config: PixelRewardConfig, architecture: CLIPArchitecture, tokenizer: CLIPTokenizer,
                 step_aware: bool = False, text_encoder: CLIPTextModel | None = None):
        super().__init__(architecture, tokenizer, architecture.embed_dim if step_aware else None, text_encoder)
        self.config, self.step_aware = config, step_aware
        if step_aware:
            # Sinusoidal features of the raw training timestep (0..999), then an MLP; the SiLU is AdaLN's.
            self.time_embedding = nn.Sequential(Timesteps(architecture.embed_dim, True, 0.0),
                                                TimestepEmbedding(architecture.embed_dim, architecture.embed_dim),
                                                nn.SiLU())

    @classmethod
    def from_clip(cls, clip: WorldCLIP, config: PixelRewardConfig) -> "PixelReward":
        """A pixel model that scores exactly as `clip` until trained (its weights copied)."""
        model = cls(config, clip.architecture, clip.tokenizer, text_encoder=copy.deepcopy(clip.text_encoder))
        model.load_state_dict(clip.state_dict())
        return model

    def train(self, mode: bool = True) -> "PixelReward":
        super().train(mode)
        if self.step_aware:
            # The step-aware model keeps the batch-norm statistics of the pixel model it started from: scores then
            # do not depend on which timesteps share a batch, and adapting to each timestep is AdaLN's job.
            for m in self.image_tower.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def encode_images(self, images: torch.Tensor, timesteps: torch.Tensor | None = None) -> torch.Tensor:
        if self.step_aware != (timesteps is not None):
            raise ValueError("a step-aware pixel model needs timesteps, a plain one takes none")
        time = None
        if timesteps is not None:
            timesteps = torch.as_tensor(timesteps, device=images.device).reshape(-1).expand(len(images))
            time = self.time_embedding(timesteps.float())
        return super().encode_images(images, time)

    def forward(self, images: torch.Tensor, texts: list[str] | torch.Tensor,
                timesteps: torch.Tensor | None = None) -> torch.Tensor:
        return self.logit_scale.exp() * (self.encode_images(images, timesteps) * self.encode_texts(texts)).sum(-1)

    def pair_scores(self, images_0: torch.Tensor, images_1: torch.Tensor, texts: list[str] | torch.Tensor,
                    timesteps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of both images of each pair: one image batch (so batch norm sees both) and one text pass."""
        both = None if timesteps is None else torch.cat([timesteps, timesteps])
        image = self.encode_images(torch.cat([images_0, images_1]), both)
        text = self.encode_texts(texts).repeat(2, 1)
        return (self.logit_scale.exp() * (image * text).sum(-1)).chunk(2)

    @torch.no_grad()
    def score(self, images: np.ndarray, captions: list[str], batch_size: int = 256) -> np.ndarray:
        """Scores of uint8 images (N, H, W, 3) for their captions (the plain pixel model only)."""
        if self.step_aware:
            raise ValueError("a step-aware pixel model needs timesteps: score it through the SPM")
        return super().score(images, captions, batch_size)

    # ------------------------------------------------------------------------------------------- persistence

    def save(self, path: str | os.PathLike) -> None:
        """A directory: config.json, model.safetensors (all weights) and the tokenizer."""
        super().save(path, _KIND, step_aware=self.step_aware, config=dataclasses.asdict(self.config))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PixelReward":
        meta, tokenizer, text_encoder, weights = read_saved(path, _KIND, "pixel reward model", _MISSING_HINT)
        model = cls(PixelRewardConfig(**meta["config"]), CLIPArchitecture(**meta["architecture"]), tokenizer,
                    meta["step_aware"], text_encoder)
        return load_weights(model, weights, path, _MISSING_HINT)


def step_aware_copy(pixel: PixelReward) -> PixelReward:
    """A step-aware model that scores exactly as `pixel` until trained (its AdaLN starts as the identity)."""
    if pixel.step_aware:
        raise ValueError("the model is step-aware already")
    model = PixelReward(pixel.config, pixel.architecture, pixel.tokenizer, step_aware=True,
                        text_encoder=copy.deepcopy(pixel.text_encoder))
    missing, unexpected = model.load_state_dict(pixel.state_dict(), strict=False)
    if unexpected or any(not k.startswith(("image_tower.modulations.", "time_embedding.")) for k in missing):
        raise ValueError(f"pixel model weights do not fit the step-aware model: missing {missing}, "
                         f"unexpected {unexpected}")
    return model


@torch.no_grad()
def pixel_pair_accuracy(model: WorldCLIP, pairs: PreferencePairs, batch_size: int = 256) -> float:
    """Share of decided pairs a plain pixel model (or the world-CLIP, zero-shot) orders as their labels."""
    s0, s1 = pixel_pair_scores(model, pairs, batch_size)
    return float(pair_accuracy(torch.from_numpy(s0), torch.from_numpy(s1), torch.from_numpy(pairs.label_0)))


@torch.no_grad()
def pixel_pair_scores(model: WorldCLIP, pairs: PreferencePairs, batch_size: int = 256
                      ) -> tuple[np.ndarray, np.ndarray]:
    return model.score(pairs.images_0, pairs.captions, batch_size), model.score(pairs.images_1, pairs.captions,
                                                                                batch_size)


def train_pixel_reward(train: PreferencePairs, validation: PreferencePairs, clip: WorldCLIP,
                       config: PixelRewardConfig, seed: int, out: str | os.PathLike | None = None
                       ) -> tuple[PixelReward, dict]:
    """Fine-tune the world-CLIP `clip` (copied) on `train`'s pairs, keep the weights with the best pair accuracy on
    `validation`; deterministic on CPU for a fixed seed. With `out`, training is checkpointed to `<out>.ckpt/` and
    resumed from there, and the model is saved to `out`."""
    if not len(train):
        raise ValueError(f"the training split ({train.split}) has no pairs")
    decided_pairs(validation, "the validation split")
    if train.images_0.shape[1:] != validation.images_0.shape[1:]:
        raise ValueError(f"train images are {train.images_0.shape[1:]} but validation images are "
                         f"{validation.images_0.shape[1:]}: load both with the same image_size")
    torch.manual_seed(seed)
    model = PixelReward.from_clip(clip, config).train()
    captions, caption_index = np.unique(np.asarray(train.captions, dtype=object), return_inverse=True)
    ids = model.tokenize(list(captions))
    label, per_prompt = torch.from_numpy(train.label_0), torch.from_numpy(train.num_example_per_prompt)

    def batch_loss(rows):
        s0, s1 = model.pair_scores(to_tensor(train.images_0[rows]), to_tensor(train.images_1[rows]),
                                   ids[caption_index[rows]])
        return pair_loss(s0, s1, label[rows], per_prompt[rows])

    checkpoint = training_checkpoint(out, config, seed, train, validation,
                                     json.dumps(model.tokenizer.get_vocab(), sort_keys=True), *weight_parts(model))
    metrics = fit(model, batch_loss, lambda: {"accuracy": pixel_pair_accuracy(model, validation)}, len(train),
                  config, seed, "train pixel reward", checkpoint)
    if checkpoint is not None:
        model.save(out)
        checkpoint.remove()  # only once the model is saved: a kill before that still resumes
    return model, {**metrics, "validation_pairs": len(validation)}
