"""Training the LRM as the paper does (Sec. 4.1, App. A; official `step_clip_criterion.py`, `step_sd15.yaml`,
`step_sdxl_base.yaml`).

Both images of a pair are VAE-encoded; one timestep, drawn uniformly from the sampling grid (1, 51, ..., 951 for a
20-step DDIM over 1000 training steps, read from the scheduler), is shared by the pair; each image gets its own
noise; the pair loss has the tie correction and per-prompt weights (`lpo.reward.pair_loss`). UNet and text encoder are
fine-tuned, the VAE is frozen. Validation: pair accuracy on `validation_unique` at the grid's lowest timestep;
the best checkpoint is kept. An SDXL-type pipeline gives LRM-XL: both text encoders condition the UNet (with SDXL's
added conditions) and both are fine-tuned with it (`lpo.reward.lrm`).

Written with `accelerate` and launched by `lpo.launch`: every process draws the same global batch of pair indices
(a pure function of seed and step), takes its shard, splits it into micro-batches of `per_device_batch_size` whose
gradients accumulate, and weights its pairs by the *global* per-prompt weights; the loss is scaled by the number
of processes because DDP averages gradients, so the update equals the single-process update on the global batch
whatever the layout (what no reward reads, e.g. the UNet's up blocks, is frozen: DDP needs a gradient for every
parameter it syncs). `mixed_precision` and `gradient_checkpointing` trade exactness and compute for memory.
Training state goes to `<out>.ckpt/` every `checkpoint_every` steps; a rerun resumes from it and ends with the
weights an uninterrupted run would have.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from tqdm import tqdm
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, get_constant_schedule_with_warmup

from lpo.checkpoint import Checkpoint, check_finite_loss, fingerprint
from lpo.io import require_exists
from lpo.launch import (accumulating, check_precision_name, enable_gradient_checkpointing, layout, make_accelerator,
                        micro_batches)
from lpo.reward.lrm import LatentRewardModel, LRMConfig, clip_text_projection
from lpo.reward.pair_loss import pair_accuracy, pair_loss
from lpo.preference_data import PreferencePairs
from lpo.seeding import batch_indices, keyed_generator
from lpo.images import to_tensor

LOSS_EVERY = 25


@dataclass(frozen=True)
class LRMTrainConfig:
    model: LRMConfig = LRMConfig()
    steps: int = 4000              # paper: 4000 (SD1.5), 8000 (SDXL)
    batch_size: int = 128          # pairs per step, global
    learning_rate: float = 1e-5
    warmup_steps: int = 500
    weight_decay: float = 0.3      # DeepSpeed AdamW default, not overridden in the official config
    grad_clip: float = 1.0
    inference_steps: int = 20      # the sampling grid the timesteps are drawn from
    validate_every: int = 100
    checkpoint_every: int = 500
    clip_text_projection: str | None = None  # SD1.5: local dir of openai/clip-vit-large-patch14; SDXL: None
    per_device_batch_size: int | None = None  # pairs per micro-batch; None: a process's whole share at once
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False

    def __post_init__(self):
        for key in ("steps", "batch_size", "inference_steps", "validate_every", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"lrm.{key}={getattr(self, key)} must be >= 1")
        if not self.learning_rate > 0:
            raise ValueError(f"lrm.learning_rate={self.learning_rate} must be > 0")
        check_precision_name(self.mixed_precision, "lrm.mixed_precision")


def timestep_grid(scheduler_config: dict, inference_steps: int) -> torch.Tensor:
    """The DDIM sampling timesteps (ascending), e.g. 1, 51, ..., 951 for SD's scheduler and 20 steps."""
    ddim = DDIMScheduler.from_config(scheduler_config)
    ddim.set_timesteps(inference_steps)
    return ddim.timesteps.flip(0).clone()


def build_lrm(base_model_dir: str | os.PathLike, config: LRMTrainConfig) -> LatentRewardModel:
    """An untrained LRM initialised from a Stable Diffusion-layout pipeline directory: LRM-1.5's layout (UNet, text
    encoder, text projection), or LRM-XL's when the pipeline has SDXL's second text encoder (its own projection
    gives the reward's text embedding)."""
    base = require_exists(base_model_dir, "base model", "run the `world base-model` stage or point "
                                                        "base_model at a Stable Diffusion pipeline directory")
    unet = UNet2DConditionModel.from_pretrained(base / "unet", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder", local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer", local_files_only=True)
    schedule = {}
    if config.model.likelihood == "thurstone":
        noise = DDPMScheduler.from_pretrained(require_exists(base / "scheduler", "noise scheduler",
                                                             "the base model's scheduler/ gives s(t) its schedule"),
                                              local_files_only=True)
        schedule["alphas_cumprod"] = noise.alphas_cumprod
    if (base / "text_encoder_2").is_dir():
        if config.clip_text_projection is not None:
            raise ValueError(f"lrm.clip_text_projection={config.clip_text_projection!r} but '{base}' is an SDXL-type "
                             f"pipeline, whose LRM takes its text embedding from text_encoder_2's own projection: "
                             f"set lrm.clip_text_projection to null")
        tokenizer_2 = require_exists(base / "tokenizer_2", "second tokenizer",
                                     "an SDXL-type pipeline needs tokenizer_2/ beside text_encoder_2/")
        return LatentRewardModel(unet, text_encoder, tokenizer, config.model,
                                 text_encoder_2=CLIPTextModelWithProjection.from_pretrained(
                                     base / "text_encoder_2", local_files_only=True),
                                 tokenizer_2=CLIPTokenizer.from_pretrained(tokenizer_2, local_files_only=True),
                                 **schedule)
    weight = None
    if config.clip_text_projection is not None:
        weight = clip_text_projection(config.clip_text_projection, "lrm.clip_text_projection")
    return LatentRewardModel(unet, text_encoder, tokenizer, config.model, text_projection_weight=weight, **schedule)


class LatentEncoder:
    """The frozen VAE and noise schedule: uint8 images -> noisy latents at given timesteps."""

    def __init__(self, base_model_dir, device):
        self.vae = AutoencoderKL.from_pretrained(Path(base_model_dir) / "vae", local_files_only=True)
        self.vae.requires_grad_(False).eval().to(device)
        self.noise = DDPMScheduler.from_pretrained(Path(base_model_dir) / "scheduler", local_files_only=True)
        self.device = device

    @torch.no_grad()
    def latents(self, images: np.ndarray) -> torch.Tensor:
        # The posterior mean: deterministic, and the same latent whichever process encodes the image.
        x = to_tensor(images).to(self.device)
        return self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor

    def noisy(self, latents: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.noise.add_noise(latents, noise.to(latents.device), timesteps.to(latents.device))


def noisy_pair_latents(encoder: LatentEncoder, pairs: PreferencePairs, timesteps: torch.Tensor,
                       noise_keys: list[tuple[int, ...]]) -> torch.Tensor:
    """x_t of images 0 then images 1 (2B latents) at each pair's timestep, with independent noise per image.
    Pair i's noise comes from a generator seeded by noise_keys[i], so it does not depend on batching or
    sharding, and every reward model of a comparison can be given the very same noisy latents."""
    return add_pair_noise(encoder, encoder.latents(np.concatenate([pairs.images_0, pairs.images_1])), timesteps,
                          noise_keys)


def add_pair_noise(encoder: LatentEncoder, latents: torch.Tensor, timesteps: torch.Tensor,
                   noise_keys: list[tuple[int, ...]]) -> torch.Tensor:
    """noisy_pair_latents from the clean latents of images 0 then images 1, so several draws encode them once."""
    noise = torch.stack([torch.randn((2, *latents.shape[1:]), generator=keyed_generator(*k)) for k in noise_keys])
    return encoder.noisy(latents, torch.cat([timesteps, timesteps]), torch.cat([noise[:, 0], noise[:, 1]]))


def pair_scores(lrm: LatentRewardModel, encoder: LatentEncoder, pairs: PreferencePairs, timesteps: torch.Tensor,
                noise_keys: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of both images of each pair at its timestep (see noisy_pair_latents)."""
    latents = noisy_pair_latents(encoder, pairs, timesteps, noise_keys)
    tokens = getattr(lrm, "module", lrm).tokenize(pairs.captions + pairs.captions)  # unwrap DDP
    scores = lrm(latents, torch.cat([timesteps, timesteps]).to(latents.device), **tokens)
    return scores[:len(pairs)], scores[len(pairs):]


@torch.no_grad()
def evaluate_pairs(lrm: LatentRewardModel, encoder: LatentEncoder, pairs: PreferencePairs, timestep: int,
                   seed: int, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Scores (s_0, s_1) of every pair at one timestep, noise seeded per pair (repeatable)."""
    was_training = lrm.training
    lrm.eval()
    s0, s1 = [], []
    for start in range(0, len(pairs), batch_size):
        rows = np.arange(start, min(start + batch_size, len(pairs)))
        a, b = pair_scores(lrm, encoder, pairs.take(rows), torch.full((len(rows),), timestep),
                           [(seed, timestep, int(r)) for r in rows])
        s0.append(a.float().cpu())
        s1.append(b.float().cpu())
    lrm.train(was_training)
    return torch.cat(s0).numpy(), torch.cat(s1).numpy()


def _accuracy(scores: tuple[np.ndarray, np.ndarray], labels: np.ndarray) -> float:
    return float(pair_accuracy(torch.from_numpy(scores[0]), torch.from_numpy(scores[1]),
                               torch.from_numpy(labels)))


def train_lrm(base_model_dir: str | os.PathLike, train: PreferencePairs, validation: PreferencePairs,
              config: LRMTrainConfig, seed: int, out_dir: str | os.PathLike) -> dict:
    if len(train) == 0 or len(validation) == 0:
        raise ValueError(f"no preference pairs to {'train' if len(train) == 0 else 'validate'} the LRM on: check "
                         f"the dataset and the MPCF thresholds (mpcf.*)")
    start = time.time()
    accelerator = make_accelerator(config.mixed_precision, "lrm.mixed_precision")
    world, rank = accelerator.num_processes, accelerator.process_index
    plan = layout(config.batch_size, world, config.per_device_batch_size, "lrm.batch_size",
                  "lrm.per_device_batch_size")
    torch.manual_seed(seed)
    lrm = build_lrm(base_model_dir, config)
    for module in lrm.unread_modules():
        module.requires_grad_(False)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(*filter(None, (lrm.unet, lrm.text_encoder, lrm.text_encoder_2)))
    encoder = LatentEncoder(base_model_dir, accelerator.device)
    grid = timestep_grid(encoder.noise.config, config.inference_steps)
    optimizer, schedule = lrm_optimizer(lrm, config)
    model, optimizer = accelerator.prepare(lrm, optimizer)

    checkpoint = Checkpoint(out_dir, _fingerprint(train, validation, config, seed, base_model_dir), "steps",
                            accelerator)
    state = _resume(checkpoint, lrm, optimizer, schedule)
    last_loss = state["window"][-1] if state["window"] else None
    progress = tqdm(range(state["step"], config.steps), initial=state["step"], total=config.steps, desc="LRM",
                    mininterval=2, disable=not accelerator.is_main_process)
    for step in progress:
        rows = batch_indices(len(train), config.batch_size, seed, step)
        g = keyed_generator(seed, step)
        t = grid[torch.randint(len(grid), (len(rows),), generator=g)]
        weights = 1.0 / train.num_example_per_prompt[rows]
        shard = np.arange(rank, len(rows), world)
        optimizer.zero_grad(set_to_none=True)
        loss = 0.0
        for part, _, last in micro_batches(shard, plan.per_device):
            batch = train.take(rows[part])
            with accumulating(accelerator, model, last):
                s0, s1 = pair_scores(model, encoder, batch, t[part], [(seed, step, int(i)) for i in part])
                local = pair_loss(s0, s1, torch.from_numpy(batch.label_0).to(s0.device),
                                  torch.from_numpy(train.num_example_per_prompt[rows[part]]).to(s0.device),
                                  lrm.noise_scale(t[part]))
                # pair_loss normalises weights over the micro-batch; rescale to the global normalisation.
                part_loss = local * (weights[part].sum() / weights.sum()) * world
                accelerator.backward(part_loss)
            loss = loss + part_loss.detach()
        # One host sync per step, before the update: a non-finite micro-batch makes the sum non-finite.
        check_finite_loss(loss.item(), f"LRM (step {step + 1} of {config.steps})", checkpoint, last_loss,
                          {"lrm.learning_rate": config.learning_rate})
        accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        schedule.step()
        state["window"].append(accelerator.reduce(loss, reduction="sum").item() / world)  # global loss
        last_loss = state["window"][-1]
        done = step + 1
        if done % LOSS_EVERY == 0 or done == config.steps:
            state["loss_curve"].append([done, float(np.mean(state["window"]))])
            state["window"] = []
            progress.set_postfix(loss=f"{state['loss_curve'][-1][1]:.3g}")
        if done % config.validate_every == 0 or done == config.steps:
            accuracy = _accuracy(evaluate_pairs(lrm, encoder, validation, int(grid[0]), seed), validation.label_0)
            state["validation"].append([done, accuracy])
            if accuracy > state["best_accuracy"]:
                state.update(best_accuracy=accuracy, best_step=done, best=copy.deepcopy(_trainable_state(lrm)))
        if done % config.checkpoint_every == 0 and done < config.steps:
            _save_checkpoint(checkpoint, done, lrm, optimizer, schedule, state)

    if state["best"] is not None:
        lrm.load_state_dict(state["best"])
    if accelerator.is_main_process:
        lrm.save(out_dir)
        checkpoint.remove()
    return {"steps": config.steps, "resumed_from_step": state["resumed_from"], "loss_curve": state["loss_curve"],
            "validation_accuracy": state["validation"], "best_step": state["best_step"],
            "best_validation_accuracy": state["best_accuracy"], "validation_timestep": int(grid[0]),
            "train_pairs": len(train), "validation_pairs": len(validation),
            "timestep_grid": grid.tolist(), "feature_dim": lrm.feature_dim, "processes": world,
            "per_device_batch_size": plan.per_device, "accumulation_steps": plan.accumulation,
            "mixed_precision": config.mixed_precision,
            "device": str(accelerator.device), "train_seconds": time.time() - start}


def lrm_optimizer(lrm: LatentRewardModel, config: LRMTrainConfig):
    """AdamW without weight decay on biases and norms, and the constant schedule after warm-up."""
    decay = [p for n, p in lrm.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in lrm.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.learning_rate)
    return optimizer, get_constant_schedule_with_warmup(optimizer, min(config.warmup_steps, config.steps))


def _trainable_state(lrm: LatentRewardModel) -> dict:
    return {k: v.detach().clone() for k, v in lrm.state_dict().items()}


def _fingerprint(train: PreferencePairs, validation: PreferencePairs, config: LRMTrainConfig, seed: int,
                 base_model_dir) -> str:
    # How a step's batch is laid out does not change the step: a run resumes on another number of GPUs.
    settings = {**dataclasses.asdict(config), "checkpoint_every": None, "per_device_batch_size": None,
                "gradient_checkpointing": None}
    # Stored images are identified without decoding them.
    return fingerprint(settings, seed, train.digest(), validation.digest(),
                       (Path(base_model_dir) / "unet" / "config.json").read_bytes())


def _save_checkpoint(checkpoint: Checkpoint, step: int, lrm, optimizer, schedule, state: dict) -> None:
    checkpoint.save({"model": lrm.state_dict(), "optimizer": optimizer.state_dict(),
                     "schedule": schedule.state_dict(), "torch_rng": torch.get_rng_state(),
                     **{k: state[k] for k in ("loss_curve", "window", "validation", "best_accuracy", "best_step",
                                              "best")}}, step)


def _resume(checkpoint: Checkpoint, lrm, optimizer, schedule) -> dict:
    fresh = {"step": 0, "resumed_from": 0, "loss_curve": [], "window": [], "validation": [],
             "best_accuracy": -math.inf, "best_step": None, "best": None}
    saved = checkpoint.load()
    if saved is None:
        return fresh
    step, state = saved
    lrm.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["torch_rng"])
    return {**fresh, **{k: state[k] for k in ("loss_curve", "window", "validation", "best_accuracy",
                                               "best_step", "best")},
            "step": step, "resumed_from": step}
