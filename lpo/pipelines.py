"""Saved diffusion pipelines, loaded by path: a StableDiffusion(XL)Pipeline in diffusers layout (the Shapes world's
base model, a linked SD base model, a trainer's merged output). The one loading path of every stage that reads a
pipeline folder."""
from __future__ import annotations

import json
import os
from pathlib import Path

PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def pipeline_class(path: Path) -> str:
    """The pipeline class named by a diffusers folder's model_index.json (StableDiffusion(XL)Pipeline)."""
    index = json.loads((path / "model_index.json").read_text())
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
        pipe = StableDiffusionXLPipeline.from_pretrained(path, torch_dtype=dtype, local_files_only=True,
                                                         add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(path, torch_dtype=dtype, local_files_only=True,
                                                       safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
