"""Saved diffusion pipelines, loaded by path: a StableDiffusion(XL)Pipeline in diffusers layout (the Shapes world's
base model, a linked SD base model, a trainer's merged output). The one loading path of every stage that reads a
pipeline folder."""
from __future__ import annotations

import os
from pathlib import Path

from lpo.io import load_or_explain, read_json

PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
_AGAIN = ("re-run the rule that wrote it (`snakemake ... --forcerun RULE`): world_base_model, sd_base_model or "
          "sd_official_model for a base model (a linked hub model's download may need repeating), the optimize rule "
          "that trained it for a trained one")


def pipeline_class(path: Path) -> str:
    """The pipeline class named by a diffusers folder's model_index.json (StableDiffusion(XL)Pipeline)."""
    index = read_json(path / "model_index.json", "the diffusion pipeline's index", _AGAIN)
    name = index.get("_class_name", "")
    if name not in PIPELINES:
        raise ValueError(f"'{path}' holds a {name or 'pipeline of unknown class'}; the SD worlds load "
                         f"{' or '.join(PIPELINES)}")
    return name


def load_pipeline_dir(path: str | os.PathLike, dtype=None):
    """A StableDiffusion(XL)Pipeline saved or linked in diffusers layout (`link_pipeline`, the trainers' merged
    output) with its own scheduler config, no safety checker and no watermark; weights in `dtype`."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"no diffusion pipeline at '{path}' (model_index.json missing)")
    dtype = dtype or torch.float32
    if pipeline_class(path) == "StableDiffusionXLPipeline":
        cls, options = StableDiffusionXLPipeline, {"add_watermarker": False}
    else:
        cls, options = StableDiffusionPipeline, {"safety_checker": None, "feature_extractor": None,
                                                 "requires_safety_checker": False}
    pipe = load_or_explain(path, "the diffusion pipeline", _AGAIN, lambda folder: cls.from_pretrained(
        folder, torch_dtype=dtype, local_files_only=True, **options))
    pipe.set_progress_bar_config(disable=True)
    return pipe
