"""The models one sampling step is timed on, with random or trained weights (timing does not depend on the weights'
values): the world's trained ones (base model, LRM, SPM), random-weight ones at the world's configured sizes, or
random-weight ones at the published SD1.5 / SDXL configs with a CLIP ViT-H/14 pixel model (SPO's SPM is PickScore,
a ViT-H/14 CLIP).
"""
from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lpo.config import from_dict
from lpo.evaluate.scorers.common import CLIP_MEAN, CLIP_STD, quiet_loading
from lpo.optimize.sampler import Conditioning
from lpo.reward.lrm import LatentRewardModel, LRMConfig
from lpo.reward.spm import SPM
from lpo.timing.architectures import CLIP_BIGG_TEXT, CLIP_L_TEXT, SD15_UNET, SD_VAE, SDXL_UNET, SDXL_VAE, tiny

PROMPT = "a small red circle on a gray background, on the left"  # padded to 77 tokens: any prompt costs the same
ARCHES = ("sd15", "sdxl")
# Test-sized stand-ins for the text towers and the ViT-H/14: same code path, widths a CPU runs in milliseconds.
_TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "projection_dim": 32}
_TINY_VIT = {"embed_dim": 32,
             "vision_cfg": {"image_size": 28, "layers": 1, "width": 32, "head_width": 16, "patch_size": 14},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@dataclass
class StepModels:
    """Everything one sampling step runs, placed on one device."""
    name: str                     # what was timed, for the report
    unet: UNet2DConditionModel    # the policy: denoising and the SPM's x0_hat
    scheduler: object             # its DDIM scheduler (the 20-step schedule is read from its config)
    vae: AutoencoderKL
    lrm: LatentRewardModel
    spm_reward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # (images [-1, 1], timesteps) -> scores
    cond: Conditioning
    null: Conditioning
    description: dict[str, str] = field(default_factory=dict)        # model -> what it is, for the report

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        return self.unet.config.in_channels, size, size

    @property
    def image_size(self) -> int:
        return self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)


def _world_models(name: str, pipe, lrm: LatentRewardModel, spm: SPM, weights: str) -> StepModels:
    """`pipe` is already on its device and dtype; the SPM's pixel model stays float32, as lpo.reward.spm.SPM feeds
    it."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    lrm = lrm.to(device, dtype).eval()
    ids = spm.predictor.prompt_ids([PROMPT, ""])
    with torch.no_grad():
        states = pipe.text_encoder(ids)[0]
    prompt_ids = ids[:1]

    def spm_reward(images: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return spm.score_images(images, timesteps, prompt_ids.expand(len(images), -1))

    pixel = spm.model
    description = {"policy": f"{weights} UNet {list(pipe.unet.config.block_out_channels)}",
                   "VAE": f"{weights} AutoencoderKL {list(pipe.vae.config.block_out_channels)}",
                   "LRM": f"{weights}, UNet {list(lrm.unet.config.block_out_channels)}, VFE gs "
                          f"{lrm.config.guidance_scale:g}, head backend {lrm.config.head_backend}",
                   "SPM pixel model": f"{weights} step-aware conv tower (width {pixel.architecture.width}), float32"}
    return StepModels(name, pipe.unet.eval(), pipe.scheduler, pipe.vae.eval(), lrm, spm_reward,
                      Conditioning(states[:1]), Conditioning(states[1:]), description)


def _placed(pipe, device: torch.device, dtype: torch.dtype):
    """The pipeline on `device`, cast only when its dtype differs (diffusers warns about every cast)."""
    pipe = pipe.to(device)
    return pipe if pipe.unet.dtype == dtype else pipe.to(dtype=dtype)


def load_world_models(model_dir, lrm_dir, spm_dir, device: torch.device, dtype: torch.dtype,
                      name: str = "trained models") -> StepModels:
    """The world's trained base model, LRM and SPM (the DAG's results/<world>/...)."""
    from lpo.world.pipeline import load_pipeline
    pipe = _placed(load_pipeline(model_dir), device, dtype)
    lrm = LatentRewardModel.load(lrm_dir, tokenizer_dir=model_dir)
    return _world_models(name, pipe, lrm, SPM.load(spm_dir, pipe), "trained")


def random_world_models(params: dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> StepModels:
    """Random-weight models at the sizes of a world's config (sections world, vae, base_model, lrm, world_clip,
    pixel_reward, spm; missing ones take their defaults)."""
    from lpo.reward.lrm_training import LRMTrainConfig
    from lpo.reward.pixel import PixelReward, PixelRewardConfig
    from lpo.reward.spm import SPMConfig
    from lpo.world.base_model import (BaseModelConfig, VAEConfig, build_text_encoder, build_unet, build_vae,
                                      check_image_size, sampling_scheduler)
    from lpo.world.clip import WorldCLIPConfig
    from lpo.world.settings import WorldConfig

    world = from_dict(WorldConfig, params.get("world"), "world")
    vae_config = from_dict(VAEConfig, params.get("vae"), "vae")
    base = from_dict(BaseModelConfig, params.get("base_model"), "base_model")
    latent_size = check_image_size(world.image_size, vae_config, base.unet)
    tokenizer = clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = build_text_encoder(base.text_encoder)
    unet = build_unet(base.unet, latent_size, vae_config.latent_channels, base.text_encoder.hidden_size)
    pipe = StableDiffusionPipeline(vae=build_vae(vae_config, world.image_size), text_encoder=text_encoder,
                                   tokenizer=tokenizer, unet=unet, scheduler=sampling_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    lrm = LatentRewardModel(copy.deepcopy(unet), copy.deepcopy(text_encoder), tokenizer,
                            from_dict(LRMTrainConfig, params.get("lrm"), "lrm").model)
    pixel = PixelReward(from_dict(PixelRewardConfig, params.get("pixel_reward"), "pixel_reward"),
                        from_dict(WorldCLIPConfig, params.get("world_clip"), "world_clip").architecture(), tokenizer,
                        step_aware=True)
    pipe = _placed(pipe, device, dtype)
    spm = SPM(pixel, pipe, from_dict(SPMConfig, params.get("spm"), "spm"))
    return _world_models(f"random weights at the {world.name} world's sizes", pipe, lrm, spm, "random")


def arch_configs(arch: str, tiny_widths: bool) -> tuple[dict, dict, list[dict]]:
    """The UNet, VAE and text encoder configs of the published SD1.5 or SDXL (SDXL: both text encoders), or the same
    topology with tiny widths, its UNet sized to their states."""
    xl = arch == "sdxl"
    unet_config, vae_config = dict(SDXL_UNET if xl else SD15_UNET), dict(SDXL_VAE if xl else SD_VAE)
    text_configs = [CLIP_L_TEXT, CLIP_BIGG_TEXT] if xl else [CLIP_L_TEXT]
    if tiny_widths:
        unet_config, vae_config = tiny(unet_config), tiny(vae_config)
        text_configs = [{**c, **_TINY_TEXT} for c in text_configs]
        unet_config["sample_size"], vae_config["sample_size"] = 8, 64
        unet_config["cross_attention_dim"] = sum(c["hidden_size"] for c in text_configs)
        if xl:
            unet_config["projection_class_embeddings_input_dim"] = \
                text_configs[1]["projection_dim"] + 6 * unet_config["addition_time_embed_dim"]
    return unet_config, vae_config, text_configs


def arch_models(arch: str, device: torch.device, dtype: torch.dtype, tiny_widths: bool = False,
                seed: int = 0) -> StepModels:
    """Random-weight models at the published configs: SD1.5 (UNet, VAE, CLIP ViT-L/14 text) or SDXL (UNet, the
    fp16-fix VAE, CLIP ViT-L/14 + OpenCLIP ViT-bigG text), the LRM over the same UNet and text encoders, and the SPM's
    pixel model as a CLIP ViT-H/14 (open_clip's 'ViT-H-14' config). `tiny_widths`: the same topology with tiny widths
    (a set-up check that runs on a CPU; its times say nothing about the real models)."""
    import open_clip

    from lpo.world.base_model import sampling_scheduler
    if arch not in ARCHES:
        raise ValueError(f"--arch {arch!r}: use one of {', '.join(ARCHES)}")
    if device.type != "cuda" and not tiny_widths:
        raise ValueError(f"timing the real {arch} architecture needs a CUDA GPU, not {device}: on a CPU one "
                         f"step of its UNet, VAE and ViT-H/14 takes minutes and {'~25' if arch == 'sdxl' else '~10'} "
                         f"GB of memory. Run it on a GPU machine, time the world's models with `lpo timing step-cost`, "
                         f"or pass --tiny to check the set-up with tiny widths")
    xl = arch == "sdxl"
    unet_config, vae_config, text_configs = arch_configs(arch, tiny_widths)
    vit = _TINY_VIT if tiny_widths else {}
    tokenizer = clip_tokenizer(sd=True)
    torch.manual_seed(seed)
    with torch.device(device):  # 2.6 B parameters for SDXL: initialise them where they will run
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_configs[0]))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_configs[1])) if xl else None
        with quiet_loading():  # open_clip warns that the model it builds has random weights: that is the point
            clip = open_clip.create_model("ViT-H-14", pretrained=None, device=device, **vit)
    # The LRM shares the policy's UNet and text encoders: the same computation as its own copy, half the memory.
    lrm = LatentRewardModel(unet, text_encoder, tokenizer, LRMConfig(), text_encoder_2=text_encoder_2,
                            tokenizer_2=tokenizer if xl else None,
                            projection_dim=None if xl else text_configs[0]["projection_dim"]).to(device, dtype)
    if dtype != torch.float32:  # built in float32; diffusers warns about every cast, even a no-op
        vae, clip = vae.to(dtype), clip.to(dtype)
    with torch.no_grad():
        (cond, _, cond_added), (null, _, null_added) = (lrm.encode_text(**lrm.tokenize([p])) for p in (PROMPT, ""))
    label = f"{'SDXL' if xl else 'SD1.5'}{' (tiny widths)' if tiny_widths else ''}"
    size = unet_config["sample_size"] * 8
    description = {
        "policy": f"{label} UNet, random weights, {size}x{size} px",
        "VAE": f"{'SDXL fp16-fix' if xl else 'SD'} AutoencoderKL, random weights",
        "LRM": f"the policy's UNet (down + mid blocks) and text encoder{'s' if xl else ''}, VFE gs "
               f"{lrm.config.guidance_scale:g}, head backend {lrm.config.head_backend}",
        "SPM pixel model": f"open_clip ViT-H-14{' (tiny widths)' if tiny_widths else ''}, random weights, "
                           f"{clip.visual.image_size[0]} px input"}
    return StepModels(f"{label}, random weights", unet.eval(), sampling_scheduler(), vae.eval(), lrm.eval(),
                      ClipPixelModel(clip.eval()), Conditioning(cond, cond_added), Conditioning(null, null_added),
                      description)


class ClipPixelModel:
    """SPO's SPM at real size: PickScore-style CLIP scoring of decoded images (resized to the tower's input, CLIP
    normalisation) against the prompt. The timestep conditioning is left out of the cost: here it is an AdaLN MLP on
    a timestep embedding (lpo.reward.pixel), tiny next to a ViT-H/14."""

    def __init__(self, clip):
        import open_clip
        self.clip = clip
        param = next(clip.parameters())
        self.ids = open_clip.tokenizer.SimpleTokenizer(context_length=77)([PROMPT]).to(param.device)
        self.mean = torch.tensor(CLIP_MEAN, device=param.device).reshape(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD, device=param.device).reshape(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        size = self.clip.visual.image_size
        x = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
        x = ((x + 1) / 2 - self.mean) / self.std
        dtype = next(self.clip.parameters()).dtype
        image = self.clip.encode_image(x.to(dtype), normalize=True)
        text = self.clip.encode_text(self.ids.expand(len(images), -1), normalize=True)
        return self.clip.logit_scale.exp() * (image * text).sum(-1)


def clip_tokenizer(sd: bool = False):
    from lpo.world.tokenizer import MAX_LENGTH, SD_MAX_LENGTH, build_clip_tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        return build_clip_tokenizer(Path(tmp) / "tokenizer", SD_MAX_LENGTH if sd else MAX_LENGTH)
