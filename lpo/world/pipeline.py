"""Loading and sampling a world's text-to-image pipeline (the Shapes base model or any SD-layout directory)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from diffusers import StableDiffusionPipeline
from tqdm import tqdm

from lpo.images import to_uint8
from lpo.io import load_or_explain


def load_pipeline(model_dir: str | os.PathLike) -> StableDiffusionPipeline:
    path = Path(model_dir)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no diffusion pipeline at '{path}' (model_index.json missing): run the `world base-model` stage to "
            f"train the Shapes world's base model, or point --model at a directory saved by save_pretrained")
    pipe = load_or_explain(path, "the diffusion pipeline", "re-run the rule that wrote it (`snakemake ... --forcerun "
                           "world_base_model` for the base model, or the optimize rule that trained it)",
                           lambda folder: StableDiffusionPipeline.from_pretrained(
                               folder, local_files_only=True, safety_checker=None, requires_safety_checker=False))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe: StableDiffusionPipeline, prompts: list[str], seeds: list[int], steps: int = 20,
           guidance_scale: float = 7.5, eta: float = 0.0, batch_size: int = 64) -> np.ndarray:
    """uint8 images (N, H, W, 3); image i depends only on (prompts[i], seeds[i]), not on batching. Under torchrun
    every process samples a contiguous share and every process returns all images."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if not torch.distributed.is_torchelastic_launched():  # leaves accelerate's process state to the caller
        return _sample(pipe, prompts, seeds, steps, guidance_scale, eta, batch_size, progress=True)
    state = PartialState(cpu=True)  # the world's pipelines sample on CPU processes (gloo)
    with state.split_between_processes(list(range(len(prompts)))) as rows:
        mine = _sample(pipe, [prompts[i] for i in rows], [seeds[i] for i in rows], steps, guidance_scale, eta,
                       batch_size, progress=state.is_main_process)
    return np.concatenate(gather_object([mine]))


def _sample(pipe, prompts, seeds, steps, guidance_scale, eta, batch_size, progress: bool) -> np.ndarray:
    batches = []
    device = pipe.device  # a walk over every module's parameters: ~8% of sampling when asked once per image
    for start in tqdm(range(0, len(prompts), batch_size), desc="sampling", mininterval=2, disable=not progress):
        # One generator per image: its initial latent and its DDIM noise (eta > 0) come from its own seed.
        generators = [torch.Generator(device).manual_seed(s) for s in seeds[start:start + batch_size]]
        images = pipe(prompts[start:start + batch_size], num_inference_steps=steps, guidance_scale=guidance_scale,
                      eta=eta, generator=generators, output_type="pt").images
        batches.append(to_uint8(images * 2 - 1))
    if not batches:
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        return np.zeros((0, size, size, 3), np.uint8)
    return np.concatenate(batches)
