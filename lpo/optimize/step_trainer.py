"""The step-level preference-optimisation trainer shared by LPO, SPO and step-wise GRPO ([FT] Sec. 4.3, App. A and
B; official `train_lpo.py`), and the LoRA / checkpoint conventions Diffusion-DPO reuses.

Each round: a global batch of `sample_batch_size` prompts is drawn and split evenly over the processes,
`sample_step_pairs` collects the kept (x_t, x_w, x_l) tuples, the tuples of all processes are gathered, shuffled with
a seed shared by all processes and split evenly, and each global mini-batch of `train_batch_size` tuples gets one
optimizer step of the step-DPO loss, accumulated over micro-batches of `per_device_batch_size` (`lpo.launch`). The
policy is LoRA on the UNet (peft; alpha = rank, gaussian init, so it starts equal to the reference); the frozen
reference is the same UNet with its adapters disabled (or another saved pipeline's UNet: `reference_dir`).
SD1.5-type and SDXL-type pipelines alike: prompts condition the UNet as the pipeline's own encode_prompt does
(`encode_prompts`), SDXL's added conditions included. The GRPO objective trains on every candidate group instead of
the kept tuples (`lpo.optimize.grpo`).

Determinism: prompts, initial noise, candidates and continuations come from generators seeded per (round, prompt
row of the global batch), and the shuffle per round, so a run resumed from `<out>.ckpt/` ends with the LoRA weights
an uninterrupted run has, and any number of processes and micro-batches reproduces one process with whole batches.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import diffusers
import numpy as np
import torch
from accelerate import Accelerator
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model_state_dict

from lpo.checkpoint import Checkpoint, check_finite_loss, fingerprint
from lpo.io import atomic_path, write_json
from lpo.launch import (accumulating, check_precision_name, enable_gradient_checkpointing, layout, make_accelerator,
                        micro_batches)
from lpo.optimize.grpo import group_advantages, grpo_loss, step_kl
from lpo.optimize.sampler import (Conditioning, PromptBatch, StepReward, StepSamples, device_clock, sample_step_pairs,
                                  step_distribution, step_log_prob)
from lpo.pipelines import load_pipeline_dir, pipeline_class
from lpo.seeding import batch_indices, keyed_generator
from lpo.optimize.step_dpo import pair_log_probs, step_dpo_loss
from lpo.optimize.threshold import DDIMSteps, check_threshold, ddim_steps, threshold_schedule
from lpo.world.pipeline import load_pipeline as load_sd_pipeline

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
OBJECTIVES = ("dpo", "grpo")
OBJECTIVE_NAMES = {"dpo": "step-level DPO", "grpo": "step-wise GRPO"}
SAMPLE_STREAM, SHUFFLE_STREAM = 0, 1


@dataclass(frozen=True)
class StepPOConfig:
    """LPO's settings by default (official SD1.5 code values); SPO: timestep_range=(0, 750) and its SPM reward."""
    section: ClassVar[str] = "lpo"      # the config section, named in messages
    samples_per_step: int = 4           # K candidates per step
    num_inference_steps: int = 20       # DDIM, eta = 1
    guidance_scale: float = 5.0         # CFG of sampling and of the log-probabilities (official sample.guidance_scale)
    threshold: str = "sigma"            # constant | sigma | variance | linear
    threshold_min: float = 0.35
    threshold_max: float = 0.5
    # Steps with t_cur - steps_offset in this closed range are optimised: the paper's grid {0, 50, ..., 950}.
    timestep_range: tuple[int, int] = (0, 1000)
    beta: float = 500.0
    eps: float = 0.1                    # ratio clamp [1 - eps, 1 + eps]
    lora_rank: int = 4
    learning_rate: float = 6e-5         # official code; the paper's Table 11 says 5e-5
    sample_batch_size: int = 5          # prompts per round, over all processes
    train_batch_size: int = 10          # tuples per optimizer step, over all processes
    per_device_batch_size: int | None = None  # tuples per micro-batch; None: a process's whole share at once
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    rounds: int = 1000                  # the paper's 5 epochs of 4k prompts at 5 prompts x 4 GPUs per round
    checkpoint_every: int = 50          # rounds
    # "dpo": step-level DPO on the kept (winner, loser) pairs (LPO, SPO; beta its inverse temperature, eps its ratio
    # clamp); "grpo": step-wise GRPO on every candidate group (lpo.optimize.grpo; beta the KL weight, eps the PPO
    # clip range, train_batch_size counted in groups of K candidates; the thresholds are not used).
    objective: str = "dpo"

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"{self.section}.objective={self.objective!r}: use {' or '.join(OBJECTIVES)}")
        if self.samples_per_step < 2:
            need = "a group to normalise rewards over" if self.objective == "grpo" else "a winner and a loser"
            raise ValueError(f"{self.section}.samples_per_step={self.samples_per_step}: K must be >= 2 to form {need}")
        check_threshold(self.threshold, self.threshold_min, self.threshold_max)
        if len(self.timestep_range) != 2 or self.timestep_range[0] > self.timestep_range[1]:
            raise ValueError(f"timestep_range={list(self.timestep_range)} must be [low, high] with low <= high")
        if self.guidance_scale < 1:
            raise ValueError(f"guidance_scale={self.guidance_scale} must be >= 1 (1 disables guidance)")
        if not 0 < self.eps < 1:
            raise ValueError(f"eps={self.eps} must lie in (0, 1): the ratio is clamped to [1 - eps, 1 + eps]")
        check_lora(self.lora_rank, self.learning_rate)
        for key in ("num_inference_steps", "sample_batch_size", "train_batch_size", "rounds", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")
        if self.beta <= 0:
            raise ValueError(f"beta={self.beta} must be > 0")
        check_precision_name(self.mixed_precision, f"{self.section}.mixed_precision")


# ---------------------------------------------------------------------------------------------------- shared

def check_lora(rank: int, learning_rate: float) -> None:
    if rank < 1:
        raise ValueError(f"lora_rank={rank}: LoRA needs rank >= 1 (the paper uses 4 for SD1.5, 64 for SDXL)")
    if learning_rate <= 0:
        raise ValueError(f"learning_rate={learning_rate} must be > 0")


def add_lora(unet, rank: int, seed: int) -> list[torch.nn.Parameter]:
    """Freeze `unet` and add the policy's LoRA on the attention projections; return the trainable parameters."""
    check_lora(rank, 1.0)
    unet.requires_grad_(False)
    torch.manual_seed(seed)  # peft's gaussian init draws lora_A from the global generator
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=list(LORA_TARGETS)))
    return [p for p in unet.parameters() if p.requires_grad]


@contextlib.contextmanager
def reference_model(unet):
    """The frozen reference: the policy's UNet with its adapters disabled."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def frozen_reference(policy, reference_dir: str | os.PathLike | None, device: torch.device):
    """A context manager yielding the reference UNet: the policy's with its adapters disabled, or the UNet of the
    pipeline at `reference_dir`, frozen on `device`."""
    if reference_dir is None:
        return lambda: reference_model(policy)
    unet = load_pipeline(reference_dir).unet.requires_grad_(False).eval().to(device)
    return lambda: contextlib.nullcontext(unet)


def lora_optimizer(params: list[torch.nn.Parameter], learning_rate: float) -> torch.optim.AdamW:
    # The official trainers' AdamW settings; constant learning rate, no schedule.
    return torch.optim.AdamW(params, lr=learning_rate, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)


def load_pipeline(pipeline_dir: str | os.PathLike):
    """The saved pipeline as the class its model_index.json names (StableDiffusionXLPipeline for SDXL-type
    models); a folder without one gets the Shapes world's message on how to make it."""
    path = Path(pipeline_dir)
    if not (path / "model_index.json").is_file():
        return load_sd_pipeline(path)
    return load_pipeline_dir(path)


def freeze_text_encoders(pipe, device: torch.device) -> None:
    """The pipeline's text encoder(s), both for SDXL-type pipelines, frozen on `device`."""
    for encoder in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if encoder is not None:
            encoder.requires_grad_(False).to(device)


@torch.no_grad()
def _encode(pipe, texts: list[str], device: torch.device, guided: bool,
            image_size: tuple[int, int] | None) -> tuple[Conditioning, Conditioning | None]:
    """(the texts' conditioning, the null conditioning of classifier-free guidance or None), by the pipeline's own
    encode_prompt. SDXL-type pipelines add text_embeds and time_ids for an uncropped image of `image_size` (default:
    the UNet's native size), as StableDiffusionXLPipeline.__call__ does without size arguments."""
    if not isinstance(pipe, StableDiffusionXLPipeline):
        states, null = pipe.encode_prompt(texts, device=device, num_images_per_prompt=1,
                                          do_classifier_free_guidance=guided)
        return Conditioning(states), Conditioning(null) if guided else None
    states, null, pooled, null_pooled = pipe.encode_prompt(texts, device=device, do_classifier_free_guidance=guided)
    height, width = image_size or (pipe.unet.config.sample_size * pipe.vae_scale_factor,) * 2
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=states.dtype, device=device)
    time_ids = time_ids.expand(len(texts), -1)
    return (Conditioning(states, {"text_embeds": pooled, "time_ids": time_ids}),
            Conditioning(null, {"text_embeds": null_pooled, "time_ids": time_ids}) if guided else None)


def encode_prompts(pipe, texts: list[str], device: torch.device, image_size: tuple[int, int] | None = None
                   ) -> Conditioning:
    """The UNet conditioning of `texts` (len(texts) rows) as the pipeline conditions its UNet: the text encoder's
    states (SD1.5-type), or both encoders' penultimate states with SDXL's added conditions (see `_encode`)."""
    return _encode(pipe, texts, device, False, image_size)[0]


def null_conditioning(pipe, device: torch.device, image_size: tuple[int, int] | None = None) -> Conditioning:
    """One row: what the pipeline's classifier-free guidance conditions on without a negative prompt, the empty
    prompt's states; zeros for SDXL-type pipelines whose config sets force_zeros_for_empty_prompt."""
    return _encode(pipe, [""], device, True, image_size)[1]


def save_lora(checkpoint: Checkpoint, unet, optimizer, progress: dict) -> None:
    """The LoRA weights, optimizer state and progress of a LoRA trainer, after progress["position"]."""
    lora = {n: p.detach().cpu() for n, p in unet.named_parameters() if p.requires_grad}
    checkpoint.save({"lora": lora, "optimizer": optimizer.state_dict(), "progress": progress}, progress["position"])


def resume_lora(checkpoint: Checkpoint, unet, optimizer) -> dict | None:
    """Load the checkpoint into `unet` and `optimizer` and return its progress, or None to start afresh."""
    saved = checkpoint.load()
    if saved is None:
        return None
    state = saved[1]
    missing = set(state["lora"]) - {n for n, p in unet.named_parameters() if p.requires_grad}
    if missing:
        raise ValueError(f"checkpoint {checkpoint.dir} holds LoRA weights this model lacks: {sorted(missing)[:3]}")
    unet.load_state_dict(state["lora"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    return state["progress"]


def save_merged_pipeline(unet, pipeline_dir: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """The base pipeline with the LoRA merged into its UNet, in diffusers layout, and the LoRA itself beside it
    (`save_lora_adapter`), written together so neither exists without the other."""
    base = Path(pipeline_dir)
    with atomic_path(out_dir) as tmp:
        shutil.copytree(base, tmp, ignore=lambda folder, names: ["unet"] if Path(folder) == base else [])
        save_lora_adapter(unet, getattr(diffusers, pipeline_class(base)), tmp)
        unet.fuse_lora()
        unet.unload_lora()
        unet.save_pretrained(tmp / "unet")


def save_lora_adapter(unet, pipeline_type, out_dir: Path) -> None:
    """The UNet's LoRA as diffusers' training scripts save it: `out_dir/pytorch_lora_weights.safetensors` in
    diffusers' key format with the LoraConfig as metadata, which `load_lora_weights(out_dir)` of a `pipeline_type`
    (StableDiffusion(XL)Pipeline) holding the base model reads."""
    config = unet.peft_config["default"].to_dict()
    # peft keeps target_modules as a set, listed in an order that changes with each process's string hashing; sorted,
    # the same run writes the same bytes.
    config["target_modules"] = sorted(config["target_modules"])
    pipeline_type.save_lora_weights(
        out_dir, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        unet_lora_adapter_metadata=config)


# ---------------------------------------------------------------------------------------------------- LPO / SPO

def optimised_steps(steps: DDIMSteps, timestep_range: tuple[int, int]) -> torch.Tensor:
    grid = steps.timesteps - steps.steps_offset
    optimised = (grid >= timestep_range[0]) & (grid <= timestep_range[1])
    if not optimised.any():
        raise ValueError(f"timestep_range={list(timestep_range)} holds none of the sampling grid "
                         f"{grid.tolist()}: widen it")
    return optimised


def train_step_po(pipeline_dir: str | os.PathLike, prompts: list[str], reward: StepReward, config: StepPOConfig,
                  seed: int, out_dir: str | os.PathLike, metrics_path: str | os.PathLike | None = None,
                  reward_id: str = "", reference_dir: str | os.PathLike | None = None) -> dict:
    """Optimise the pipeline's UNet with step-level DPO against `reward`; save the LoRA-merged pipeline, and the
    LoRA adapter beside it, to `out_dir` (and the metrics to `metrics_path`); return the metrics.

    Run under `accelerate launch` for several processes. `reward_id` names the reward in the checkpoint
    fingerprint (e.g. the reward model's directory), so a checkpoint made with another reward is not resumed.
    `reference_dir`: a pipeline whose UNet is the frozen reference (default: the policy's UNet, adapters disabled).
    """
    if not prompts:
        raise ValueError("no training prompts: the prompt list is empty; pass the world's training prompts")
    start = time.time()
    section = config.section
    accelerator = make_accelerator(config.mixed_precision, f"{section}.mixed_precision")
    sampling = layout(config.sample_batch_size, accelerator.num_processes, None, f"{section}.sample_batch_size", "")
    training = layout(config.train_batch_size, accelerator.num_processes, config.per_device_batch_size,
                      f"{section}.train_batch_size", f"{section}.per_device_batch_size")
    pipe = load_pipeline(pipeline_dir)
    steps = ddim_steps(pipe.scheduler.config, config.num_inference_steps)
    thresholds = threshold_schedule(steps, config.threshold, config.threshold_min, config.threshold_max)
    optimised = optimised_steps(steps, config.timestep_range)
    # How a step's batch is laid out does not change the step: a run resumes on another number of GPUs.
    settings = {**dataclasses.asdict(config), "checkpoint_every": None, "per_device_batch_size": None,
                "gradient_checkpointing": None, "reward": reward_id}
    checkpoint = Checkpoint(out_dir, fingerprint(settings, seed, *pipe.unet.state_dict().values(),
                                                 np.asarray(prompts, dtype=str)), "rounds", accelerator)

    params = add_lora(pipe.unet, config.lora_rank, seed)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(pipe.unet)
    freeze_text_encoders(pipe, accelerator.device)
    unet, optimizer = accelerator.prepare(pipe.unet, lora_optimizer(params, config.learning_rate))
    policy = accelerator.unwrap_model(unet)
    progress = resume_lora(checkpoint, policy, optimizer) or _fresh_progress(len(steps))
    first_round = progress["position"]
    null = null_conditioning(pipe, accelerator.device)
    reference = frozen_reference(policy, reference_dir, accelerator.device)

    for round_index in range(first_round, config.rounds):
        sample_start = device_clock(accelerator.device)
        samples = _sample_round(pipe, policy, steps, prompts, reward, thresholds, optimised, null, config, seed,
                                round_index, accelerator, sampling.share)
        sampling_seconds = device_clock(accelerator.device) - sample_start - samples.reward_seconds
        gather = _gather_groups if config.objective == "grpo" else _gather_tuples
        tuples = gather(accelerator, samples, len(steps), sampling.share)

        train_start = device_clock(accelerator.device)
        for rows in _mini_batches(len(tuples["step"]), training.share, seed, round_index, accelerator):
            loss = 0.0
            for part, weight, last in micro_batches(rows, training.per_device):
                batch = {name: tensor[part] for name, tensor in tuples.items()}
                with accumulating(accelerator, unet, last):
                    part_loss = weight * _step_po_loss(accelerator, unet, reference, pipe, steps, prompts, null,
                                                       batch, config)
                    accelerator.backward(part_loss)
                loss = loss + part_loss.detach()
            global_loss = accelerator.reduce(loss, "mean")
            check_finite_loss(global_loss.item(), f"{section.upper()} {OBJECTIVE_NAMES[config.objective]} (round "
                                                  f"{round_index + 1}, "
                                                  f"optimizer step {progress['optimizer_steps'] + 1})",
                              checkpoint, progress["loss_curve"][-1][1] if progress["loss_curve"] else None,
                              {f"{section}.learning_rate": config.learning_rate, f"{section}.beta": config.beta})
            accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            progress["optimizer_steps"] += 1
            progress["loss_curve"].append([progress["optimizer_steps"], global_loss.item()])
        seconds = torch.tensor([samples.reward_seconds, sampling_seconds,
                                device_clock(accelerator.device) - train_start], device=accelerator.device)
        _account(progress, accelerator, samples, seconds, len(tuples["step"]) < accelerator.num_processes)

        progress["position"] = round_index + 1
        if progress["position"] % config.checkpoint_every == 0 and progress["position"] < config.rounds:
            save_lora(checkpoint, policy, optimizer, progress)

    metrics = {**_metrics(progress, steps, thresholds, optimised, first_round, accelerator, time.time() - start),
               "objective": config.objective, "per_device_batch_size": training.per_device,
               "accumulation_steps": training.accumulation}
    return finish_run(accelerator, policy, pipeline_dir, out_dir, metrics, metrics_path, checkpoint)


def finish_run(accelerator, policy, pipeline_dir, out_dir, metrics: dict, metrics_path, checkpoint) -> dict:
    """The end of every LoRA trainer: the merged pipeline and metrics written by the main process, the
    checkpoint removed only once they exist, then all processes released together."""
    if accelerator.is_main_process:
        save_merged_pipeline(policy, pipeline_dir, out_dir)
        if metrics_path is not None:
            write_json(metrics_path, metrics)
        checkpoint.remove()
    accelerator.wait_for_everyone()
    return metrics


def _fresh_progress(n_steps: int) -> dict:
    return {"position": 0, "optimizer_steps": 0, "skipped_rounds": 0, "loss_curve": [],
            "pairs_scored": [0] * n_steps, "pairs_kept": [0] * n_steps, "gap_sum": [0.0] * n_steps,
            "seconds": {"reward": 0.0, "sampling": 0.0, "optimisation": 0.0}}


def _sample_round(pipe, policy, steps: DDIMSteps, prompts: list[str], reward: StepReward,
                  thresholds: torch.Tensor, optimised: torch.Tensor, null: Conditioning, config: StepPOConfig,
                  seed: int, round_index: int, accelerator: Accelerator, per_process: int) -> StepSamples:
    """This process's share of the round's global prompt batch, sampled with one generator per global row."""
    device = accelerator.device
    rows = accelerator.process_index * per_process + np.arange(per_process)
    chosen = batch_indices(len(prompts), config.sample_batch_size, seed, round_index)[rows]
    generators = [keyed_generator(seed, SAMPLE_STREAM, round_index, int(row)) for row in rows]
    size = policy.config.sample_size
    x = torch.stack([torch.randn((policy.config.in_channels, size, size), generator=g) for g in generators])
    texts = [prompts[i] for i in chosen]
    batch = PromptBatch(texts, torch.from_numpy(chosen), encode_prompts(pipe, texts, device), null)
    with accelerator.autocast():
        return sample_step_pairs(policy, x.to(device), steps, batch, reward, thresholds, optimised,
                                 samples_per_step=config.samples_per_step, guidance_scale=config.guidance_scale,
                                 generators=generators, keep_groups=config.objective == "grpo")


def _gather_rows(accelerator: Accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's rows of `tensor` (their counts may differ), in process order."""
    if accelerator.num_processes == 1:
        return tensor
    counts = accelerator.gather(torch.tensor([len(tensor)], device=accelerator.device)).tolist()
    if max(counts) == 0:
        return tensor
    padded = accelerator.pad_across_processes(tensor, dim=0)
    gathered, width = accelerator.gather(padded), padded.shape[0]
    return torch.cat([gathered[r * width:r * width + count] for r, count in enumerate(counts)])


def _gather_tuples(accelerator: Accelerator, samples: StepSamples, n_steps: int, per_process: int
                   ) -> dict[str, torch.Tensor]:
    """All processes' tuples, ordered by (global prompt row, step) so the order does not depend on the split."""
    device = accelerator.device
    local = {"parent": samples.parent, "winner": samples.winner, "loser": samples.loser,
             "step": samples.step.to(device), "prompt": samples.prompt.to(device),
             "row": (samples.row + accelerator.process_index * per_process).to(device)}
    gathered = {name: _gather_rows(accelerator, tensor) for name, tensor in local.items()}
    order = torch.argsort(gathered["row"] * n_steps + gathered["step"])
    return {name: tensor[order] for name, tensor in gathered.items()}


def _gather_groups(accelerator: Accelerator, samples: StepSamples, n_steps: int, per_process: int
                   ) -> dict[str, torch.Tensor]:
    """GRPO's training rows: one per group, its K candidates with their group-normalised advantages (computed where
    the group was sampled) and sampling log-densities, all processes' groups ordered by (global prompt row, step) so
    the order does not depend on the split. A row is a group, not a candidate, so the policy's step distribution,
    which depends on the parent alone, is computed once for its K candidates."""
    groups, device = samples.groups, accelerator.device
    local = {"parent": groups.parent, "candidates": groups.candidates,
             "advantage": group_advantages(groups.scores).to(device), "old_log_prob": groups.log_prob.float(),
             "step": groups.step.to(device), "prompt": groups.prompt.to(device),
             "row": (groups.row + accelerator.process_index * per_process).to(device)}
    gathered = {name: _gather_rows(accelerator, tensor) for name, tensor in local.items()}
    order = torch.argsort(gathered["row"] * n_steps + gathered["step"])
    return {name: tensor[order] for name, tensor in gathered.items()}


def _mini_batches(n: int, share: int, seed: int, round_index: int, accelerator: Accelerator):
    """This process's rows of each global mini-batch of the round's n shuffled tuples, `share` rows a step. The
    tuples are dealt to the processes in turn (a remainder of fewer tuples than processes is dropped, so every
    process takes the same number of optimizer steps), so the rows of step k over all processes are the k-th
    `share * processes` of the shuffled order whatever the number of processes."""
    processes = accelerator.num_processes
    order = np.random.default_rng([seed, SHUFFLE_STREAM, round_index]).permutation(n)[:n - n % processes]
    mine = torch.from_numpy(order[accelerator.process_index::processes]).to(accelerator.device)
    for start in range(0, len(mine), share):
        yield mine[start:start + share]


def _step_po_loss(accelerator: Accelerator, unet, reference, pipe, steps: DDIMSteps, prompts: list[str],
                  null: Conditioning, batch: dict[str, torch.Tensor], config: StepPOConfig) -> torch.Tensor:
    cond = encode_prompts(pipe, [prompts[i] for i in batch["prompt"].tolist()], accelerator.device)
    if config.objective == "grpo":
        k = batch["candidates"].shape[1]
        args = (steps, batch["parent"], batch["step"], cond, null, config.guidance_scale)
        with accelerator.autocast():
            with torch.no_grad(), reference() as frozen:
                reference_mean, _ = step_distribution(frozen, *args)
            mean, sigma = step_distribution(unet, *args)
            log_prob = step_log_prob(batch["candidates"].flatten(0, 1), mean.repeat_interleave(k, 0),
                                     sigma.repeat_interleave(k, 0))
            return grpo_loss(log_prob, batch["old_log_prob"].flatten(), batch["advantage"].flatten(),
                             step_kl(mean, reference_mean, sigma), config.eps, config.beta)
    args = (steps, batch["parent"], batch["winner"], batch["loser"], batch["step"], cond, null,
            config.guidance_scale)
    with accelerator.autocast():
        with torch.no_grad(), reference() as frozen:
            reference_w, reference_l = pair_log_probs(frozen, *args)
        log_prob_w, log_prob_l = pair_log_probs(unet, *args)
        return step_dpo_loss(log_prob_w, log_prob_l, reference_w, reference_l, config.beta, config.eps)


def _account(progress: dict, accelerator: Accelerator, samples: StepSamples, seconds: torch.Tensor,
             skipped: bool) -> None:
    """Add this round's pair counts, probability gaps and device-seconds, summed over the processes."""
    gap = samples.probability_gap
    per_step = torch.stack([(~gap.isnan()).sum(1).double(), samples.kept.double(), gap.nan_to_num(0.0).sum(1)])
    per_step = accelerator.reduce(per_step.to(accelerator.device), "sum").cpu()
    for key, row in zip(("pairs_scored", "pairs_kept", "gap_sum"), per_step):
        progress[key] = [a + b for a, b in zip(progress[key], row.tolist())]
    seconds = accelerator.reduce(seconds.double(), "sum").tolist()
    for key, value in zip(("reward", "sampling", "optimisation"), seconds):
        progress["seconds"][key] += value
    progress["skipped_rounds"] += int(skipped)


def _metrics(progress: dict, steps: DDIMSteps, thresholds: torch.Tensor, optimised: torch.Tensor,
             first_round: int, accelerator: Accelerator, wall_seconds: float) -> dict:
    scored, kept = progress["pairs_scored"], progress["pairs_kept"]
    device = accelerator.device
    return {
        "rounds": progress["position"], "resumed_from_round": first_round,
        "optimizer_steps": progress["optimizer_steps"], "skipped_rounds": progress["skipped_rounds"],
        "loss_curve": progress["loss_curve"], "pairs_kept": int(sum(kept)),
        "per_timestep": {
            "timestep": steps.timesteps.tolist(), "sigma": steps.sigma.tolist(), "threshold": thresholds.tolist(),
            "optimised": optimised.tolist(), "pairs_scored": [int(n) for n in scored],
            "pairs_kept": [int(n) for n in kept],
            "mean_probability_gap": [g / n if n else None for g, n in zip(progress["gap_sum"], scored)]},
        # Summed over processes: seconds of device time, the unit of the paper's training-cost table.
        "device_seconds": progress["seconds"],
        "processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "wall_seconds": wall_seconds,
    }
