"""The published configs of the paper's models (the `config.json` files of runwayml/stable-diffusion-v1-5,
stabilityai/stable-diffusion-xl-base-1.0 and madebyollin/sdxl-vae-fp16-fix), and same-topology copies with tiny widths.

Used to check the LRM's feature sizes without allocating 2.6 B parameters (build on the meta device), to time
real architectures with random weights on a GPU, and to build tiny hub-layout models for tests.
"""
from __future__ import annotations

SD15_UNET = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

SDXL_UNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}

# CLIP ViT-L/14's text tower (SD1.5's text encoder) and OpenCLIP ViT-bigG's (SDXL's text_encoder_2).
CLIP_L_TEXT = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
               "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
               "projection_dim": 768}
CLIP_BIGG_TEXT = {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                  "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu",
                  "projection_dim": 1280}

SD_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [128, 256, 512, 512],
          "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
          "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215}
# SDXL's VAE (madebyollin/sdxl-vae-fp16-fix, the one LPO samples SDXL with): SD's VAE topology at 1024 px.
SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": False}


def tiny(config: dict, divisor: int = 20, groups: int = 4) -> dict:
    """The same topology (block types, stages, layers per block) with every width divided by `divisor`;
    SDXL's added-condition input width follows from the tiny text encoders, so callers set it."""
    out = dict(config)
    out["block_out_channels"] = [max(groups, c // divisor // groups * groups) for c in config["block_out_channels"]]
    out["norm_num_groups"] = groups
    if "cross_attention_dim" in config:
        out["cross_attention_dim"] = max(8, config["cross_attention_dim"] // divisor)
    if "addition_time_embed_dim" in config:
        out["addition_time_embed_dim"] = 8
        out["transformer_layers_per_block"] = [1] * len(config["block_out_channels"])
    if isinstance(config.get("attention_head_dim"), list):
        out["attention_head_dim"] = [2] * len(config["attention_head_dim"])
    elif "attention_head_dim" in config:
        out["attention_head_dim"] = 2
    return out
