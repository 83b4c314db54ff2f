"""A tiny random-weight Stable Diffusion 1.5 pipeline (16x16 images, 4x8x8 latents) for the preference-optimisation
tests; no training, no pretrained weights."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from lpo.world.base_model import (SD15_SCHEDULE, TextEncoderConfig, UNetConfig, VAEConfig, build_text_encoder,
                                  build_unet, build_vae, sampling_scheduler)
from lpo.world.tokenizer import build_clip_tokenizer

IMAGE_SIZE, LATENT_SIZE, TEXT_DIM = 16, 8, 16
SD15_DDIM = {**SD15_SCHEDULE, "set_alpha_to_one": False}
PROMPTS = ["a red square on the left", "a blue circle on the right", "a green triangle", "a small gray star",
           "a big yellow square", "a purple circle on the left"]


def tiny_unet(seed: int = 0):
    torch.manual_seed(seed)
    return build_unet(UNetConfig(block_out_channels=(8, 16), attention_head_dim=2, norm_num_groups=8),
                      LATENT_SIZE, 4, TEXT_DIM)


def build_tiny_pipeline(out_dir: Path, seed: int = 0) -> Path:
    tokenizer = build_clip_tokenizer(out_dir.parent / f"{out_dir.name}-tokenizer")
    unet = tiny_unet(seed)
    torch.manual_seed(seed + 1)
    pipe = StableDiffusionPipeline(
        vae=build_vae(VAEConfig(block_out_channels=(8, 16), norm_num_groups=4), IMAGE_SIZE),
        text_encoder=build_text_encoder(TextEncoderConfig(hidden_size=TEXT_DIM, layers=1, heads=2)),
        tokenizer=tokenizer, unet=unet, scheduler=sampling_scheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out_dir)
    return out_dir


def unet_weights(pipeline_dir: Path) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet", local_files_only=True).state_dict()
