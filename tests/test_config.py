"""The config files, the schema and the stage dataclasses describe the same keys."""
import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from lpo.optimize.ablations import LPOAblationConfig
from lpo.checks import check_config
from lpo.config import from_dict
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
from lpo.sd.config import METHODS, OfficialUNets, SDPipelineConfig, SDWorldConfig, sd_stages, sd_world_config
from lpo.reward.spm import SPMConfig
from lpo.timing.step import TimingConfig
from lpo.world.base_model import BaseModelConfig, VAEConfig
from lpo.world.clip import WorldCLIPConfig
from lpo.world.corpus import CorpusConfig
from lpo.world.judge import JudgeConfig
from lpo.world.judge_agreement import JudgeAgreementConfig
from lpo.world.preferences import PreferencesConfig
from lpo.world.report import ReportConfig
from lpo.world.settings import PromptsConfig, WorldConfig
from lpo.world.side_scorers import SideScorerConfig

REPO = Path(__file__).resolve().parents[1]
SECTIONS = {"world": WorldConfig, "prompts": PromptsConfig, "corpus": CorpusConfig, "judge": JudgeConfig,
            "vae": VAEConfig, "base_model": BaseModelConfig, "side_scorers": SideScorerConfig,
            "world_clip": WorldCLIPConfig, "preferences": PreferencesConfig, "report": ReportConfig,
            "mpcf": MPCFConfig, "lrm": LRMTrainConfig, "lrm_calibrated": CalibratedLRMConfig,
            "pixel_reward": PixelRewardConfig, "spm": SPMConfig,
            "reward_study": RewardStudyConfig, "reward_scaling": RewardScalingConfig, "probes": ProbeConfig,
            "judge_agreement": JudgeAgreementConfig,
            "lpo": LPOConfig, "spo": SPOConfig, "grpo": GRPOConfig, "diffusion_dpo": DiffusionDPOConfig,
            "lpo_ablations": LPOAblationConfig, "step_fidelity": StepFidelityConfig, "evaluate": EvaluateConfig,
            "timing": TimingConfig}


def schema() -> dict:
    return yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())


def default_config() -> dict:
    return yaml.safe_load((REPO / "config/config.yaml").read_text())


def schema_keys(node: dict) -> dict:
    return {k: (schema_keys(v) if v.get("type") == "object" and "properties" in v else None)
            for k, v in node["properties"].items()}


def dataclass_keys(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: (dataclass_keys(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else None)
            for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("section", SECTIONS)
def test_schema_matches_the_stage_dataclass(section):
    assert schema_keys(schema()["properties"][section]) == dataclass_keys(SECTIONS[section])


# Sections only the SD worlds' configs have (config/sd15.yaml, sd21.yaml, sdxl.yaml); their presence selects the SD
# rules, so the default config leaves them out.
SD_SECTIONS = {"sd_world": SDWorldConfig, "sd_pipeline": SDPipelineConfig}


def test_schema_lists_exactly_the_sections():
    # `compute` and `resources` are the workflow's own (how a rule launches its stage, what its job asks of the
    # scheduler): no stage reads them.
    assert set(schema()["properties"]) == set(SECTIONS) | set(SD_SECTIONS) | {"seed", "compute", "resources"}


@pytest.mark.parametrize("section", SD_SECTIONS)
def test_sd_sections_match_their_dataclasses(section):
    node = schema()["properties"][section]
    assert set(node["properties"]) == {f.name for f in dataclasses.fields(SD_SECTIONS[section])}
    if section == "sd_world":
        assert set(node["properties"]["official_unets"]["properties"]) == {
            f.name for f in dataclasses.fields(OfficialUNets)}
        assert set(node["properties"]["eval_guidance_scale"]["properties"]) == set(METHODS)


@pytest.mark.parametrize("name", ["sd15.yaml", "sd21.yaml", "sdxl.yaml"])
def test_sd_configs_pass_the_schema_and_the_stage_checks(name):
    import jsonschema
    config = default_config()
    for key, value in yaml.safe_load((REPO / "config" / name).read_text()).items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    jsonschema.validate(config, schema())
    check_config(config)
    world = sd_world_config(config["sd_world"])
    assert world.preset == config["world"]["name"] == name.removesuffix(".yaml")
    sd_stages(world, from_dict(SDPipelineConfig, config["sd_pipeline"], "sd_pipeline"))


@pytest.mark.parametrize("name", ["config.yaml", "smoke.yaml"])
def test_shipped_configs_pass_every_check(name):
    import jsonschema
    config = default_config()
    for key, value in yaml.safe_load((REPO / "config" / name).read_text()).items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    jsonschema.validate(config, schema())
    check_config(config)


def test_default_config_spells_out_every_key():
    keys = {k: v for k, v in schema_keys(schema()).items() if k not in SD_SECTIONS}
    assert keys == _keys_of(default_config())


def _keys_of(node):
    # An empty mapping (`resources.rules: {}`) is a free-form one: its schema lists no keys either.
    return {k: (_keys_of(v) if isinstance(v, dict) and v else None) for k, v in node.items()}


@pytest.mark.parametrize("section, value, message", [
    ("world", {"image_size": 30}, "world.image_size"),
    ("world", {"vocabulary": {"colors": []}}, "world.vocabulary.colors"),
    ("world", {"vocabulary": {"colors": ["mauve"]}}, "world.vocabulary.colors"),
    ("prompts", {"validation_unique": 5000}, "prompts.validation_unique"),
    ("world", {"heldout_pairs": 39}, "world.heldout_pairs"),
])
def test_cross_key_errors_name_the_key(section, value, message):
    config = default_config()
    config[section] = {**config[section], **value}
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        check_config(config)


def test_bad_input_stops_snakemake_naming_it(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("world:\n  image_size: 30\n")
    run = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                          "-n", "--configfile", str(bad)], capture_output=True, text=True)
    assert run.returncode != 0
    assert "world.image_size" in run.stdout + run.stderr


def test_cli_names_a_missing_model_directory(tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text('{"eval_seen": ["a small red circle on a gray background, on the left"]}')
    run = subprocess.run([sys.executable, "-m", "lpo", "sample", "--model", str(tmp_path / "nowhere"),
                          "--prompts", str(prompts), "--sets", "eval_seen", "--out", str(tmp_path / "s.npz")],
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert str(tmp_path / "nowhere") in run.stderr and "base-model" in run.stderr
    assert not (tmp_path / "s.npz").exists()
