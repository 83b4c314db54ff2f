"""The settings of the paper's Stable Diffusion worlds: SD1.5, SD2.1-base (optimised with LRM-1.5, [FT] Table 4) and
SDXL, on Pick-a-Pic v1, evaluated with the real scorers. `SDWorldConfig` (config section `sd_world`) names every
model, data set and scorer checkpoint a world uses, as a hub reference or a local path (lpo.sd.hub);
`SDPipelineConfig` (`sd_pipeline`) says what its DAG trains and how it evaluates, and `sd_stages` which stages that
runs.

Presets hold the paper's choices ([CODE] lpo/configs and evaluation/general_score_pap_val.py, as transcribed in
shared/spec/paper.md 2.3, 2.4 and 3); a config names a preset and overrides what it needs.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import Any

from lpo.config import from_dict

PICKAPIC_V1 = "yuvalkirstain/pickapic_v1"
# The official evaluation streams the validation_unique prompts from this copy of Pick-a-Pic v1.
PICKAPIC_EVAL = "pickapic-anonymous/pickapic_v1"
METHODS = ("original", "lpo", "spo", "diffusion_dpo")
# Methods evaluated with a CFG scale of their own: the paper's, and step-wise GRPO (App. B), trained here only and
# evaluated at LPO's scale (nothing official exists for it).
EVALUATED = (*METHODS, "grpo")
# What each stage of an SD world reads (see lpo.sd.inputs.missing_inputs).
STAGES = ("reward", "optimize", "evaluate", "official")
TABLE2_SCORERS = ("pickscore", "imagereward", "hpsv2", "hpsv2.1", "aesthetic")


@dataclass(frozen=True)
class OfficialUNets:
    """UNets of the official checkpoints the paper evaluated instead of retraining ([FT] Sec. 5.1), each put into
    the base pipeline; None: not evaluated in this world."""
    lpo: str | None = None             # casiatao/LPO, the merged LoRA
    spo: str | None = None             # SPO-Diffusion-Models (SPO fine-tunes the UNet only)
    diffusion_dpo: str | None = None   # mhdang/dpo-*-text2image-v1 (Pick-a-Pic v2)


@dataclass(frozen=True)
class SDWorldConfig:
    """Every field that names a model, data set or file is a hub reference or a local path (lpo.sd.hub)."""
    preset: str                        # sd15, sd21 or sdxl: the paper's defaults for every field below
    base_model: str                    # a diffusers StableDiffusion(XL)Pipeline folder
    vae: str | None                    # replaces the pipeline's VAE (SDXL: madebyollin/sdxl-vae-fp16-fix)
    lrm: str | None                    # a released LRM folder (unet/, text_encoder/[_2], state_dict.pt) or one of ours
    clip_text_projection: str | None   # CLIP ViT-L/14, whose text_projection initialises LRM-1.5's (lpo.reward.lrm)
    dataset: str                       # Pick-a-Pic v1: hub id, save_to_disk folder, or parquet/arrow files
    eval_dataset: str                  # where the validation_unique evaluation prompts come from
    mpcf_scores: str | None            # the authors' vqa_aes_clip_score_mp.csv, row-aligned with the train split
    train_prompts: str | None          # the authors' 4k_training_prompts.json; None: a seeded draw (lpo.sd.pickapic)
    train_prompt_count: int            # prompts in that draw (the paper's 4k)
    eval_prompt_count: int             # unique validation_unique captions expected (500 in Pick-a-Pic v1)
    official_unets: OfficialUNets
    scorers: dict[str, dict[str, Any]]  # scorer name -> its constructor's path arguments (lpo.evaluate.scorers)
    resolution: int                    # image side in pixels (512 for SD1.5 / SD2.1-base, 1024 for SDXL)
    eval_guidance_scale: dict[str, float]  # CFG scale per method at evaluation (official code; not in the paper)

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"sd_world.preset={self.preset!r}: use one of {', '.join(PRESETS)}")
        if self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"sd_world.resolution={self.resolution} must be a positive multiple of 8")
        if self.train_prompt_count < 1 or self.eval_prompt_count < 1:
            raise ValueError("sd_world.train_prompt_count and sd_world.eval_prompt_count must be >= 1")
        unknown = sorted(set(self.eval_guidance_scale) - set(EVALUATED))
        if unknown or any(not v > 0 for v in self.eval_guidance_scale.values()):
            raise ValueError(f"sd_world.eval_guidance_scale={self.eval_guidance_scale}: keys among "
                             f"{', '.join(EVALUATED)}, values > 0")
        from lpo.evaluate.scorers import SCORERS  # here, not at the top: the scorers import torch and open_clip

        unknown = sorted(set(self.scorers) - set(SCORERS))
        if unknown:
            raise ValueError(f"sd_world.scorers: unknown scorer(s) {', '.join(unknown)} (known: {', '.join(SCORERS)})")

    @property
    def xl(self) -> bool:
        return self.preset == "sdxl"

    def guidance_scale(self, method: str) -> float:
        if method not in self.eval_guidance_scale:
            raise ValueError(f"sd_world.eval_guidance_scale has no scale for method '{method}' "
                             f"(it has: {', '.join(self.eval_guidance_scale)})")
        return float(self.eval_guidance_scale[method])


TRAINABLE = ("lpo", "diffusion_dpo", "grpo")
LRM_REWARDED = ("lpo", "grpo")   # trained against the LRM (sd_pipeline.lpo_lrm)
LPO_LRMS = ("trained", "released")
DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class SDPipelineConfig:
    """What an SD world's DAG trains and how it evaluates (config section `sd_pipeline`).

    SPO is not trained here: the paper evaluated the official SPO UNet ([FT] Sec. 5.1, "official models ... without
    retraining"), and SPO's official step-aware preference model is a PickScore-based network this package does not
    implement (lpo.reward.spm is the Shapes world's); set sd_world.official_unets.spo to evaluate the released UNet."""
    trained: tuple[str, ...] = ("lpo", "diffusion_dpo")  # methods trained here (rows "ours (trained here)")
    lpo_lrm: str = "trained"          # LPO's and GRPO's reward: the LRM trained here, or the released sd_world.lrm
    images_per_prompt: int = 1        # the official script scores 1 image per prompt (shared/spec/paper.md 3.4)
    steps: int = 20                   # DDIM steps at evaluation
    seed: int = 42                    # image j of every prompt starts from seed + j (j = 0: the official seed)
    batch_size: int = 4               # prompts per pipeline call
    dtype: str = "auto"               # auto: float16 on CUDA (the official evaluation), float32 on CPU
    scorer_batch_size: int = 16
    bootstrap: int = 1000
    grid_prompts: int = 8             # prompts in each sample grid of the report
    reward_timesteps: tuple[int, ...] = (0, 200)  # Table 18's t for the LRMs' accuracy

    def __post_init__(self):
        unknown = sorted(set(self.trained) - set(TRAINABLE))
        if unknown:
            raise ValueError(f"sd_pipeline.trained: cannot train {', '.join(unknown)} here (trainable: "
                             f"{', '.join(TRAINABLE)}; SPO is evaluated from its official UNet)")
        if self.lpo_lrm not in LPO_LRMS:
            raise ValueError(f"sd_pipeline.lpo_lrm={self.lpo_lrm!r}: use one of {', '.join(LPO_LRMS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"sd_pipeline.dtype={self.dtype!r}: use one of {', '.join(DTYPES)}")
        for key in ("images_per_prompt", "steps", "batch_size", "scorer_batch_size", "bootstrap", "grid_prompts"):
            if getattr(self, key) < 1:
                raise ValueError(f"sd_pipeline.{key}={getattr(self, key)} must be >= 1")
        if not self.reward_timesteps or any(not 0 <= t < 1000 for t in self.reward_timesteps):
            raise ValueError(f"sd_pipeline.reward_timesteps={list(self.reward_timesteps)}: timesteps in [0, 999]")

    @property
    def trains_lrm(self) -> bool:
        return any(m in self.trained for m in LRM_REWARDED) and self.lpo_lrm == "trained"


def sd_stages(world: SDWorldConfig, pipeline: SDPipelineConfig) -> tuple[str, ...]:
    """The stages (lpo.sd.inputs.missing_inputs) a DAG with these settings runs; ValueError when they contradict
    the world."""
    if any(m in pipeline.trained for m in LRM_REWARDED) and pipeline.lpo_lrm == "released" and world.lrm is None:
        raise ValueError("sd_pipeline.lpo_lrm=released but sd_world.lrm is not set: name the released LRM there, or "
                         "set sd_pipeline.lpo_lrm: trained")
    stages = ["evaluate"]
    if pipeline.trains_lrm:
        stages.append("reward")
    if pipeline.trained:
        stages.append("optimize")
    if world.lrm is not None or any(getattr(world.official_unets, m) for m in ("lpo", "spo", "diffusion_dpo")):
        stages.append("official")
    return tuple(stages)


def official_methods(world: SDWorldConfig) -> list[str]:
    """Methods whose official UNet the world evaluates."""
    return [m for m in ("lpo", "spo", "diffusion_dpo") if getattr(world.official_unets, m) is not None]


def _table2_scorers() -> dict[str, dict[str, str]]:
    """The evaluation scorers at the hub references of their checkpoints; files hosted elsewhere (the LAION
    aesthetic MLP on GitHub) have no hub reference and must be configured as paths."""
    from lpo.evaluate.scorers import SCORERS

    out = {}
    for name in TABLE2_SCORERS:
        out[name] = {arg: spec.hub_id + (f"/{spec.filename}" if spec.filename else "")
                     for arg, spec in SCORERS[name].checkpoints.items() if not spec.optional and spec.url is None}
    return out


_COMMON = {"vae": None, "dataset": PICKAPIC_V1, "eval_dataset": PICKAPIC_EVAL, "mpcf_scores": None,
           "train_prompts": None, "train_prompt_count": 4000, "eval_prompt_count": 500}
PRESETS: dict[str, dict[str, Any]] = {
    "sd15": {**_COMMON,
             # The official evaluation's id; runwayml/stable-diffusion-v1-5 (the training code's) left the hub.
             "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
             "lrm": "casiatao/LRM/lrm_sd15",
             "clip_text_projection": "openai/clip-vit-large-patch14",
             "official_unets": {"lpo": "casiatao/LPO/lpo_sd15_merge/unet",
                                "spo": "SPO-Diffusion-Models/SPO-SD-v1-5_4k-p_10ep/unet",
                                "diffusion_dpo": "mhdang/dpo-sd1.5-text2image-v1/unet"},
             "resolution": 512,
             "eval_guidance_scale": {"original": 7.5, "diffusion_dpo": 7.5, "spo": 5.0, "lpo": 5.0,
                                     "grpo": 5.0}},
    # [CODE] lpo_sd-v2-1_...: SD2.1-base (512 px, epsilon prediction) optimised with LRM-1.5 (same VAE). No
    # official SD2.1 checkpoints were released; the evaluation scales follow SD1.5's (the code has none for SD2.1).
    "sd21": {**_COMMON,
             "base_model": "stabilityai/stable-diffusion-2-1-base",
             "lrm": "casiatao/LRM/lrm_sd15",
             "clip_text_projection": "openai/clip-vit-large-patch14",
             "official_unets": {},
             "resolution": 512,
             "eval_guidance_scale": {"original": 7.5, "diffusion_dpo": 7.5, "spo": 5.0, "lpo": 5.0,
                                     "grpo": 5.0}},
    "sdxl": {**_COMMON,
             "base_model": "stabilityai/stable-diffusion-xl-base-1.0",
             "vae": "madebyollin/sdxl-vae-fp16-fix",
             "lrm": "casiatao/LRM/lrm_sdxl",
             "clip_text_projection": None,  # LRM-XL uses text_encoder_2's own projection
             "official_unets": {"lpo": "casiatao/LPO/lpo_sdxl_merge/unet",
                                "spo": "SPO-Diffusion-Models/SPO-SDXL_4k-p_10ep/unet",
                                "diffusion_dpo": "mhdang/dpo-sdxl-text2image-v1/unet"},
             "resolution": 1024,
             "eval_guidance_scale": {"original": 5.0, "diffusion_dpo": 5.0, "spo": 5.0, "lpo": 5.0,
                                     "grpo": 5.0}},
}


def sd_world_config(data: dict[str, Any] | SDWorldConfig, where: str = "sd_world") -> SDWorldConfig:
    """The config of `data` (a dict with `preset` and overrides) over its preset's defaults. `official_unets`,
    `eval_guidance_scale` and each scorer's arguments merge key by key; a scorer set to null is dropped."""
    if isinstance(data, SDWorldConfig):
        return data
    data = dict(data or {})
    preset = data.get("preset")
    if preset not in PRESETS:
        raise ValueError(f"{where}.preset={preset!r}: use one of {', '.join(PRESETS)}")
    known = {f.name for f in fields(SDWorldConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown key(s) in {where}: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    merged = {**copy.deepcopy(PRESETS[preset]), "scorers": _table2_scorers()}
    for key, value in data.items():
        if key in ("official_unets", "eval_guidance_scale") and isinstance(value, dict):
            merged[key] = {**merged[key], **value}
        elif key == "scorers" and isinstance(value, dict):
            scorers = merged["scorers"]
            for name, args in value.items():
                if args is None:
                    scorers.pop(name, None)
                else:
                    scorers[name] = {**scorers.get(name, {}), **args}
        else:
            merged[key] = value
    return from_dict(SDWorldConfig, merged, where)
