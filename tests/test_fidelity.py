"""Step-level reward fidelity: the pair accuracy on hand-made scores, the deterministic rollout against diffusers'
DDIM, the candidates LPO's sampler draws, the re-noised LRM's draws, and the CLI end to end on a tiny model, judge
and reward models (a plain and a calibrated LRM)."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from tiny_sd import (IMAGE_SIZE, LATENT_SIZE, PROMPTS, REFERENCE_HEAD, SD15_DDIM, SHARP_LOGIT_SCALE, TEXT_DIM,
                     build_tiny_lrm, build_tiny_pipeline, build_tiny_spm, tiny_unet)

from lpo.cli import main
from lpo.optimize.fidelity import (RenoisedLRM, StepFidelityConfig, deterministic_rollout, fidelity_row,
                                   pair_agreement, sample_candidates)
from lpo.optimize.methods import LRMReward
from lpo.optimize.sampler import Conditioning, PromptBatch, StepContext, cfg_noise
from lpo.optimize.step_trainer import load_pipeline
from lpo.optimize.threshold import ddim_steps
from lpo.reward.lrm import LatentRewardModel
from lpo.seeding import keyed_generator
from lpo.tables import read_csv, write_csv
from lpo.world.grammar import Grammar, Vocabulary
from lpo.world.judge import Judge, JudgeConfig, save_judge

STEPS = ddim_steps(SD15_DDIM, 4)  # t_cur = 751, 501, 251, 1
GUIDANCE = 3.0
VOCAB = Vocabulary(sizes=("small", "large"), colors=("red", "blue"), shapes=("circle", "square"),
                   backgrounds=("gray",), positions=("left", "right"))


@pytest.fixture(scope="module")
def unet():
    return tiny_unet().eval()


def conditioning(rows: int) -> tuple[Conditioning, Conditioning]:
    g = torch.Generator().manual_seed(7)
    return Conditioning(torch.randn(rows, 77, TEXT_DIM, generator=g)), Conditioning(torch.randn(1, 77, TEXT_DIM,
                                                                                                generator=g))


def latents(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, 4, LATENT_SIZE, LATENT_SIZE, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------- accuracy

def test_a_reward_equal_to_the_judge_scores_one_and_its_negative_zero():
    # Parent 0: candidates 2 and 3 tie in the judge, so 5 of its 6 pairs count; parent 1: the judge ties everything.
    judge = np.array([[0.1, 0.5, 0.3, 0.3], [0.2, 0.2, 0.2, 0.2]])
    same, negative = fidelity_row("r", 1, judge, judge, 100, 0), fidelity_row("r", 1, -judge, judge, 100, 0)
    assert (same["accuracy"], same["low"], same["high"]) == (1.0, 1.0, 1.0)
    assert (negative["accuracy"], negative["low"], negative["high"]) == (0.0, 0.0, 0.0)
    assert (same["pairs"], same["parents"]) == (5, 1)


def test_reward_ties_count_half_and_parents_are_resampled_whole():
    value, parent = pair_agreement(np.zeros((1, 3)), np.array([[1.0, 2.0, 3.0]]))
    assert value.tolist() == [0.5, 0.5, 0.5] and parent.tolist() == [0, 0, 0]
    # Parent 0's three pairs all right, parent 1's three all wrong: any resample is one of 0, 0.5, 1.
    judge = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    row = fidelity_row("r", 1, judge * np.array([[1.0], [-1.0]]), judge, 500, 0)
    assert row["accuracy"] == 0.5 and (row["low"], row["high"]) == (0.0, 1.0)
    assert (row["pairs"], row["parents"]) == (6, 2)


def test_no_ordered_pair_gives_an_empty_row():
    row = fidelity_row("r", 51, np.arange(4.0)[None], np.ones((1, 4)), 100, 0)
    assert row["pairs"] == row["parents"] == 0 and np.isnan(row["accuracy"])


# ---------------------------------------------------------------------------------------------------- rollouts

def test_the_rollout_is_diffusers_ddim_eta_zero_and_deterministic(unet):
    cond, null = conditioning(3)
    x = latents(3)
    out = deterministic_rollout(unet, x, STEPS, 1, cond, null, GUIDANCE)
    assert torch.equal(out, deterministic_rollout(unet, x.clone(), STEPS, 1, cond, null, GUIDANCE))
    scheduler = DDIMScheduler.from_config(SD15_DDIM)
    scheduler.set_timesteps(len(STEPS))
    expected = x
    with torch.no_grad():
        for t in scheduler.timesteps[1:]:
            noise = cfg_noise(unet, expected, t.expand(3), cond, null, GUIDANCE)
            expected = scheduler.step(noise, t, expected, eta=0.0).prev_sample
    assert torch.allclose(out, expected, atol=1e-5)
    # The last step's candidates are final latents already.
    assert torch.equal(deterministic_rollout(unet, x, STEPS, len(STEPS), cond, null, GUIDANCE), x)


def test_candidates_differ_and_do_not_depend_on_the_batching(unet):
    cond, null = conditioning(3)
    seen = []

    def reward(candidates, t_cur, context):
        seen.append((t_cur, context.t_next))
        return candidates.flatten(1).mean(1)

    args = (unet, STEPS, PROMPTS[:3], torch.arange(3), cond, null, {"mean": reward}, 4, GUIDANCE)
    records = sample_candidates(*args, batch_size=3, seed=5)
    assert [r.timestep for r in records] == STEPS.timesteps.tolist() and [r.step for r in records] == [0, 1, 2, 3]
    assert seen == [(751, 501), (501, 251), (251, 1), (1, 0)]
    for record in records:
        assert record.candidates.shape == (12, 4, LATENT_SIZE, LATENT_SIZE) and record.scores["mean"].shape == (12,)
        per_parent = record.candidates.view(3, 4, -1)
        assert (per_parent[:, :, None] - per_parent[:, None]).abs().amax(-1).add(torch.eye(4)).min() > 0
    again = sample_candidates(*args, batch_size=1, seed=5)
    assert all(torch.allclose(a.candidates, b.candidates, atol=1e-5) for a, b in zip(records, again))
    other = sample_candidates(*args, batch_size=3, seed=5, stream=1)
    assert not torch.allclose(records[0].candidates, other[0].candidates)


# ---------------------------------------------------------------------------------------------------- re-noising

@pytest.mark.parametrize("draws, message", [((0,), r"step_fidelity.ensemble_draws=\[0\]: every M must be >= 1"),
                                            ((), r"step_fidelity.ensemble_draws=\[\]: give at least one M"),
                                            ((4, 4), r"step_fidelity.ensemble_draws=\[4, 4\]: list each M once")])
def test_bad_ensemble_draws_are_named(draws, message):
    with pytest.raises(ValueError, match=message):
        StepFidelityConfig(ensemble_draws=draws)


class SumLRM(torch.nn.Module):
    """Scores a latent by its sum plus its timestep and records what it was told (a Module, as LRMReward sets it to
    eval mode)."""

    def __init__(self):
        super().__init__()
        self.told = []

    def score(self, latents, timesteps, prompts):
        self.told.append((latents.clone(), timesteps.clone(), prompts))
        return latents.flatten(1).sum(1) + timesteps


def step_context(candidates, x0, prompt_index, calls):
    def denoise(c, t_next):
        calls.append(t_next)
        return torch.zeros_like(c), x0

    texts = [f"p{i}" for i in prompt_index]
    prompts = PromptBatch(texts, torch.tensor(prompt_index), Conditioning(torch.zeros(len(texts), 1, 1)), None)
    return StepContext(501, candidates[::2], candidates[::2], prompts, 2, candidates, denoise)


def test_re_noising_draws_from_x0_hat_at_the_lrms_timestep_keyed_per_candidate_and_draw():
    alphas = torch.linspace(0.99, 0.01, 1000)
    candidates, x0 = latents(4, seed=1), latents(4, seed=2)
    calls = []
    context = step_context(candidates, x0, [7, 3], calls)
    lrm = SumLRM()
    scores = RenoisedLRM(LRMReward(lrm, "candidate", scale=2.0), alphas, 3, seed=5, stream=1)(candidates, 751, context)
    context.candidate_x0()
    assert calls == [501]  # x0_hat is computed once per step, whoever asks for it
    noisy, timesteps, prompts = lrm.told[0]
    assert len(lrm.told) == 1 and scores.shape == (4, 3)  # one LRM call for the M*K rows
    assert timesteps.tolist() == [501] * 12 and prompts == ["p7"] * 6 + ["p3"] * 6
    eps = keyed_generator(5, 1, 751, 3, 1, 2)  # prompt 3 (the second row), candidate k = 1, draw m = 2
    expected = alphas[501].sqrt() * x0[3] + (1 - alphas[501]).sqrt() * torch.randn(x0.shape[1:], generator=eps)
    assert torch.allclose(noisy[3 * 3 + 2], expected, atol=1e-6)
    assert torch.allclose(scores, 2.0 * (noisy.flatten(1).sum(1) + 501).view(4, 3))
    # The draws are nested and keyed by prompt, not by batch row: fewer draws or another batch order keep them.
    fewer = RenoisedLRM(LRMReward(SumLRM(), "candidate", scale=2.0), alphas, 1, seed=5, stream=1)
    assert torch.equal(fewer(candidates, 751, context)[:, 0], scores[:, 0])
    swapped = step_context(candidates.view(2, 2, *candidates.shape[1:]).flip(0).flatten(0, 1),
                           x0.view(2, 2, *x0.shape[1:]).flip(0).flatten(0, 1), [3, 7], [])
    again = RenoisedLRM(LRMReward(SumLRM(), "candidate", scale=2.0), alphas, 3, seed=5, stream=1)
    assert torch.allclose(again(candidates, 751, swapped).view(2, 2, 3).flip(0).flatten(0, 1), scores)


# ---------------------------------------------------------------------------------------------------- the stage

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity")
    model = build_tiny_pipeline(root / "model")
    torch.manual_seed(0)
    save_judge(Judge(VOCAB, IMAGE_SIZE, width=4).eval(), JudgeConfig(), root / "judge")
    prompts = [s.prompt for s in Grammar(VOCAB, heldout_pairs=1, seed=0).seen_scenes()]
    (root / "prompts.json").write_text(json.dumps({"train": prompts}))
    study = [{"model": m, "split": "validation_unique", "timestep": t, "accuracy_judge": 0.6, "judge_low": 0.5,
              "judge_high": 0.7, "pair_type": kind} for m in ("LRM", "SPM", "pixel (x0_hat)") for t in (1, 501)
             for kind in ("all", "same_source")]
    write_csv(root / "reward_accuracy.csv", study)
    return {"model": model, "lrm": build_tiny_lrm(model, root / "lrm"),
            "calibrated-lrm": calibrated_lrm(model, root / "lrm_calibrated"),
            "spm": build_tiny_spm(model, root / "spm"), "judge": root / "judge", "prompts": root / "prompts.json",
            "accuracy": root / "reward_accuracy.csv", "root": root}


def calibrated_lrm(model, out):
    """An untrained Thurstone LRM with a FiLM head, as the `reward_lrm_calibrated` rule saves one."""
    pipe = load_pipeline(model)
    torch.manual_seed(3)
    config = dataclasses.replace(REFERENCE_HEAD, likelihood="thurstone", head="film")
    lrm = LatentRewardModel(pipe.unet, pipe.text_encoder, pipe.tokenizer, config,
                            alphas_cumprod=pipe.scheduler.alphas_cumprod)
    lrm.logit_scale.data.fill_(SHARP_LOGIT_SCALE)
    torch.nn.init.normal_(lrm.film.net[-1].weight)  # FiLM starts as the identity: make it score unlike the LRM
    lrm.save(out)
    return out


def run_cli(world, out, draws=(1, 2), **paths):
    params = {"seed": 0, "world": {"image_size": IMAGE_SIZE, "heldout_pairs": 1,
                                   "vocabulary": {"sizes": ["small", "large"], "colors": ["red", "blue"],
                                                  "shapes": ["circle", "square"], "backgrounds": ["gray"],
                                                  "positions": ["left", "right"]}},
              "lpo": {"num_inference_steps": 3, "guidance_scale": GUIDANCE},
              "step_fidelity": {"prompts": 3, "samples_per_step": 3, "bootstrap": 50, "batch_size": 2,
                                "ensemble_draws": list(draws)}}
    flags = ("model", "prompts", "lrm", "calibrated-lrm", "spm", "judge", "accuracy")
    paths = {k: str(world[k]) for k in flags} | paths
    return main(["--threads", "1", "optimize", "fidelity", "--params", json.dumps(params),
                 *(arg for k, v in paths.items() for arg in (f"--{k}", v)), "--out", str(out)])


MODELS = ("LRM", "SPM", "LRM (calibrated)", "LRM re-noised (M = 1)", "LRM re-noised (M = 2)", "chance")
DIFFERENCES = ("LRM - SPM", "LRM (calibrated) - LRM", "LRM re-noised (M = 1) - LRM",
               "LRM re-noised (M = 2) - LRM re-noised (M = 1)")


def test_the_cli_writes_one_row_per_model_and_timestep_then_the_pooled_rows(world, tmp_path):
    assert run_cli(world, tmp_path / "report") == 0
    rows = read_csv(tmp_path / "report" / "step_fidelity.csv")
    assert list(rows[0]) == ["model", "t", "accuracy", "low", "high", "pairs", "parents", "pooled"]
    timesteps = [str(t) for t in sorted(ddim_steps(SD15_DDIM, 3).timesteps.tolist())]  # 1, 334, 667
    steps = [r for r in rows if not r["pooled"]]
    assert [(r["model"], r["t"]) for r in steps] == [(m, t) for m in MODELS for t in timesteps]
    assert all(0 <= float(r["accuracy"]) <= 1 and int(r["pairs"]) <= 3 * 3 for r in steps)
    assert {r["accuracy"] for r in rows if r["model"] == "chance"} == {"0.5"}
    assert [(r["model"], r["pooled"], r["t"]) for r in rows[len(steps):]] == [
        (m, pooled, "") for pooled in ("all", "t>=501") for m in (*MODELS, *DIFFERENCES)]
    by = {(r["model"], r["pooled"], r["t"]): r for r in rows}
    # The calibrated LRM is the one --calibrated-lrm names: it orders the candidates otherwise than the LRM.
    assert by["LRM (calibrated) - LRM", "all", ""]["accuracy"] != "0.0"
    # Only t_cur = 667 is at t >= 501 (the LRM is told the parent's timestep): its pairs and its step's accuracy.
    for model in MODELS:
        assert (by[model, "t>=501", ""]["pairs"], by[model, "t>=501", ""]["accuracy"]) == (
            by[model, "", "667"]["pairs"], by[model, "", "667"]["accuracy"])
        assert int(by[model, "all", ""]["pairs"]) == sum(int(by[model, "", t]["pairs"]) for t in timesteps)
    for difference in DIFFERENCES:
        a, b = difference.split(" - ")
        for pooled in ("all", "t>=501"):
            assert float(by[difference, pooled, ""]["accuracy"]) == pytest.approx(
                float(by[a, pooled, ""]["accuracy"]) - float(by[b, pooled, ""]["accuracy"]))
    text = (tmp_path / "report" / "step_fidelity.md").read_text()
    assert text.startswith("# Step-level reward fidelity of the shapes world") and "## What to conclude" in text
    assert "LRM (calibrated) - LRM on the same pairs" in text and "## Pooled over steps" in text
    assert (tmp_path / "report" / "step_fidelity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run_cli(world, tmp_path / "again") == 0
    assert (tmp_path / "again" / "step_fidelity.csv").read_text() == (tmp_path / "report" / "step_fidelity.csv"
                                                                     ).read_text()
    # Other draw counts change only the re-noised rows: the other rewards score the same candidates.
    assert run_cli(world, tmp_path / "other", draws=(3,)) == 0
    kept = ("LRM", "SPM", "LRM (calibrated)", "chance", "LRM - SPM", "LRM (calibrated) - LRM")
    assert ([r for r in read_csv(tmp_path / "other" / "step_fidelity.csv") if r["model"] in kept]
            == [r for r in rows if r["model"] in kept])


@pytest.mark.parametrize("flag, what", [("judge", "judge"), ("accuracy", "reward accuracy CSV"), ("spm", "SPM"),
                                        ("calibrated-lrm", "calibrated LRM")])
def test_a_missing_input_is_named(world, tmp_path, capsys, flag, what):
    missing = tmp_path / "nowhere"
    assert run_cli(world, tmp_path / "report", **{flag: str(missing)}) == 2
    err = capsys.readouterr().err
    assert what in err and str(missing) in err
    assert not (tmp_path / "report").exists()
