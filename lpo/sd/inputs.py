"""What an SD world lacks: every model, data set and checkpoint its stages read that is not configured, not in the
local Hugging Face cache or incomplete, one line each (`missing_inputs`), checked on files alone before anything
is computed."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lpo.pipelines import pipeline_class
from lpo.sd import pickapic
from lpo.sd.config import STAGES, SDWorldConfig, sd_world_config
from lpo.sd.hub import download_hint, hub_cache, locate

_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors",
            "pytorch_model.bin", "diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")
# Pipeline components the worlds never load (the safety checker is off, as in the official evaluation).
UNUSED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")


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
        if name.startswith("_") or name in UNUSED_COMPONENTS or (name == "vae" and own_vae):
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


def lrm_contents(xl: bool):
    """For `_check` and lpo.sd.pipelines.load_lrm: what lists the files a released-layout LRM folder (unet/,
    text_encoder/[_2], the head: state_dict.pt as released or our head.safetensors) lacks."""
    def contents(path: Path) -> list[str]:
        lacking = _model_folder_problems(path / "unet") + _model_folder_problems(path / "text_encoder")
        if xl:
            lacking += _model_folder_problems(path / "text_encoder_2")
        has_head = any((path / name).is_file() for name in ("state_dict.pt", "head.safetensors"))
        return lacking + ([] if has_head else ["state_dict.pt"])
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
            problems += _check(config.lrm, key("lrm"), "LRM", lambda p: lrm_contents(config.xl)(p) or _unet_mismatch(
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
