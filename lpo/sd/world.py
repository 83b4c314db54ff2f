"""The paper's Stable Diffusion worlds: SD1.5, SD2.1-base (optimised with LRM-1.5, [FT] Table 4) and SDXL, on
Pick-a-Pic v1, evaluated with the real scorers.

A world config names every model, data set and scorer checkpoint it uses as a hub reference or a local path:
- a hub reference is `org/name` or `org/name/path/in/repo` (e.g. `casiatao/LRM/lrm_sd15`,
  `xswu/HPSv2/HPS_v2_compressed.pt`); it is resolved in the local Hugging Face cache only (HF_HUB_CACHE, else
  HF_HOME/hub), never downloaded: these stages run on machines without hub access;
- anything that exists on disk, or starts with `/`, `.` or `~`, is a local path used as it is.
`missing_inputs` lists everything a world lacks, one line per item, before anything is computed.

Presets hold the paper's choices ([CODE] lpo/configs and evaluation/general_score_pap_val.py, as transcribed in
shared/spec/paper.md 2.3, 2.4 and 3); a config names a preset and overrides what it needs.
"""
from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from lpo.config import from_dict
from lpo.pipelines import pipeline_class

PICKAPIC_V1 = "yuvalkirstain/pickapic_v1"
# The official evaluation streams the validation_unique prompts from this copy of Pick-a-Pic v1.
PICKAPIC_EVAL = "pickapic-anonymous/pickapic_v1"
METHODS = ("original", "lpo", "spo", "diffusion_dpo")
# What each stage of an SD world reads (see `missing_inputs`).
STAGES = ("reward", "optimize", "evaluate", "official")
TABLE2_SCORERS = ("pickscore", "imagereward", "hpsv2", "hpsv2.1", "aesthetic")

_HUB_REF = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[^/].*)?$")
_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors",
            "pytorch_model.bin", "diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")
# Pipeline components the worlds never load (the safety checker is off, as in the official evaluation).
_UNUSED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")


# --------------------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class OfficialUNets:
    """UNets of the official checkpoints the paper evaluated instead of retraining ([FT] Sec. 5.1), each put into
    the base pipeline; None: not evaluated in this world."""
    lpo: str | None = None             # casiatao/LPO, the merged LoRA
    spo: str | None = None             # SPO-Diffusion-Models (SPO fine-tunes the UNet only)
    diffusion_dpo: str | None = None   # mhdang/dpo-*-text2image-v1 (Pick-a-Pic v2)


@dataclass(frozen=True)
class SDWorldConfig:
    """Every field that names a model, data set or file is a hub reference or a local path (module docstring)."""
    preset: str                        # sd15, sd21 or sdxl: the paper's defaults for every field below
    base_model: str                    # a diffusers StableDiffusion(XL)Pipeline folder
    vae: str | None                    # replaces the pipeline's VAE (SDXL: madebyollin/sdxl-vae-fp16-fix)
    lrm: str | None                    # a released LRM folder (unet/, text_encoder/[_2], state_dict.pt)
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
        unknown = sorted(set(self.eval_guidance_scale) - set(METHODS))
        if unknown or any(not v > 0 for v in self.eval_guidance_scale.values()):
            raise ValueError(f"sd_world.eval_guidance_scale={self.eval_guidance_scale}: keys among "
                             f"{', '.join(METHODS)}, values > 0")
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


TRAINABLE = ("lpo", "diffusion_dpo")
LPO_LRMS = ("trained", "released")
DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class SDPipelineConfig:
    """What an SD world's DAG trains and how it evaluates (config section `sd_pipeline`).

    SPO is not trained here: the paper evaluated the official SPO UNet ([FT] Sec. 5.1, "official models ... without
    retraining"), and SPO's official step-aware preference model is a PickScore-based network this package does not
    implement (lpo.reward.spm is the Shapes world's); set sd_world.official_unets.spo to evaluate the released UNet."""
    trained: tuple[str, ...] = TRAINABLE   # methods trained here (Table 2 rows "ours (trained here)")
    lpo_lrm: str = "trained"          # LPO's reward: the LRM trained here, or the released sd_world.lrm (sd21)
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
        return "lpo" in self.trained and self.lpo_lrm == "trained"


def sd_stages(world: SDWorldConfig, pipeline: SDPipelineConfig) -> tuple[str, ...]:
    """The `missing_inputs` stages a DAG with these settings runs; ValueError when they contradict the world."""
    if "lpo" in pipeline.trained and pipeline.lpo_lrm == "released" and world.lrm is None:
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
             "eval_guidance_scale": {"original": 7.5, "diffusion_dpo": 7.5, "spo": 5.0, "lpo": 5.0}},
    # [CODE] lpo_sd-v2-1_...: SD2.1-base (512 px, epsilon prediction) optimised with LRM-1.5 (same VAE). No
    # official SD2.1 checkpoints were released; the evaluation scales follow SD1.5's (the code has none for SD2.1).
    "sd21": {**_COMMON,
             "base_model": "stabilityai/stable-diffusion-2-1-base",
             "lrm": "casiatao/LRM/lrm_sd15",
             "clip_text_projection": "openai/clip-vit-large-patch14",
             "official_unets": {},
             "resolution": 512,
             "eval_guidance_scale": {"original": 7.5, "diffusion_dpo": 7.5, "spo": 5.0, "lpo": 5.0}},
    "sdxl": {**_COMMON,
             "base_model": "stabilityai/stable-diffusion-xl-base-1.0",
             "vae": "madebyollin/sdxl-vae-fp16-fix",
             "lrm": "casiatao/LRM/lrm_sdxl",
             "clip_text_projection": None,  # LRM-XL uses text_encoder_2's own projection
             "official_unets": {"lpo": "casiatao/LPO/lpo_sdxl_merge/unet",
                                "spo": "SPO-Diffusion-Models/SPO-SDXL_4k-p_10ep/unet",
                                "diffusion_dpo": "mhdang/dpo-sdxl-text2image-v1/unet"},
             "resolution": 1024,
             "eval_guidance_scale": {"original": 5.0, "diffusion_dpo": 5.0, "spo": 5.0, "lpo": 5.0}},
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


# ---------------------------------------------------------------------------------------- hub references

def hub_cache() -> Path:
    """The Hugging Face hub cache as the environment names it now (huggingface_hub reads it once, at import)."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.environ[name]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def hub_parts(ref: str) -> tuple[str, str] | None:
    """(repo id, path inside the repo) of a hub reference; None for a local path."""
    if ref.startswith(("/", ".", "~")) or Path(ref).expanduser().exists() or not _HUB_REF.match(ref):
        return None
    org, name, *rest = ref.split("/")
    return f"{org}/{name}", "/".join(rest)


def download_hint(ref: str, repo_type: str = "model") -> str:
    parts = hub_parts(ref)
    if parts is None:
        return ""
    repo, inner = parts
    kind = " --repo-type dataset" if repo_type == "dataset" else ""
    only = f" --include '{inner}/*'" if inner and "." not in Path(inner).name else (f" {inner}" if inner else "")
    return f"`hf download {repo}{kind}{only}`"


def locate(ref: str, key: str, what: str, repo_type: str = "model") -> tuple[Path | None, str | None]:
    """(local path, None) or (None, why it is not available), resolving hub references in the local cache only."""
    parts = hub_parts(ref)
    if parts is None:
        path = Path(ref).expanduser()
        return (path, None) if path.exists() else (None, f"{key}: {what} not found at '{path}'")
    repo, inner = parts
    from huggingface_hub import snapshot_download
    try:
        snapshot = Path(snapshot_download(repo, repo_type=repo_type, cache_dir=hub_cache(), local_files_only=True))
    except FileNotFoundError:  # huggingface_hub's LocalEntryNotFoundError
        return None, (f"{key}: {what} '{ref}' is not in the local Hugging Face cache ({hub_cache()}): download it "
                      f"with {download_hint(ref, repo_type)} where the hub is reachable, or set {key} to a local "
                      f"path")
    path = snapshot / inner if inner else snapshot
    if not path.exists():
        return None, (f"{key}: {what} '{ref}': the cached snapshot of {repo} ({snapshot}) lacks '{inner}': "
                      f"download it with {download_hint(ref, repo_type)}, or set {key} to a local path")
    return path, None


def resolve(ref: str, key: str, what: str, repo_type: str = "model") -> Path:
    """The local path of `ref`, or FileNotFoundError naming the config key and what to download."""
    path, problem = locate(ref, key, what, repo_type)
    if problem:
        raise FileNotFoundError(problem)
    return path


# ------------------------------------------------------------------------------------------ what is missing

def _model_folder_problems(path: Path) -> list[str]:
    if not (path / "config.json").is_file():
        return [f"{path.name}/config.json"]
    if not any((path / w).is_file() for w in _WEIGHTS):
        return [f"{path.name}/{_WEIGHTS[0]}"]
    return []


def _component_problems(path: Path, class_name: str) -> list[str]:
    if not path.is_dir():
        return [f"{path.name}/"]
    if "Tokenizer" in class_name:
        ok = (path / "tokenizer.json").is_file() or all((path / f).is_file() for f in ("vocab.json", "merges.txt"))
        return [] if ok else [f"{path.name}/tokenizer.json (or vocab.json + merges.txt)"]
    if "Scheduler" in class_name:
        return [] if (path / "scheduler_config.json").is_file() else [f"{path.name}/scheduler_config.json"]
    return _model_folder_problems(path)


def pipeline_problems(path: Path, own_vae: bool) -> list[str]:
    """Files a diffusers pipeline folder lacks for the components the worlds load; ValueError for a pipeline of
    another class."""
    if not (path / "model_index.json").is_file():
        return ["model_index.json"]
    pipeline_class(path)
    index = json.loads((path / "model_index.json").read_text())
    missing = []
    for name, spec in index.items():
        if name.startswith("_") or name in _UNUSED_COMPONENTS or (name == "vae" and own_vae):
            continue
        if isinstance(spec, list) and len(spec) == 2 and spec[1] is not None:
            missing += _component_problems(path / name, spec[1])
    return missing


def _check(ref: str | None, key: str, what: str, contents, repo_type: str = "model") -> list[str]:
    """One line when `ref` is not configured, not available or lacks files (`contents(path)` lists them)."""
    if ref is None:
        return [f"{key}: {what} not configured: set {key} to a hub reference or a local path"]
    path, problem = locate(ref, key, what, repo_type)
    if problem:
        return [problem]
    try:
        lacking = contents(path)
    except ValueError as e:  # a folder of the wrong kind, e.g. another pipeline class
        return [f"{key}: {e}"]
    if lacking:
        hint = download_hint(ref, repo_type)
        return [f"{key}: {what} at '{path}' lacks {', '.join(lacking)}" + (f": download it with {hint}" if hint
                                                                          else "")]
    return []


def _lrm_contents(xl: bool):
    def contents(path: Path) -> list[str]:
        lacking = _model_folder_problems(path / "unet") + _model_folder_problems(path / "text_encoder")
        if xl:
            lacking += _model_folder_problems(path / "text_encoder_2")
        return lacking + ([] if (path / "state_dict.pt").is_file() else ["state_dict.pt"])
    return contents


def _scorer_problems(scorers: dict[str, dict[str, Any]], where: str) -> list[str]:
    from lpo.evaluate.scorers import missing_checkpoints
    problems, resolved, unresolved = [], {}, []
    for name, args in scorers.items():
        resolved[name] = {}
        for arg, value in (args or {}).items():
            if not isinstance(value, str) or arg == "device":
                resolved[name][arg] = value
                continue
            path, problem = locate(value, f"{where}.scorers.{name}.{arg}", f"{name} checkpoint")
            if problem:
                problems.append(problem)
                unresolved.append(f"{name}.{arg}:")
            else:
                resolved[name][arg] = str(path)
    # Arguments already reported as not in the cache are not reported again as "not configured".
    problems += [f"{where}.scorers.{line}" for line in missing_checkpoints(resolved)
                 if not line.startswith(tuple(unresolved))]
    return problems


def missing_inputs(world_config: dict[str, Any] | SDWorldConfig, stages: tuple[str, ...] = STAGES,
                   where: str = "sd_world") -> list[str]:
    """Every input the world's `stages` need that is not configured, not available or incomplete, one line each
    naming what it is, the hub reference (and file) to download and the config key to point at it. Only files
    are checked (no weights are loaded); empty when everything is in place.

    reward (training an LRM): base model (+ VAE), Pick-a-Pic train / validation_unique / test_unique, the MPCF
    score file, CLIP ViT-L/14 for LRM-1.5's text projection;
    optimize: base model (+ VAE), the training prompts (the authors' file, or the train split's captions), the
    train split (Diffusion-DPO's pairs);
    evaluate: base model (+ VAE), the evaluation prompts (validation_unique), the scorer checkpoints;
    official: the official UNets that are configured, and the released LRM (Table 18; sd21's LPO reward).
    """
    from lpo.sd import pickapic

    config = sd_world_config(world_config, where)
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)} (known: {', '.join(STAGES)})")

    def key(name: str) -> str:
        return f"{where}.{name}"

    problems = _check(config.base_model, key("base_model"), "base pipeline",
                      lambda p: pipeline_problems(p, own_vae=config.vae is not None))
    if config.vae is not None:
        problems += _check(config.vae, key("vae"), "VAE", _model_folder_problems)
    # source -> split -> the columns its stages read
    splits: dict[str, dict[str, set[str]]] = {}

    def need(ref: str, split: str, columns) -> None:
        splits.setdefault(ref, {}).setdefault(split, set()).update(columns)

    if "reward" in stages:
        for split in ("train", "validation_unique", "test_unique"):
            need(config.dataset, split, pickapic.PAIR_COLUMNS)
        problems += pickapic.mpcf_file_problems(config.mpcf_scores, key("mpcf_scores"))
        if config.clip_text_projection is not None:
            problems += _check(config.clip_text_projection, key("clip_text_projection"),
                               "CLIP ViT-L/14 (its text_projection initialises the LRM's)", _model_folder_problems)
    if "optimize" in stages:
        need(config.dataset, "train", pickapic.PAIR_COLUMNS)
        if config.train_prompts is not None:
            problems += pickapic.prompt_file_problems(config.train_prompts, key("train_prompts"))
    if "evaluate" in stages:
        need(config.eval_dataset, "validation_unique", ("caption",))
        problems += _scorer_problems(config.scorers, where)
    for ref, needed in splits.items():
        which = key("dataset") if ref == config.dataset else key("eval_dataset")
        problems += pickapic.source_problems(ref, which, needed)
    if "official" in stages:
        base_unet = _base_unet_config(config)
        for method in ("lpo", "spo", "diffusion_dpo"):
            ref = getattr(config.official_unets, method)
            if ref is not None:
                problems += _check(ref, key(f"official_unets.{method}"), f"official {method} UNet",
                                   lambda p: _model_folder_problems(p) or _unet_mismatch(p, base_unet, _UNET_KEYS))
        if config.lrm is not None:
            # Only the latent space must match: sd21 is optimised with LRM-1.5, whose UNet is SD1.5's.
            problems += _check(config.lrm, key("lrm"), "LRM", lambda p: _lrm_contents(config.xl)(p) or _unet_mismatch(
                p / "unet", base_unet, ("in_channels",)))
    return problems


# UNet config fields that fix the architecture (and so the weights' shapes) of an SD / SDXL UNet.
_UNET_KEYS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
              "cross_attention_dim", "addition_embed_type")


def _base_unet_config(config: SDWorldConfig) -> dict | None:
    path, problem = locate(config.base_model, "sd_world.base_model", "base pipeline")
    unet = None if problem else path / "unet" / "config.json"
    return json.loads(unet.read_text()) if unet is not None and unet.is_file() else None


def _unet_mismatch(path: Path, base: dict | None, keys: tuple[str, ...]) -> list[str]:
    """For `_check`: nothing, or ValueError naming the UNet config fields at `path` that differ from the base
    model's (a checkpoint of another architecture, e.g. an SDXL UNet given to SD1.5)."""
    if base is None:
        return []
    found = json.loads((path / "config.json").read_text())
    wrong = [f"{k}={found.get(k)!r} (base model: {base.get(k)!r})" for k in keys if found.get(k) != base.get(k)]
    if wrong:
        raise ValueError(f"'{path}' holds a UNet of another architecture than the base model's: {'; '.join(wrong)}")
    return []


def require_inputs(world_config: dict[str, Any] | SDWorldConfig, stages: tuple[str, ...] = STAGES,
                   where: str = "sd_world") -> SDWorldConfig:
    """The config, or one FileNotFoundError listing every missing input (see `missing_inputs`)."""
    config = sd_world_config(world_config, where)
    problems = missing_inputs(config, stages, where)
    if problems:
        raise FileNotFoundError(
            f"the {config.preset} world lacks {len(problems)} input(s); models and data are read from local paths "
            f"or the local Hugging Face cache ({hub_cache()}) only, so download them first where the hub is "
            "reachable:\n" + "\n".join(f"  - {p}" for p in problems))
    return config


# --------------------------------------------------------------------------------------------------- loading

def ddim_config(base: Path) -> dict[str, Any]:
    """The base model's scheduler config as a DDIM config: its schedule, prediction type, steps_offset, spacing
    and set_alpha_to_one carry over. Where the config omits them, clip_sample and set_alpha_to_one are off, as
    every SD release sets them: DDIM's defaults would clip the predicted x0 to [-1, 1] (wrong for latents) and
    change the last step's alpha."""
    config = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
    return {"clip_sample": False, "set_alpha_to_one": False, **config, "_class_name": "DDIMScheduler"}


def load_pipeline(config: SDWorldConfig, method: str = "original", dtype=None):
    """The base pipeline (StableDiffusionPipeline or StableDiffusionXLPipeline) with the world's VAE, the
    official UNet of `method` (original: the base model's own), a DDIM scheduler from the base model's scheduler
    config (`ddim_config`: SD2.1-768's v-prediction carries over), no safety checker and no watermark. Weights in
    `dtype` (default float32)."""
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)

    if method not in METHODS:
        raise ValueError(f"unknown method '{method}' (known: {', '.join(METHODS)})")
    dtype = dtype or torch.float32
    base = resolve(config.base_model, "sd_world.base_model", "base pipeline")
    problems = pipeline_problems(base, own_vae=config.vae is not None)
    if problems:
        raise FileNotFoundError(f"sd_world.base_model: '{base}' lacks {', '.join(problems)}")
    xl = pipeline_class(base) == "StableDiffusionXLPipeline"
    kwargs: dict[str, Any] = {"scheduler": DDIMScheduler.from_config(ddim_config(base))}
    if config.vae is not None:
        kwargs["vae"] = AutoencoderKL.from_pretrained(resolve(config.vae, "sd_world.vae", "VAE"),
                                                      torch_dtype=dtype, local_files_only=True)
    if method != "original":
        ref = getattr(config.official_unets, method)
        if ref is None:
            raise ValueError(f"sd_world.official_unets.{method} is not set: the {config.preset} world has no "
                             f"official {method} model")
        kwargs["unet"] = UNet2DConditionModel.from_pretrained(
            resolve(ref, f"sd_world.official_unets.{method}", f"official {method} UNet"), torch_dtype=dtype,
            local_files_only=True)
    if xl:
        pipe = StableDiffusionXLPipeline.from_pretrained(base, torch_dtype=dtype, local_files_only=True,
                                                         add_watermarker=False, **kwargs)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(base, torch_dtype=dtype, local_files_only=True,
                                                       safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def link_pipeline(config: SDWorldConfig, out_dir: str | os.PathLike, method: str = "original") -> Path:
    """A pipeline folder at `out_dir` that the Shapes-world stages can load by path (lpo.world.pipeline,
    the trainers): links to the base model's components, the world's VAE and the official UNet of `method`,
    and a DDIM scheduler config carrying the base scheduler's settings. Nothing is copied."""
    from lpo.io import atomic_path

    if method not in METHODS:
        raise ValueError(f"unknown method '{method}' (known: {', '.join(METHODS)})")
    base = resolve(config.base_model, "sd_world.base_model", "base pipeline")
    problems = pipeline_problems(base, own_vae=config.vae is not None)
    if problems:
        raise FileNotFoundError(f"sd_world.base_model: '{base}' lacks {', '.join(problems)}")
    index = json.loads((base / "model_index.json").read_text())
    sources = {name: base / name for name, spec in index.items()
               if not name.startswith("_") and name not in _UNUSED_COMPONENTS and isinstance(spec, list)
               and spec[1] is not None and name != "scheduler"}
    if config.vae is not None:
        sources["vae"] = resolve(config.vae, "sd_world.vae", "VAE")
    if method != "original":
        ref = getattr(config.official_unets, method)
        if ref is None:
            raise ValueError(f"sd_world.official_unets.{method} is not set")
        sources["unet"] = resolve(ref, f"sd_world.official_unets.{method}", f"official {method} UNet")
    scheduler = ddim_config(base)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for name in _UNUSED_COMPONENTS:
            if name in index:
                index[name] = [None, None]
        index["scheduler"] = ["diffusers", "DDIMScheduler"]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        for name, source in sources.items():
            (tmp / name).symlink_to(source.resolve(), target_is_directory=True)
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
    return Path(out_dir)


def load_lrm(config: SDWorldConfig, lrm_config=None):
    """The world's LRM (a released one from casiatao/LRM, or any LatentRewardModel.save folder), tokenizers
    from the base model."""
    from lpo.reward.lrm import LatentRewardModel

    if config.lrm is None:
        raise ValueError("sd_world.lrm is not set")
    lrm_dir = resolve(config.lrm, "sd_world.lrm", "LRM")
    problems = _lrm_contents(config.xl)(lrm_dir)
    if problems:
        raise FileNotFoundError(f"sd_world.lrm: '{lrm_dir}' lacks {', '.join(problems)}")
    base = resolve(config.base_model, "sd_world.base_model", "base pipeline")
    return LatentRewardModel.load(lrm_dir, tokenizer_dir=base, config=lrm_config)


def scorer_paths(config: SDWorldConfig) -> dict[str, dict[str, Any]]:
    """The scorers' constructor arguments with hub references resolved to cached paths (lpo.evaluate.scorers.build_scorer
    takes them); FileNotFoundError when one is not cached."""
    out = {}
    for name, args in config.scorers.items():
        out[name] = {arg: (str(resolve(v, f"sd_world.scorers.{name}.{arg}", f"{name} checkpoint"))
                           if isinstance(v, str) and arg != "device" else v) for arg, v in (args or {}).items()}
    return out
