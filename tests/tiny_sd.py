"""Tiny random-weight Stable Diffusion pipelines for the preference-optimisation tests; no training, no pretrained
weights: the Shapes world's layout (16x16 images, 4x8x8 latents), and SD1.5's and SDXL's topologies at tiny widths
saved in hub layout (64x64 images, 4x8x8 latents)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lpo.timing.architectures import SD15_UNET, SD_VAE, SDXL_UNET, tiny
from lpo.reward.lrm import LatentRewardModel, LRMConfig
from lpo.reward.pixel import PixelReward, PixelRewardConfig, step_aware_copy
from lpo.reward.spm import SPM, SPMConfig
from lpo.optimize.step_trainer import load_pipeline
from lpo.world.base_model import (SD15_SCHEDULE, TextEncoderConfig, UNetConfig, VAEConfig, build_text_encoder,
                                  build_unet, build_vae, sampling_scheduler)
from lpo.world.clip import CLIPArchitecture
from lpo.world.tokenizer import SD_MAX_LENGTH, build_clip_tokenizer

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


# ------------------------------------------------------------------------------ the paper's topologies, tiny widths

# scheduler/scheduler_config.json of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-xl-base-1.0.
SD15_HUB_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                      "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
                      "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
SDXL_HUB_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                      "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
                      "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
                      "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                      "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}
HUB_IMAGE_SIZE = 64  # the tiny VAEs keep SD's 8x downsampling: 4x8x8 latents
SDXL_TEXT_DIMS = (16, 32)  # text_encoder (CLIP ViT-L's place), text_encoder_2 (OpenCLIP bigG's, projected)


def clip_text_encoder(width: int, projection: bool = False, act: str = "quick_gelu"):
    """A two-layer random CLIP text tower (two, so the penultimate states SDXL reads differ from the embeddings)."""
    config = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, hidden_act=act, projection_dim=width)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _save_with_hub_scheduler(pipe, out_dir: Path, scheduler: dict) -> Path:
    pipe.save_pretrained(out_dir)
    (out_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return out_dir


def build_tiny_sd15_pipeline(out_dir: Path, seed: int = 0) -> Path:
    """A random pipeline of SD1.5's topology (lpo.timing.architectures' UNet and VAE at tiny widths, one CLIP text
    encoder) with SD1.5's hub scheduler config, saved in hub layout: 64x64 images."""
    tokenizer = build_clip_tokenizer(out_dir.parent / f"{out_dir.name}-tokenizer", SD_MAX_LENGTH)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{**tiny(SD15_UNET), "sample_size": HUB_IMAGE_SIZE // 8})
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**{**tiny(SD_VAE), "sample_size": HUB_IMAGE_SIZE}),
        text_encoder=clip_text_encoder(unet.config.cross_attention_dim), tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler.from_config(SD15_HUB_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    return _save_with_hub_scheduler(pipe, out_dir, SD15_HUB_SCHEDULER)


def tiny_sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    """SDXL's UNet topology at tiny widths: its blocks, transformer depths [1, 2, 10] and text_time added conditions
    (projection input = text_encoder_2's projection width + 6 time ids x the time embedding width), cross-attending
    to both text encoders' states (SDXL_TEXT_DIMS); 4x8x8 latents."""
    torch.manual_seed(seed)
    config = tiny(SDXL_UNET)
    return UNet2DConditionModel(**{
        **config, "sample_size": HUB_IMAGE_SIZE // 8, "cross_attention_dim": sum(SDXL_TEXT_DIMS),
        "transformer_layers_per_block": SDXL_UNET["transformer_layers_per_block"],
        "projection_class_embeddings_input_dim": SDXL_TEXT_DIMS[1] + 6 * config["addition_time_embed_dim"]})


def build_tiny_sdxl_pipeline(out_dir: Path, seed: int = 0) -> Path:
    """A random pipeline of SDXL's topology saved in hub layout (64x64 images): two CLIP text encoders, the second
    projected (CLIPTextModelWithProjection, its projection width = its hidden width), `tiny_sdxl_unet`, SDXL's VAE
    scaling and hub scheduler config; StableDiffusionXLPipeline.from_pretrained(out_dir) loads it."""
    tokenizer = build_clip_tokenizer(out_dir.parent / f"{out_dir.name}-tokenizer", SD_MAX_LENGTH)
    unet = tiny_sdxl_unet(seed)
    first, second = clip_text_encoder(SDXL_TEXT_DIMS[0]), clip_text_encoder(SDXL_TEXT_DIMS[1], True, "gelu")
    vae = AutoencoderKL(**{**tiny(SD_VAE), "sample_size": HUB_IMAGE_SIZE, "scaling_factor": 0.13025,
                           "force_upcast": True})
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=first, text_encoder_2=second, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=unet,
                                     scheduler=EulerDiscreteScheduler.from_config(SDXL_HUB_SCHEDULER),
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    return _save_with_hub_scheduler(pipe, out_dir, SDXL_HUB_SCHEDULER)


# A random reward model's scores differ little between candidates; scaled by this logit scale the pairs clear the
# paper's validity thresholds, so a two-round run takes optimizer steps.
SHARP_LOGIT_SCALE = math.log(1e4)
REFERENCE_HEAD = LRMConfig(head_backend="reference")


def build_tiny_lrm(pipeline_dir: Path, out_dir: Path, config: LRMConfig = REFERENCE_HEAD) -> Path:
    """An untrained LRM on the pipeline's own UNet and text encoder(s) (an SDXL-type pipeline's two: LRM-XL's
    layout), saved with LatentRewardModel.save."""
    pipe = load_pipeline(pipeline_dir)
    second = {"text_encoder_2": pipe.text_encoder_2, "tokenizer_2": pipe.tokenizer_2} \
        if getattr(pipe, "text_encoder_2", None) is not None else {}
    torch.manual_seed(1)
    lrm = LatentRewardModel(pipe.unet, pipe.text_encoder, pipe.tokenizer, config, **second)
    lrm.logit_scale.data.fill_(SHARP_LOGIT_SCALE)
    lrm.save(out_dir)
    return out_dir


def build_tiny_spm(pipeline_dir: Path, out_dir: Path) -> Path:
    """An untrained SPM (a tiny step-aware pixel model with the pipeline's tokenizer), saved with SPM.save."""
    pipe = load_pipeline(pipeline_dir)
    torch.manual_seed(2)
    pixel = PixelReward(PixelRewardConfig(), CLIPArchitecture(width=8, embed_dim=16, text_width=16), pipe.tokenizer,
                        text_encoder=clip_text_encoder(16))
    spm = SPM(step_aware_copy(pixel), pipe, SPMConfig())
    spm.model.logit_scale.data.fill_(SHARP_LOGIT_SCALE)
    spm.save(out_dir)
    return out_dir
