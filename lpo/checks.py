"""Checks the schema cannot express (they relate several keys), run when the DAG starts so that bad input
stops the run before any job, with a message naming the key."""
from __future__ import annotations

import os
from pathlib import Path

from lpo.config import from_dict
from lpo.seeding import stage_seed

# The values of TRITON_INTERPRET that triton reads as true (its getenv_bool), which run the Triton head on the CPU.
TRITON_INTERPRET_ON = ("1", "true", "on", "yes", "y")


def check_config(config: dict) -> None:
    from lpo.optimize.ablations import LPOAblationConfig
    from lpo.optimize.diffusion_dpo import DiffusionDPOConfig
    from lpo.optimize.fidelity import StepFidelityConfig
    from lpo.evaluate.scores import EvaluateConfig
    from lpo.reward.lrm import CalibratedLRMConfig
    from lpo.reward.lrm_training import LRMTrainConfig
    from lpo.reward.mpcf import MPCFConfig
    from lpo.optimize.methods import GRPOConfig, LPOConfig, SPOConfig
    from lpo.reward.pixel import PixelRewardConfig
    from lpo.reward.probes import ProbeConfig
    from lpo.reward.scaling import RewardScalingConfig
    from lpo.reward.study import RewardStudyConfig
    from lpo.reward.spm import SPMConfig
    from lpo.timing.step import TimingConfig
    from lpo.world.base_model import BaseModelConfig, VAEConfig, check_image_size
    from lpo.world.clip import WorldCLIPConfig
    from lpo.world.corpus import CorpusConfig
    from lpo.world.judge import JudgeConfig
    from lpo.world.judge_agreement import JudgeAgreementConfig
    from lpo.world.preferences import PreferencesConfig
    from lpo.world.report import ReportConfig
    from lpo.world.settings import PromptsConfig, WorldConfig, make_prompt_sets
    from lpo.world.side_scorers import SideScorerConfig

    world = from_dict(WorldConfig, config["world"], "world")
    grammar = world.grammar(stage_seed(config["seed"], "grammar"))
    make_prompt_sets(grammar, from_dict(PromptsConfig, config["prompts"], "prompts"), 0)
    base_model = from_dict(BaseModelConfig, config["base_model"], "base_model")
    check_image_size(world.image_size, from_dict(VAEConfig, config["vae"], "vae"), base_model.unet)
    preferences = from_dict(PreferencesConfig, config["preferences"], "preferences")
    unsaved = [step for step in preferences.snapshot_steps() if step not in base_model.snapshots]
    if unsaved:
        raise ValueError(f"preferences.sources names checkpoint(s) {unsaved}, which the base model does not save: "
                         f"add them to base_model.snapshots (now {list(base_model.snapshots)})")
    for name, cls in (("corpus", CorpusConfig), ("judge", JudgeConfig), ("side_scorers", SideScorerConfig),
                      ("world_clip", WorldCLIPConfig), ("report", ReportConfig), ("mpcf", MPCFConfig),
                      ("lrm", LRMTrainConfig), ("lrm_calibrated", CalibratedLRMConfig),
                      ("pixel_reward", PixelRewardConfig), ("spm", SPMConfig),
                      ("reward_study", RewardStudyConfig), ("reward_scaling", RewardScalingConfig),
                      ("probes", ProbeConfig), ("judge_agreement", JudgeAgreementConfig),
                      ("lpo", LPOConfig), ("spo", SPOConfig), ("grpo", GRPOConfig),
                      ("diffusion_dpo", DiffusionDPOConfig), ("lpo_ablations", LPOAblationConfig),
                      ("step_fidelity", StepFidelityConfig),
                      ("evaluate", EvaluateConfig), ("timing", TimingConfig)):
        from_dict(cls, config[name], name)
    check_cuda(config)
    check_output_dirs(config)


def output_dirs(config: dict) -> dict[str, Path]:
    """The workflow's output directories, relative to its working directory, as workflow/rules/common.smk names
    them (RESULTS, REPORTS)."""
    name = config["world"]["name"]
    return {"results": Path("results", name), "reports": Path("reports", name)}


def check_output_dirs(config: dict, workdir: Path | None = None) -> None:
    """ValueError unless every output directory can be created and written in `workdir` (the current directory,
    Snakemake's -d, by default); otherwise a run would find out only when a job first writes, e.g. at a training
    checkpoint."""
    workdir = Path.cwd() if workdir is None else workdir
    for kind, relative in output_dirs(config).items():
        directory = workdir / relative
        # The deepest path that is there already is where the job's mkdir / write would fail.
        there = next(p for p in (directory, *directory.parents) if os.path.lexists(p))
        if not there.is_dir():
            problem, fix = f"{there} is not a directory", f"move {there} aside"
        elif not os.access(there, os.W_OK | os.X_OK):
            problem, fix = f"{there} is not writable by this user", f"fix the permissions of {there}"
        else:
            continue
        raise ValueError(f"the {kind} directory {directory} (from world.name={config['world']['name']!r}) cannot "
                         f"be created or written: {problem}; run in another working directory (snakemake -d DIR) "
                         f"or {fix}")


def check_cuda(config: dict) -> None:
    """ValueError when a head_backend asks for Triton on a machine without CUDA, where the job would fail; the
    CPU interpreter (TRITON_INTERPRET, inherited by the jobs) runs it anywhere."""
    keys = [key for key, value in _leaves(config, "") if key.rsplit(".", 1)[-1] == "head_backend"
            and value == "triton"]
    if not keys or os.environ.get("TRITON_INTERPRET", "").lower() in TRITON_INTERPRET_ON:
        return
    import torch
    if not torch.cuda.is_available():
        raise ValueError(f"{keys[0]}: triton needs CUDA, and this machine has none (torch.cuda.is_available() is "
                         f"False): set it to auto (Triton on CUDA, PyTorch elsewhere) or reference, or run on a "
                         f"CUDA machine (or with TRITON_INTERPRET=1, the slow CPU interpreter)")


def _leaves(node, prefix: str):
    """(dotted key, value) of every non-mapping value in a nested config."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def check_sd_world(config: dict):
    """The SD world's settings (lpo.sd.config.SDWorldConfig, SDPipelineConfig), or FileNotFoundError listing every
    model, data set and checkpoint its stages lack, with its hub id and config key (lpo.sd.inputs.require_inputs)."""
    from lpo.sd.config import SDPipelineConfig, sd_stages, sd_world_config
    from lpo.sd.inputs import require_inputs

    world = sd_world_config(config["sd_world"])
    pipeline = from_dict(SDPipelineConfig, config.get("sd_pipeline"), "sd_pipeline")
    return require_inputs(world, sd_stages(world, pipeline)), pipeline
