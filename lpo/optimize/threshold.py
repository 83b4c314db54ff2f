"""The DDIM eta = 1 step schedule and LPO's dynamic threshold ([FT] Eq. 12).

A candidate pair is kept when the winner's two-way softmax probability exceeds the loser's by more than th(t).
Noisier steps (larger sigma_t) get a larger threshold: th(t) = th_min + (s_t - s_min) / (s_max - s_min) *
(th_max - th_min), where s_t is sigma_t ("sigma", the paper's default), sigma_t^2 ("variance") or t ("linear"),
and min / max run over the schedule's steps. The official code pastes the SD schedule's sigma table; here it is
computed from the scheduler config, so any model's schedule gets its own (the SD1.5 table is reproduced exactly).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from diffusers import DDIMScheduler

STRATEGIES = ("constant", "sigma", "variance", "linear")
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class DDIMSteps:
    """Per-step coefficients of DDIM sampling with eta = 1, in sampling order (t_cur descending).

    alpha / alpha_prev are the cumulative alphas at t_cur and at prev_timestep = t_cur - T / N; the last step's
    alpha_prev is the scheduler's final_alpha_cumprod (alphas_cumprod[0] when set_alpha_to_one is False).
    """
    timesteps: torch.Tensor        # (N,) int64, t_cur of each step
    prev_timesteps: torch.Tensor   # (N,) int64, negative on the last step
    alpha: torch.Tensor            # (N,) float64
    alpha_prev: torch.Tensor       # (N,) float64
    sigma: torch.Tensor            # (N,) float64, the eta = 1 standard deviation of each step
    steps_offset: int              # t_cur - steps_offset is the paper's grid {0, 50, ..., 950}
    prediction_type: str

    def __len__(self) -> int:
        return len(self.timesteps)


def ddim_steps(scheduler_config: Mapping[str, Any], num_inference_steps: int) -> DDIMSteps:
    """The DDIM eta = 1 schedule a diffusers DDIMScheduler with this config would sample with."""
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps={num_inference_steps} must be >= 1")
    scheduler = DDIMScheduler.from_config(dict(scheduler_config))
    config = scheduler.config
    if config.clip_sample or config.thresholding:
        raise ValueError("scheduler config has clip_sample or thresholding on: the step log-probability assumes "
                         "the unclipped DDIM mean; set clip_sample=False and thresholding=False (SD's configs do)")
    if config.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"scheduler config prediction_type={config.prediction_type!r} is not supported: use one "
                         f"of {', '.join(PREDICTION_TYPES)}")
    scheduler.set_timesteps(num_inference_steps)
    timesteps = scheduler.timesteps.long()
    prev = timesteps - config.num_train_timesteps // num_inference_steps  # as DDIMScheduler.step computes it
    alphas_cumprod = scheduler.alphas_cumprod.double()
    alpha = alphas_cumprod[timesteps]
    alpha_prev = torch.where(prev >= 0, alphas_cumprod[prev.clamp(min=0)],
                             torch.tensor(float(scheduler.final_alpha_cumprod), dtype=torch.float64))
    variance = (1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)
    return DDIMSteps(timesteps, prev, alpha, alpha_prev, variance.sqrt(), int(config.steps_offset),
                     str(config.prediction_type))


def check_threshold(strategy: str, threshold_min: float, threshold_max: float) -> None:
    """Raise naming the config key when the threshold settings cannot be used."""
    if strategy not in STRATEGIES:
        raise ValueError(f"threshold={strategy!r} is not a threshold strategy: use one of {', '.join(STRATEGIES)}")
    for key, value in (("threshold_min", threshold_min), ("threshold_max", threshold_max)):
        # p_max - p_min of a two-way softmax lies in [0, 1): 0 keeps every distinct pair, 1 none.
        if not 0 < value < 1:
            raise ValueError(f"{key}={value} must lie in (0, 1): it is compared with the winner's minus the "
                             f"loser's softmax probability")
    if threshold_min > threshold_max:
        raise ValueError(f"threshold_min={threshold_min} > threshold_max={threshold_max}: swap them")
    if strategy == "constant" and threshold_min != threshold_max:
        raise ValueError(f"threshold='constant' uses one value, but threshold_min={threshold_min} != "
                         f"threshold_max={threshold_max}: set both to the constant")


def threshold_schedule(steps: DDIMSteps, strategy: str, threshold_min: float, threshold_max: float
                       ) -> torch.Tensor:
    """th(t_cur) for every step of `steps`, (N,) float64."""
    check_threshold(strategy, threshold_min, threshold_max)
    source = {"constant": torch.zeros_like(steps.sigma), "sigma": steps.sigma, "variance": steps.sigma ** 2,
              "linear": steps.timesteps.double()}[strategy]
    spread = source.max() - source.min()
    position = (source - source.min()) / spread if spread > 0 else torch.zeros_like(source)
    return threshold_min + position * (threshold_max - threshold_min)
