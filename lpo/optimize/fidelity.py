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
from lpo.optimize.methods import LPOConfig, LRMReward, SPMReward, SPOConfig, training_prompts
from lpo.optimize.sampler import (Conditioning, PromptBatch, StepContext, StepReward, cfg_noise, ddim_mean,
                                  sample_step_pairs, step_coefficients)
from lpo.optimize.step_trainer import encode_prompts, load_pipeline, null_conditioning
from lpo.optimize.threshold import DDIMSteps, ddim_steps
from lpo.reward.spm import decode_latents
from lpo.seeding import keyed_generator
from lpo.stats import Estimate, bootstrap
from lpo.tables import markdown, read_csv, write_csv

MODELS = ("LRM", "SPM")
CHANCE = "chance"
# What the plot reads of the reward study's reward_accuracy.csv: its accuracy against the judge per noise level.
STUDY_COLUMNS = ("model", "split", "timestep", "accuracy_judge", "judge_low", "judge_high")


@dataclass(frozen=True)
class StepFidelityConfig:
    prompts: int = 48             # train prompts, one eta = 1 trajectory each: the parents of every step
    samples_per_step: int = 4     # K candidates per parent (LPO's K)
    seed_offset: int = 0          # another value draws other prompts and trajectories of the same world
    bootstrap: int = 1000
    batch_size: int = 16          # trajectories per sampler call; their K candidates roll out together

    def __post_init__(self):
        if self.samples_per_step < 2:
            raise ValueError(f"step_fidelity.samples_per_step={self.samples_per_step}: K must be >= 2 to form a pair")
        for key in ("prompts", "bootstrap", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"step_fidelity.{key}={getattr(self, key)} must be >= 1")
        if self.seed_offset < 0:
            raise ValueError(f"step_fidelity.seed_offset={self.seed_offset} must be >= 0")


@dataclass
class StepCandidates:
    """One step of every trajectory: the K candidates of each parent and every reward's scores of them."""
    step: int                        # index into the DDIMSteps
    timestep: int                    # t_cur, the parents' timestep
    candidates: torch.Tensor         # (P*K, C, h, w), prompt-major
    scores: dict[str, torch.Tensor]  # reward name -> (P*K,)


class _Recorder:
    """Scores each step's candidates with every reward and keeps them. The sampler continues from a uniformly random
    candidate whatever the scores, so which reward's scores it is handed does not change the trajectories."""

    def __init__(self, rewards: dict[str, StepReward]):
        self.rewards, self.calls = rewards, []

    def __call__(self, candidates: torch.Tensor, t_cur: int, context: StepContext) -> torch.Tensor:
        scores = {name: reward(candidates, t_cur, context).float() for name, reward in self.rewards.items()}
        self.calls.append((t_cur, candidates.cpu(), {name: s.cpu() for name, s in scores.items()}))
        return next(iter(scores.values()))


# ---------------------------------------------------------------------------------------------------- sampling

@torch.no_grad()
def sample_candidates(unet, steps: DDIMSteps, texts: list[str], index: torch.Tensor, cond: Conditioning,
                      null: Conditioning, rewards: dict[str, StepReward], samples_per_step: int,
                      guidance_scale: float, batch_size: int, seed: int, stream: int = 0) -> list[StepCandidates]:
    """Every step's candidates and scores for one eta = 1 trajectory per prompt (`cond` has one row per text), by
    LPO's step sampler with every step drawn. Trajectory j has its own generator, keyed (seed, stream, j), so it
    does not depend on the batching."""
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
    out = []
    for i, calls in enumerate(zip(*parts)):
        out.append(StepCandidates(i, calls[0][0], torch.cat([c[1] for c in calls]),
                                  {name: torch.cat([c[2][name] for c in calls]) for name in rewards}))
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


@dataclass
class Fidelity:
    rows: list[dict]               # one per (model, t), MODELS then CHANCE
    pooled: dict[str, Estimate]    # per model, every step's pairs, bootstrapped over trajectories
    lrm_minus_spm: Estimate        # the paired difference of the two, over the same pairs
    seconds: float


def measure_fidelity(pipe, steps: DDIMSteps, texts: list[str], index: torch.Tensor,
                     rewards: dict[str, StepReward], judge_overall, config: StepFidelityConfig,
                     guidance_scale: float, seed: int) -> Fidelity:
    """Sample, roll out, judge and score every step (see the module docstring); `rewards` holds MODELS."""
    start = time.perf_counter()
    device = next(pipe.unet.parameters()).device
    cond, null = encode_prompts(pipe, texts, device), null_conditioning(pipe, device)
    records = sample_candidates(pipe.unet, steps, texts, index, cond, null, rewards, config.samples_per_step,
                                guidance_scale, config.batch_size, seed, config.seed_offset)
    rows, agreement, trajectory = [], {name: [] for name in (*MODELS, CHANCE)}, []
    k = config.samples_per_step
    for record in tqdm(records, desc="step fidelity", mininterval=2):
        judged = judge_rollouts(pipe, steps, record, cond, null, guidance_scale, config.batch_size,
                                judge_overall).reshape(-1, k)
        scores = {name: record.scores[name].numpy().reshape(-1, k) for name in MODELS}
        scores[CHANCE] = np.zeros_like(judged)  # a reward that ties every pair: 0.5 with no spread
        for name, reward in scores.items():
            rows.append(fidelity_row(name, record.timestep, reward, judged, config.bootstrap, seed))
            value, parent = pair_agreement(reward, judged)
            agreement[name].append(value)
        trajectory.append(parent)  # the same pairs for every reward; a parent's row is its trajectory's
    values, trajectory = {name: np.concatenate(v) for name, v in agreement.items()}, np.concatenate(trajectory)
    if not len(trajectory):
        raise ValueError("the judge scored every rollout of every parent alike: no pair to measure fidelity on")
    estimates = {name: bootstrap(v, trajectory, n=config.bootstrap, seed=seed) for name, v in values.items()}
    difference = bootstrap(values["LRM"] - values["SPM"], trajectory, n=config.bootstrap, seed=seed)
    return Fidelity(sorted(rows, key=lambda r: ((*MODELS, CHANCE).index(r["model"]), r["t"])), estimates,
                    difference, time.perf_counter() - start)


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


def run_step_fidelity(model_dir, prompts_path, lrm_dir, spm_dir, judge_dir, accuracy_csv, grammar, world: str,
                      lpo: LPOConfig, spo: SPOConfig, config: StepFidelityConfig, seed: int, out_dir) -> Fidelity:
    """Measure the fidelity of the LRM and the SPM on the base model and write step_fidelity.md, .csv and .png
    to `out_dir`."""
    from lpo.reward.lrm import LatentRewardModel
    from lpo.reward.spm import SPM
    from lpo.world.judge import judge_images, load_judge
    for path, what, hint in ((model_dir, "base model", "run the `world base-model` stage"),
                             (prompts_path, "prompt file", "run the `world prompts` stage"),
                             (lrm_dir, "LRM", "run the `reward lrm` stage"),
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
    rewards = {"LRM": LRMReward(LatentRewardModel.load(lrm_dir, tokenizer_dir=model_dir).to(device),
                                lpo.lrm_timestep, lpo.reward_scale),
               "SPM": SPMReward(SPM.load(spm_dir, pipe), spo.reward_scale)}
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


def _conclusions(fidelity: Fidelity, study: list[dict], spo: SPOConfig) -> list[str]:
    n = len({r["t"] for r in fidelity.rows})
    lines = []
    for model in MODELS:
        up, down = _above(fidelity.rows, model)
        lines.append(f"- The {model} ranks a step's candidates as the judge ranks their rollouts better than chance "
                     f"(95% interval above 0.5) at {len(up)} of {n} timesteps{_where(up)}, worse than chance at "
                     f"{len(down)}{_where(down)}; over all steps {fidelity.pooled[model]}.")
    d = fidelity.lrm_minus_spm
    verdict = ("ranks better than the SPM" if d.low > 0 else "ranks worse than the SPM" if d.high < 0
               else "cannot be told from the SPM")
    lines.append(f"- On the same pairs the LRM {verdict}: LRM - SPM = {d}. SPO scores with the SPM only at the "
                 f"steps of its timestep_range {list(spo.timestep_range)} (t_cur minus the scheduler's steps_offset); "
                 f"the SPM's rows outside it are beyond SPO's use.")
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


def write_fidelity_report(out: Path, world: str, fidelity: Fidelity, study: list[dict], lpo: LPOConfig,
                          spo: SPOConfig, config: StepFidelityConfig, device: torch.device) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "step_fidelity.csv", fidelity.rows)
    plot_fidelity(fidelity.rows, study, out / "step_fidelity.png")
    by = {(r["model"], r["t"]): r for r in fidelity.rows}
    table = [{"t": t, **{m: _fmt(by[m, t]) for m in MODELS}, "pairs": by[MODELS[0], t]["pairs"],
              "parents": by[MODELS[0], t]["parents"]}
             for t in sorted({r["t"] for r in fidelity.rows})]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
    lines = [f"# Step-level reward fidelity of the {world} world", "",
             f"Generated by `snakemake` (rule `optimize_fidelity`) on {datetime.date.today()}, device: {name}, in "
             f"{fidelity.seconds:.0f} s. The base model samples {config.prompts} train prompts with LPO's step "
             f"sampler (DDIM eta = 1, {lpo.num_inference_steps} steps, CFG {lpo.guidance_scale:g}); at every step "
             f"it draws K = {config.samples_per_step} candidates around each parent and continues from a random one. "
             f"Every candidate is rolled out to an image by DDIM eta = 0 with the same CFG and judged (overall "
             f"preference). The LRM scores the noisy candidates told the timestep LPO tells it "
             f"(`{lpo.lrm_timestep}`), the SPM the decoded x0_hat at the candidates' own timestep, as SPO scores them. "
             f"Fidelity is pair accuracy against the judge over every candidate pair of a parent whose rollouts the "
             f"judge scores differently (a reward tie counts half); t is the parent's timestep t_cur. Intervals are "
             f"95% bootstrap intervals over parents (over trajectories when pooled over steps). `chance` is a reward "
             f"that ties every pair (0.5).", "",
             "## What to conclude", "", *_conclusions(fidelity, study, spo), "",
             "## Fidelity per timestep", "",
             "Left: fidelity per step; right: the reward study's accuracy against the judge on the preference data's "
             "pairs at the same noise levels (`reward_accuracy.csv`). All rows are in `step_fidelity.csv`.", "",
             "![step fidelity against timestep](step_fidelity.png)", "", markdown(table), ""]
    with atomic_path(out / "step_fidelity.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def plot_fidelity(rows: list[dict], study: list[dict], path: str | Path) -> None:
    """Fidelity against t beside the reward study's accuracy against the judge, 95% bands."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    colours = {model: f"C{i}" for i, model in enumerate(MODELS)}
    for model in MODELS:
        rs = sorted((r for r in rows if r["model"] == model and r["pairs"]), key=lambda r: r["t"])
        t = [r["t"] for r in rs]
        axes[0].plot(t, [r["accuracy"] for r in rs], marker="o", ms=3, color=colours[model], label=model)
        axes[0].fill_between(t, [r["low"] for r in rs], [r["high"] for r in rs], color=colours[model], alpha=0.15)
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
