"""`lpo timing train-step-arch`: the time and peak memory of one optimizer step of each trainer (LRM, LPO,
Diffusion-DPO) at the published SD1.5 / SDXL sizes, random weights, behind `lpo plan`'s estimated hours.

Each step is the trainer's own, on one micro-batch of `per_device_batch_size` samples:
- LRM (lpo.reward.lrm_training): the LRM over the UNet and text encoder(s), `unread_modules` frozen, the trainer's
  AdamW param groups and schedule; `pair_scores` (the frozen fp32 VAE encodes both images of each pair, each gets
  its noise at the pair's grid timestep) and `pair_loss`, backward, gradient clipping, the optimizer step.
- LPO (lpo.optimize.step_trainer): LoRA on the UNet (`add_lora`), `_step_po_loss` on a micro-batch of tuples (the
  prompts encoded, the reference's pass without grad, the policy's guided pass: `pair_log_probs`,
  `step_dpo_loss`), backward, clipping, the optimizer step.
- Diffusion-DPO (lpo.optimize.diffusion_dpo): LoRA, `_denoising_errors` (VAE encoding of winners and losers, the
  reference's and the policy's denoising errors) and `diffusion_dpo_loss`, backward, clipping, the optimizer step.

Inputs are built at the architecture's shapes rather than read from data: random uint8 images at the model's
resolution (LRM, Diffusion-DPO) and random latents as LPO's tuples (the sampler's output) at optimised grid steps.
Not counted: decoding images from the data set, LPO's sampling rounds, the LRM's validation, checkpoints, and the
gradient synchronisation of several processes.

Settings come from config/<arch>.yaml over config/config.yaml (precision, LoRA rank, the LRM's model, ...); each
stage runs at each per-device batch with gradient checkpointing off and on. On the CPU (--tiny) an fp16 stage runs
in fp32: accelerate has no fp16 there. Timing: `WARMUP` untimed steps (the first allocates AdamW's state), then the
median of the timed ones (CUDA events on a GPU, lpo.timing.step.time_call); peak memory is
`torch.cuda.max_memory_allocated` over the steps, reset per setting once its models are built (so weights,
gradients, optimizer state and activations), "n/a" on the CPU.
"""
from __future__ import annotations

import datetime
import gc
import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import (AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lpo.config import DEFAULT_CONFIG, from_dict, read_config
from lpo.io import atomic_path
from lpo.launch import enable_gradient_checkpointing, make_accelerator
from lpo.optimize.diffusion_dpo import DiffusionDPOConfig, _denoising_errors, diffusion_dpo_loss
from lpo.optimize.methods import LPOConfig
from lpo.optimize.step_trainer import (_step_po_loss, add_lora, freeze_text_encoders, frozen_reference,
                                       lora_optimizer, null_conditioning, optimised_steps)
from lpo.optimize.threshold import ddim_steps
from lpo.preference_data import PreferencePairs
from lpo.reward.lrm import LatentRewardModel
from lpo.reward.lrm_training import LatentEncoder, LRMTrainConfig, lrm_optimizer, pair_scores, timestep_grid
from lpo.reward.pair_loss import pair_loss
from lpo.seeding import keyed_generator
from lpo.tables import markdown, write_csv
from lpo.timing.models import PROMPT, arch_configs, clip_tokenizer
from lpo.timing.report import device_name
from lpo.timing.step import time_call
from lpo.world.base_model import sampling_scheduler

GIB = 2 ** 30
WARMUP = 2
STAGES = {"lrm": "LRM", "lpo": "LPO", "diffusion_dpo": "Diffusion-DPO"}
ARCH_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}
CONFIG_DIR = DEFAULT_CONFIG.parent
OUT_OF_MEMORY = "out of memory"


@dataclass(frozen=True)
class TrainSetting:
    stage: str
    per_device: int
    precision: str          # accelerate's: no, fp16, bf16
    checkpointing: bool


@dataclass
class Components:
    """A random-weight SD pipeline's parts on one device, in fp32 as the trainers load them."""
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection | None
    tokenizer: object
    projection_dim: int | None    # SD1.5's LRM text projection; None for SDXL (text_encoder_2's own)

    @property
    def xl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def image_size(self) -> int:
        return self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    def pipeline(self):
        if self.xl:
            return StableDiffusionXLPipeline(self.vae, self.text_encoder, self.text_encoder_2, self.tokenizer,
                                             self.tokenizer, self.unet, sampling_scheduler())
        return StableDiffusionPipeline(self.vae, self.text_encoder, self.tokenizer, self.unet, sampling_scheduler(),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def arch_config(arch: str) -> dict:
    """The config the arch's SD world trains with: config/<arch>.yaml over config/config.yaml."""
    return read_config([str(DEFAULT_CONFIG), str(CONFIG_DIR / f"{arch}.yaml")])


def build_components(arch: str, device: torch.device, tiny_widths: bool, seed: int, tokenizer) -> Components:
    """The UNet, VAE and text encoder(s) of lpo.timing.models.arch_models (its tiny widths too), without its pixel
    reward model."""
    xl = arch == "sdxl"
    unet_config, vae_config, text_configs = arch_configs(arch, tiny_widths)
    torch.manual_seed(seed)
    with torch.device(device):  # SDXL's 3.5 B parameters: initialise them where they will run
        # eval(), as from_pretrained returns them to the trainers.
        unet = UNet2DConditionModel(**unet_config).eval()
        vae = AutoencoderKL(**vae_config).eval()
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_configs[0])).eval()
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_configs[1])).eval() if xl else None
    return Components(unet, vae, text_encoder, text_encoder_2, tokenizer,
                      None if xl else text_configs[0]["projection_dim"])


def _random_images(count: int, size: int, generator: np.random.Generator) -> np.ndarray:
    return generator.integers(0, 256, (count, size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------- the steps

class InMemoryLatentEncoder(LatentEncoder):
    """The LRM trainer's LatentEncoder over a VAE in memory (its own __init__ reads a pipeline folder)."""

    def __init__(self, vae: AutoencoderKL, device: torch.device):
        self.vae, self.device = vae.requires_grad_(False).eval().to(device), device
        self.noise = DDPMScheduler.from_config(sampling_scheduler().config)


def lrm_step(parts: Components, config: dict, setting: TrainSetting, accelerator, seed: int) -> Callable[[], None]:
    """A step of lpo.reward.lrm_training.train_lrm whose one micro-batch is the whole step."""
    train = from_dict(LRMTrainConfig, config.get("lrm"), "lrm")
    device, b = accelerator.device, setting.per_device
    lrm = LatentRewardModel(parts.unet, parts.text_encoder, parts.tokenizer, train.model,
                            text_encoder_2=parts.text_encoder_2, tokenizer_2=parts.tokenizer if parts.xl else None,
                            projection_dim=parts.projection_dim).to(device)
    for module in lrm.unread_modules():
        module.requires_grad_(False)
    if setting.checkpointing:
        enable_gradient_checkpointing(*filter(None, (lrm.unet, lrm.text_encoder, lrm.text_encoder_2)))
    encoder = InMemoryLatentEncoder(parts.vae, device)
    optimizer, schedule = lrm_optimizer(lrm, train)
    model, optimizer = accelerator.prepare(lrm, optimizer)

    draw = np.random.default_rng(seed)
    pairs = PreferencePairs(_random_images(b, parts.image_size, draw), _random_images(b, parts.image_size, draw),
                            [PROMPT] * b, np.ones(b), np.ones(b, dtype=np.int64), np.arange(b), "timing", b)
    grid = timestep_grid(encoder.noise.config, train.inference_steps)
    timesteps = grid[torch.randint(len(grid), (b,), generator=keyed_generator(seed, 0))]
    label = torch.from_numpy(pairs.label_0).to(device)
    counts = torch.from_numpy(pairs.num_example_per_prompt).to(device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        s0, s1 = pair_scores(model, encoder, pairs, timesteps, [(seed, 0, i) for i in range(b)])
        loss = pair_loss(s0, s1, label, counts)
        loss.item()  # the trainer checks every micro-batch's loss on the host
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        schedule.step()
    return step


def _lora_update(accelerator, loss: torch.Tensor, params, optimizer) -> None:
    """The LoRA trainers' update after the loss: backward, the host-side loss check, clipping, the step."""
    accelerator.backward(loss)
    loss.item()  # the trainers check the step's loss on the host
    accelerator.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _lora_pipeline(parts: Components, rank: int, setting: TrainSetting, accelerator, seed: int):
    """The LoRA trainers' set-up of the policy: (pipeline, the LoRA parameters)."""
    pipe = parts.pipeline()
    params = add_lora(pipe.unet, rank, seed)
    if setting.checkpointing:
        enable_gradient_checkpointing(pipe.unet)
    freeze_text_encoders(pipe, accelerator.device)
    return pipe, params


def lpo_step(parts: Components, config: dict, setting: TrainSetting, accelerator, seed: int) -> Callable[[], None]:
    """An optimizer step of lpo.optimize.step_trainer.train_step_po whose one micro-batch is the whole step."""
    lpo = from_dict(LPOConfig, config.get("lpo"), "lpo")
    device, b = accelerator.device, setting.per_device
    pipe, params = _lora_pipeline(parts, lpo.lora_rank, setting, accelerator, seed)
    steps = ddim_steps(pipe.scheduler.config, lpo.num_inference_steps)
    optimised = optimised_steps(steps, lpo.timestep_range).nonzero().flatten()
    unet, optimizer = accelerator.prepare(pipe.unet, lora_optimizer(params, lpo.learning_rate))
    policy = accelerator.unwrap_model(unet)
    null = null_conditioning(pipe, device)
    reference = frozen_reference(policy, None, device)
    draw = torch.Generator().manual_seed(seed)
    shape = (b, policy.config.in_channels, policy.config.sample_size, policy.config.sample_size)
    tuples = {name: torch.randn(shape, generator=draw).to(device) for name in ("parent", "winner", "loser")}
    tuples["step"] = optimised[torch.randint(len(optimised), (b,), generator=draw)].to(device)
    tuples["prompt"] = torch.zeros(b, dtype=torch.long, device=device)

    def step() -> None:
        loss = _step_po_loss(accelerator, unet, reference, pipe, steps, [PROMPT], null, tuples, lpo)
        _lora_update(accelerator, loss, params, optimizer)
    return step


def diffusion_dpo_step(parts: Components, config: dict, setting: TrainSetting, accelerator, seed: int
                       ) -> Callable[[], None]:
    """An optimizer step of lpo.optimize.diffusion_dpo.train_diffusion_dpo whose one micro-batch is the whole
    step."""
    dpo = from_dict(DiffusionDPOConfig, config.get("diffusion_dpo"), "diffusion_dpo")
    device, b = accelerator.device, setting.per_device
    pipe, params = _lora_pipeline(parts, dpo.lora_rank, setting, accelerator, seed)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pipe.vae.requires_grad_(False).to(device)
    unet, optimizer = accelerator.prepare(pipe.unet, lora_optimizer(params, dpo.learning_rate))
    policy = accelerator.unwrap_model(unet)
    draw = np.random.default_rng(seed)
    winners, losers = (_random_images(b, parts.image_size, draw) for _ in range(2))

    def step() -> None:
        generators = [keyed_generator(seed, 0, i) for i in range(b)]
        with accelerator.autocast():
            model, reference = _denoising_errors(unet, policy, pipe, noise_scheduler, winners, losers, [PROMPT] * b,
                                                 generators, device)
            loss = diffusion_dpo_loss(*model, *reference, dpo.beta_dpo)
        _lora_update(accelerator, loss, params, optimizer)
    return step


STEPS = {"lrm": lrm_step, "lpo": lpo_step, "diffusion_dpo": diffusion_dpo_step}


# ---------------------------------------------------------------------------------------------------- settings

def per_device_batches(tokens: list[str], config: dict, stages: list[str]) -> dict[str, list[int]]:
    """--per-device-batch's `B` (every stage) and `STAGE=B` (that stage) tokens as each stage's batches, in the
    order given; a stage named by neither takes its config's per_device_batch_size."""
    shared, own = [], {s: [] for s in stages}
    for token in tokens:
        stage, sep, text = token.rpartition("=")
        if sep and stage not in STAGES:
            raise ValueError(f"--per-device-batch {token}: {stage!r} is not a stage; use B or STAGE=B with STAGE one "
                             f"of {', '.join(STAGES)}")
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise ValueError(f"--per-device-batch {token}: give a whole number >= 1, as B or STAGE=B (e.g. lrm=16)")
        if not sep:
            shared.append(value)
        elif stage in own:
            own[stage].append(value)
        else:
            raise ValueError(f"--per-device-batch {token}: {stage} is not timed here; add it to --stages "
                             f"({' '.join(stages)}) or leave the token out")
    out = {}
    for stage in stages:
        batches = list(dict.fromkeys(own[stage] + shared))
        if not batches:
            configured = config[stage].get("per_device_batch_size")
            if configured is None:
                raise ValueError(f"{stage}.per_device_batch_size is null in the config (a process's whole share): "
                                 f"give the batch to time with --per-device-batch {stage}=B")
            batches = [configured]
        out[stage] = batches
    return out


def stage_precision(stage: str, config: dict, device: torch.device) -> str:
    configured = config[stage].get("mixed_precision") or "no"
    return "no" if configured == "fp16" and device.type != "cuda" else configured


def settings(config: dict, batches: dict[str, list[int]], device: torch.device) -> list[TrainSetting]:
    return [TrainSetting(stage, b, stage_precision(stage, config, device), checkpointing)
            for stage, stage_batches in batches.items() for b in stage_batches for checkpointing in (False, True)]


# ---------------------------------------------------------------------------------------------------- measuring

@dataclass(frozen=True)
class StepTiming:
    setting: TrainSetting
    seconds: tuple[float, ...]      # each timed step; empty where the setting ran out of memory
    peak_bytes: int | None          # None on the CPU

    @property
    def median(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None


def time_setting(arch: str, setting: TrainSetting, config: dict, tiny_widths: bool, steps: int, seed: int,
                 tokenizer) -> StepTiming:
    """One setting on freshly built models; a setting that runs out of GPU memory is timed as no steps."""
    accelerator = make_accelerator(setting.precision, f"{setting.stage}.mixed_precision")
    device = accelerator.device
    cuda = device.type == "cuda"
    try:
        parts = build_components(arch, device, tiny_widths, seed, tokenizer)
        step = STEPS[setting.stage](parts, config, setting, accelerator, seed)
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        seconds = tuple(time_call(step, device, WARMUP, steps))
        return StepTiming(setting, seconds, torch.cuda.max_memory_allocated(device) if cuda else None)
    except torch.OutOfMemoryError:
        return StepTiming(setting, (), torch.cuda.max_memory_allocated(device) if cuda else None)
    finally:
        accelerator.free_memory()


def train_device(arch: str, tiny_widths: bool) -> torch.device:
    """Where the steps run: the GPU, or the CPU for tiny widths only."""
    if arch not in ARCH_NAMES:
        raise ValueError(f"--arch {arch!r}: use one of {', '.join(ARCH_NAMES)}")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not tiny_widths:
        raise ValueError(f"timing a training step of the real {arch} architecture needs a CUDA GPU and none is "
                         f"visible: on a CPU one step takes minutes and tens of GB. Run it on a GPU machine "
                         f"(bash benchmarks/gpu_check.sh), or pass --tiny to check the set-up with tiny widths")
    return torch.device("cpu")


def measure_train_steps(arch: str, config: dict, batches: dict[str, list[int]], device: torch.device,
                        tiny_widths: bool, steps: int, seed: int = 0) -> Iterator[StepTiming]:
    """Time every stage at every batch, checkpointing off and on. A process's accelerate state keeps the precision
    it was first given, and the LRM (bf16) and the LoRA trainers (fp16) differ: the settings of each precision
    run in a fresh process of their own, one after another."""
    todo = settings(config, batches, device)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context, max_tasks_per_child=1) as pool:
        for precision in dict.fromkeys(s.precision for s in todo):
            group = [s for s in todo if s.precision == precision]
            yield from pool.submit(_time_settings, arch, group, config, tiny_widths, steps, seed,
                                   torch.get_num_threads()).result()


def _time_settings(arch: str, group: list[TrainSetting], config: dict, tiny_widths: bool, steps: int, seed: int,
                   threads: int) -> list[StepTiming]:
    torch.set_num_threads(threads)
    tokenizer = clip_tokenizer(sd=True)
    timings = []
    for setting in group:
        timings.append(time_setting(arch, setting, config, tiny_widths, steps, seed, tokenizer))
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return timings


# ---------------------------------------------------------------------------------------------------- report

def _precision_name(precision: str) -> str:
    return "fp32" if precision == "no" else precision


def csv_rows(timings: list[StepTiming], device: str) -> list[dict]:
    """What lpo.timing.plan reads: one row per stage and setting."""
    return [{"stage": t.setting.stage, "per_device_batch": t.setting.per_device,
             "precision": _precision_name(t.setting.precision),
             "gradient_checkpointing": "on" if t.setting.checkpointing else "off",
             "seconds_per_step": "" if t.median is None else t.median,
             "peak_gib": "n/a" if t.peak_bytes is None else round(t.peak_bytes / GIB, 3),
             "timed_steps": len(t.seconds), "status": "ok" if t.seconds else OUT_OF_MEMORY, "device": device}
            for t in timings]


def write_train_step_report(out_dir: str | Path, arch: str, tiny_widths: bool, device: torch.device,
                            timings: list[StepTiming], steps: int, command: str) -> Path:
    """<out>/train_step_<arch>[_tiny].csv and .md; returns the .md's path."""
    out = Path(out_dir)
    stem = f"train_step_{arch}" + ("_tiny" if tiny_widths else "")
    name = device_name(device)
    rows = csv_rows(timings, name)
    write_csv(out / f"{stem}.csv", rows)
    table = [{"stage": STAGES[r["stage"]], "per-device batch": r["per_device_batch"], "precision": r["precision"],
              "checkpointing": r["gradient_checkpointing"],
              "seconds per micro-batch step": OUT_OF_MEMORY if r["seconds_per_step"] == "" else
              f"{r['seconds_per_step']:.3g}",
              "peak GiB": r["peak_gib"]} for r in rows]
    label = ARCH_NAMES[arch] + (" (tiny widths)" if tiny_widths else "")
    if device.type == "cuda":
        clock = "CUDA events; peak memory: `torch.cuda.max_memory_allocated` over the steps, weights included"
    else:
        clock = "time.perf_counter; no peak memory on the CPU"
    lines = [f"# Time of one training step: {label}, random weights", "",
             f"Generated on {datetime.date.today()} by `{command}`. Device: **{name}**; torch {torch.__version__}. "
             f"Median of {steps} timed step{'s' if steps > 1 else ''} per setting after {WARMUP} untimed ({clock}).",
             "",
             markdown(table), "",
             "Each row is one optimizer step whose single micro-batch holds the per-device batch, as each trainer "
             "runs it (lpo/timing/train_step.py), with the config's other settings (config/"
             f"{arch}.yaml). `lpo plan` multiplies a row's seconds by the accumulation and the optimizer steps of "
             "a run. Not counted: decoding images from the data set, LPO's sampling rounds, the LRM's validation, "
             "checkpoints, several processes' gradient synchronisation."]
    if tiny_widths:
        lines += ["", "Tiny widths: a check of the set-up; these times say nothing about the real models."]
    if device.type != "cuda":
        lines += ["", "On the CPU an fp16 stage runs in fp32 (accelerate has no fp16 there)."]
    with atomic_path(out / f"{stem}.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return out / f"{stem}.md"
