"""LPO / SPO / Diffusion-DPO entry points: the step rewards, the paper configs' optimisation sections on tiny models
of SD1.5's and SDXL's topology saved in hub layout, the ablation runs, and bad input."""
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import (AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from test_preference_data import write_preferences
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import lpo.step_trainer
from lpo.ablations import REFERENCE, LPOAblationConfig, ablation_variants
from lpo.architectures import SD15_UNET, SD_VAE, SDXL_UNET, tiny
from lpo.checks import check_config
from lpo.cli import main
from lpo.config import from_dict
from lpo.diffusion_dpo import DiffusionDPOConfig
from lpo.evaluate import EvaluateConfig
from lpo.lrm import LatentRewardModel, LRMConfig
from lpo.optimize import (LPOConfig, LRMReward, SPMReward, SPOConfig, UnsupportedModelError, train_dpo, train_lpo,
                          train_spo, training_prompts)
from lpo.pixel_reward import PixelReward, PixelRewardConfig, step_aware_copy
from lpo.sampler import PromptBatch, StepContext
from lpo.spm import SPM, SPMConfig
from lpo.world.tokenizer import build_clip_tokenizer

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a small red circle on a gray background", "a large blue square on a white background",
           "a green triangle on the left", "a purple cross at the top"]
IMAGE_SIZE = 64  # the tiny SD VAE keeps SD's 8x downsampling: 8x8 latents
# SD1.5's scheduler/scheduler_config.json on the hub.
SD15_HUB_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                      "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
                      "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
SECTIONS = {"lpo": LPOConfig, "spo": SPOConfig, "diffusion_dpo": DiffusionDPOConfig,
            "lpo_ablations": LPOAblationConfig, "evaluate": EvaluateConfig}
# Two rounds of one prompt; every kept tuple of a round fits one optimizer step: two optimizer steps in all.
TWO_STEPS = {"rounds": 2, "sample_batch_size": 1, "train_batch_size": 20}


def paper_section(world: str, section: str) -> dict:
    return yaml.safe_load((REPO / "config" / f"{world}.yaml").read_text())[section]


def text_encoder(width: int, projection: bool = False):
    config = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=77, projection_dim=width)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def write_prompts(path: Path, sets: dict) -> Path:
    path.write_text(json.dumps(sets))
    return path


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """A tiny SD1.5-topology pipeline in hub layout (PNDM scheduler config as on the hub), an LRM on its UNet,
    an SPM on a tiny pixel model, a prompt file and a preference dataset."""
    root = tmp_path_factory.mktemp("sd15")
    tokenizer = build_clip_tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**tiny(SD15_UNET), "sample_size": IMAGE_SIZE // 8})
    encoder = text_encoder(unet.config.cross_attention_dim)
    vae = AutoencoderKL(**{**tiny(SD_VAE), "sample_size": IMAGE_SIZE})
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler.from_config(SD15_HUB_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "model")
    (root / "model/scheduler/scheduler_config.json").write_text(json.dumps(SD15_HUB_SCHEDULER))

    torch.manual_seed(1)
    lrm = LatentRewardModel(UNet2DConditionModel.from_config(unet.config), encoder, tokenizer,
                            LRMConfig(head_backend="reference"))
    lrm.logit_scale.data.fill_(math.log(1e4))  # a reward sharp enough that the sigma thresholds keep pairs
    lrm.save(root / "lrm")
    (root / "lrm_metrics.json").write_text(json.dumps({"train_seconds": 12.5}))

    pixel = PixelReward(PixelRewardConfig(width=8, embed_dim=16, text_width=16, text_layers=1, text_heads=2),
                        text_encoder(16), tokenizer)
    spm = SPM(step_aware_copy(pixel), pipe, SPMConfig())
    spm.model.logit_scale.data.fill_(math.log(1e4))
    spm.save(root / "spm")
    (root / "spm_metrics.json").write_text(json.dumps({"train_seconds": 30.0}))
    write_preferences(root / "prefs", image_size=IMAGE_SIZE, sizes={"train": 8, "validation_unique": 2,
                                                                     "test_unique": 2})
    return {"root": root, "model": root / "model", "lrm": root / "lrm", "spm": root / "spm",
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
                       PromptBatch(prompts, torch.arange(len(prompts)), embeds, embeds[:1]), k, candidates,
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


# ---------------------------------------------------------------------------------------------------- paper configs

def test_sd15_lpo_section_trains_two_steps_with_an_lrm_on_an_sd15_topology_model(sd15, tmp_path):
    config = from_dict(LPOConfig, {**paper_section("sd15", "lpo"), **TWO_STEPS}, "lpo")
    assert (config.lora_rank, config.beta, config.samples_per_step, config.guidance_scale) == (4, 500.0, 4, 5.0)
    metrics = train_lpo(sd15["model"], sd15["prompts"], sd15["lrm"], config, 0, tmp_path / "lpo",
                        tmp_path / "lpo.json", sd15["root"] / "lrm_metrics.json")
    assert metrics["optimizer_steps"] == 2 and metrics["rounds"] == 2
    assert metrics["per_timestep"]["optimised"] == [True] * 20 and metrics["pairs_kept"] > 2
    assert metrics["cost"] == {"reward_models": {"lrm": 12.5}, "reward_modelling_seconds": 12.5,
                               "preference_optimisation_seconds": pytest.approx(sum(
                                   metrics["device_seconds"].values()))}
    assert json.loads((tmp_path / "lpo.json").read_text())["cost"]["reward_modelling_seconds"] == 12.5
    StableDiffusionPipeline.from_pretrained(tmp_path / "lpo", local_files_only=True)


def test_sd15_spo_section_trains_two_steps_with_an_spm_on_t_up_to_750(sd15, tmp_path):
    config = from_dict(SPOConfig, {**paper_section("sd15", "spo"), **TWO_STEPS}, "spo")
    metrics = train_spo(sd15["model"], sd15["prompts"], sd15["spm"], config, 0, tmp_path / "spo",
                        tmp_path / "spo.json", sd15["root"] / "spm_metrics.json")
    per_t = metrics["per_timestep"]
    # t_cur - 1 <= 750: the four noisiest of the 20 steps (951 ... 801) are not optimised.
    assert per_t["optimised"] == [False] * 4 + [True] * 16 and per_t["pairs_scored"][:4] == [0] * 4
    assert metrics["optimizer_steps"] == 2 and metrics["cost"]["reward_models"] == {"spm": 30.0}
    assert (tmp_path / "spo" / "model_index.json").exists()


def test_sd15_diffusion_dpo_section_trains_on_the_train_pairs(sd15, tmp_path):
    config = from_dict(DiffusionDPOConfig, {**paper_section("sd15", "diffusion_dpo"), "steps": 2, "batch_size": 2},
                       "diffusion_dpo")
    assert (config.beta_dpo, config.lora_rank) == (5000.0, 4)
    metrics = train_dpo(sd15["model"], sd15["prefs"], config, 0, tmp_path / "dpo", tmp_path / "dpo.json")
    assert len(metrics["loss_curve"]) == 2 and metrics["pairs"] + metrics["ties_skipped"] == 8
    assert metrics["cost"]["reward_modelling_seconds"] == 0.0
    assert (tmp_path / "dpo" / "unet").is_dir() and (tmp_path / "dpo.json").exists()


@pytest.mark.parametrize("world", ["sd15", "sd21", "sdxl"])
def test_paper_configs_carry_the_papers_settings_and_pass_every_check(world):
    step = from_dict(LPOConfig, paper_section(world, "lpo"), "lpo")
    spo = from_dict(SPOConfig, paper_section(world, "spo"), "spo")
    dpo = from_dict(DiffusionDPOConfig, paper_section(world, "diffusion_dpo"), "diffusion_dpo")
    xl = world == "sdxl"
    assert step.lora_rank == dpo.lora_rank == spo.lora_rank == (64 if xl else 4)
    assert (step.threshold_min, step.threshold_max) == ((0.45, 0.6) if xl else (0.35, 0.5))
    assert step.learning_rate == (1e-5 if xl else 6e-5)
    assert (step.beta, step.samples_per_step, step.guidance_scale, step.num_inference_steps) == (500.0, 4, 5.0, 20)
    assert (step.sample_batch_size, step.train_batch_size) == ((4, 4) if xl else (5, 10))
    assert spo.timestep_range == (0, 750) and step.timestep_range == (0, 950)
    assert step.reward_scale == spo.reward_scale == 1.0  # the reward models' own logit scales
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    override = yaml.safe_load((REPO / "config" / f"{world}.yaml").read_text())
    assert set(override) == {"mpcf", "lrm", "lpo", "spo", "diffusion_dpo"}
    lrm = override["lrm"]
    assert (lrm["steps"], lrm["warmup_steps"], lrm["batch_size"]) == ((8000, 1000, 32) if xl else (4000, 500, 128))
    assert lrm["learning_rate"] == 1e-5 and lrm["model"]["guidance_scale"] == 7.5 and override["mpcf"]["strategy"] == 2
    check_config({**config, **{k: {**config[k], **v} for k, v in override.items()}})


def build_sdxl_hub(root: Path) -> Path:
    tokenizer = build_clip_tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    first, second = text_encoder(16), text_encoder(32, projection=True)
    unet = UNet2DConditionModel(**{**tiny(SDXL_UNET), "sample_size": 8, "cross_attention_dim": 48,
                                   "projection_class_embeddings_input_dim": 32 + 6 * 8})
    pipe = StableDiffusionXLPipeline(vae=AutoencoderKL(**{**tiny(SD_VAE), "sample_size": 64}), text_encoder=first,
                                     text_encoder_2=second, tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                     scheduler=EulerDiscreteScheduler())
    pipe.save_pretrained(root / "model")
    return root / "model"


def test_sdxl_is_refused_before_any_output_naming_the_missing_added_conditions(sd15, tmp_path):
    model = build_sdxl_hub(tmp_path)
    step = from_dict(LPOConfig, {**paper_section("sdxl", "lpo"), **TWO_STEPS}, "lpo")
    spo = from_dict(SPOConfig, {**paper_section("sdxl", "spo"), **TWO_STEPS}, "spo")
    dpo = from_dict(DiffusionDPOConfig, paper_section("sdxl", "diffusion_dpo"), "diffusion_dpo")
    for run in (lambda: train_lpo(model, sd15["prompts"], sd15["lrm"], step, 0, tmp_path / "out", tmp_path / "m"),
                lambda: train_spo(model, sd15["prompts"], sd15["spm"], spo, 0, tmp_path / "out", tmp_path / "m"),
                lambda: train_dpo(model, sd15["prefs"], dpo, 0, tmp_path / "out", tmp_path / "m")):
        with pytest.raises(UnsupportedModelError, match="SDXL.*added conditions"):
            run()
    assert not (tmp_path / "out").exists() and not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------------- bad input

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
    real_loss = lpo.step_trainer.step_dpo_loss
    monkeypatch.setattr(lpo.step_trainer, "step_dpo_loss", lambda *a, **k: real_loss(*a, **k) * math.nan)
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


def test_a_bad_optimisation_setting_stops_the_dag_at_start():
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config["lpo"] = {**config["lpo"], "lora_rank": 0}
    with pytest.raises(ValueError, match="lora_rank=0"):
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
    prefs = write_preferences(tmp_path / "prefs", image_size=IMAGE_SIZE, sizes={"train": 2, "validation_unique": 1},
                              unlabeled={"train": [0, 1]})
    with pytest.raises(ValueError, match="no labelled pairs"):
        train_dpo(sd15["model"], prefs, DiffusionDPOConfig(steps=1, batch_size=1), 0, tmp_path / "dpo")
    assert not (tmp_path / "dpo").exists()
