"""Checks the schema cannot express (they relate several keys), run when the DAG starts so that bad input
stops the run before any job, with a message naming the key."""
from __future__ import annotations

from lpo.config import from_dict
from lpo.seeding import stage_seed


def check_config(config: dict) -> None:
    from lpo.optimize.ablations import LPOAblationConfig
    from lpo.optimize.diffusion_dpo import DiffusionDPOConfig
    from lpo.optimize.fidelity import StepFidelityConfig
    from lpo.evaluate.scores import EvaluateConfig
    from lpo.reward.lrm_training import LRMTrainConfig
    from lpo.reward.mpcf import MPCFConfig
    from lpo.optimize.methods import LPOConfig, SPOConfig
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
                      ("lrm", LRMTrainConfig), ("pixel_reward", PixelRewardConfig), ("spm", SPMConfig),
                      ("reward_study", RewardStudyConfig), ("reward_scaling", RewardScalingConfig),
                      ("probes", ProbeConfig),
                      ("lpo", LPOConfig), ("spo", SPOConfig),
                      ("diffusion_dpo", DiffusionDPOConfig), ("lpo_ablations", LPOAblationConfig),
                      ("step_fidelity", StepFidelityConfig),
                      ("evaluate", EvaluateConfig), ("timing", TimingConfig)):
        from_dict(cls, config[name], name)


def check_sd_world(config: dict):
    """The SD world's settings (lpo.sd.config.SDWorldConfig, SDPipelineConfig), or FileNotFoundError listing every
    model, data set and checkpoint its stages lack, with its hub id and config key (lpo.sd.inputs.require_inputs)."""
    from lpo.sd.config import SDPipelineConfig, sd_stages, sd_world_config
    from lpo.sd.inputs import require_inputs

    world = sd_world_config(config["sd_world"])
    pipeline = from_dict(SDPipelineConfig, config.get("sd_pipeline"), "sd_pipeline")
    return require_inputs(world, sd_stages(world, pipeline)), pipeline
