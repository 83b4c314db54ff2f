"""SPO's step-aware preference model (SPM): a pixel reward model applied to the predicted clean image of a noisy
latent, and conditioned on the timestep.

For latents x_t at timestep t: the frozen UNet of the base pipeline predicts epsilon (with classifier-free guidance,
scale 5.0 by default, as SPO's SPM trainer (`cfg_scale: 5.0`) and SPO's SD1.5 sampler do); the DDIM formula gives
x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t); the VAE decodes x0_hat / scaling_factor; the step-aware pixel model
(`lpo.reward.pixel`, AdaLN on the timestep) scores the decoded image against the caption. Timestep 0 means a clean
latent: it is decoded as it is, as SPO scores its final images.

Training follows SPO: start from the trained pixel reward model; for each pair draw t from SPO's grid
{0, 50, ..., 750}, the same t for both images; VAE-encode both (a posterior sample), noise them with independent
noise (SPO's trainer shares one noise draw between the two: `shared_noise`), predict and decode x0_hat, score,
pair loss.

Grid value g is mapped onto the scheduler's training timestep g + steps_offset (1, 51, ..., 751 for SD1.5's
schedule): those are the DDIM timesteps of the 20-step "leading" sampler (951, 901, ..., 1) whose candidates the
SPM judges, so it is trained at exactly the timesteps it is asked about. SPO's released trainer draws t uniformly
from 0..999 instead; the grid is what SPO's paper describes.

Given its output path, training state goes to `<out>.ckpt/` every `checkpoint_every` steps; a rerun resumes from it
and ends with the weights an uninterrupted run would have.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from lpo.io import atomic_path, require_exists
from lpo.reward.pair_loss import pair_accuracy, pair_loss
from lpo.reward.pair_training import decided_pairs, fit, training_checkpoint, weight_parts
from lpo.reward.pixel import PixelReward, step_aware_copy
from lpo.preference_data import PreferencePairs
from lpo.images import to_tensor

SPO_GRID = tuple(range(0, 751, 50))
_CONFIG, _MODEL = "spm.json", "model"
_KIND = "spm"
_MISSING_HINT = "run the `reward spm` stage to train it"


@dataclass(frozen=True)
class SPMConfig:
    steps: int = 500                # ~0.5-1.5 s a step on the default world's models on 2 busy CPU cores
    batch_size: int = 32
    learning_rate: float = 2e-4     # fine-tuning the trained pixel model, not training from scratch
    warmup_steps: int = 50
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    validate_every: int = 50
    checkpoint_every: int = 50
    grid: tuple[int, ...] = SPO_GRID                # SPO's training grid (before the steps_offset mapping)
    validation_grid: tuple[int, ...] = (0, 250, 500, 750)
    guidance_scale: float = 5.0     # CFG of the epsilon prediction behind x0_hat; 1.0: prompt-conditioned only
    shared_noise: bool = False      # True: both images of a pair get the same noise draw (SPO's trainer)

    def __post_init__(self):
        if min(self.steps, self.batch_size, self.validate_every, self.checkpoint_every) < 1:
            raise ValueError("spm: steps, batch_size, validate_every and checkpoint_every must be >= 1")
        if not self.grid or not self.validation_grid or min(*self.grid, *self.validation_grid) < 0:
            raise ValueError("spm.grid and spm.validation_grid must be non-empty lists of timesteps >= 0")
        if self.learning_rate <= 0 or self.warmup_steps < 0 or self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise ValueError("spm: learning_rate and max_grad_norm must be > 0, warmup_steps and weight_decay >= 0")
        if self.guidance_scale < 1.0:
            raise ValueError(f"spm.guidance_scale={self.guidance_scale} must be >= 1 (1: no guidance)")


# ---------------------------------------------------------------------------------------------------- x0_hat

def spo_timesteps(scheduler, grid) -> torch.Tensor:
    """SPO's grid values -> the scheduler's training timesteps (g + steps_offset)."""
    offset = int(getattr(scheduler.config, "steps_offset", 0))
    timesteps = torch.as_tensor(grid, dtype=torch.long) + offset
    top = scheduler.config.num_train_timesteps
    if timesteps.numel() and (timesteps.min() < 0 or timesteps.max() >= top):
        raise ValueError(f"SPO grid {list(grid)} + steps_offset {offset} leaves the scheduler's 0..{top - 1}")
    return timesteps


def predicted_clean(scheduler, latents: torch.Tensor, model_output: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """x0_hat from the UNet output at `timesteps` (one per latent): DDIM's formula for epsilon prediction, and
    its counterpart for v-prediction (SD2.x)."""
    a = scheduler.alphas_cumprod.to(latents.device)[timesteps.to(latents.device)].float()
    a = a.reshape(-1, *(1,) * (latents.dim() - 1))
    x, out = latents.float(), model_output.float()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        x0 = (x - (1 - a).sqrt() * out) / a.sqrt()
    elif kind == "v_prediction":
        x0 = a.sqrt() * x - (1 - a).sqrt() * out
    else:
        raise ValueError(f"prediction_type {kind!r} is not supported (epsilon or v_prediction)")
    return x0.to(latents.dtype)


def x0_prediction(unet: UNet2DConditionModel, scheduler, latents: torch.Tensor, timesteps: torch.Tensor,
                  text_embeddings: torch.Tensor, guidance_scale: float = 1.0,
                  uncond_embeddings: torch.Tensor | None = None) -> torch.Tensor:
    """The UNet's predicted clean latent of `latents` at `timesteps` ((B,) or one for all), with classifier-free
    guidance when guidance_scale != 1 (then `uncond_embeddings`, the empty prompt's, are needed)."""
    timesteps = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(len(latents))
    if guidance_scale == 1.0:
        out = unet(latents, timesteps, encoder_hidden_states=text_embeddings).sample
    else:
        if uncond_embeddings is None:
            raise ValueError("classifier-free guidance needs the empty prompt's embeddings (uncond_embeddings)")
        uncond, cond = unet(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]),
                            encoder_hidden_states=torch.cat([uncond_embeddings, text_embeddings])).sample.chunk(2)
        out = uncond + guidance_scale * (cond - uncond)
    return predicted_clean(scheduler, latents, out, timesteps)


def encode_images(vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Scaled latents of [-1, 1] images, a posterior sample (the posterior mean without a generator)."""
    posterior = vae.encode(images.to(vae.dtype)).latent_dist
    latents = posterior.mean if generator is None else posterior.sample(generator)
    return (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float32 images of scaled latents."""
    latents = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    return vae.decode(latents.to(vae.dtype)).sample.float().clamp(-1.0, 1.0)


class CleanImagePredictor:
    """Noisy latents -> decoded predicted clean images, through a frozen pipeline's text encoder, UNet and VAE.

    What the SPM scores, and what a plain pixel reward model must score at a noisy step. Everything runs under
    no_grad and the pipeline's modules are left as they are: the UNet may be a policy being trained elsewhere (SPO
    judges candidates with the policy's own x0_hat)."""

    def __init__(self, pipeline, guidance_scale: float = 5.0):
        self.unet, self.vae, self.scheduler = pipeline.unet, pipeline.vae, pipeline.scheduler
        self.text_encoder, self.tokenizer = pipeline.text_encoder, pipeline.tokenizer
        self.guidance_scale = guidance_scale
        self.device = self.unet.device
        self._uncond = None

    def prompt_ids(self, texts: list[str] | torch.Tensor) -> torch.Tensor:
        """Captions -> token ids padded to the tokenizer's length, as Stable Diffusion encodes prompts; ids pass."""
        if isinstance(texts, torch.Tensor):
            return texts.to(self.device)
        return self.tokenizer(list(texts), padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(self.device)

    @torch.no_grad()
    def text_embeddings(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt embeddings, empty-prompt embeddings or None without guidance) for the UNet."""
        cond = self.text_encoder(ids)[0]
        if self.guidance_scale == 1.0:
            return cond, None
        if self._uncond is None:
            self._uncond = self.text_encoder(self.prompt_ids([""]))[0]
        return cond, self._uncond.expand(len(ids), -1, -1)

    @torch.no_grad()
    def noisy_latents(self, images: torch.Tensor, timesteps: torch.Tensor, generator: torch.Generator,
                      shared_halves: bool = False) -> torch.Tensor:
        """x_t of [-1, 1] images: VAE posterior sample, then the forward process at `timesteps` (B,).
        `shared_halves`: the two halves of the batch (images 0 and 1 of pairs) get the same noise."""
        latents = encode_images(self.vae, images.to(self.device), generator)
        if shared_halves:
            half = torch.randn(latents[:len(latents) // 2].shape, generator=generator)
            noise = torch.cat([half, half])
        else:
            noise = torch.randn(latents.shape, generator=generator)
        return self.scheduler.add_noise(latents, noise.to(latents), timesteps.to(self.device))

    @torch.no_grad()
    def from_latents(self, latents: torch.Tensor, timesteps: torch.Tensor,
                     texts: list[str] | torch.Tensor) -> torch.Tensor:
        """Decoded x0_hat of x_t at `timesteps` (B,); a latent at timestep 0 is decoded as it is."""
        timesteps = torch.as_tensor(timesteps, device=self.device).reshape(-1).expand(len(latents))
        x0 = latents
        if bool((timesteps > 0).any()):
            cond, uncond = self.text_embeddings(self.prompt_ids(texts))
            x0 = x0_prediction(self.unet, self.scheduler, latents, timesteps, cond, self.guidance_scale, uncond)
        clean = (timesteps == 0).reshape(-1, *(1,) * (latents.dim() - 1))
        return decode_latents(self.vae, torch.where(clean, latents, x0))


class SPM:
    """SPO's SPM: score(x_t, t, caption) = step-aware pixel model(decoded x0_hat(x_t), t, caption)."""

    def __init__(self, model: PixelReward, pipeline, config: SPMConfig):
        if not model.step_aware:
            raise ValueError("the SPM needs a step-aware pixel model (lpo.reward.pixel.step_aware_copy)")
        if model.tokenizer.get_vocab() != pipeline.tokenizer.get_vocab():
            raise ValueError("the pixel model's tokenizer differs from the pipeline's: train the pixel model with the "
                             "base model's tokenizer/ folder")
        self.config = config
        self.predictor = CleanImagePredictor(pipeline, config.guidance_scale)
        self.model = model.to(self.predictor.device).eval()

    @torch.no_grad()
    def score_latents(self, latents: torch.Tensor, timesteps: torch.Tensor | int,
                      texts: list[str] | torch.Tensor) -> torch.Tensor:
        """[B] rewards of noisy latents at `timesteps` ((B,) or one for all) for captions or prompt token ids."""
        ids = self.predictor.prompt_ids(texts)
        timesteps = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(len(latents))
        return self.score_images(self.predictor.from_latents(latents, timesteps, ids), timesteps, ids)

    @torch.no_grad()
    def score_clean_latents(self, x0_latents: torch.Tensor, timesteps: torch.Tensor | int,
                            texts: list[str] | torch.Tensor) -> torch.Tensor:
        """[B] rewards when the sampler already has x0_hat (SPO reuses its guided noise prediction)."""
        return self.score_images(decode_latents(self.predictor.vae, x0_latents), timesteps, texts)

    @torch.no_grad()
    def score_images(self, images: torch.Tensor, timesteps: torch.Tensor | int,
                     texts: list[str] | torch.Tensor) -> torch.Tensor:
        """[B] rewards of decoded predicted clean images ([-1, 1] NCHW) at `timesteps`."""
        ids = self.predictor.prompt_ids(texts)
        return self.model(images.float(), ids, torch.as_tensor(timesteps, device=images.device))

    def save(self, path: str | os.PathLike) -> None:
        """A directory: spm.json (its config) and model/ (the step-aware pixel model); the frozen pipeline is an
        input, not part of it."""
        with atomic_path(path) as tmp:
            tmp.mkdir()
            (tmp / _CONFIG).write_text(json.dumps({"kind": _KIND, "config": dataclasses.asdict(self.config)},
                                                  indent=2, sort_keys=True) + "\n")
            self.model.save(tmp / _MODEL)

    @classmethod
    def load(cls, path: str | os.PathLike, pipeline) -> "SPM":
        path = require_exists(path, "SPM", _MISSING_HINT)
        require_exists(path / _CONFIG, f"SPM file {_CONFIG}", f"'{path}' is not a complete SPM; {_MISSING_HINT}")
        try:
            meta = json.loads((path / _CONFIG).read_text())
            if meta.get("kind") != _KIND:
                raise ValueError(f"{_CONFIG} describes a {meta.get('kind')!r}, not an SPM")
            config = SPMConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
        except Exception as e:  # json and the config's own checks raise unrelated types
            raise ValueError(f"cannot read the SPM at '{path}' ({e}): {_MISSING_HINT} again") from e
        return cls(PixelReward.load(path / _MODEL), pipeline, config)


# ---------------------------------------------------------------------------------------------------- training

def check_pair_images(pairs: PreferencePairs, pipeline, what: str) -> None:
    """The pipeline's VAE and UNet must take the images: their side a multiple of what they downsample by."""
    factor = pipeline.vae_scale_factor * 2 ** (len(pipeline.unet.config.block_out_channels) - 1)
    h, w = pairs.images_0.shape[1:3]
    if h % factor or w % factor:
        raise ValueError(f"{what} images are {h}x{w}, but the pipeline's VAE and UNet need sides that are "
                         f"multiples of {factor}: load the pairs with image_size set to one")


def train_spm(pixel: PixelReward, pipeline, train: PreferencePairs, validation: PreferencePairs, config: SPMConfig,
              seed: int, out: str | os.PathLike | None = None) -> tuple[SPM, dict]:
    """Train the SPM from the trained pixel model `pixel` (left unchanged) on `train`, keeping the weights with the
    best mean pair accuracy over `config.validation_grid` on `validation`; deterministic on CPU for a fixed seed.
    With `out`, training is checkpointed to `<out>.ckpt/` and resumed from there, and the SPM is saved to `out`."""
    if not len(train):
        raise ValueError(f"the training split ({train.split}) has no pairs")
    decided_pairs(validation, "the validation split")
    for pairs, what in ((train, "training"), (validation, "validation")):
        check_pair_images(pairs, pipeline, what)
    torch.manual_seed(seed)
    spm = SPM(step_aware_copy(pixel), pipeline, config)
    model, predictor = spm.model.train(), spm.predictor
    grid = spo_timesteps(predictor.scheduler, config.grid)
    rng, generator = np.random.default_rng([seed, 1]), torch.Generator().manual_seed(seed)
    captions, caption_index = np.unique(np.asarray(train.captions, dtype=object), return_inverse=True)
    ids = predictor.prompt_ids(list(captions))
    label, per_prompt = torch.from_numpy(train.label_0), torch.from_numpy(train.num_example_per_prompt)

    def views(pairs: PreferencePairs, rows, timesteps, texts, generator):
        """Decoded x0_hat of both images of each pair, noised at the same t."""
        images = torch.cat([to_tensor(pairs.images_0[rows]), to_tensor(pairs.images_1[rows])])
        both = torch.cat([timesteps, timesteps])
        latents = predictor.noisy_latents(images, both, generator, config.shared_noise)
        return predictor.from_latents(latents, both, torch.cat([texts, texts])).chunk(2)

    def batch_loss(rows):
        timesteps = grid[rng.integers(len(grid), size=len(rows))]
        texts = ids[caption_index[rows]]
        view_0, view_1 = views(train, rows, timesteps, texts, generator)
        s0, s1 = model.pair_scores(view_0, view_1, texts, timesteps.to(view_0.device))
        return pair_loss(s0, s1, label[rows], per_prompt[rows])

    # The validation views are drawn once, with their own seed: every validation scores the same noisy images.
    validation_generator = torch.Generator().manual_seed(seed + 1)
    validation_ids = predictor.prompt_ids(validation.captions)
    validation_views = {}
    for t in spo_timesteps(predictor.scheduler, config.validation_grid).tolist():
        timesteps = torch.full((len(validation),), t)
        validation_views[t] = (timesteps, *views(validation, np.arange(len(validation)), timesteps, validation_ids,
                                                 validation_generator))
    validation_label = torch.from_numpy(validation.label_0).to(predictor.device)

    def validate():
        accuracy = {t: float(pair_accuracy(*model.pair_scores(v0, v1, validation_ids, ts), validation_label))
                    for t, (ts, v0, v1) in validation_views.items()}
        return {"accuracy": float(np.mean(list(accuracy.values()))),
                "accuracy_by_timestep": {str(t): a for t, a in accuracy.items()}}  # scheduler timesteps

    # The frozen pipeline shapes every x0_hat the model learns from, so it is part of what made the run.
    checkpoint = training_checkpoint(out, config, seed, train, validation,
                                     json.dumps(dict(predictor.scheduler.config), sort_keys=True, default=str),
                                     json.dumps(predictor.tokenizer.get_vocab(), sort_keys=True),
                                     *weight_parts(model, predictor.unet, predictor.vae, predictor.text_encoder))
    metrics = fit(model, batch_loss, validate, len(train), config, seed, "train spm", checkpoint, (rng, generator))
    if checkpoint is not None:
        spm.save(out)
        checkpoint.remove()  # only once the SPM is saved: a kill before that still resumes
    return spm, {**metrics, "validation_pairs": len(validation), "grid_timesteps": grid.tolist()}
