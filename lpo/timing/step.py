"""The timed sampling step: its settings (TimingConfig), its parts, the timer and the measurement that makes one row
of the paper's Table 5 ([FT]: "time of each sampling step on a single A100").

The parts of one step from x_{t+1} of one prompt (t_cur = 451, the middle of the 20-step DDIM grid; costs do not
depend on t), each timed alone on fixed, seeded inputs (PART_DOCS says what each runs): the denoising step, which both
methods pay once; the x0 prediction and the VAE decoding of the K candidates, which only the SPM needs; and each
reward model on the K candidates (the SPM's pixel model on the decoded images, the LRM on the noisy latents).

Batch: the K candidates of one prompt run as one batch, as the sampler scores them; a per-candidate time is the
batch's time / K, so the table's "K x part" equals the measured batch. Totals follow the paper's accounting:
SPM = denoise + K (x0 + decode + reward), LRM = denoise + K reward. Not counted (Table 5 has no column for them):
encoding the prompt for the policy (once per trajectory), picking the winner and loser, and the saving of a sampler
that reuses the continuing candidate's x0 pass as the next step's denoising pass (lpo.optimize.sampler does, for SPO).

Noise ensembling (lpo.reward.study): the LRM's score of a clean latent at t as the mean over M independent
re-noisings, i.e. M LRM passes. For each M of `timing.ensemble_draws` the step's LRM reward is also timed M-fold: the
M re-noisings of the K candidates' clean latents at t_cur (the candidates' seeded latents stand in for them) and the
LRM over the M*K rows as one batch, as a scorer batches them; the LRM step is then denoise + that M-fold reward. M = 1
is the LRM reward above, the candidate as drawn (the sampler's one noising), so its row is Table 5's LRM row. Not
counted: where the clean latents come from (the reward study holds them; a sampler holding only x_t would first pay
the x0 prediction).

Timing: `warmup` untimed calls, then the median of `repeats` timed calls: CUDA events on a GPU (the events queue
behind the calls, so host overhead counts only where the GPU waits for it), time.perf_counter on the CPU.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lpo.optimize.sampler import cfg_noise, ddim_mean, step_coefficients
from lpo.optimize.threshold import ddim_steps
from lpo.reward.spm import decode_latents
from lpo.timing.models import PROMPT, StepModels

INFERENCE_STEPS = 20          # the paper's DDIM steps; the step timed is the middle one (t_cur = 451 for SD)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# What each timed part runs (the report's "what each column includes").
PART_DOCS = {
    "denoise": "one guided UNet pass over the prompt's latent x_{t+1} (2 rows with CFG), DDIM's eta = 1 mean and "
               "the K candidates drawn around it.",
    "x0_prediction": "one guided UNet pass over the K candidates (2K rows) at their timestep, then DDIM's x̂_0 "
                     "formula.",
    "vae_decoding": "the VAE decoder on the K predicted clean latents.",
    "spm_reward": "the step-aware pixel model on the K decoded images, its text tower on the prompt included.",
    "lrm_reward": "the LRM's text encoder (K prompt rows + the empty prompt), the UNet's down and mid blocks over "
                  "2K rows (VFE's conditional and unconditional passes batched) and the reward head, on the K "
                  "noisy candidates.",
    "lrm_ensembling": "M re-noisings of each of the K candidates' clean latents at the LRM's timestep "
                      "(sqrt(ᾱ) x_0 + sqrt(1 − ᾱ) ε, ε fixed and seeded), the LRM on the M·K rows as one batch "
                      "(its text encoder on M·K prompt rows, the down and mid blocks over 2MK rows with VFE, the "
                      "reward head) and each candidate's mean over its M draws; M = 1 is the LRM reward above, "
                      "unchanged.",
}


@dataclass(frozen=True)
class TimingConfig:
    samples_per_step: int = 4     # K, as the paper's Table 5 and LPO's sampler
    guidance_scale: float = 5.0   # CFG of the denoising and x0 passes (LPO's and SPO's SD1.5 sampling)
    warmup: int = 3               # untimed calls before each part
    repeats: int = 20             # timed calls per part; the median is reported
    dtype: str = "auto"           # auto: float16 on CUDA (LPO's official code samples in fp16), float32 on CPU
    ensemble_draws: tuple[int, ...] = (1, 4, 16)  # M of the LRM's noise ensembling, each timed as M LRM passes

    def __post_init__(self):
        if self.samples_per_step < 2:
            raise ValueError(f"timing.samples_per_step={self.samples_per_step}: K must be >= 2 (a winner and a "
                             f"loser per step)")
        if self.guidance_scale < 1:
            raise ValueError(f"timing.guidance_scale={self.guidance_scale} must be >= 1 (1: no guidance)")
        if self.warmup < 0 or self.repeats < 1:
            raise ValueError(f"timing.warmup={self.warmup} must be >= 0 and timing.repeats={self.repeats} >= 1")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"timing.dtype={self.dtype!r}: use auto or one of {', '.join(DTYPES)}")
        draws = list(self.ensemble_draws)
        if not draws:
            raise ValueError("timing.ensemble_draws=[]: name at least one M (1: no ensembling)")
        if not all(isinstance(m, int) and m >= 1 for m in draws):
            raise ValueError(f"timing.ensemble_draws={draws}: every M must be >= 1 (M LRM passes per reward; "
                             f"1: no ensembling)")
        if len(set(draws)) != len(draws):
            raise ValueError(f"timing.ensemble_draws={draws}: name each M once")

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float16 if device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]


# ---------------------------------------------------------------------------------------------------- parts

class StepParts:
    """The calls of one sampling step on fixed, seeded inputs: the prompt's latent x_{t+1} at t_cur and K candidates
    at t_next (random latents: the cost does not depend on their values)."""

    def __init__(self, models: StepModels, samples_per_step: int, guidance_scale: float, seed: int = 0):
        self.models, self.k, self.guidance_scale, self.seed = models, samples_per_step, guidance_scale, seed
        device, dtype, shape = models.device, models.dtype, models.latent_shape
        steps = ddim_steps(models.scheduler.config, INFERENCE_STEPS)
        i = INFERENCE_STEPS // 2
        self.t_cur, t_next = int(steps.timesteps[i]), int(steps.prev_timesteps[i])
        self.prediction_type = steps.prediction_type
        generator = torch.Generator().manual_seed(seed)
        self.parent = torch.randn((1, *shape), generator=generator).to(device, dtype)
        self.candidates = torch.randn((self.k, *shape), generator=generator).to(device, dtype)
        self.alpha, self.alpha_prev, self.sigma = step_coefficients(steps, torch.tensor(i), self.parent[0])
        self.noise = torch.Generator(device).manual_seed(seed)
        self.cur = torch.full((1,), self.t_cur, device=device)
        self.next = torch.full((self.k,), t_next, device=device)
        self.lrm_ids = models.lrm.tokenize([PROMPT] * self.k)

    def denoise(self) -> torch.Tensor:
        """x_{t+1} -> the K candidates x_t^k = mu + sigma z_k."""
        m = self.models
        noise = cfg_noise(m.unet, self.parent, self.cur, m.cond, m.null, self.guidance_scale)
        mean, _ = ddim_mean(self.parent, noise, self.alpha, self.alpha_prev, self.sigma, self.prediction_type)
        z = torch.randn((self.k, *self.parent.shape[1:]), generator=self.noise, device=mean.device, dtype=mean.dtype)
        return mean + self.sigma * z

    def x0_prediction(self, candidates: torch.Tensor) -> torch.Tensor:
        """Predicted clean latents of the candidates at their own timestep, as lpo.optimize.sampler computes SPO's
        input."""
        m = self.models
        noise = cfg_noise(m.unet, candidates, self.next, m.cond.expand(len(candidates)), m.null,
                          self.guidance_scale)
        zero = torch.zeros_like(self.alpha_prev)
        return ddim_mean(candidates, noise, self.alpha_prev, zero, zero, self.prediction_type)[1]

    def vae_decoding(self, x0: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.models.vae, x0)

    def spm_reward(self, images: torch.Tensor) -> torch.Tensor:
        return self.models.spm_reward(images, self.next)

    def lrm_reward(self, candidates: torch.Tensor) -> torch.Tensor:
        # The LRM is called with t_cur, the parent's timestep, as the official sampler does.
        return self.models.lrm(candidates, self.t_cur, **self.lrm_ids)

    def ensemble_inputs(self, draws: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """What M-fold ensembling adds to the clean latents, fixed like every part's inputs: M seeded noises per
        candidate and the prompt's ids, for M*K rows (draw-major: row d*K + k is candidate k's draw d)."""
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.randn((draws * self.k, *self.candidates.shape[1:]), generator=generator)
        return noise.to(self.candidates), {name: ids.repeat(draws, 1) for name, ids in self.lrm_ids.items()}

    def lrm_ensemble_reward(self, x0: torch.Tensor, noise: torch.Tensor, ids: dict[str, torch.Tensor]
                            ) -> torch.Tensor:
        """Noise ensembling's reward of the K clean latents x0 at t_cur: each re-noised M = len(noise) / K times,
        the LRM on the M*K rows as one batch, the mean over each candidate's M draws."""
        draws = len(noise) // self.k
        noisy = self.alpha.sqrt() * x0.repeat(draws, 1, 1, 1) + (1 - self.alpha).sqrt() * noise
        return self.models.lrm(noisy, self.t_cur, **ids).reshape(draws, self.k).mean(0)

    def batch_rows(self) -> dict[str, int]:
        """Rows each part's network runs on (guidance and VFE double them)."""
        guided = 1 if self.guidance_scale == 1 else 2
        vfe = 1 if self.models.lrm.config.guidance_scale == 1 else 2
        return {"denoise": guided, "x0_prediction": guided * self.k, "vae_decoding": self.k,
                "spm_reward": self.k, "lrm_reward": vfe * self.k}


# ---------------------------------------------------------------------------------------------------- timing

def time_call(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of fn after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.synchronize()
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(repeats)]
            for start, end in events:
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize()
        return [start.elapsed_time(end) / 1000 for start, end in events]
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


@dataclass(frozen=True)
class PartTiming:
    seconds: tuple[float, ...]
    rows: int                     # rows of the batch its network ran on

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def iqr(self) -> tuple[float, float]:
        if len(self.seconds) < 2:
            return self.seconds[0], self.seconds[0]
        q1, _, q3 = statistics.quantiles(self.seconds, n=4, method="inclusive")
        return q1, q3


@dataclass(frozen=True)
class StepCost:
    """One row of Table 5, in seconds; the per-candidate parts run K times a step."""
    reward_model: str
    denoise: float
    x0_prediction: float
    vae_decoding: float
    reward_prediction: float
    samples_per_step: int

    @property
    def total(self) -> float:
        return self.denoise + self.samples_per_step * (self.x0_prediction + self.vae_decoding +
                                                       self.reward_prediction)


@dataclass(frozen=True)
class EnsembleCost:
    """One row of the noise-ensembling table: the LRM step with M-fold ensembling."""
    draws: int                    # M
    step: StepCost                # its reward prediction is the M-fold reward per candidate
    over_single: float            # its total / the M = 1 step's (Table 5's LRM row)
    over_spm: float               # its total / the SPM step's


@dataclass(frozen=True)
class StepCostMeasurement:
    parts: dict[str, PartTiming]
    samples_per_step: int
    ensembling: dict[int, PartTiming]   # M -> the M-fold LRM reward of the K candidates; M = 1: parts["lrm_reward"]

    def table(self) -> list[StepCost]:
        """[SPM, LRM] from the part medians; per-candidate = batch / K."""
        k, p = self.samples_per_step, {name: t.median for name, t in self.parts.items()}
        return [StepCost("SPM", p["denoise"], p["x0_prediction"] / k, p["vae_decoding"] / k, p["spm_reward"] / k, k),
                StepCost("LRM", p["denoise"], 0.0, 0.0, p["lrm_reward"] / k, k)]

    def ensembling_table(self) -> list[EnsembleCost]:
        """One row per M: denoise + the M-fold reward, in Table 5's accounting, so M = 1 is its LRM row exactly."""
        spm, lrm = self.table()
        rows = []
        for draws, timing in self.ensembling.items():
            step = StepCost("LRM", lrm.denoise, 0.0, 0.0, timing.median / self.samples_per_step,
                            self.samples_per_step)
            rows.append(EnsembleCost(draws, step, step.total / lrm.total, step.total / spm.total))
        return rows


def spm_over_lrm(rows: list[StepCost]) -> float:
    """How many times longer an SPM step takes than an LRM step."""
    total = {r.reward_model: r.total for r in rows}
    return total["SPM"] / total["LRM"]


@torch.no_grad()
def measure_step_cost(models: StepModels, config: TimingConfig, seed: int = 0) -> StepCostMeasurement:
    """Time every part of one step and the LRM reward M-fold for each M of `config.ensemble_draws` (see the module
    docstring) on `models`' device."""
    parts = StepParts(models, config.samples_per_step, config.guidance_scale, seed)
    x0 = parts.x0_prediction(parts.candidates)
    images = parts.vae_decoding(x0)
    calls = {"denoise": parts.denoise,
             "x0_prediction": lambda: parts.x0_prediction(parts.candidates),
             "vae_decoding": lambda: parts.vae_decoding(x0),
             "spm_reward": lambda: parts.spm_reward(images),
             "lrm_reward": lambda: parts.lrm_reward(parts.candidates)}
    rows = parts.batch_rows()

    def timed(fn: Callable[[], object], network_rows: int) -> PartTiming:
        return PartTiming(tuple(time_call(fn, models.device, config.warmup, config.repeats)), network_rows)

    timings = {name: timed(fn, rows[name]) for name, fn in calls.items()}
    ensembling = {}
    for draws in config.ensemble_draws:
        if draws == 1:  # the candidate as drawn: Table 5's LRM reward, not timed twice
            ensembling[draws] = timings["lrm_reward"]
            continue
        noise, ids = parts.ensemble_inputs(draws)
        ensembling[draws] = timed(lambda: parts.lrm_ensemble_reward(parts.candidates, noise, ids),
                                  draws * rows["lrm_reward"])
    return StepCostMeasurement(timings, config.samples_per_step, ensembling)
