"""Diffusion-DPO (Wallace et al., CVPR 2024), the offline baseline: the preference order of a final image pair is
propagated to every denoising step ([FT] Eq. 5).

For a winner/loser pair of VAE-encoded images, the same noise and the same timestep t ~ U{0, ..., T-1} give noisy
latents; the policy's and the frozen reference's denoising errors (MSE against the noise, or the velocity for
v-prediction models, mean over latent elements) enter

    loss = -log sigmoid(-beta_dpo / 2 * ((mse_w - mse_l) - (ref_w - ref_l)))

This is the official code's form (`scale_term = -0.5 * beta_dpo`); the paper writes -beta T omega(lambda_t)
(...), whose constant factor the official beta_dpo absorbs, so beta_dpo = 5000 (the official SD1.5 and SDXL value)
means the same here. The official runs fine-tune the whole UNet: 2000 steps of 2048 pairs (16 GPUs x 128
accumulation), lr 1e-8 scaled by that batch (2.048e-5), constant after 500 warmup steps; this harness trains LoRA
with the same conventions as LPO (`lpo.optimize.step_trainer`), so the baselines differ only in their objective and
data.

Pair images enter at the model's resolution as in the official data pipeline: shorter side resized (bilinear),
centre crop (lpo.images.fit_square), decoded batch by batch from the dataset; the official script also
flips them at random unless run with --no_hflip, which this harness does not do.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from lpo.checkpoint import Checkpoint, check_finite_loss, fingerprint
from lpo.launch import (accumulating, check_precision_name, enable_gradient_checkpointing, layout, make_accelerator,
                        micro_batches)
from lpo.preference_data import ImageColumn, at_resolution, images_digest
from lpo.optimize.sampler import Conditioning, device_clock
from lpo.seeding import batch_indices, keyed_generator
from lpo.optimize.step_trainer import (add_lora, check_lora, encode_prompts, finish_run,
                                       freeze_text_encoders, load_pipeline, lora_optimizer, reference_model,
                                       resume_lora, save_lora)
from lpo.images import to_tensor


@dataclass(frozen=True)
class DiffusionDPOConfig:
    beta_dpo: float = 5000.0
    lora_rank: int = 4
    learning_rate: float = 2.048e-5  # the official full fine-tune's effective rate
    warmup_steps: int = 500          # constant learning rate after a linear warmup, as the official runs
    batch_size: int = 16             # pairs per optimizer step over all processes (official: 2048)
    steps: int = 2000                # optimizer steps
    checkpoint_every: int = 500      # optimizer steps
    per_device_batch_size: int | None = None  # pairs per micro-batch; None: a process's whole share at once
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if self.beta_dpo <= 0:
            raise ValueError(f"beta_dpo={self.beta_dpo} must be > 0")
        check_lora(self.lora_rank, self.learning_rate)
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0")
        for key in ("batch_size", "steps", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")
        check_precision_name(self.mixed_precision, "diffusion_dpo.mixed_precision")


def diffusion_dpo_loss(model_w: torch.Tensor, model_l: torch.Tensor, reference_w: torch.Tensor,
                       reference_l: torch.Tensor, beta_dpo: float = 5000.0) -> torch.Tensor:
    """Mean over pairs of -log sigmoid(-beta_dpo / 2 * ((model_w - model_l) - (reference_w - reference_l))),
    from per-pair denoising errors (P,)."""
    inside = -0.5 * beta_dpo * ((model_w - model_l) - (reference_w - reference_l))
    return -F.logsigmoid(inside.float()).mean()


@dataclass(frozen=True)
class DecidedPairs:
    """The pairs with a decided label (1 or 0), ties (0.5) left out; their images are decoded a batch at a time
    (arrays, or lpo.preference_data.ImageColumns read from the dataset)."""
    images_0: np.ndarray | ImageColumn  # every pair's, ties included
    images_1: np.ndarray | ImageColumn
    index: np.ndarray                   # (P,) positions of the decided pairs in images_0 / images_1
    first_wins: np.ndarray              # (P,) bool: image 0 is the preferred one
    captions: list[str]                 # (P,)

    def __len__(self) -> int:
        return len(self.index)

    def batch(self, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(winners, losers), uint8 (B, H, W, 3), of the decided pairs at `chosen`."""
        index, first = self.index[chosen], self.first_wins[chosen][:, None, None, None]
        image_0, image_1 = np.asarray(self.images_0[index]), np.asarray(self.images_1[index])
        return np.where(first, image_0, image_1), np.where(first, image_1, image_0)

    def at_resolution(self, size: int) -> DecidedPairs:
        """Images at size x size (shorter side resized, centre cropped, as the official Diffusion-DPO data)."""
        return dataclasses.replace(self, images_0=at_resolution(self.images_0, size),
                                   images_1=at_resolution(self.images_1, size))

    def digest(self) -> str:
        """Identifies the training data for checkpoints without decoding it."""
        h = hashlib.sha256("\n".join(self.captions).encode())
        for part in (images_digest(self.images_0), images_digest(self.images_1)):
            h.update(part.encode())
        h.update(self.index.tobytes() + self.first_wins.tobytes())
        return h.hexdigest()


def decided_pairs(images_0: np.ndarray | ImageColumn, images_1: np.ndarray | ImageColumn, captions: list[str],
                  label_0: np.ndarray) -> DecidedPairs:
    """The pairs with a decided label (1 or 0); ties (0.5) are skipped. Nothing is decoded."""
    label_0 = np.asarray(label_0, dtype=np.float64)
    if not len(images_0) == len(images_1) == len(captions) == len(label_0):
        raise ValueError(f"{len(images_0)} images_0, {len(images_1)} images_1, {len(captions)} captions and "
                         f"{len(label_0)} labels: one of each per pair")
    for name, images in (("images_0", images_0), ("images_1", images_1)):
        # An ImageColumn decodes to uint8 RGB by construction, and asking its shape could decode an image.
        if not isinstance(images, ImageColumn) and (images.dtype != np.uint8 or images.ndim != 4
                                                    or images.shape[-1] != 3):
            raise ValueError(f"{name} must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if not np.isin(label_0, (0.0, 0.5, 1.0)).all():
        raise ValueError("label_0 must hold 1 (image 0 preferred), 0 (image 1 preferred) or 0.5 (tie)")
    index = np.flatnonzero(label_0 != 0.5)
    if not len(index):
        raise ValueError(f"all {len(label_0)} pairs are ties: Diffusion-DPO needs pairs with a preferred image")
    return DecidedPairs(images_0, images_1, index, label_0[index] == 1.0, [captions[i] for i in index])


def train_diffusion_dpo(pipeline_dir, images_0: np.ndarray | ImageColumn, images_1: np.ndarray | ImageColumn,
                        captions: list[str], label_0: np.ndarray, config: DiffusionDPOConfig, seed: int, out_dir,
                        metrics_path=None) -> dict:
    """Train LoRA on the pipeline's UNet with Diffusion-DPO on the preference pairs; save the LoRA-merged
    pipeline, and the LoRA adapter beside it, to `out_dir` (and the metrics to `metrics_path`); return the
    metrics. Resumes from `<out>.ckpt/`.
    Images of another size are brought to the model's resolution (the size its pipeline samples: 512 for SD1.5,
    1024 for SDXL): ImageColumns as each batch is decoded, arrays in memory before training."""
    pairs = decided_pairs(images_0, images_1, captions, label_0)
    start = time.time()
    accelerator = make_accelerator(config.mixed_precision, "diffusion_dpo.mixed_precision")
    plan = layout(config.batch_size, accelerator.num_processes, config.per_device_batch_size,
                  "diffusion_dpo.batch_size", "diffusion_dpo.per_device_batch_size")
    pipe = load_pipeline(pipeline_dir)
    pairs = pairs.at_resolution(pipe.unet.config.sample_size * pipe.vae_scale_factor)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    # How a step's batch is laid out does not change the step: a run resumes on another number of GPUs.
    settings = {**dataclasses.asdict(config), "checkpoint_every": None, "per_device_batch_size": None,
                "gradient_checkpointing": None}
    checkpoint = Checkpoint(out_dir, fingerprint(settings, seed, *pipe.unet.state_dict().values(), pairs.digest()),
                            "steps", accelerator)

    params = add_lora(pipe.unet, config.lora_rank, seed)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(pipe.unet)
    freeze_text_encoders(pipe, accelerator.device)
    pipe.vae.requires_grad_(False).to(accelerator.device)
    unet, optimizer = accelerator.prepare(pipe.unet, lora_optimizer(params, config.learning_rate))
    policy = accelerator.unwrap_model(unet)
    progress = resume_lora(checkpoint, policy, optimizer) or {"position": 0, "loss_curve": [], "accuracy_curve": [],
                                                              "seconds": 0.0}
    first_step = progress["position"]

    rows = accelerator.process_index * plan.share + np.arange(plan.share)
    for step in range(first_step, config.steps):
        step_start = device_clock(accelerator.device)
        chosen = batch_indices(len(pairs), config.batch_size, seed, step)[rows]
        totals = torch.zeros(2, device=accelerator.device)  # loss and implicit accuracy, means over the share
        for part, weight, last in micro_batches(np.arange(plan.share), plan.per_device):
            generators = [keyed_generator(seed, step, int(row)) for row in rows[part]]
            winners, losers = pairs.batch(chosen[part])
            with accumulating(accelerator, unet, last):
                with accelerator.autocast():
                    model, reference = _denoising_errors(unet, policy, pipe, noise_scheduler, winners, losers,
                                                         [pairs.captions[i] for i in chosen[part]], generators,
                                                         accelerator.device)
                    loss = weight * diffusion_dpo_loss(*model, *reference, config.beta_dpo)
                accelerator.backward(loss)
            # The official "implicit accuracy": the policy improved the winner's error more than the loser's; ties
            # count half.
            model_diff, reference_diff = model[0] - model[1], reference[0] - reference[1]
            accuracy = ((model_diff < reference_diff).float() + 0.5 * (model_diff == reference_diff).float()).mean()
            totals += torch.stack([loss.detach(), weight * accuracy])
        global_loss, global_accuracy = accelerator.reduce(totals, "mean")
        check_finite_loss(global_loss.item(), f"Diffusion-DPO (optimizer step {step + 1})", checkpoint,
                          progress["loss_curve"][-1][1] if progress["loss_curve"] else None,
                          {"diffusion_dpo.learning_rate": config.learning_rate,
                           "diffusion_dpo.beta_dpo": config.beta_dpo})
        accelerator.clip_grad_norm_(params, 1.0)
        # diffusers' constant_with_warmup as a function of the step, so resuming needs no scheduler state (and
        # accelerate's prepared schedulers would step once per process).
        warmup = step / config.warmup_steps if step < config.warmup_steps else 1.0
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * warmup
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress["loss_curve"].append([step + 1, global_loss.item()])
        progress["accuracy_curve"].append([step + 1, global_accuracy.item()])
        seconds = torch.tensor([device_clock(accelerator.device) - step_start], device=accelerator.device)
        progress["seconds"] += accelerator.reduce(seconds.double(), "sum").item()
        progress["position"] = step + 1
        if progress["position"] % config.checkpoint_every == 0 and progress["position"] < config.steps:
            save_lora(checkpoint, policy, optimizer, progress)

    device = accelerator.device
    metrics = {"steps": config.steps, "resumed_from_step": first_step, "pairs": len(pairs),
               "ties_skipped": int(len(label_0) - len(pairs)), "loss_curve": progress["loss_curve"],
               "implicit_accuracy_curve": progress["accuracy_curve"],
               "device_seconds": {"optimisation": progress["seconds"]}, "processes": accelerator.num_processes,
               "per_device_batch_size": plan.per_device, "accumulation_steps": plan.accumulation,
               "mixed_precision": config.mixed_precision,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
               "wall_seconds": time.time() - start}
    return finish_run(accelerator, policy, pipeline_dir, out_dir, metrics, metrics_path, checkpoint)


def _denoising_errors(unet, policy, pipe, noise_scheduler: DDPMScheduler, winners: np.ndarray, losers: np.ndarray,
                      texts: list[str], generators: list[torch.Generator], device: torch.device
                      ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((model_w, model_l), (reference_w, reference_l)) per-pair MSEs; each pair draws its VAE sample, noise and
    timestep from its own generator, shared by winner and loser."""
    with torch.no_grad():
        dist = pipe.vae.encode(to_tensor(np.concatenate([winners, losers])).to(device)).latent_dist
    shape = dist.mean.shape[1:]
    vae_noise = torch.stack([torch.randn((2, *shape), generator=g) for g in generators]).transpose(0, 1)
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
    timesteps = torch.cat([torch.randint(noise_scheduler.config.num_train_timesteps, (1,), generator=g)
                           for g in generators])
    latents = (dist.mean + dist.std * vae_noise.flatten(0, 1).to(device)) * pipe.vae.config.scaling_factor
    noise, timesteps = noise.to(device).repeat(2, 1, 1, 1), timesteps.to(device).repeat(2)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
        noise_scheduler.get_velocity(latents, noise, timesteps)
    # SDXL-type UNets are told (resolution, resolution, 0, 0, resolution, resolution), as in the official code:
    # the images were brought to the resolution before encoding.
    cond = encode_prompts(pipe, texts, device, image_size=(int(winners.shape[1]), int(winners.shape[2])))
    cond = Conditioning.cat([cond, cond])

    def errors(model) -> tuple[torch.Tensor, torch.Tensor]:
        prediction = model(noisy, timesteps, **cond.kwargs()).sample
        return tuple((prediction.float() - target.float()).pow(2).flatten(1).mean(1).chunk(2))

    with torch.no_grad(), reference_model(policy):
        reference = errors(policy)
    return errors(unet), reference
