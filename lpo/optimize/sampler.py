"""The step-level sampler shared by LPO and SPO ([FT] Sec. 4.3; SPO's step-wise resampler).

One function, `sample_step_pairs`, runs DDIM with eta = 1 from noise to a clean latent. At every step inside the
optimised timestep range it draws K candidates x'_k = mu + sigma_t z_k around the step's mean, scores them with a
reward callable, keeps (parent, best, worst) when the two-way softmax of the best and worst scores separates them
by more than th(t_cur), and continues from a uniformly random candidate whatever the scores. LPO and SPO differ only
in the reward they pass (see `StepReward`) and their settings (SPO optimises t <= 750 only).

Conventions: candidates are ordered prompt-major (row b * K + k belongs to prompt b); each prompt row has its own
generator, so a row's trajectory does not depend on which other prompts share its batch or process. Every UNet pass
takes the prompts' `Conditioning`, which carries SDXL's added conditions for SDXL-type UNets.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from lpo.optimize.threshold import DDIMSteps

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class Conditioning:
    """The prompt conditioning of a UNet for a batch of rows, as the UNet's keyword arguments take it.

    encoder_hidden_states (B, L, D); added_cond_kwargs only for UNets with added conditions (SDXL's
    addition_embed_type "text_time": text_embeds (B, P), the pooled text_encoder_2 output, and time_ids (B, 6),
    original size, crop top-left and target size). A plain tensor stands for encoder_hidden_states alone.
    """
    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None

    @staticmethod
    def of(value: Conditioning | torch.Tensor) -> Conditioning:
        return value if isinstance(value, Conditioning) else Conditioning(value)

    def __len__(self) -> int:
        return len(self.encoder_hidden_states)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Conditioning:
        """The same conditioning with `fn` applied to every tensor (row selection, repetition)."""
        added = {key: fn(value) for key, value in self.added_cond_kwargs.items()} if self.added_cond_kwargs else None
        return Conditioning(fn(self.encoder_hidden_states), added)

    def expand(self, rows: int) -> Conditioning:
        """A one-row conditioning (the null prompt's) broadcast to `rows` rows without copying."""
        return self.map(lambda t: t.expand(rows, *t.shape[1:]))

    def repeat_interleave(self, repeats: int) -> Conditioning:
        return self.map(lambda t: t.repeat_interleave(repeats, dim=0))

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        states = torch.cat([p.encoder_hidden_states for p in parts])
        if parts[0].added_cond_kwargs is None:
            return Conditioning(states)
        return Conditioning(states, {key: torch.cat([p.added_cond_kwargs[key] for p in parts])
                                     for key in parts[0].added_cond_kwargs})

    def kwargs(self) -> dict:
        return {"encoder_hidden_states": self.encoder_hidden_states, "added_cond_kwargs": self.added_cond_kwargs}


@dataclass(frozen=True)
class PromptBatch:
    """The prompts of one sampling batch and their UNet conditioning."""
    text: list[str]
    index: torch.Tensor   # (B,) int64, position of each prompt in the training prompt list
    cond: Conditioning    # B rows
    null: Conditioning    # one row: the empty prompt's, for classifier-free guidance


def cfg_noise(unet, x: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning | torch.Tensor,
              null: Conditioning | torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """The classifier-free-guided UNet output for latents x (B, ...) at per-row timesteps (B,); `cond` has B rows,
    `null` one."""
    cond, null = Conditioning.of(cond), Conditioning.of(null)
    if guidance_scale == 1:
        return unet(x, timesteps, **cond.kwargs()).sample
    both = Conditioning.cat([null.expand(len(x)), cond])
    uncond, guided = unet(torch.cat([x, x]), torch.cat([timesteps, timesteps]), **both.kwargs()).sample.chunk(2)
    return uncond + guidance_scale * (guided - uncond)


def ddim_mean(x: torch.Tensor, model_output: torch.Tensor, alpha: torch.Tensor, alpha_prev: torch.Tensor,
              sigma: torch.Tensor, prediction_type: str = "epsilon") -> tuple[torch.Tensor, torch.Tensor]:
    """(mean of x_prev, predicted x0) of the DDIM step from x; alpha, alpha_prev, sigma broadcast against x."""
    if prediction_type == "epsilon":
        x0 = (x - (1 - alpha).sqrt() * model_output) / alpha.sqrt()
        eps = model_output
    else:  # v_prediction
        x0 = alpha.sqrt() * x - (1 - alpha).sqrt() * model_output
        eps = alpha.sqrt() * model_output + (1 - alpha).sqrt() * x
    direction = (1 - alpha_prev - sigma ** 2).clamp(min=0).sqrt() * eps
    return alpha_prev.sqrt() * x0 + direction, x0


def step_log_prob(x_prev: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """(P,) log N(x_prev; mean, sigma^2 I) of the DDIM eta = 1 step, averaged over each latent's elements."""
    log_density = -(x_prev.detach() - mean) ** 2 / (2 * sigma ** 2) - sigma.log() - LOG_SQRT_2PI
    return log_density.flatten(1).mean(dim=1)


def step_distribution(unet, steps: DDIMSteps, parent: torch.Tensor, step: torch.Tensor,
                      cond: Conditioning | torch.Tensor, null: Conditioning | torch.Tensor, guidance_scale: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, sigma) of the eta = 1 DDIM step from each parent (P, C, H, W) under `unet`: the Gaussian the sampler
    draws the step's candidates from. step: (P,) indices into `steps`; cond: P rows, null: one."""
    timesteps = steps.timesteps[step.cpu()].to(parent.device)
    noise = cfg_noise(unet, parent, timesteps, cond, null, guidance_scale)
    alpha, alpha_prev, sigma = step_coefficients(steps, step, parent)
    return ddim_mean(parent, noise, alpha, alpha_prev, sigma, steps.prediction_type)[0], sigma


def step_coefficients(steps: DDIMSteps, index: torch.Tensor, like: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """alpha, alpha_prev, sigma of steps `index` (any shape), shaped to broadcast over `like`'s trailing dims."""
    shape = (*index.shape, *(1,) * (like.dim() - index.dim()))
    return tuple(getattr(steps, name)[index.cpu()].to(like).reshape(shape)
                 for name in ("alpha", "alpha_prev", "sigma"))


@dataclass
class StepContext:
    """What a reward may need about the step whose candidates it scores.

    t_next is the candidates' own timestep (t_cur - T/N; 0 on the last step, whose candidates are the final
    latents). `candidate_x0()` is SPO's input: the predicted clean latent of each candidate, from one guided UNet
    pass at t_next; the sampler reuses that pass to denoise the candidate that continues, as SPO's pipeline does.
    """
    t_next: int
    parent: torch.Tensor        # (B, C, H, W)
    parent_x0: torch.Tensor     # (B, C, H, W) predicted x0 of the parent
    prompts: PromptBatch
    samples_per_step: int
    _candidates: torch.Tensor = field(repr=False)
    _denoise: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]] | None = field(repr=False)
    _noise: torch.Tensor | None = field(default=None, repr=False)
    _x0: torch.Tensor | None = field(default=None, repr=False)

    def candidate_x0(self) -> torch.Tensor:
        """(B*K, C, H, W) predicted clean latent of every candidate; computed once per step."""
        if self._denoise is None:
            return self._candidates
        if self._x0 is None:
            self._noise, self._x0 = self._denoise(self._candidates, self.t_next)
        return self._x0


class StepReward(Protocol):
    """Scores (B*K,) for candidate latents (B*K, C, H, W) of a step from t_cur (the parent's timestep).

    LPO: the LRM on the noisy candidates; the official code passes t_cur, the parent's timestep (context.t_next
    is the candidates' own). SPO: the SPM on the VAE-decoded context.candidate_x0() at context.t_next.
    """

    def __call__(self, candidates: torch.Tensor, t_cur: int, context: StepContext) -> torch.Tensor: ...


@dataclass
class StepSamples:
    """The kept (parent, winner, loser) tuples of one sampling batch, P of them, and per-step statistics."""
    parent: torch.Tensor           # (P, C, H, W) x at t_cur
    winner: torch.Tensor           # (P, C, H, W) best-scored candidate
    loser: torch.Tensor            # (P, C, H, W) worst-scored candidate
    step: torch.Tensor             # (P,) int64, index into the DDIMSteps
    timestep: torch.Tensor         # (P,) int64, t_cur
    prompt: torch.Tensor           # (P,) int64, index into the training prompt list
    row: torch.Tensor              # (P,) int64, row of the prompt in this batch
    kept: torch.Tensor             # (N,) int64, pairs kept at each step
    probability_gap: torch.Tensor  # (N, B) softmax p_max - p_min of each row; NaN at steps not optimised
    final: torch.Tensor            # (B, C, H, W) the clean latents the batch ended with
    reward_seconds: float          # time spent inside the reward, candidate_x0 included
    groups: StepGroups | None = None  # every optimised step's K candidates, when asked for (GRPO)


@dataclass
class StepGroups:
    """Every row's K candidates at every optimised step, G = rows x optimised steps groups (row-major by step)."""
    parent: torch.Tensor      # (G, C, H, W) x at t_cur, shared by the group
    candidates: torch.Tensor  # (G, K, C, H, W)
    scores: torch.Tensor      # (G, K) the reward's scores
    log_prob: torch.Tensor    # (G, K) each candidate's step log-density under the sampling policy (step_log_prob)
    step: torch.Tensor        # (G,) int64, index into the DDIMSteps
    prompt: torch.Tensor      # (G,) int64, index into the training prompt list
    row: torch.Tensor         # (G,) int64, row of the prompt in this batch


def device_clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _draw(generators: list[torch.Generator], shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(like)


@torch.no_grad()
def sample_step_pairs(unet, x: torch.Tensor, steps: DDIMSteps, prompts: PromptBatch, reward: StepReward,
                      thresholds: torch.Tensor, optimised: torch.Tensor, *, samples_per_step: int = 4,
                      guidance_scale: float = 5.0, generators: list[torch.Generator],
                      keep_groups: bool = False) -> StepSamples:
    """Sample from the initial noise x (B, C, H, W) through every step of `steps` and collect the pairs.

    thresholds (N,): th(t_cur) of each step; optimised (N,) bool: steps whose candidates are drawn, scored and
    kept (the others take one plain eta = 1 step); generators: one per row of x; keep_groups: also return every
    optimised step's K candidates with their scores and sampling log-densities (`StepGroups`). The trajectory and
    the pairs are the same either way.
    """
    if samples_per_step < 2:
        raise ValueError(f"samples_per_step={samples_per_step}: K must be >= 2 to form a winner and a loser")
    if keep_groups and not bool(optimised.any()):
        raise ValueError("keep_groups needs an optimised step: no step draws a candidate group")
    batch, k = len(x), samples_per_step
    if len(generators) != batch or len(prompts.text) != batch or len(prompts.cond) != batch:
        raise ValueError(f"{batch} latents but {len(prompts.text)} prompts, {len(prompts.cond)} conditioning rows "
                         f"and {len(generators)} generators")
    rows = torch.arange(batch, device=x.device)

    kept_tuples: list[tuple] = []
    groups: list[tuple] = []
    kept = torch.zeros(len(steps), dtype=torch.long)
    gaps = torch.full((len(steps), batch), float("nan"))
    reward_seconds, noise = 0.0, None
    for i in range(len(steps)):
        t_cur = int(steps.timesteps[i])
        alpha, alpha_prev, sigma = step_coefficients(steps, torch.tensor(i), x[0])
        if noise is None:
            noise = cfg_noise(unet, x, torch.full((batch,), t_cur, device=x.device), prompts.cond, prompts.null,
                              guidance_scale)
        mean, x0 = ddim_mean(x, noise, alpha, alpha_prev, sigma, steps.prediction_type)
        if not optimised[i]:
            x, noise = mean + sigma * _draw(generators, x.shape[1:], x), None
            continue

        candidates = mean[:, None] + sigma * _draw(generators, (k, *x.shape[1:]), x)  # (B, K, C, H, W)
        last = i == len(steps) - 1
        t_next = max(int(steps.prev_timesteps[i]), 0)
        context = StepContext(t_next, x, x0, prompts, k, candidates.flatten(0, 1),
                              None if last else _x0_predictor(unet, prompts, guidance_scale, alpha_prev,
                                                              steps.prediction_type))
        start = device_clock(x.device)
        scores = reward(candidates.flatten(0, 1), t_cur, context)
        reward_seconds += device_clock(x.device) - start
        scores = _check_scores(scores, candidates, t_cur).view(batch, k)

        if keep_groups:
            log_prob = step_log_prob(candidates.flatten(0, 1), mean.repeat_interleave(k, 0), sigma).view(batch, k)
            groups.append((x, candidates, scores, log_prob, torch.full((batch,), i), prompts.index.cpu(), rows.cpu()))

        best, worst = scores.argmax(1), scores.argmin(1)
        pair = torch.stack([scores[rows, best], scores[rows, worst]], dim=1).softmax(dim=1)
        gap = (pair[:, 0] - pair[:, 1]).double().cpu()
        keep = gap > float(thresholds[i])
        gaps[i], kept[i] = gap, int(keep.sum())
        if keep.any():
            sel = rows[keep.to(x.device)]
            kept_tuples.append((x[sel], candidates[sel, best[sel]], candidates[sel, worst[sel]],
                                torch.full((len(sel),), i), prompts.index.cpu()[sel.cpu()], sel.cpu()))

        choice = torch.cat([torch.randint(k, (1,), generator=g) for g in generators]).to(x.device)
        x = candidates[rows, choice]
        reuse = context._noise is not None and not last and int(steps.timesteps[i + 1]) == t_next
        noise = context._noise.view(batch, k, *x.shape[1:])[rows, choice] if reuse else None

    samples = _collect(kept_tuples, steps, kept, gaps, x, reward_seconds)
    if keep_groups:
        samples.groups = StepGroups(*(torch.cat(parts) for parts in zip(*groups)))
    return samples


def _x0_predictor(unet, prompts: PromptBatch, guidance_scale: float, alpha_next: torch.Tensor,
                  prediction_type: str) -> Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]:
    """(noise, x0) of candidates at their timestep t_next, whose cumulative alpha is the step's alpha_prev."""

    def predict(candidates: torch.Tensor, t_next: int) -> tuple[torch.Tensor, torch.Tensor]:
        repeats = len(candidates) // len(prompts.text)
        timesteps = torch.full((len(candidates),), t_next, device=candidates.device)
        noise = cfg_noise(unet, candidates, timesteps, prompts.cond.repeat_interleave(repeats), prompts.null,
                          guidance_scale)
        zero = torch.zeros_like(alpha_next)
        return noise, ddim_mean(candidates, noise, alpha_next, zero, zero, prediction_type)[1]

    return predict


def _check_scores(scores: torch.Tensor, candidates: torch.Tensor, t_cur: int) -> torch.Tensor:
    """The reward's scores of `candidates` (B, K, ...) as floats, or an error saying whose fault a bad one is."""
    expected = candidates.shape[0] * candidates.shape[1]
    if not isinstance(scores, torch.Tensor) or scores.shape != (expected,):
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"the reward returned {shape} at t_cur={t_cur}; expected a tensor of shape ({expected},), "
                         f"one score per candidate, prompt-major")
    if not torch.isfinite(scores).all():
        # A reward fed non-finite latents scores them non-finite through no fault of its own: the model being
        # sampled (in LPO / SPO, the policy being trained) diverged.
        if not torch.isfinite(candidates).all():
            raise ValueError(f"the sampled candidates at t_cur={t_cur} are non-finite, so their rewards are too: the "
                             f"policy diverged. Lower the trainer's learning_rate (lpo.learning_rate or "
                             f"spo.learning_rate; or its beta), or check the model being sampled")
        raise ValueError(f"the reward returned non-finite scores at t_cur={t_cur} for finite candidates: check the "
                         f"reward model")
    return scores.float()


def _collect(kept_tuples: list[tuple], steps: DDIMSteps, kept: torch.Tensor, gaps: torch.Tensor,
             final: torch.Tensor, reward_seconds: float) -> StepSamples:
    if kept_tuples:
        parent, winner, loser, step, prompt, row = (torch.cat(parts) for parts in zip(*kept_tuples))
    else:
        empty = final[:0]
        parent, winner, loser = empty, empty.clone(), empty.clone()
        step = prompt = row = torch.zeros(0, dtype=torch.long)
    return StepSamples(parent, winner, loser, step, steps.timesteps[step], prompt, row, kept, gaps, final,
                       reward_seconds)
