"""The paper configs' optimisation sections (config/sd15.yaml and config/sdxl.yaml: lpo, spo, diffusion_dpo) run
two optimisation steps through the CLI, as the DAG calls it, on tiny random models of SD1.5's and SDXL's topology
saved in hub layout: LPO with a tiny LRM on the pipeline's own UNet, SPO with a tiny SPM, Diffusion-DPO on a tiny
preference dataset. Only the budget is overridden; the merged pipeline must load as its class and sample."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from test_preference_data import write_preferences
from tiny_sd import (HUB_IMAGE_SIZE, build_tiny_lrm, build_tiny_sd15_pipeline, build_tiny_sdxl_pipeline, build_tiny_spm,
                     unet_weights)

from lpo.checks import check_config
from lpo.cli import main
from lpo.config import from_dict
from lpo.optimize.diffusion_dpo import DiffusionDPOConfig
from lpo.reward.lrm import LRMConfig
from lpo.optimize.methods import GRPOConfig, LPOConfig, SPOConfig
from lpo.pipelines import pipeline_class

REPO = Path(__file__).resolve().parents[1]
WORLDS = {"sd15": (build_tiny_sd15_pipeline, StableDiffusionPipeline),
          "sdxl": (build_tiny_sdxl_pipeline, StableDiffusionXLPipeline)}
PROMPTS = ["a small red circle on a gray background", "a large blue square on a white background",
           "a green triangle on the left", "a purple cross at the top"]
# Two rounds of one prompt, every kept tuple of a round in one optimizer step: two optimizer steps in all, each
# accumulated over micro-batches; in fp32, since the sections' fp16 needs a GPU.
BUDGET = {"lpo": {"rounds": 2, "sample_batch_size": 1, "train_batch_size": 20, "mixed_precision": "no"},
          "spo": {"rounds": 2, "sample_batch_size": 1, "train_batch_size": 20, "mixed_precision": "no"},
          "grpo": {"rounds": 2, "sample_batch_size": 1, "train_batch_size": 20, "mixed_precision": "no"},
          "diffusion_dpo": {"steps": 2, "batch_size": 2, "per_device_batch_size": 1, "mixed_precision": "no"}}
REWARD_SECONDS = {"lrm": 12.5, "spm": 30.0}  # the reward models' training metrics, for the cost summary


def paper_config(world: str) -> dict:
    return yaml.safe_load((REPO / "config" / f"{world}.yaml").read_text())


@pytest.fixture(scope="module", params=list(WORLDS))
def world(request, tmp_path_factory):
    """The world's tiny pipeline, an LRM built from its UNet with the config's lrm.model settings, an SPM, a prompt
    file and a preference dataset."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    model = WORLDS[name][0](root / "model")
    lrm_config = from_dict(LRMConfig, paper_config(name)["lrm"]["model"], "lrm.model")
    (root / "prompts.json").write_text(json.dumps({"train": PROMPTS}))
    for reward, seconds in REWARD_SECONDS.items():
        (root / f"{reward}_metrics.json").write_text(json.dumps({"train_seconds": seconds}))
    return {"name": name, "root": root, "model": model, "lrm": build_tiny_lrm(model, root / "lrm", lrm_config),
            "spm": build_tiny_spm(model, root / "spm"), "prompts": root / "prompts.json",
            "prefs": write_preferences(root / "prefs", image_size=HUB_IMAGE_SIZE,
                                       sizes={"train": 8, "validation_unique": 2, "test_unique": 2})}


def run_cli(world: dict, method: str, out: Path, capsys) -> dict:
    """`lpo optimize <method>` with the paper section plus BUDGET as --params; the metrics it wrote."""
    section = {**paper_config(world["name"])[method], **BUDGET[method]}
    root = world["root"]
    lrm = ["--prompts", world["prompts"], "--lrm", world["lrm"], "--lrm-metrics", root / "lrm_metrics.json"]
    inputs = {"lpo": lrm, "grpo": lrm,
              "spo": ["--prompts", world["prompts"], "--spm", world["spm"], "--spm-metrics", root / "spm_metrics.json"],
              "diffusion_dpo": ["--preferences", world["prefs"]]}[method]
    argv = ["optimize", method.replace("_", "-"), "--params", json.dumps({method: section}), "--model",
            world["model"], *inputs, "--out", out, "--metrics", out.with_suffix(".json")]
    code = main([str(a) for a in argv])
    assert code == 0, capsys.readouterr().err[-3000:]
    return json.loads(out.with_suffix(".json").read_text())


def check_merged_pipeline(world: dict, out: Path) -> None:
    """The LoRA moved the UNet, the merged pipeline loads as the base's class and samples 64x64 images."""
    # Diffusion-DPO's two steps are the first of its 500 warmup steps (lr 0, then lr / 500): its LoRA moves the
    # weights by ~1e-8, still a change in float32.
    merged, base = unet_weights(out), unet_weights(world["model"])
    assert merged.keys() == base.keys() and not any("lora" in k for k in merged)
    assert max((merged[k] - base[k]).abs().max().item() for k in merged) > 0, "the LoRA left the UNet unchanged"
    pipe_class = WORLDS[world["name"]][1]
    assert pipeline_class(out) == pipe_class.__name__
    pipe = pipe_class.from_pretrained(out, local_files_only=True)
    images = pipe(PROMPTS[:1], num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, HUB_IMAGE_SIZE, HUB_IMAGE_SIZE, 3) and np.isfinite(images).all()


def test_lpo_section_takes_two_optimizer_steps_with_an_lrm_of_the_models_topology(world, tmp_path, capsys):
    metrics = run_cli(world, "lpo", tmp_path / "lpo", capsys)
    assert metrics["optimizer_steps"] == 2 and metrics["rounds"] == 2
    assert metrics["per_timestep"]["optimised"] == [True] * 20  # [0, 950]: every step of the 20
    assert metrics["pairs_kept"] >= 2 and all(np.isfinite(loss) for _, loss in metrics["loss_curve"])
    assert metrics["cost"] == {"reward_models": {"lrm": 12.5}, "reward_modelling_seconds": 12.5,
                               "preference_optimisation_seconds": pytest.approx(sum(
                                   metrics["device_seconds"].values()))}
    check_merged_pipeline(world, tmp_path / "lpo")


def test_spo_section_takes_two_optimizer_steps_with_an_spm_on_t_up_to_750(world, tmp_path, capsys):
    metrics = run_cli(world, "spo", tmp_path / "spo", capsys)
    per_t = metrics["per_timestep"]
    # t_cur - 1 <= 750: the four noisiest of the 20 steps (951 ... 801) are sampled but not optimised.
    assert per_t["optimised"] == [False] * 4 + [True] * 16 and per_t["pairs_scored"][:4] == [0] * 4
    assert metrics["optimizer_steps"] == 2 and metrics["rounds"] == 2
    assert metrics["cost"]["reward_models"] == {"spm": 30.0}
    check_merged_pipeline(world, tmp_path / "spo")


# Step-wise GRPO (Table 12) is configured for SD1.5 only: the sd15 world of the fixture.
@pytest.mark.parametrize("world", ["sd15"], indirect=True)
def test_sd15_grpo_section_trains_with_table_12_settings(world, tmp_path, capsys):
    grpo = from_dict(GRPOConfig, paper_config("sd15")["grpo"], "grpo")
    lpo = from_dict(LPOConfig, paper_config("sd15")["lpo"], "lpo")
    assert (grpo.samples_per_step, grpo.beta, grpo.eps, grpo.num_inference_steps) == (4, 0.1, 0.1, 20)
    assert grpo.rounds == 8 * lpo.rounds and grpo.budgets == (1,)  # Table 12: 8x LPO's training time
    # 2 rounds of one prompt's 20 groups, all in one optimizer step a round.
    metrics = run_cli(world, "grpo", tmp_path / "grpo", capsys)
    assert (metrics["objective"], metrics["rounds"], metrics["optimizer_steps"]) == ("grpo", 2, 2)
    assert metrics["cost"]["reward_models"] == {"lrm": 12.5}
    check_merged_pipeline(world, tmp_path / "grpo")


def test_diffusion_dpo_section_takes_two_optimizer_steps_on_the_train_pairs(world, tmp_path, capsys):
    metrics = run_cli(world, "diffusion_dpo", tmp_path / "dpo", capsys)
    assert [step for step, _ in metrics["loss_curve"]] == [1, 2]
    assert metrics["pairs"] + metrics["ties_skipped"] == 8 and metrics["cost"]["reward_modelling_seconds"] == 0.0
    check_merged_pipeline(world, tmp_path / "dpo")


@pytest.mark.parametrize("world_name", ["sd15", "sd21", "sdxl"])
def test_paper_configs_carry_the_papers_settings_and_pass_every_check(world_name):
    override = paper_config(world_name)
    step = from_dict(LPOConfig, override["lpo"], "lpo")
    spo = from_dict(SPOConfig, override["spo"], "spo")
    dpo = from_dict(DiffusionDPOConfig, override["diffusion_dpo"], "diffusion_dpo")
    xl = world_name == "sdxl"
    assert step.lora_rank == dpo.lora_rank == spo.lora_rank == (64 if xl else 4)
    assert (step.threshold_min, step.threshold_max) == ((0.45, 0.6) if xl else (0.35, 0.5))
    assert step.learning_rate == (1e-5 if xl else 6e-5)
    assert (step.beta, step.samples_per_step, step.guidance_scale, step.num_inference_steps) == (500.0, 4, 5.0, 20)
    # Global batches: the official per-GPU batches on its 4 GPUs, micro-batches of the per-GPU batch, fp16.
    assert (step.sample_batch_size, step.train_batch_size, step.per_device_batch_size) == \
        ((16, 16, 4) if xl else (20, 40, 10))
    assert step.mixed_precision == spo.mixed_precision == dpo.mixed_precision == "fp16"
    assert step.gradient_checkpointing == xl and (dpo.batch_size, dpo.gradient_checkpointing) == (2048, True)
    assert spo.timestep_range == (0, 750) and step.timestep_range == (0, 950)
    assert step.reward_scale == spo.reward_scale == 1.0  # the reward models' own logit scales
    assert dataclasses.replace(spo, timestep_range=step.timestep_range, rounds=step.rounds) == \
        SPOConfig(**{k: v for k, v in dataclasses.asdict(step).items() if k != "lrm_timestep"})
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    assert {"mpcf", "lrm", "lpo", "spo", "diffusion_dpo"} <= set(override)
    lrm = override["lrm"]
    assert (lrm["steps"], lrm["warmup_steps"], lrm["batch_size"]) == ((8000, 1000, 32) if xl else (4000, 500, 128))
    assert lrm["learning_rate"] == 1e-5 and lrm["model"]["guidance_scale"] == 7.5 and override["mpcf"]["strategy"] == 2
    # 16 per GPU x 8 GPUs (LRM-XL: 4 x 8), in DeepSpeed's bf16.
    assert (lrm["per_device_batch_size"], lrm["mixed_precision"]) == ((4 if xl else 16), "bf16")
    check_config({**config, **{k: {**config.get(k, {}), **v} for k, v in override.items()}})
