"""LPO / SPO / Diffusion-DPO entry points: the step rewards, the ablation runs, and bad input (the paper configs'
sections on tiny SD1.5- and SDXL-topology models are tests/test_paper_configs.py)."""
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from test_preference_data import write_preferences
from tiny_sd import HUB_IMAGE_SIZE, build_tiny_lrm, build_tiny_sd15_pipeline

import lpo.optimize.step_trainer
from lpo.optimize.ablations import REFERENCE, LPOAblationConfig, ablation_variants
from lpo.checks import check_config
from lpo.cli import main
from lpo.config import from_dict
from lpo.optimize.diffusion_dpo import DiffusionDPOConfig
from lpo.evaluate.scores import EvaluateConfig
from lpo.optimize.methods import (LPOConfig, LRMReward, SPMReward, SPOConfig, UnsupportedModelError, train_dpo,
                                  train_lpo, train_spo, training_prompts)
from lpo.optimize.sampler import Conditioning, PromptBatch, StepContext

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a small red circle on a gray background", "a large blue square on a white background",
           "a green triangle on the left", "a purple cross at the top"]
SECTIONS = {"lpo": LPOConfig, "spo": SPOConfig, "diffusion_dpo": DiffusionDPOConfig,
            "lpo_ablations": LPOAblationConfig, "evaluate": EvaluateConfig}
# Two rounds of one prompt; every kept tuple of a round fits one optimizer step: two optimizer steps in all.
TWO_STEPS = {"rounds": 2, "sample_batch_size": 1, "train_batch_size": 20, "mixed_precision": "no"}  # fp16: GPU only


def paper_section(world: str, section: str) -> dict:
    return yaml.safe_load((REPO / "config" / f"{world}.yaml").read_text())[section]


def write_prompts(path: Path, sets: dict) -> Path:
    path.write_text(json.dumps(sets))
    return path


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """A tiny SD1.5-topology pipeline in hub layout, an LRM on its UNet, a prompt file and a preference dataset."""
    root = tmp_path_factory.mktemp("sd15")
    model = build_tiny_sd15_pipeline(root / "model")
    write_preferences(root / "prefs", image_size=HUB_IMAGE_SIZE, sizes={"train": 8, "validation_unique": 2,
                                                                         "test_unique": 2})
    return {"root": root, "model": model, "lrm": build_tiny_lrm(model, root / "lrm"),
            "prompts": write_prompts(root / "prompts.json", {"train": PROMPTS, "eval_seen": PROMPTS[:1]}),
            "prefs": root / "prefs"}


# ---------------------------------------------------------------------------------------------------- rewards

class RecordingLRM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def score(self, latents, timesteps, prompts):
        self.calls.append((timesteps.tolist(), list(prompts)))
        return latents.flatten(1).mean(1)


def context(prompts, k=2, t_next=451, x0=None):
    embeds = torch.zeros(len(prompts), 77, 8)
    candidates = torch.randn(len(prompts) * k, 4, 2, 2)
    return StepContext(t_next, torch.zeros(len(prompts), 4, 2, 2), torch.zeros(len(prompts), 4, 2, 2),
                       PromptBatch(prompts, torch.arange(len(prompts)), Conditioning(embeds),
                                   Conditioning(embeds[:1])), k, candidates,
                       None if x0 is None else (lambda c, t: (c, x0))), candidates


@pytest.mark.parametrize("mode, expected", [("parent", 501), ("candidate", 451), ("zero", 0)])
def test_lrm_reward_tells_the_lrm_the_chosen_timestep_and_each_candidates_prompt(mode, expected):
    lrm = RecordingLRM()
    ctx, candidates = context(["a", "b"], k=2, t_next=451)
    scores = LRMReward(lrm, mode, scale=3.0)(candidates, 501, ctx)
    assert torch.allclose(scores, 3.0 * candidates.flatten(1).mean(1))
    (timesteps, prompts), = lrm.calls
    assert timesteps == [expected] * 4 and prompts == ["a", "a", "b", "b"]


def test_spm_reward_scores_the_candidates_x0_at_their_own_timestep():
    calls = []

    class FakeSPM:
        def score_clean_latents(self, x0, timesteps, texts):
            calls.append((x0, timesteps.tolist(), texts))
            return x0.flatten(1).sum(1)

    x0 = torch.randn(6, 4, 2, 2)
    ctx, candidates = context(["a", "b", "c"], k=2, t_next=701, x0=x0)
    scores = SPMReward(FakeSPM(), scale=0.5)(candidates, 751, ctx)
    (seen, timesteps, texts), = calls
    assert seen is x0 and timesteps == [701] * 6 and texts == ["a", "a", "b", "b", "c", "c"]
    assert torch.allclose(scores, 0.5 * x0.flatten(1).sum(1))


# ---------------------------------------------------------------------------------------------------- bad input

def test_a_pipeline_of_another_class_is_refused_before_any_output(sd15, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    lpo_config = from_dict(LPOConfig, {**paper_section("sd15", "lpo"), **TWO_STEPS}, "lpo")
    spo_config = from_dict(SPOConfig, {**paper_section("sd15", "spo"), **TWO_STEPS}, "spo")
    out, metrics = tmp_path / "out", tmp_path / "metrics.json"
    for run in (lambda: train_lpo(model, sd15["prompts"], sd15["lrm"], lpo_config, 0, out, metrics),
                lambda: train_spo(model, sd15["prompts"], tmp_path / "no-spm", spo_config, 0, out, metrics),
                lambda: train_dpo(model, sd15["prefs"], DiffusionDPOConfig(), 0, out, metrics)):
        with pytest.raises(UnsupportedModelError, match="holds a StableDiffusion3Pipeline.*SDXL-type"):
            run()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("content, message", [
    ("", "is empty or not JSON"),
    ("{}", "has no prompt set 'train'"),
    ('{"train": []}', "must be a non-empty list"),
    ('["a red circle"]', "has no prompt set 'train'")])
def test_bad_prompt_files_are_named(tmp_path, content, message):
    (tmp_path / "prompts.json").write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        training_prompts(tmp_path / "prompts.json")
    assert str(tmp_path / "prompts.json") in str(error.value)


def test_cli_stops_on_an_empty_prompt_file_without_output(sd15, tmp_path, capsys):
    (tmp_path / "prompts.json").write_text("")
    code = main(["optimize", "lpo", "--model", str(sd15["model"]), "--prompts", str(tmp_path / "prompts.json"),
                 "--lrm", str(sd15["lrm"]), "--out", str(tmp_path / "lpo"), "--metrics", str(tmp_path / "m.json")])
    assert code == 2 and "is empty or not JSON" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.json"]


def test_cli_stops_on_a_nan_loss_without_output(sd15, tmp_path, monkeypatch, capsys):
    real_loss = lpo.optimize.step_trainer.step_dpo_loss
    monkeypatch.setattr(lpo.optimize.step_trainer, "step_dpo_loss", lambda *a, **k: real_loss(*a, **k) * math.nan)
    params = json.dumps({"lpo": {**paper_section("sd15", "lpo"), **TWO_STEPS, "num_inference_steps": 4}})
    code = main(["optimize", "lpo", "--params", params, "--model", str(sd15["model"]), "--prompts",
                 str(sd15["prompts"]), "--lrm", str(sd15["lrm"]), "--out", str(tmp_path / "lpo"), "--metrics",
                 str(tmp_path / "m.json")])
    err = capsys.readouterr().err
    assert code == 2 and "loss is nan" in err and "optimizer step 1" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("section, change, message", [
    ("lpo", {"lora_rank": 0}, "lora_rank=0"),
    ("lpo", {"samples_per_step": 1}, "K must be >= 2"),
    ("lpo", {"threshold_max": 1.0}, r"threshold_max=1.0 must lie in \(0, 1\)"),
    ("lpo", {"lrm_timestep": "child"}, "lrm_timestep='child'"),
    ("lpo", {"reward_scale": 0.0}, "reward_scale=0.0 must be > 0"),
    ("spo", {"timestep_range": [750, 0]}, "timestep_range"),
    ("diffusion_dpo", {"lora_rank": 0}, "lora_rank=0"),
    ("lpo_ablations", {"thresholds": [[0.3, 1.2]]}, r"threshold_max=1.2 must lie in \(0, 1\)"),
    ("lpo_ablations", {"timestep_ranges": [[900, 100]]}, "lpo_ablations.timestep_ranges"),
    ("lpo_ablations", {"lrm_timesteps": ["child"]}, "lpo_ablations.lrm_timesteps"),
    ("evaluate", {"tie_band": -0.1}, "evaluate.tie_band")])
def test_bad_optimisation_settings_are_named(section, change, message):
    """What check_config (run when the DAG starts) does for these sections, on the default config's values."""
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    with pytest.raises(ValueError, match=message):
        from_dict(SECTIONS[section], {**config[section], **change}, section)


@pytest.mark.parametrize("section, change, message", [
    ("lpo", {"lora_rank": 0}, "lora_rank=0"),
    # Issue 16's bad inputs: each named by its key before any job.
    ("grpo", {"samples_per_step": 1}, "grpo.samples_per_step=1: K must be >= 2 to form a group"),
    ("grpo", {"reference": "no/such/pipeline"}, "grpo.reference='no/such/pipeline': no saved pipeline UNet"),
    ("lrm_calibrated", {"uncertainty_scale": -1.0}, "lrm_calibrated.uncertainty_scale=-1.0 must be > 0"),
    ("reward_study", {"ensemble_draws": [0, 16]}, r"reward_study.ensemble_draws=\[0, 16\]: every M must be >= 2"),
    ("step_fidelity", {"ensemble_draws": [0]}, r"step_fidelity.ensemble_draws=\[0\]: every M must be >= 1"),
    ("timing", {"ensemble_draws": [0]}, r"timing.ensemble_draws=\[0\]"),
])
def test_a_bad_setting_stops_the_dag_at_start(section, change, message):
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config[section] = {**config[section], **change}
    with pytest.raises(ValueError, match=message):
        check_config(config)


# ---------------------------------------------------------------------------------------------------- ablations

def test_ablation_variants_share_one_reference_run_and_override_one_setting():
    main_run = dataclasses.asdict(LPOConfig(timestep_range=(0, 950)))
    ablations = dataclasses.asdict(LPOAblationConfig(rounds=7, thresholds=((0.3, 0.3), (0.35, 0.5), (0.3, 0.45)),
                                                     betas=(100.0,), lrm_timesteps=("zero",),
                                                     timestep_ranges=((750, 950),)))
    runs = ablation_variants(main_run, ablations)
    assert set(runs) == {REFERENCE, "th0.3", "th0.3-0.45", "beta100", "lrmt-zero", "t750-950"}
    reference = runs[REFERENCE]
    assert reference["settings"] == {**main_run, "rounds": 7, "timestep_range": [0, 950]}
    assert reference["rows"] == [("threshold", (0.35, 0.5)), ("beta", 500.0), ("lrm_timestep", "parent"),
                                 ("timestep_range", (0, 950))]
    changed = {run: {k for k, v in r["settings"].items() if v != reference["settings"][k]} for run, r in runs.items()}
    assert changed == {REFERENCE: set(), "th0.3": {"threshold", "threshold_min", "threshold_max"},
                       "th0.3-0.45": {"threshold_min", "threshold_max"}, "beta100": {"beta"},
                       "lrmt-zero": {"lrm_timestep"}, "t750-950": {"timestep_range"}}
    assert runs["th0.3"]["settings"]["threshold"] == "constant"
    for run in runs.values():  # every run's settings are a valid lpo section
        from_dict(LPOConfig, run["settings"], "lpo")
    assert ablation_variants(main_run, {**ablations, "thresholds": [], "betas": [], "lrm_timesteps": [],
                                   "timestep_ranges": []}) == {}


def test_shipped_configs_ablation_runs_are_valid_and_smoke_runs_one():
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    runs = ablation_variants(config["lpo"], config["lpo_ablations"])
    assert len(runs) == 19 and REFERENCE in runs
    smoke = yaml.safe_load((REPO / "config/smoke.yaml").read_text())
    merged = {k: {**config[k], **smoke.get(k, {})} for k in ("lpo", "lpo_ablations")}
    smoke_runs = ablation_variants(merged["lpo"], merged["lpo_ablations"])
    # The smoke reference run has the main run's settings, so the DAG reuses the main LPO run for it.
    assert set(smoke_runs) == {REFERENCE, "lrmt-zero"} and smoke_runs[REFERENCE]["settings"] == merged["lpo"]


def test_preference_dataset_without_train_pairs_is_named(tmp_path, sd15):
    prefs = write_preferences(tmp_path / "prefs", image_size=HUB_IMAGE_SIZE, sizes={"train": 2, "validation_unique": 1},
                              unlabeled={"train": [0, 1]})
    with pytest.raises(ValueError, match="no labelled pairs"):
        train_dpo(sd15["model"], prefs, DiffusionDPOConfig(steps=1, batch_size=1), 0, tmp_path / "dpo")
    assert not (tmp_path / "dpo").exists()
