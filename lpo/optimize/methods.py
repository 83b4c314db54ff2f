"""LPO, SPO, step-wise GRPO and Diffusion-DPO on a world: the two step rewards that make the step-level trainer LPO
or SPO, and the training entry points the CLI calls ([FT] Sec. 4.3 and 5.1, App. B).

- LPO: `train_step_po` with the LRM scoring the noisy candidates themselves (no decoding). The official code tells
  the LRM the parent's timestep t_cur although the candidates sit at t_cur - T/N; `lrm_timestep` selects that
  ("parent"), the candidates' own timestep ("candidate"), or 0 ([FT] Table 22's "always 0").
- SPO: the same trainer with the SPM scoring the VAE-decoded predicted clean image of each candidate at the
  candidate's timestep, optimising t in [0, 750] only (SPO's range). Its other settings are LPO's, so the two
  differ only in their reward and range (the paper does not restate SPO's hyperparameters).
- Step-wise GRPO ([FT] App. B): the same trainer, sampler and LRM reward as LPO with the `grpo` objective
  (lpo.optimize.grpo), every candidate group trained on, no validity threshold.
- Diffusion-DPO: offline, on the preference dataset's decided train pairs, with the same LoRA conventions.

All three train SD1.5/SD2.x-type and SDXL-type pipelines (`check_supported`); the trainers load each as the class
its model_index.json names.

Each entry point records, beside the trainer's metrics, the device-seconds of the reward modelling it depends on
(the reward model's `<dir>_metrics.json` train_seconds), so a training-cost table needs only these files.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from lpo.optimize.diffusion_dpo import DiffusionDPOConfig, train_diffusion_dpo
from lpo.io import read_json, require_exists, write_json
from lpo.launch import process_state
from lpo.optimize.sampler import StepContext
from lpo.pipelines import pipeline_class
from lpo.optimize.step_trainer import StepPOConfig, load_pipeline, train_step_po

LRM_TIMESTEPS = ("parent", "candidate", "zero")
TRAINING_PROMPTS = "train"  # the world's analogue of the paper's "4k prompts" from Pick-a-Pic v1 train


@dataclass(frozen=True)
class ScaledRewardConfig(StepPOConfig):
    """The step trainer's settings plus `reward_scale`, which multiplies the reward model's scores before the
    two-way softmax of the validity threshold (its temperature; the pair order and the loss do not change). 1 for
    the paper's reward models, whose learned logit scales set it; a world whose reward model keeps a small logit
    scale needs more for the paper's thresholds to keep pairs at all."""
    reward_scale: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if not self.reward_scale > 0:
            raise ValueError(f"reward_scale={self.reward_scale} must be > 0 (1 leaves the scores as they are)")


@dataclass(frozen=True)
class LPOConfig(ScaledRewardConfig):
    """LPO's settings: the timestep the LRM is told (see the module docstring)."""
    lrm_timestep: str = "parent"

    def __post_init__(self):
        super().__post_init__()
        if self.lrm_timestep not in LRM_TIMESTEPS:
            raise ValueError(f"lrm_timestep={self.lrm_timestep!r}: use one of {', '.join(LRM_TIMESTEPS)} (parent: "
                             f"the official code; zero: paper Table 22's 'always 0')")


@dataclass(frozen=True)
class SPOConfig(ScaledRewardConfig):
    section: ClassVar[str] = "spo"
    # SPO samples and trains only at t in [0, 750], the SPM's training grid ([FT] Sec. 5.1, Fig. 4).
    timestep_range: tuple[int, int] = (0, 750)


@dataclass(frozen=True)
class GRPOConfig(LPOConfig):
    """Step-wise GRPO's settings: LPO's, with the objective's beta (KL weight) and eps (PPO clip) of [FT] Table 12,
    train_batch_size counted in groups, and `reference`: the pipeline whose UNet is the KL term's reference policy
    (None: the pipeline the policy starts from, its LoRA disabled, as LPO's reference)."""
    section: ClassVar[str] = "grpo"
    objective: str = "grpo"
    beta: float = 0.1
    eps: float = 0.1
    reference: str | None = None
    # Multiples of `rounds` the DAG trains, one run each: LPO's cost and [FT] Table 12's "8x the training time".
    budgets: tuple[int, ...] = (1, 8)

    def __post_init__(self):
        super().__post_init__()
        if not self.budgets or min(self.budgets) < 1:
            raise ValueError(f"grpo.budgets={list(self.budgets)}: give one or more multiples of grpo.rounds, each >= 1")
        if self.objective != "grpo":
            raise ValueError(f"grpo.objective={self.objective!r}: the grpo section trains step-wise GRPO only; "
                             f"set lpo.objective or spo.objective for the others")
        if self.reference is not None and not (Path(self.reference) / "unet" / "config.json").is_file():
            raise ValueError(f"grpo.reference={self.reference!r}: no saved pipeline UNet there (unet/config.json "
                             f"missing); give a pipeline directory saved by a trainer, or null for the base model")


def grpo_runs(budgets) -> dict[str, int]:
    """{run name: multiple of grpo.rounds} of the DAG's GRPO runs: `grpo` at LPO's cost, `grpo_<m>x` at m times."""
    return {"grpo" if m == 1 else f"grpo_{m}x": m for m in budgets}


class UnsupportedModelError(ValueError):
    """A pipeline of a class the trainers do not drive."""


# ---------------------------------------------------------------------------------------------------- rewards

def candidate_prompts(context: StepContext) -> list[str]:
    """Each prompt repeated K times, in the sampler's prompt-major candidate order."""
    return [text for text in context.prompts.text for _ in range(context.samples_per_step)]


class LRMReward:
    """LPO's step reward: the LRM on the noisy candidate latents, times `scale`. The LRM conditions its own UNet from
    the prompts (an SDXL LRM with both text encoders and SDXL's time_ids, `lpo.reward.lrm`), so it needs only the
    texts."""

    def __init__(self, lrm, timestep: str = "parent", scale: float = 1.0):
        if timestep not in LRM_TIMESTEPS:
            raise ValueError(f"lrm_timestep={timestep!r}: use one of {', '.join(LRM_TIMESTEPS)}")
        self.lrm, self.timestep, self.scale = lrm.eval().requires_grad_(False), timestep, scale

    @torch.no_grad()
    def __call__(self, candidates: torch.Tensor, t_cur: int, context: StepContext) -> torch.Tensor:
        t = {"parent": t_cur, "candidate": context.t_next, "zero": 0}[self.timestep]
        timesteps = torch.full((len(candidates),), t, device=candidates.device)
        return self.scale * self.lrm.score(candidates, timesteps, candidate_prompts(context))


class SPMReward:
    """SPO's step reward: the SPM on the decoded predicted clean image of each candidate, at its own timestep,
    times `scale`."""

    def __init__(self, spm, scale: float = 1.0):
        self.spm, self.scale = spm, scale

    @torch.no_grad()
    def __call__(self, candidates: torch.Tensor, t_cur: int, context: StepContext) -> torch.Tensor:
        timesteps = torch.full((len(candidates),), context.t_next, device=candidates.device)
        return self.scale * self.spm.score_clean_latents(context.candidate_x0(), timesteps,
                                                         candidate_prompts(context))


# ---------------------------------------------------------------------------------------------------- inputs

def training_prompts(prompts_path: str | os.PathLike, prompt_set: str = TRAINING_PROMPTS) -> list[str]:
    """The prompts of one set of a world's prompt file (`lpo world prompts`: a JSON object of named lists)."""
    path = require_exists(prompts_path, "prompt file", "run the `world prompts` stage")
    try:
        sets = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"prompt file '{path}' is empty or not JSON ({e}): run the `world prompts` stage "
                         f"again") from e
    if not isinstance(sets, dict) or prompt_set not in sets:
        names = ", ".join(sets) if isinstance(sets, dict) else type(sets).__name__
        raise ValueError(f"prompt file '{path}' has no prompt set '{prompt_set}' (it has: {names or 'nothing'})")
    prompts = sets[prompt_set]
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError(f"prompt set '{prompt_set}' in '{path}' must be a non-empty list of non-empty prompts")
    return prompts


def check_supported(pipeline_dir: str | os.PathLike) -> None:
    """Refuse, before any work, a pipeline of a class other than StableDiffusionPipeline and
    StableDiffusionXLPipeline: the trainers condition the UNet as those two encode prompts."""
    root = Path(pipeline_dir)
    if not (root / "model_index.json").is_file():
        return  # the trainers' loader names the missing pipeline
    try:
        pipeline_class(root)
    except ValueError as e:
        raise UnsupportedModelError(f"{e}: LPO, SPO and Diffusion-DPO train SD1.5/SD2.x-type and SDXL-type "
                                    f"text-to-image pipelines only") from e


def directory_digest(path: str | os.PathLike) -> str:
    """A digest of every file under `path`: a reward model retrained in place invalidates old checkpoints."""
    digest = hashlib.sha256()
    root = Path(path)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(root)).encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def reward_training_seconds(metrics_paths: dict[str, str | os.PathLike]) -> dict[str, float]:
    """{reward model: seconds} from each reward model's training metrics (`train_seconds`)."""
    out = {}
    for name, path in metrics_paths.items():
        metrics = read_json(path, f"the {name} training metrics", f"train the {name} first")
        if "train_seconds" not in metrics:
            raise ValueError(f"'{path}' has no train_seconds: not the metrics of a reward-model training")
        out[name] = float(metrics["train_seconds"])
    return out


def _with_cost(metrics: dict, reward_seconds: dict[str, float], metrics_path) -> dict:
    """The trainer's metrics plus the cost summary of [FT] Table 6: reward modelling and preference
    optimisation, in device-seconds."""
    optimisation = float(sum(metrics["device_seconds"].values()))
    metrics = {**metrics, "cost": {"reward_models": reward_seconds,
                                   "reward_modelling_seconds": float(sum(reward_seconds.values())),
                                   "preference_optimisation_seconds": optimisation}}
    if metrics_path is not None:
        write_json(metrics_path, metrics)
    return metrics


def _device() -> torch.device:
    return process_state().device


# ---------------------------------------------------------------------------------------------------- training

def train_lpo(pipeline_dir, prompts_path, lrm_dir, config: LPOConfig, seed: int, out_dir, metrics_path=None,
              lrm_metrics=None, reference_dir=None) -> dict:
    """LPO: step-level DPO of the pipeline's UNet against the LRM (or, with a GRPOConfig, step-wise GRPO); writes
    the merged pipeline to `out_dir`. `reference_dir`: see train_step_po."""
    from lpo.reward.lrm import LatentRewardModel
    prompts = training_prompts(prompts_path)
    check_supported(pipeline_dir)
    seconds = reward_training_seconds({"lrm": lrm_metrics}) if lrm_metrics else {}
    lrm = LatentRewardModel.load(lrm_dir, tokenizer_dir=pipeline_dir).to(_device())
    reward = LRMReward(lrm, config.lrm_timestep, config.reward_scale)
    metrics = train_step_po(pipeline_dir, prompts, reward, config, seed, out_dir, None,
                            reward_id=f"lrm:{directory_digest(lrm_dir)}", reference_dir=reference_dir)
    return _with_cost(metrics, seconds, metrics_path)


def train_grpo(pipeline_dir, prompts_path, lrm_dir, config: GRPOConfig, seed: int, out_dir, metrics_path=None,
               lrm_metrics=None) -> dict:
    """Step-wise GRPO: LPO's sampler and LRM reward with the GRPO objective, against `config.reference`."""
    return train_lpo(pipeline_dir, prompts_path, lrm_dir, config, seed, out_dir, metrics_path, lrm_metrics,
                     config.reference)


def train_spo(pipeline_dir, prompts_path, spm_dir, config: SPOConfig, seed: int, out_dir, metrics_path=None,
              spm_metrics=None) -> dict:
    """SPO: step-level DPO against the SPM (the frozen base pipeline's VAE decodes the policy's x0_hat)."""
    from lpo.reward.spm import SPM
    prompts = training_prompts(prompts_path)
    check_supported(pipeline_dir)
    seconds = reward_training_seconds({"spm": spm_metrics}) if spm_metrics else {}
    # The SPM decodes the policy's x0_hat with the frozen base VAE and scores it with its own pixel model, so an
    # SDXL-type model needs nothing more: the sampler computes x0_hat with SDXL's added conditions.
    spm = SPM.load(spm_dir, load_pipeline(pipeline_dir).to(_device()))
    reward = SPMReward(spm, config.reward_scale)
    metrics = train_step_po(pipeline_dir, prompts, reward, config, seed, out_dir, None,
                            reward_id=f"spm:{directory_digest(spm_dir)}")
    return _with_cost(metrics, seconds, metrics_path)


def train_dpo(pipeline_dir, preferences_dir, config: DiffusionDPOConfig, seed: int, out_dir, metrics_path=None
              ) -> dict:
    """Diffusion-DPO on every decided pair of the preference dataset's train split (no reward model)."""
    from lpo.preference_data import load_pairs
    check_supported(pipeline_dir)
    pairs = load_pairs(preferences_dir, TRAINING_PROMPTS)
    if not len(pairs):
        raise ValueError(f"the train split of '{preferences_dir}' has no labelled pairs: nothing to train on")
    metrics = train_diffusion_dpo(pipeline_dir, pairs.images_0, pairs.images_1, pairs.captions,
                                  np.asarray(pairs.label_0), config, seed, out_dir, None)
    return _with_cost(metrics, {}, metrics_path)
