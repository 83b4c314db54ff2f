"""Step-level reward fidelity: does a step reward rank a step's candidates as the judge ranks what they become?

LPO trains on the LRM's order of the K candidates x_{t-1} drawn around one parent x_t; the paper measures its reward
models on finished images only ([FT] Table 18). Here the base model samples train prompts with LPO's own step
sampler (`sample_step_pairs`: DDIM eta = 1, the optimisers' CFG, K candidates at every step, a random one
continuing), and every candidate of every step is rolled out to an image by DDIM eta = 0 with the same CFG, so
that its image depends on the candidate alone, and judged. Each reward scores the candidates exactly as its method
does: the LRM the noisy candidates (`LRMReward`, told lpo.lrm_timestep's timestep), the SPM the decoded x0_hat at
the candidates' own timestep (`SPMReward`). Fidelity at a step is the pair accuracy of a reward against the judge's
overall preference of the rollouts, over every candidate pair of a parent whose judge scores differ (a reward tie
counts half), with 95% bootstrap intervals over parents; pooled over steps, over trajectories.

Two LRM variants are scored on the same candidates and rollouts: the noise-calibrated LRM (`LRM (calibrated)`: a
Thurstone likelihood with a FiLM head, scored as the LRM is), and noise ensembling of the LRM (`LRM re-noised (M = m)`,
`RenoisedLRM`): the mean LRM score over M re-noisings sqrt(abar_t) x0_hat + sqrt(1 - abar_t) eps_m of the
candidate's predicted clean latent, at the timestep t the LRM is told. The draws are nested (the M = 4 ensemble
holds the M = 1 draw), so the paired differences between draw counts isolate the averaging; M = 1 against the LRM
itself isolates the re-noising.

step_fidelity.csv, one row per (model, t), then the pooled rows:
  model     a reward (LRM, SPM, LRM (calibrated), LRM re-noised (M = m), chance), or `A - B`: the paired difference of
            two rewards' pair accuracy over the same pairs
  t         the parents' timestep t_cur; empty on pooled rows
  accuracy, low, high   pair accuracy (or its difference) and its 95% bootstrap interval: over parents on a step's
            row, over trajectories on a pooled row
  pairs     candidate pairs whose rollouts the judge orders
  parents   parents holding those pairs (a pooled row counts each trajectory once per step)
  pooled    empty on a step's row; `all`: pooled over every step; `t>=501`: over the steps whose LRM timestep (the
            one lpo.lrm_timestep tells the LRM; t_cur under the default `parent`) is >= 501, the noisy half of the
            schedule where the calibration and ensembling are meant to help
"""
from __future__ import annotations

import datetime
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lpo.images import to_uint8
from lpo.io import atomic_path, require_exists
from lpo.optimize.methods import LPOConfig, LRMReward, SPMReward, SPOConfig, candidate_prompts, training_prompts
from lpo.optimize.sampler import (Conditioning, PromptBatch, StepContext, StepReward, cfg_noise, ddim_mean,
                                  device_clock, sample_step_pairs, step_coefficients)
from lpo.optimize.step_trainer import encode_prompts, load_pipeline, null_conditioning
from lpo.optimize.threshold import DDIMSteps, ddim_steps
from lpo.reward.spm import decode_latents
from lpo.reward.study import CALIBRATED
from lpo.seeding import keyed_generator
from lpo.stats import Estimate, bootstrap
from lpo.tables import markdown, read_csv, write_csv

MODELS = ("LRM", "SPM")  # the rewards the reward study measures too
RENOISED = "LRM re-noised"  # the recorder's key of RenoisedLRM's per-draw scores, which become one row per M
CHANCE = "chance"
HIGH_T = 501  # the pooled range `t>=501`: the noisy half of the schedule
POOLED = ("all", f"t>={HIGH_T}")
# What the plot reads of the reward study's reward_accuracy.csv: its accuracy against the judge per noise level.
STUDY_COLUMNS = ("model", "split", "timestep", "accuracy_judge", "judge_low", "judge_high")


def renoised(draws: int) -> str:
    return f"LRM re-noised (M = {draws})"


@dataclass(frozen=True)
class StepFidelityConfig:
    prompts: int = 48             # train prompts, one eta = 1 trajectory each: the parents of every step
    samples_per_step: int = 4     # K candidates per parent (LPO's K)
    seed_offset: int = 0          # another value draws other prompts and trajectories of the same world
    bootstrap: int = 1000
    batch_size: int = 16          # trajectories per sampler call; their K candidates roll out together
    ensemble_draws: tuple[int, ...] = (1, 4, 16)  # M of each re-noised LRM row

    def __post_init__(self):
        if self.samples_per_step < 2:
            raise ValueError(f"step_fidelity.samples_per_step={self.samples_per_step}: K must be >= 2 to form a pair")
        for key in ("prompts", "bootstrap", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"step_fidelity.{key}={getattr(self, key)} must be >= 1")
        if self.seed_offset < 0:
            raise ValueError(f"step_fidelity.seed_offset={self.seed_offset} must be >= 0")
        draws = list(self.ensemble_draws)
        if not draws:
            raise ValueError("step_fidelity.ensemble_draws=[]: give at least one M, e.g. [1, 4, 16]")
        if any(m < 1 for m in draws):
            raise ValueError(f"step_fidelity.ensemble_draws={draws}: every M must be >= 1")
        if len(set(draws)) < len(draws):
            raise ValueError(f"step_fidelity.ensemble_draws={draws}: list each M once")

    @property
    def draws(self) -> list[int]:
        return sorted(self.ensemble_draws)

    def rewards(self) -> tuple[str, ...]:
        """Every reward measured, in the report's order."""
        return (*MODELS, CALIBRATED, *map(renoised, self.draws))

    def models(self) -> tuple[str, ...]:
        """Every row's model: the rewards and chance."""
        return (*self.rewards(), CHANCE)


def lrm_timestep(reward: LRMReward, t_cur: int, t_next: int) -> int:
    """The timestep `reward` tells the LRM for the candidates of the step from t_cur to t_next (as LRMReward picks
    it)."""
    return {"parent": t_cur, "candidate": t_next, "zero": 0}[reward.timestep]


class RenoisedLRM:
    """Noise ensembling of LPO's step reward: a candidate x_t is noisy already, so it is the candidates' predicted
    clean latent x0_hat (the SPM's input, computed once per step) that is noised again, M times, to the timestep t
    the LRM is told. Returns (B*K, M) scores, one column per draw: the mean of the first m columns is the M = m
    ensemble. Draw m of a candidate comes from a generator keyed (seed, stream, t_cur, prompt index, k, m), so it
    does not depend on the batching."""

    def __init__(self, reward: LRMReward, alphas_cumprod: torch.Tensor, draws: int, seed: int, stream: int = 0):
        self.reward, self.alphas_cumprod, self.draws = reward, alphas_cumprod, draws
        self.seed, self.stream = seed, stream

    @torch.no_grad()
    def __call__(self, candidates: torch.Tensor, t_cur: int, context: StepContext) -> torch.Tensor:
        t = lrm_timestep(self.reward, t_cur, context.t_next)
        x0 = context.candidate_x0()
        k, m = context.samples_per_step, self.draws
        eps = torch.stack([torch.randn(x0.shape[1:], generator=keyed_generator(self.seed, self.stream, t_cur,
                                                                                prompt, j, draw))
                           for prompt in context.prompts.index.tolist() for j in range(k) for draw in range(m)])
        abar = self.alphas_cumprod[t].to(x0)
        noisy = abar.sqrt() * x0.repeat_interleave(m, 0) + (1 - abar).sqrt() * eps.to(x0)
        # All M*K rows of the batch in one LRM call: the LRM runs best on large batches.
        prompts = [text for text in candidate_prompts(context) for _ in range(m)]
        scores = self.reward.lrm.score(noisy, torch.full((len(noisy),), t, device=x0.device), prompts)
        return (self.reward.scale * scores).view(len(x0), m)


@dataclass
class StepCandidates:
    """One step of every trajectory: the K candidates of each parent and every reward's scores of them."""
    step: int                        # index into the DDIMSteps
    timestep: int                    # t_cur, the parents' timestep
    t_next: int                      # the candidates' own timestep
    candidates: torch.Tensor         # (P*K, C, h, w), prompt-major
    scores: dict[str, torch.Tensor]  # reward name -> (P*K,), or (P*K, M) per draw for RENOISED


class _Recorder:
    """Scores each step's candidates with every reward and keeps them, with the seconds each reward took (the first
    reward to ask for candidate_x0 pays for it). The sampler continues from a uniformly random candidate whatever
    the scores, so which reward's scores it is handed does not change the trajectories."""

    def __init__(self, rewards: dict[str, StepReward]):
        self.rewards, self.calls = rewards, []
        self.seconds = dict.fromkeys(rewards, 0.0)

    def __call__(self, candidates: torch.Tensor, t_cur: int, context: StepContext) -> torch.Tensor:
        scores = {}
        for name, reward in self.rewards.items():
            start = device_clock(candidates.device)
            scores[name] = reward(candidates, t_cur, context).float()
            self.seconds[name] += device_clock(candidates.device) - start
        self.calls.append((t_cur, context.t_next, candidates.cpu(), {name: s.cpu() for name, s in scores.items()}))
        return next(iter(scores.values()))


# ---------------------------------------------------------------------------------------------------- sampling

@torch.no_grad()
def sample_candidates(unet, steps: DDIMSteps, texts: list[str], index: torch.Tensor, cond: Conditioning,
                      null: Conditioning, rewards: dict[str, StepReward], samples_per_step: int,
                      guidance_scale: float, batch_size: int, seed: int, stream: int = 0,
                      seconds: dict[str, float] | None = None) -> list[StepCandidates]:
    """Every step's candidates and scores for one eta = 1 trajectory per prompt (`cond` has one row per text), by
    LPO's step sampler with every step drawn. Trajectory j has its own generator, keyed (seed, stream, j), so it
    does not depend on the batching. `seconds`, when given, gains each reward's scoring time."""
    # A threshold no softmax gap exceeds: the sampler keeps no tuple, the recorder keeps what is needed here.
    never = torch.ones(len(steps), dtype=torch.float64)
    every = torch.ones(len(steps), dtype=torch.bool)
    size, channels = unet.config.sample_size, unet.config.in_channels
    device = next(unet.parameters()).device
    parts: list[list[tuple]] = []
    for start in range(0, len(texts), batch_size):
        rows = range(start, min(start + batch_size, len(texts)))
        generators = [keyed_generator(seed, stream, row) for row in rows]
        x = torch.stack([torch.randn((channels, size, size), generator=g) for g in generators]).to(device)
        batch = PromptBatch([texts[r] for r in rows], index[start:start + len(rows)],
                            cond.map(lambda t: t[start:start + len(rows)]), null)
        recorder = _Recorder(rewards)
        sample_step_pairs(unet, x, steps, batch, recorder, never, every, samples_per_step=samples_per_step,
                          guidance_scale=guidance_scale, generators=generators)
        parts.append(recorder.calls)
        if seconds is not None:
            for name, spent in recorder.seconds.items():
                seconds[name] = seconds.get(name, 0.0) + spent
    out = []
    for i, calls in enumerate(zip(*parts)):
        out.append(StepCandidates(i, calls[0][0], calls[0][1], torch.cat([c[2] for c in calls]),
                                  {name: torch.cat([c[3][name] for c in calls]) for name in rewards}))
    return out


@torch.no_grad()
def deterministic_rollout(unet, x: torch.Tensor, steps: DDIMSteps, start: int, cond: Conditioning,
                          null: Conditioning, guidance_scale: float) -> torch.Tensor:
    """The clean latents DDIM eta = 0 reaches from x (rows at the timestep of step `start`, one `cond` row each)
    through steps start, ..., N - 1 with the sampler's guidance; x itself when start = N (the last step's
    candidates are final)."""
    for i in range(start, len(steps)):
        alpha, alpha_prev, sigma = step_coefficients(steps, torch.tensor(i), x[0])
        timesteps = torch.full((len(x),), int(steps.timesteps[i]), device=x.device)
        noise = cfg_noise(unet, x, timesteps, cond, null, guidance_scale)
        x = ddim_mean(x, noise, alpha, alpha_prev, torch.zeros_like(sigma), steps.prediction_type)[0]
    return x


@torch.no_grad()
def judge_rollouts(pipe, steps: DDIMSteps, record: StepCandidates, cond: Conditioning, null: Conditioning,
                   guidance_scale: float, batch_size: int, judge_overall) -> np.ndarray:
    """The judge's overall preference (P*K,) of every candidate's rollout; `judge_overall(images, rows)` scores
    uint8 images of the prompts at `rows`."""
    k = len(record.candidates) // len(cond)
    device = next(pipe.unet.parameters()).device
    out = []
    for start in range(0, len(cond), batch_size):
        rows = np.arange(start, min(start + batch_size, len(cond)))
        x = record.candidates[start * k:(rows[-1] + 1) * k].to(device)
        latents = deterministic_rollout(pipe.unet, x, steps, record.step + 1,
                                        cond.map(lambda t: t[start:rows[-1] + 1]).repeat_interleave(k), null,
                                        guidance_scale)
        out.append(judge_overall(to_uint8(decode_latents(pipe.vae, latents)), np.repeat(rows, k)))
    return np.concatenate(out)


# ---------------------------------------------------------------------------------------------------- accuracy

def pair_agreement(reward: np.ndarray, judge: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(agreement, parent) of every candidate pair of a parent whose judge scores differ: 1 when the reward orders
    the pair as the judge does, 0.5 when the reward ties, 0 otherwise. reward, judge: (P, K)."""
    reward, judge = np.asarray(reward, np.float64), np.asarray(judge, np.float64)
    a, b = np.triu_indices(reward.shape[1], k=1)
    judge_gap, reward_gap = judge[:, a] - judge[:, b], reward[:, a] - reward[:, b]
    value = np.where(reward_gap == 0, 0.5, (np.sign(reward_gap) == np.sign(judge_gap)).astype(np.float64))
    ordered = judge_gap != 0
    parent = np.broadcast_to(np.arange(len(reward))[:, None], ordered.shape)
    return value[ordered], parent[ordered]


def fidelity_row(model: str, timestep: int, reward: np.ndarray, judge: np.ndarray, n_bootstrap: int,
                 seed: int) -> dict:
    """One CSV row: the pair accuracy of `reward` against `judge` ((P, K) each), bootstrapped over parents."""
    value, parent = pair_agreement(reward, judge)
    if not len(value):
        return {"model": model, "t": timestep, "accuracy": float("nan"), "low": float("nan"), "high": float("nan"),
                "pairs": 0, "parents": 0}
    estimate = bootstrap(value, parent, n=n_bootstrap, seed=seed)
    return {"model": model, "t": timestep, "accuracy": estimate.mean, "low": estimate.low, "high": estimate.high,
            "pairs": len(value), "parents": len(np.unique(parent))}


def pooled_row(model: str, pooled: str, value: np.ndarray, trajectory: np.ndarray, parent: np.ndarray,
               n_bootstrap: int, seed: int) -> dict:
    """One pooled CSV row: the mean of `value` (a pair's agreement, or a difference of two) bootstrapped over
    trajectories; `parent` tells the parents apart across steps."""
    row = {"model": model, "t": "", "accuracy": float("nan"), "low": float("nan"), "high": float("nan"),
           "pairs": len(value), "parents": len(np.unique(parent)), "pooled": pooled}
    if len(value):
        estimate = bootstrap(value, trajectory, n=n_bootstrap, seed=seed)
        row |= {"accuracy": estimate.mean, "low": estimate.low, "high": estimate.high}
    return row


def differences(config: StepFidelityConfig) -> list[tuple[str, str]]:
    """The paired differences (a, b) reported as a - b: LRM - SPM, the calibration's gain, the re-noising's (the
    fewest draws against the LRM itself) and the averaging's (every M against the fewest draws)."""
    fewest = renoised(config.draws[0])
    return [("LRM", "SPM"), (CALIBRATED, "LRM"), (fewest, "LRM"),
            *((renoised(m), fewest) for m in config.draws[1:])]


@dataclass
class Fidelity:
    rows: list[dict]                  # one per (model, t), in config.models() order
    pooled: list[dict]                # per POOLED range: every model's row, then every difference's
    seconds: float
    reward_seconds: dict[str, float]  # time each reward took to score every candidate

    def estimate(self, model: str, pooled: str = "all") -> Estimate | None:
        """A pooled row's estimate (`model` may be a difference `A - B`); None where it holds no pair."""
        row = next(r for r in self.pooled if r["model"] == model and r["pooled"] == pooled)
        return Estimate(row["accuracy"], row["low"], row["high"]) if row["pairs"] else None


def measure_fidelity(pipe, steps: DDIMSteps, texts: list[str], index: torch.Tensor,
                     rewards: dict[str, StepReward], judge_overall, config: StepFidelityConfig,
                     guidance_scale: float, seed: int) -> Fidelity:
    """Sample, roll out, judge and score every step (see the module docstring); `rewards` holds MODELS, CALIBRATED
    and RENOISED (a RenoisedLRM of max(config.ensemble_draws) draws)."""
    start = time.perf_counter()
    device = next(pipe.unet.parameters()).device
    cond, null = encode_prompts(pipe, texts, device), null_conditioning(pipe, device)
    reward_seconds: dict[str, float] = {}
    records = sample_candidates(pipe.unet, steps, texts, index, cond, null, rewards, config.samples_per_step,
                                guidance_scale, config.batch_size, seed, config.seed_offset, reward_seconds)
    models = config.models()
    rows, agreement, trajectory, parents, high = [], {name: [] for name in models}, [], [], []
    k = config.samples_per_step
    for record in tqdm(records, desc="step fidelity", mininterval=2):
        judged = judge_rollouts(pipe, steps, record, cond, null, guidance_scale, config.batch_size,
                                judge_overall).reshape(-1, k)
        scores = {name: record.scores[name].numpy().reshape(-1, k) for name in (*MODELS, CALIBRATED)}
        draws = record.scores[RENOISED]
        for m in config.draws:
            scores[renoised(m)] = draws[:, :m].mean(1).numpy().reshape(-1, k)
        scores[CHANCE] = np.zeros_like(judged)  # a reward that ties every pair: 0.5 with no spread
        for name in models:
            rows.append(fidelity_row(name, record.timestep, scores[name], judged, config.bootstrap, seed))
            value, parent = pair_agreement(scores[name], judged)
            agreement[name].append(value)
        trajectory.append(parent)  # the same pairs for every reward; a parent's row is its trajectory's
        parents.append(record.step * len(texts) + parent)
        told = lrm_timestep(rewards[RENOISED].reward, record.timestep, record.t_next)
        high.append(np.full(len(parent), told >= HIGH_T))
    values = {name: np.concatenate(v) for name, v in agreement.items()}
    trajectory, parents, high = np.concatenate(trajectory), np.concatenate(parents), np.concatenate(high)
    if not len(trajectory):
        raise ValueError("the judge scored every rollout of every parent alike: no pair to measure fidelity on")
    named = [(name, values[name]) for name in models] + [(f"{a} - {b}", values[a] - values[b])
                                                         for a, b in differences(config)]
    pooled = [pooled_row(name, label, value[keep], trajectory[keep], parents[keep], config.bootstrap, seed)
              for label, keep in zip(POOLED, (np.ones_like(high), high)) for name, value in named]
    return Fidelity(sorted(rows, key=lambda r: (models.index(r["model"]), r["t"])), pooled,
                    time.perf_counter() - start, reward_seconds)


# ---------------------------------------------------------------------------------------------------- the stage

def study_accuracy(path: str | Path) -> list[dict]:
    """The reward study's LRM and SPM accuracy against the judge per split and timestep, over all pairs (rows
    without a pair_type, or pair_type `all`)."""
    rows = read_csv(path)
    missing = [c for c in STUDY_COLUMNS if rows and c not in rows[0]]
    if not rows or missing:
        raise ValueError(f"'{path}' is not the reward study's reward_accuracy.csv (no rows, or no column "
                         f"{', '.join(missing)}): run the `reward study` stage")
    return [{"model": r["model"], "split": r["split"], "t": int(r["timestep"]),
             **{key: float(r[key]) for key in STUDY_COLUMNS[3:]}}
            for r in rows if r["model"] in MODELS and r.get("pair_type") in (None, "", "all")]


def run_step_fidelity(model_dir, prompts_path, lrm_dir, calibrated_dir, spm_dir, judge_dir, accuracy_csv, grammar,
                      world: str, lpo: LPOConfig, spo: SPOConfig, config: StepFidelityConfig, seed: int,
                      out_dir) -> Fidelity:
    """Measure the fidelity of the LRM, the SPM, the calibrated LRM and the re-noised LRM on the base model and
    write step_fidelity.md, .csv and .png to `out_dir`."""
    from lpo.reward.lrm import LatentRewardModel
    from lpo.reward.spm import SPM
    from lpo.world.judge import judge_images, load_judge
    for path, what, hint in ((model_dir, "base model", "run the `world base-model` stage"),
                             (prompts_path, "prompt file", "run the `world prompts` stage"),
                             (lrm_dir, "LRM", "run the `reward lrm` stage"),
                             (calibrated_dir, "calibrated LRM", "run the `reward_lrm_calibrated` rule (`reward lrm` "
                                                                "with lrm.model.likelihood: thurstone, head: film)"),
                             (spm_dir, "SPM", "run the `reward spm` stage"),
                             (judge_dir, "judge", "run the `world judge` stage"),
                             (accuracy_csv, "reward accuracy CSV", "run the `reward study` stage")):
        require_exists(path, what, hint)
    study = study_accuracy(accuracy_csv)
    prompts = training_prompts(prompts_path)
    if config.prompts > len(prompts):
        raise ValueError(f"step_fidelity.prompts={config.prompts} but '{prompts_path}' has {len(prompts)} train "
                         f"prompts: lower it")
    chosen = np.sort(np.random.default_rng([seed, config.seed_offset]).choice(len(prompts), config.prompts,
                                                                              replace=False))
    texts = [prompts[i] for i in chosen]
    scenes = [grammar.parse(t) for t in texts]

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(model_dir).to(device)
    pipe.unet.eval().requires_grad_(False)

    def lrm(directory) -> LRMReward:
        return LRMReward(LatentRewardModel.load(directory, tokenizer_dir=model_dir).to(device), lpo.lrm_timestep,
                         lpo.reward_scale)

    rewards = {"LRM": lrm(lrm_dir), "SPM": SPMReward(SPM.load(spm_dir, pipe), spo.reward_scale),
               CALIBRATED: lrm(calibrated_dir)}
    rewards[RENOISED] = RenoisedLRM(rewards["LRM"], pipe.scheduler.alphas_cumprod, config.draws[-1], seed,
                                    config.seed_offset)
    judge, judge_config = load_judge(judge_dir)

    def judge_overall(images: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return judge_images(judge, images, [scenes[r] for r in rows], judge_config).overall

    steps = ddim_steps(pipe.scheduler.config, lpo.num_inference_steps)
    fidelity = measure_fidelity(pipe, steps, texts, torch.from_numpy(chosen), rewards, judge_overall, config,
                                lpo.guidance_scale, seed)
    write_fidelity_report(Path(out_dir), world, fidelity, study, lpo, spo, config, device)
    return fidelity


# ---------------------------------------------------------------------------------------------------- the report

def _fmt(row: dict) -> str:
    return f"{row['accuracy']:.3f} [{row['low']:.3f}, {row['high']:.3f}]" if row["pairs"] else "-"


def _above(rows: list[dict], model: str) -> tuple[list[int], list[int]]:
    """The timesteps where the model's interval lies above 0.5, and below it."""
    mine = [r for r in rows if r["model"] == model and r["pairs"]]
    return [r["t"] for r in mine if r["low"] > 0.5], [r["t"] for r in mine if r["high"] < 0.5]


def _where(timesteps: list[int]) -> str:
    return f" (t = {', '.join(map(str, timesteps))})" if timesteps else ""


def _verdict(d: Estimate | None) -> str:
    if d is None:
        return "no pair"
    word = "higher" if d.low > 0 else "lower" if d.high < 0 else "not told apart"
    return f"{d} ({word})"


def _conclusions(fidelity: Fidelity, study: list[dict], spo: SPOConfig, config: StepFidelityConfig) -> list[str]:
    n = len({r["t"] for r in fidelity.rows})
    high = POOLED[1]
    lines = []
    for model in config.rewards():
        up, down = _above(fidelity.rows, model)
        lines.append(f"- The {model} ranks a step's candidates as the judge ranks their rollouts better than chance "
                     f"(95% interval above 0.5) at {len(up)} of {n} timesteps{_where(up)}, worse than chance at "
                     f"{len(down)}{_where(down)}; over all steps {fidelity.estimate(model)}.")
    d = fidelity.estimate("LRM - SPM")
    verdict = ("ranks better than the SPM" if d.low > 0 else "ranks worse than the SPM" if d.high < 0
               else "cannot be told from the SPM")
    lines.append(f"- On the same pairs the LRM {verdict}: LRM - SPM = {d}. SPO scores with the SPM only at the "
                 f"steps of its timestep_range {list(spo.timestep_range)} (t_cur minus the scheduler's steps_offset); "
                 f"the SPM's rows outside it are beyond SPO's use.")
    for a, b in differences(config)[1:]:
        lines.append(f"- {a} - {b} on the same pairs: over all steps {_verdict(fidelity.estimate(f'{a} - {b}'))}; "
                     f"at LRM timesteps t >= {HIGH_T} {_verdict(fidelity.estimate(f'{a} - {b}', high))}.")
    for model in MODELS:
        accuracy = [r["accuracy_judge"] for r in study if r["model"] == model]
        mine = [r["accuracy"] for r in fidelity.rows if r["model"] == model and r["pairs"]]
        if accuracy and mine:
            lines.append(f"- Beside the reward study (the preference data's pairs of finished images, noised to "
                         f"each t): the {model}'s accuracy against the judge averages {np.mean(accuracy):.3f} over "
                         f"its timesteps and splits, its step fidelity {np.mean(mine):.3f} over the steps.")
    lines.append("- LPO's step-level DPO learns from the order of a step's candidates: where a reward's fidelity "
                 "interval holds 0.5, the pairs it selects there cannot be told from random ones by this "
                 "measurement, and training on them is not shown to move the policy towards the judge.")
    return lines


def csv_rows(fidelity: Fidelity) -> list[dict]:
    """step_fidelity.csv: the rows per (model, t), `pooled` empty, then the pooled rows (module docstring)."""
    return [r | {"pooled": ""} for r in fidelity.rows] + fidelity.pooled


def write_fidelity_report(out: Path, world: str, fidelity: Fidelity, study: list[dict], lpo: LPOConfig,
                          spo: SPOConfig, config: StepFidelityConfig, device: torch.device) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "step_fidelity.csv", csv_rows(fidelity))
    models = config.rewards()
    plot_fidelity(fidelity.rows, study, models, out / "step_fidelity.png")
    by = {(r["model"], r["t"]): r for r in fidelity.rows}
    table = [{"t": t, **{m: _fmt(by[m, t]) for m in models}, "pairs": by[models[0], t]["pairs"],
              "parents": by[models[0], t]["parents"]}
             for t in sorted({r["t"] for r in fidelity.rows})]
    pooled = {(r["model"], r["pooled"]): r for r in fidelity.pooled}
    names = list(dict.fromkeys(r["model"] for r in fidelity.pooled if r["model"] != CHANCE))
    summary = [{"reward or difference": name, **{label: _fmt(pooled[name, label]) for label in POOLED}}
               for name in names]
    spent = ", ".join(f"{name} {fidelity.reward_seconds[name]:.0f} s" for name in fidelity.reward_seconds)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
    lines = [f"# Step-level reward fidelity of the {world} world", "",
             f"Generated by `snakemake` (rule `optimize_fidelity`) on {datetime.date.today()}, device: {name}, in "
             f"{fidelity.seconds:.0f} s, of which scoring the candidates took {spent} (the SPM's time includes "
             f"the x0_hat it shares with the re-noised LRM). The base model samples {config.prompts} train prompts "
             f"with LPO's step sampler (DDIM eta = 1, {lpo.num_inference_steps} steps, CFG {lpo.guidance_scale:g}); "
             f"at every step it draws K = {config.samples_per_step} candidates around each parent and continues from "
             f"a random one. Every candidate is rolled out to an image by DDIM eta = 0 with the same CFG and judged "
             f"(overall preference). The LRM scores the noisy candidates told the timestep LPO tells it "
             f"(`{lpo.lrm_timestep}`), the SPM the decoded x0_hat at the candidates' own timestep, as SPO scores them. "
             f"The calibrated LRM (Thurstone likelihood, FiLM head) scores as the LRM does. `LRM re-noised (M = m)` is "
             f"the LRM's mean score over M re-noisings sqrt(abar_t) x0_hat + sqrt(1 - abar_t) eps_m of each "
             f"candidate's x0_hat to the LRM's timestep t; the draws are nested (the larger M holds the smaller's), "
             f"and M = 1 against the LRM itself isolates the re-noising from the averaging. "
             f"Fidelity is pair accuracy against the judge over every candidate pair of a parent whose rollouts the "
             f"judge scores differently (a reward tie counts half); t is the parent's timestep t_cur. Intervals are "
             f"95% bootstrap intervals over parents (over trajectories when pooled over steps). `chance` is a reward "
             f"that ties every pair (0.5).", "",
             "## What to conclude", "", *_conclusions(fidelity, study, spo, config), "",
             "## Pooled over steps", "",
             f"Every step ({pooled['LRM', 'all']['pairs']} pairs), and the steps whose LRM timestep is >= {HIGH_T} "
             f"(`{POOLED[1]}`, the noisy half of the schedule: {pooled['LRM', POOLED[1]]['pairs']} pairs); `A - B` "
             f"rows are paired differences of pair accuracy over the same pairs. The same rows close "
             f"`step_fidelity.csv` (column `pooled`).", "", markdown(summary), "",
             "## Fidelity per timestep", "",
             "Left: fidelity per step; right: the reward study's accuracy against the judge on the preference data's "
             "pairs at the same noise levels (`reward_accuracy.csv`). All rows are in `step_fidelity.csv`.", "",
             "![step fidelity against timestep](step_fidelity.png)", "", markdown(table), ""]
    with atomic_path(out / "step_fidelity.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def plot_fidelity(rows: list[dict], study: list[dict], models: tuple[str, ...], path: str | Path) -> None:
    """Fidelity of `models` against t beside the reward study's accuracy against the judge, 95% bands."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    colours = {model: f"C{i}" for i, model in enumerate(models)}
    for model in models:
        rs = sorted((r for r in rows if r["model"] == model and r["pairs"]), key=lambda r: r["t"])
        t = [r["t"] for r in rs]
        axes[0].plot(t, [r["accuracy"] for r in rs], ls="-" if model in MODELS else "--", marker="o", ms=3,
                     color=colours[model], label=model)
        axes[0].fill_between(t, [r["low"] for r in rs], [r["high"] for r in rs], color=colours[model],
                             alpha=0.15 if model in MODELS else 0.06)
    for model in MODELS:
        for split, style in zip(dict.fromkeys(r["split"] for r in study), ("-", "--", ":")):
            rs = sorted((r for r in study if r["model"] == model and r["split"] == split), key=lambda r: r["t"])
            t = [r["t"] for r in rs]
            axes[1].plot(t, [r["accuracy_judge"] for r in rs], ls=style, marker="o", ms=3, color=colours[model],
                         label=f"{model}, {split}")
            axes[1].fill_between(t, [r["judge_low"] for r in rs], [r["judge_high"] for r in rs],
                                 color=colours[model], alpha=0.1)
    for ax, title, xlabel in ((axes[0], "step fidelity: a parent's candidates vs the judge on their rollouts",
                               "parent timestep t_cur"),
                              (axes[1], "reward accuracy against noise: preference pairs vs the judge",
                               "timestep of the noisy latents")):
        ax.axhline(0.5, color="gray", lw=0.8, ls="--")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("pair accuracy")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
