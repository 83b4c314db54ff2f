"""The pixel reward model: the Shapes world's "PickScore", and (timestep-conditioned) the image scorer of SPO's SPM.

CLIP-style, as PickScore is: score(image, caption) = exp(logit_scale) * cos(V(image), T(caption)), with
logit_scale initialised to 2.6592 (CLIP's and PickScore's value).
- Image tower: the world's small conv encoder (`lpo.world.judge.conv_encoder`) on [-1, 1] NCHW images, then a
  linear projection to embed_dim.
- Text tower: a small CLIPTextModel over the world's real CLIP tokenizer (the base model's `tokenizer/` folder),
  pooled at the end-of-text token, then a linear projection. Chosen over a bag of words because word order carries
  meaning here ("a red circle on a gray background" is not "a gray circle on a red background") and because BPE
  tokenises any caption, so no word is ever unknown. It can start from the base model's text encoder, as
  PickScore's starts from a pretrained CLIP.
- Step-aware variant (for the SPM): a sinusoidal timestep embedding and an MLP give, after every normalisation of
  the image tower and on its output features, a per-channel scale and shift (AdaLN); they are zero-initialised,
  so the step-aware model starts as exactly the pixel model it is initialised from.

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
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lpo.io import atomic_path, require_exists
from lpo.reward.pair_loss import pair_accuracy, pair_loss
from lpo.reward.pair_training import decided_pairs, fit, training_checkpoint, weight_parts
from lpo.preference_data import PreferencePairs
from lpo.world.base_model import TextEncoderConfig, build_text_encoder
from lpo.images import to_tensor
from lpo.world.judge import conv_encoder
from lpo.world.tokenizer import MAX_LENGTH

LOGIT_SCALE_INIT = 2.6592
_CONFIG, _WEIGHTS, _TOKENIZER = "config.json", "model.safetensors", "tokenizer"
_KIND = "pixel_reward"
_MISSING_HINT = "run the `reward pixel` stage to train it"


@dataclass(frozen=True)
class PixelRewardConfig:
    steps: int = 2000
    batch_size: int = 64
    learning_rate: float = 1e-3     # from scratch; PickScore's 3e-6 is for fine-tuning CLIP-H
    warmup_steps: int = 100
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    validate_every: int = 100
    checkpoint_every: int = 500
    width: int = 32                 # image tower (conv_encoder) width; its features are 4 * width
    embed_dim: int = 64             # the joint image-text space
    text_width: int = 64            # text tower, when not started from the base model's text encoder
    text_layers: int = 2
    text_heads: int = 4

    def __post_init__(self):
        if min(self.steps, self.batch_size, self.validate_every, self.checkpoint_every, self.embed_dim,
               self.text_layers, self.text_heads) < 1 or self.width < 2:
            raise ValueError("pixel_reward: steps, batch_size, validate_every, checkpoint_every, embed_dim, "
                             "text_layers and text_heads must be >= 1 and width >= 2")
        if self.text_width % self.text_heads:
            raise ValueError(f"pixel_reward.text_width={self.text_width} must be a multiple of "
                             f"pixel_reward.text_heads={self.text_heads}")
        if self.learning_rate <= 0 or self.warmup_steps < 0 or self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise ValueError("pixel_reward: learning_rate and max_grad_norm must be > 0, warmup_steps and "
                             "weight_decay >= 0")


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


class PixelReward(nn.Module):
    """score(images in [-1, 1] NCHW, captions or token ids[, timesteps]) = exp(logit_scale) * cosine."""

    def __init__(self, config: PixelRewardConfig, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 step_aware: bool = False):
        super().__init__()
        self.config, self.tokenizer, self.step_aware = config, tokenizer, step_aware
        features = 4 * config.width
        self.image_tower = ImageTower(config.width, features, config.embed_dim if step_aware else None)
        self.visual_projection = nn.Linear(features, config.embed_dim, bias=False)
        self.text_encoder = text_encoder
        self.text_projection = nn.Linear(text_encoder.config.hidden_size, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        if step_aware:
            # Sinusoidal features of the raw training timestep (0..999), then an MLP; the SiLU is AdaLN's.
            self.time_embedding = nn.Sequential(Timesteps(config.embed_dim, True, 0.0),
                                                TimestepEmbedding(config.embed_dim, config.embed_dim), nn.SiLU())

    def train(self, mode: bool = True) -> "PixelReward":
        super().train(mode)
        if self.step_aware:
            # The step-aware model keeps the batch-norm statistics of the pixel model it started from: scores then
            # do not depend on which timesteps share a batch, and adapting to each timestep is AdaLN's job.
            for m in self.image_tower.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        # Padded to the longest caption: the causal text transformer's end-of-text state, which is pooled, does not
        # depend on the padding after it.
        return self.tokenizer(list(captions), padding="longest", max_length=MAX_LENGTH, truncation=True,
                              return_tensors="pt").input_ids

    def encode_texts(self, texts: list[str] | torch.Tensor) -> torch.Tensor:
        ids = self.tokenize(texts) if isinstance(texts, (list, tuple)) else texts
        pooled = self.text_encoder(ids.to(self.logit_scale.device)).pooler_output
        return F.normalize(self.text_projection(pooled), dim=-1)

    def encode_images(self, images: torch.Tensor, timesteps: torch.Tensor | None = None) -> torch.Tensor:
        if self.step_aware != (timesteps is not None):
            raise ValueError("a step-aware pixel model needs timesteps, a plain one takes none")
        time = None
        if timesteps is not None:
            timesteps = torch.as_tensor(timesteps, device=images.device).reshape(-1).expand(len(images))
            time = self.time_embedding(timesteps.float())
        return F.normalize(self.visual_projection(self.image_tower(images, time)), dim=-1)

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
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        self.eval()
        device = self.logit_scale.device
        return np.concatenate([self(to_tensor(images[i:i + batch_size]).to(device), captions[i:i + batch_size])
                               .cpu().numpy() for i in range(0, len(images), batch_size)] or [np.zeros(0)])

    # ------------------------------------------------------------------------------------------- persistence

    def save(self, path: str | os.PathLike) -> None:
        """A directory: config.json, model.safetensors (all weights) and the tokenizer."""
        meta = {"kind": _KIND, "step_aware": self.step_aware, "config": dataclasses.asdict(self.config),
                "text_encoder": self.text_encoder.config.to_dict()}
        with atomic_path(path) as tmp:
            tmp.mkdir()
            (tmp / _CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(tmp / _WEIGHTS))
            self.tokenizer.save_pretrained(tmp / _TOKENIZER)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PixelReward":
        path = require_exists(path, "pixel reward model", _MISSING_HINT)
        for name in (_CONFIG, _WEIGHTS, _TOKENIZER):
            require_exists(path / name, f"pixel reward model file {name}",
                           f"'{path}' is not a complete pixel reward model; {_MISSING_HINT} again")
        try:
            meta = json.loads((path / _CONFIG).read_text())
            if meta.get("kind") != _KIND:
                raise ValueError(f"config.json describes a {meta.get('kind')!r}, not a {_KIND!r}")
            text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(meta["text_encoder"]))
            tokenizer = CLIPTokenizer.from_pretrained(path / _TOKENIZER, local_files_only=True)
            model = cls(PixelRewardConfig(**meta["config"]), text_encoder, tokenizer, meta["step_aware"])
            model.load_state_dict(load_file(str(path / _WEIGHTS)))
        except Exception as e:  # json, safetensors and load_state_dict raise many unrelated types
            raise ValueError(f"cannot read the pixel reward model at '{path}' ({e}): {_MISSING_HINT} again") from e
        return model.eval()


def step_aware_copy(pixel: PixelReward) -> PixelReward:
    """A step-aware model that scores exactly as `pixel` until trained (its AdaLN starts as the identity)."""
    if pixel.step_aware:
        raise ValueError("the model is step-aware already")
    model = PixelReward(pixel.config, copy.deepcopy(pixel.text_encoder), pixel.tokenizer, step_aware=True)
    missing, unexpected = model.load_state_dict(pixel.state_dict(), strict=False)
    if unexpected or any(not k.startswith(("image_tower.modulations.", "time_embedding.")) for k in missing):
        raise ValueError(f"pixel model weights do not fit the step-aware model: missing {missing}, "
                         f"unexpected {unexpected}")
    return model


def load_tokenizer(tokenizer: CLIPTokenizer | str | os.PathLike) -> CLIPTokenizer:
    if isinstance(tokenizer, CLIPTokenizer):
        return tokenizer
    path = require_exists(tokenizer, "CLIP tokenizer", "point it at the base model's tokenizer/ folder (the "
                                                         "`world tokenizer` stage writes one)")
    try:
        return CLIPTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError or TypeError for a wrong folder
        raise ValueError(f"cannot read a CLIP tokenizer from '{path}' ({e}): point it at the base model's "
                         f"tokenizer/ folder") from e


@torch.no_grad()
def pixel_pair_accuracy(model: PixelReward, pairs: PreferencePairs, batch_size: int = 256) -> float:
    """Share of decided pairs the plain pixel model orders as their labels."""
    s0, s1 = pixel_pair_scores(model, pairs, batch_size)
    return float(pair_accuracy(torch.from_numpy(s0), torch.from_numpy(s1), torch.from_numpy(pairs.label_0)))


@torch.no_grad()
def pixel_pair_scores(model: PixelReward, pairs: PreferencePairs, batch_size: int = 256
                      ) -> tuple[np.ndarray, np.ndarray]:
    return model.score(pairs.images_0, pairs.captions, batch_size), model.score(pairs.images_1, pairs.captions,
                                                                                batch_size)


def train_pixel_reward(train: PreferencePairs, validation: PreferencePairs,
                       tokenizer: CLIPTokenizer | str | os.PathLike, config: PixelRewardConfig, seed: int,
                       text_encoder: CLIPTextModel | None = None, out: str | os.PathLike | None = None
                       ) -> tuple[PixelReward, dict]:
    """Train on `train`'s pairs, keep the weights with the best pair accuracy on `validation`; deterministic on
    CPU for a fixed seed. `text_encoder` (e.g. the base model's) starts the text tower, copied; without it the
    tower is a fresh CLIPTextModel of text_width x text_layers. With `out`, training is checkpointed to
    `<out>.ckpt/` and resumed from there, and the model is saved to `out`."""
    if not len(train):
        raise ValueError(f"the training split ({train.split}) has no pairs")
    decided_pairs(validation, "the validation split")
    if train.images_0.shape[1:] != validation.images_0.shape[1:]:
        raise ValueError(f"train images are {train.images_0.shape[1:]} but validation images are "
                         f"{validation.images_0.shape[1:]}: load both with the same image_size")
    tokenizer = load_tokenizer(tokenizer)
    torch.manual_seed(seed)
    if text_encoder is None:
        text_encoder = build_text_encoder(TextEncoderConfig(hidden_size=config.text_width, layers=config.text_layers,
                                                            heads=config.text_heads))
    else:
        text_encoder = copy.deepcopy(text_encoder).requires_grad_(True)
    model = PixelReward(config, text_encoder, tokenizer).train()
    captions, caption_index = np.unique(np.asarray(train.captions, dtype=object), return_inverse=True)
    ids = model.tokenize(list(captions))
    label, per_prompt = torch.from_numpy(train.label_0), torch.from_numpy(train.num_example_per_prompt)

    def batch_loss(rows):
        s0, s1 = model.pair_scores(to_tensor(train.images_0[rows]), to_tensor(train.images_1[rows]),
                                   ids[caption_index[rows]])
        return pair_loss(s0, s1, label[rows], per_prompt[rows])

    checkpoint = training_checkpoint(out, config, seed, train, validation,
                                     json.dumps(tokenizer.get_vocab(), sort_keys=True), *weight_parts(model))
    metrics = fit(model, batch_loss, lambda: {"accuracy": pixel_pair_accuracy(model, validation)}, len(train),
                  config, seed, "train pixel reward", checkpoint)
    if checkpoint is not None:
        model.save(out)
        checkpoint.remove()  # only once the model is saved: a kill before that still resumes
    return model, {**metrics, "validation_pairs": len(validation)}
