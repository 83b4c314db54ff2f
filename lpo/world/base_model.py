"""The Shapes world's base text-to-image model: a tiny Stable Diffusion 1.5 (AutoencoderKL, CLIPTextModel over the
real CLIP tokenizer, UNet2DConditionModel with cross-attention, DDIM) trained from scratch on the world's corpus.

Training is deterministic in (data, config, seed): batches come from seeded per-epoch permutations and all noise
from a generator seeded per step, so a run resumed from a checkpoint replays exactly what an uninterrupted run does.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lpo.checkpoint import Checkpoint, fingerprint
from lpo.io import atomic_path
from lpo.seeding import batch_indices, keyed_generator
from lpo.images import to_tensor, to_uint8
from lpo.world.tokenizer import MAX_LENGTH

VOCAB_SIZE, BOS_ID, EOS_ID = 49408, 49406, 49407
LOSS_EVERY = 50
HELDOUT_FRACTION = 0.05
ENCODE_BATCH = 256

# Stable Diffusion 1.5's noise schedule (its scheduler_config.json).
SD15_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     steps_offset=1, clip_sample=False, prediction_type="epsilon", timestep_spacing="leading")
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class VAEConfig:
    """Tiny AutoencoderKL; len(block_out_channels) - 1 downsamplings (32x32 -> 8x8 by default)."""
    block_out_channels: tuple[int, ...] = (16, 32, 32)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    latent_channels: int = 4
    steps: int = 1200
    batch_size: int = 32
    learning_rate: float = 2e-3
    warmup_steps: int = 20
    kl_weight: float = 1e-6


@dataclass(frozen=True)
class TextEncoderConfig:
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4


@dataclass(frozen=True)
class UNetConfig:
    """UNet2DConditionModel; >= 2 down stages so the LRM has multi-scale features. attention_head_dim is the
    number of heads, as in Stable Diffusion's configs."""
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention_head_dim: int = 2
    norm_num_groups: int = 16


@dataclass(frozen=True)
class BaseModelConfig:
    text_encoder: TextEncoderConfig = TextEncoderConfig()
    unet: UNetConfig = UNetConfig()
    steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    caption_dropout: float = 0.1  # empty prompt, so classifier-free guidance works
    prediction_type: str = "epsilon"  # or "v_prediction" (as SD 2.x); saved in the pipeline's scheduler config
    min_snr_gamma: float | None = 5.0  # Min-SNR loss weighting (Hang et al. 2023); None: plain MSE of the target
    checkpoint_every: int = 500
    snapshots: tuple[int, ...] = ()  # training steps whose weights are also saved: the preference data's sources

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"base_model.prediction_type={self.prediction_type!r}: use one of "
                             f"{', '.join(PREDICTION_TYPES)}")
        bad = [s for s in self.snapshots
               if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s < self.steps]
        if bad or len(set(self.snapshots)) != len(self.snapshots):
            raise ValueError(f"base_model.snapshots={list(self.snapshots)}: list distinct training steps in "
                             f"[1, {self.steps - 1}] (base_model.steps={self.steps} is the final model)")


# ---------------------------------------------------------------------------------------------------- sizes

def check_image_size(image_size: int, vae: VAEConfig, unet: UNetConfig | None = None) -> int:
    """Return the latent size for `image_size`, or raise naming world.image_size and the sizes that work. Without
    `unet`, only the VAE's downsampling is checked (the VAE stage does not depend on the base model's settings)."""
    vae_factor = 2 ** (len(vae.block_out_channels) - 1)
    if image_size <= 0 or image_size % vae_factor:
        raise ValueError(f"world.image_size={image_size} cannot be encoded: the VAE's {len(vae.block_out_channels)} "
                         f"blocks downsample by {vae_factor}. {_sizes_that_work(vae_factor, unet)}")
    if unet is None:
        return image_size // vae_factor
    return _check_latent_size(image_size // vae_factor, image_size, vae_factor, unet)


def _check_latent_size(latent_size: int, image_size: int, vae_factor: int, unet: UNetConfig) -> int:
    halvings = len(unet.block_out_channels) - 1
    if latent_size % 2 ** halvings:
        raise ValueError(f"world.image_size={image_size} gives {latent_size}x{latent_size} latents, which the "
                         f"UNet's {halvings + 1} down stages cannot halve {halvings} times. "
                         f"{_sizes_that_work(vae_factor, unet)}")
    return latent_size


def _sizes_that_work(vae_factor: int, unet: UNetConfig | None) -> str:
    step = vae_factor * 2 ** (len(unet.block_out_channels) - 1 if unet else 0)
    return f"Use a multiple of {step}: {', '.join(str(step * k) for k in range(1, 5))}, ..."


# ---------------------------------------------------------------------------------------------------- builders

def build_vae(config: VAEConfig, image_size: int) -> AutoencoderKL:
    n = len(config.block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=config.block_out_channels,
                         layers_per_block=config.layers_per_block, norm_num_groups=config.norm_num_groups,
                         latent_channels=config.latent_channels, sample_size=image_size)


def build_text_encoder(config: TextEncoderConfig) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=config.hidden_size, intermediate_size=4 * config.hidden_size,
        num_hidden_layers=config.layers, num_attention_heads=config.heads, max_position_embeddings=MAX_LENGTH,
        projection_dim=config.hidden_size, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID))


def build_unet(config: UNetConfig, latent_size: int, latent_channels: int, cross_attention_dim: int
               ) -> UNet2DConditionModel:
    n = len(config.block_out_channels)
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * n, mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D",) * n, block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block, attention_head_dim=config.attention_head_dim,
        norm_num_groups=config.norm_num_groups, cross_attention_dim=cross_attention_dim)


def training_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(**{**SD15_SCHEDULE, "prediction_type": prediction_type})


def sampling_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    return DDIMScheduler(**{**SD15_SCHEDULE, "prediction_type": prediction_type}, set_alpha_to_one=False)


# ---------------------------------------------------------------------------------------------------- shared

def _optimizer(params: list[torch.nn.Parameter], lr: float, warmup: int, steps: int):
    # The fused kernel matters here: the text encoder's 49408-row embedding is most of the parameters.
    optimizer = torch.optim.AdamW(params, lr=lr, fused=True)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, min(warmup, steps), steps)


def _check_images(images: np.ndarray, image_size: int) -> None:
    if images.dtype != np.uint8 or images.shape[1:] != (image_size, image_size, 3):
        raise ValueError(f"expected uint8 images of shape (N, {image_size}, {image_size}, 3) for "
                         f"world.image_size={image_size}, got {images.dtype} {images.shape}")


class _LossCurve:
    """Mean training loss over each window of LOSS_EVERY steps, as [step, loss] points."""

    def __init__(self, points: list | None = None, window: list | None = None):
        self.points, self.window = list(points or []), list(window or [])

    def add(self, step: int, loss: float) -> None:
        self.window.append(loss)
        if step % LOSS_EVERY == 0:
            self.points.append([step, float(np.mean(self.window))])
            self.window = []

    def final(self) -> float:
        return self.points[-1][1] if self.points else float(np.mean(self.window))


# ---------------------------------------------------------------------------------------------------- VAE

def train_vae(images: np.ndarray, image_size: int, config: VAEConfig, seed: int, out_dir: str | os.PathLike
              ) -> dict:
    """Train the AutoencoderKL, set its scaling_factor so latents have unit variance, save it to `out_dir`."""
    _check_images(images, image_size)
    start = time.time()
    torch.manual_seed(seed)
    order = np.random.default_rng(seed).permutation(len(images))
    n_heldout = max(1, round(HELDOUT_FRACTION * len(images)))
    heldout, train = images[order[:n_heldout]], to_tensor(images[order[n_heldout:]])

    vae = build_vae(config, image_size)
    optimizer, schedule = _optimizer(list(vae.parameters()), config.learning_rate, config.warmup_steps,
                                     config.steps)
    curve = _LossCurve()
    progress = tqdm(range(config.steps), desc="vae", mininterval=2)
    for step in progress:
        batch = train[batch_indices(len(train), config.batch_size, seed, step)]
        loss = _vae_loss(vae, batch, config.kl_weight, keyed_generator(seed, step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        curve.add(step + 1, loss.item())
        if (step + 1) % LOSS_EVERY == 0:
            progress.set_postfix(loss=f"{curve.final():.3g}")

    vae.eval()
    with torch.no_grad():
        latents = _encode(vae, train[:4096])
        vae.register_to_config(scaling_factor=1.0 / latents.std().item())
        mse = _reconstruction_mse(vae, heldout)
    with atomic_path(out_dir) as tmp:
        vae.save_pretrained(tmp)
    return {"steps": config.steps, "final_loss": curve.final(), "loss_curve": curve.points,
            "heldout_images": int(n_heldout), "heldout_mse": mse, "heldout_psnr_db": -10 * math.log10(mse),
            "scaling_factor": vae.config.scaling_factor, "train_seconds": time.time() - start}


def _vae_loss(vae: AutoencoderKL, x: torch.Tensor, kl_weight: float, generator: torch.Generator) -> torch.Tensor:
    # Per-image sums averaged over the batch, as Stable Diffusion's VAE was trained, so kl_weight means the same.
    posterior = vae.encode(x).latent_dist
    reconstruction = vae.decode(posterior.sample(generator)).sample
    return (reconstruction - x).pow(2).sum(dim=(1, 2, 3)).mean() + kl_weight * posterior.kl().mean()


def _encode(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([vae.encode(chunk).latent_dist.mean for chunk in x.split(ENCODE_BATCH)])


def _encode_shared(vae: AutoencoderKL, images: np.ndarray, accelerator: Accelerator) -> torch.Tensor:
    """Every process encodes a share of the ENCODE_BATCH chunks _encode makes, so the latents are the bytes one
    process gets, and every process ends with all of them."""
    chunks = range(0, len(images), ENCODE_BATCH)
    with accelerator.split_between_processes(list(chunks)) as mine:
        parts = [_encode(vae, to_tensor(images[start:start + ENCODE_BATCH])) for start in mine]
    return torch.cat([latent for share in gather_object([parts]) for latent in share])


def _reconstruction_mse(vae: AutoencoderKL, images: np.ndarray) -> float:
    """Mean squared error of uint8 reconstructions, in units of the full [0, 1] range."""
    x = to_tensor(images)
    decoded = torch.cat([vae.decode(z).sample for z in _encode(vae, x).split(ENCODE_BATCH)])
    diff = to_uint8(decoded).astype(np.float64) - images.astype(np.float64)
    return max(float(np.mean((diff / 255.0) ** 2)), 1e-12)


# ---------------------------------------------------------------------------------------------------- base model

def train_base_model(images: np.ndarray, captions: list[str], vae_dir: str | os.PathLike,
                     tokenizer_dir: str | os.PathLike, config: BaseModelConfig, seed: int,
                     out_dir: str | os.PathLike, snapshots_dir: str | os.PathLike | None = None) -> dict:
    """Train text encoder + UNet on the frozen VAE's latents; save a StableDiffusionPipeline to `out_dir`, and
    the weights after each of `config.snapshots` steps as pipelines `<snapshots_dir>/step<N>/`.

    Every `checkpoint_every` steps the training state goes to `<out_dir>.ckpt/`; a later call with the same
    inputs resumes from it and ends with the weights an uninterrupted run would have.
    """
    if config.snapshots and snapshots_dir is None:
        raise ValueError(f"base_model.snapshots={list(config.snapshots)} needs a directory to save them to")
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    start = time.time()
    vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True).eval().requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    _check_images(images, vae.config.sample_size)
    # Several CPU processes (torchrun) split each batch: the tiny models keep a second thread of one process busy
    # poorly (a step of 128: 0.36 s on one thread, 0.35 s on two, 0.26 s as two one-thread processes).
    accelerator = Accelerator(cpu=True)
    with torch.no_grad():
        latents = _encode_shared(vae, images, accelerator) * vae.config.scaling_factor
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    _check_latent_size(latents.shape[-1], vae.config.sample_size, vae_factor, config.unet)
    vocabulary, caption_index = np.unique(np.asarray(captions, dtype=object), return_inverse=True)
    token_ids = _tokenize(tokenizer, ["", *vocabulary])  # row 0: the empty prompt
    caption_rows = torch.from_numpy(caption_index.astype(np.int64) + 1)

    torch.manual_seed(seed)
    text_encoder = build_text_encoder(config.text_encoder)
    unet = build_unet(config.unet, latents.shape[-1], latents.shape[1], config.text_encoder.hidden_size)
    params = [*text_encoder.parameters(), *unet.parameters()]
    optimizer, schedule = _optimizer(params, config.learning_rate, config.warmup_steps, config.steps)
    models = {"text_encoder": text_encoder, "unet": unet, "optimizer": optimizer, "schedule": schedule}

    # checkpoint_every is left out of the fingerprint because it does not change the result.
    settings = {**dataclasses.asdict(config), "checkpoint_every": None}
    checkpoint = Checkpoint(out_dir, fingerprint(settings, seed, latents, token_ids, caption_rows), "steps",
                            accelerator)
    first_step, curve, saved = _resume(checkpoint, models)
    world, rank = accelerator.num_processes, accelerator.process_index
    if config.batch_size % world:
        raise ValueError(f"base_model.batch_size={config.batch_size} does not split over {world} processes: "
                         f"use a multiple of {world} or fewer processes")
    shard = slice(rank * config.batch_size // world, (rank + 1) * config.batch_size // world)
    text_encoder_ddp, unet_ddp = accelerator.prepare(text_encoder, unet)
    noise_scheduler = training_scheduler(config.prediction_type)
    progress = tqdm(range(first_step, config.steps), initial=first_step, total=config.steps, desc="base model",
                    mininterval=2, disable=not accelerator.is_main_process)
    for step in progress:
        # The whole batch's draws, then this process's share: every process count trains on the same samples.
        generator = keyed_generator(seed, step)
        indices = torch.from_numpy(batch_indices(len(latents), config.batch_size, seed, step))
        dropped = torch.rand(len(indices), generator=generator) < config.caption_dropout
        noise = torch.randn((len(indices), *latents.shape[1:]), generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(indices),), generator=generator)
        ids = token_ids[torch.where(dropped, 0, caption_rows[indices])]
        loss = _diffusion_loss(text_encoder_ddp, unet_ddp, noise_scheduler, latents[indices][shard], ids[shard],
                               noise[shard], timesteps[shard], config.min_snr_gamma)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)  # gradients are averaged over processes: the mean over the whole batch
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        curve.add(step + 1, accelerator.reduce(loss.detach(), reduction="mean").item())
        if (step + 1) % LOSS_EVERY == 0:
            progress.set_postfix(loss=f"{curve.final():.3g}")
        if step + 1 in config.snapshots:
            # Held in memory and in every later checkpoint, so that a resumed run still has the earlier snapshots.
            saved[step + 1] = {name: _cpu_copy(models[name].state_dict()) for name in ("text_encoder", "unet")}
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            _save_checkpoint(checkpoint, step + 1, models, curve, saved)

    if accelerator.is_main_process:
        if snapshots_dir is not None:
            _save_snapshots(snapshots_dir, saved, vae, tokenizer, tokenizer_dir, text_encoder, unet,
                            config.prediction_type)
        _save_pipeline(out_dir, vae, text_encoder, tokenizer, tokenizer_dir, unet, config.prediction_type)
        checkpoint.remove()
    accelerator.wait_for_everyone()
    return {"steps": config.steps, "snapshots": sorted(saved), "resumed_from_step": first_step,
            "final_loss": curve.final(), "loss_curve": curve.points, "images": len(images), "unique_captions": len(vocabulary),
            "text_encoder_params": sum(p.numel() for p in text_encoder.parameters()),
            "unet_params": sum(p.numel() for p in unet.parameters()), "processes": world,
            "train_seconds": time.time() - start}


def _tokenize(tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    # Padded to 77 with no attention mask, exactly as StableDiffusionPipeline encodes prompts.
    return tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                     return_tensors="pt").input_ids


def _diffusion_loss(text_encoder, unet, noise_scheduler, latents, ids, noise, timesteps, min_snr_gamma
                    ) -> torch.Tensor:
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, encoder_hidden_states=text_encoder(ids)[0]).sample
    epsilon = noise_scheduler.config.prediction_type == "epsilon"
    target = noise if epsilon else noise_scheduler.get_velocity(latents, noise, timesteps)
    errors = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma is None:
        return errors.mean()
    # Caps the weight of low-noise steps, which otherwise dominate the gradient and slow training down. In x0 terms
    # the epsilon MSE weighs snr and the v MSE snr + 1: Min-SNR weighs min(snr, gamma).
    alphas_cumprod = noise_scheduler.alphas_cumprod[timesteps]
    snr = alphas_cumprod / (1 - alphas_cumprod)
    return (errors * snr.clamp(max=min_snr_gamma) / (snr if epsilon else snr + 1)).mean()


def _save_pipeline(out_dir, vae, text_encoder, tokenizer, tokenizer_dir, unet, prediction_type: str) -> None:
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=sampling_scheduler(prediction_type), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    with atomic_path(out_dir) as tmp:
        pipeline.save_pretrained(tmp)
        # The tokenizer folder as built keeps SD1.5's vocab.json + merges.txt beside tokenizer.json.
        shutil.copytree(tokenizer_dir, Path(tmp) / "tokenizer", dirs_exist_ok=True)


# ---------------------------------------------------------------------------------------------------- checkpoints

def _cpu_copy(state: dict) -> dict:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def _save_snapshots(snapshots_dir, saved: dict, vae, tokenizer, tokenizer_dir, text_encoder, unet,
                    prediction_type: str) -> None:
    """The snapshots as pipelines `step<N>/` in one directory, written whole or not at all."""
    # Fresh modules of the same configs: the trained ones are still wrapped for distributed training.
    text_encoder = CLIPTextModel(text_encoder.config)
    unet = UNet2DConditionModel.from_config(unet.config)
    with atomic_path(snapshots_dir) as tmp:
        tmp.mkdir()
        for step, weights in sorted(saved.items()):
            text_encoder.load_state_dict(weights["text_encoder"])
            unet.load_state_dict(weights["unet"])
            _save_pipeline(tmp / f"step{step}", vae, text_encoder, tokenizer, tokenizer_dir, unet, prediction_type)


def _save_checkpoint(checkpoint: Checkpoint, step: int, models: dict, curve: _LossCurve, saved: dict) -> None:
    state = {name: module.state_dict() for name, module in models.items()}
    # Noise and batches are seeded per step; the global RNG is saved for modules that draw from it (dropout).
    state.update(torch_rng=torch.get_rng_state(), loss_points=curve.points, loss_window=curve.window,
                 snapshots=saved)
    checkpoint.save(state, step)


def _resume(checkpoint: Checkpoint, models: dict) -> tuple[int, _LossCurve, dict]:
    """The step to continue from, the loss curve so far and the snapshots taken so far."""
    saved = checkpoint.load()
    if saved is None:
        return 0, _LossCurve(), {}
    step, state = saved
    for name, module in models.items():
        module.load_state_dict(state[name])
    torch.set_rng_state(state["torch_rng"])
    return step, _LossCurve(state["loss_points"], state["loss_window"]), state["snapshots"]
