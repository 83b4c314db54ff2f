"""The SD worlds' models, loaded from their resolved references: the base pipeline with the world's VAE and an
official UNet (`load_pipeline`, or linked as a folder by `link_pipeline`), the released LRM, and the scorers'
checkpoint paths."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lpo.pipelines import pipeline_class
from lpo.sd.config import METHODS, SDWorldConfig
from lpo.sd.hub import resolve
from lpo.sd.inputs import UNUSED_COMPONENTS, lrm_contents, pipeline_problems


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
               if not name.startswith("_") and name not in UNUSED_COMPONENTS and isinstance(spec, list)
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
        for name in UNUSED_COMPONENTS:
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
    problems = lrm_contents(config.xl)(lrm_dir)
    if problems:
        raise FileNotFoundError(f"sd_world.lrm: '{lrm_dir}' lacks {', '.join(problems)}")
    base = resolve(config.base_model, "sd_world.base_model", "base pipeline")
    return LatentRewardModel.load(lrm_dir, tokenizer_dir=base, config=lrm_config)


def scorer_paths(config: SDWorldConfig) -> dict[str, dict[str, Any]]:
    """The scorers' constructor arguments with hub references resolved to cached paths
    (lpo.evaluate.scorers.build_scorer takes them); FileNotFoundError when one is not cached."""
    out = {}
    for name, args in config.scorers.items():
        out[name] = {arg: (str(resolve(v, f"sd_world.scorers.{name}.{arg}", f"{name} checkpoint"))
                           if isinstance(v, str) and arg != "device" else v) for arg, v in (args or {}).items()}
    return out
