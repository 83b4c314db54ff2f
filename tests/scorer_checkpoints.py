"""Small random checkpoints in the real scorers' on-disk layouts (hub directories, .pt/.pth files), shared by
tests/test_scorers.py and tests/test_scorer_parity.py. Same topology as the real models, smaller widths."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from reference_scorers import randomize
from transformers import CLIPConfig, CLIPModel

from lpo.evaluate.scorers.aesthetic import AestheticMLP
from lpo.evaluate.scorers.image_reward import VIT_LARGE, ImageRewardModel, text_config
from lpo.world.tokenizer import SD_MAX_LENGTH, build_clip_tokenizer

PROMPTS = [
    "a photo of an astronaut riding a horse on the moon",
    "A Red Cube, left of a BLUE sphere... (studio lighting!)",
    "café crème on a wooden table, 35mm film grain",
    ("an extremely detailed, intricate, highly elaborate oil painting of a sprawling medieval city at dusk with "
    "hundreds of tiny lanterns, winding cobblestone streets, towering gothic cathedrals, flocks of birds, distant "
    "snow-capped mountains, a calm river reflecting the sky, boats, market stalls, and people in colourful clothes "
    "walking past bakeries, blacksmiths, fountains and statues under a violet sky with the first stars appearing"),
]

# The hub's preprocessor_config.json of laion/CLIP-ViT-H-14-laion2B-s32B-b79K (transformers 4 legacy format).
LAION_PREPROCESSOR = {
    "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224,
}

# ViT-H-14's open_clip config (model_configs/ViT-H-14.json) with small widths and depths.
TINY_VIT_H_14 = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def sample_images(n: int = 4, seed: int = 0) -> list[np.ndarray]:
    """Smooth colour fields plus noise, in shapes that take every resize/crop/pad branch: square SD-sized,
    landscape (odd HPS padding), portrait whose centre crop offset is 65.5 (torchvision rounds it to 66, the
    transformers processor floors it to 65), already 224, and upscaled."""
    shapes = [(512, 512), (200, 300), (154, 97), (224, 224), (64, 80)]
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        h, w = shapes[i % len(shapes)]
        y, x = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([np.sin(6 * x * rng.uniform(0.5, 2) + rng.uniform(0, 6)),
                         np.cos(5 * y * rng.uniform(0.5, 2) + rng.uniform(0, 6)),
                         np.sin(4 * (x + y) * rng.uniform(0.5, 2))], -1)
        images.append(np.clip(127 + 90 * base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))
    return images


def save_pngs(images: list[np.ndarray], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"image_{i}.png" for i in range(len(images))]
    for image, path in zip(images, paths):
        Image.fromarray(image).save(path)
    return paths


# ------------------------------------------------------------------------------------------------------ CLIP

def clip_config(projection_dim: int, hidden_act: str, width: int = 64, layers: int = 2) -> CLIPConfig:
    """A CLIP of ViT-x/14 topology at 224 px with the real 49,408-token vocabulary; width / 64 heads, as OpenAI's."""
    tower = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                 num_attention_heads=width // 64, hidden_act=hidden_act, projection_dim=projection_dim)
    return CLIPConfig(text_config=dict(tower, vocab_size=49408, max_position_embeddings=77, eos_token_id=49407,
                                       bos_token_id=49406, pad_token_id=49407),
                      vision_config=dict(tower, image_size=224, patch_size=14), projection_dim=projection_dim)


def save_clip_model(out_dir: Path, config: CLIPConfig, seed: int, fp16_values: bool = False) -> dict[str, torch.Tensor]:
    """`fp16_values`: weights exactly representable in fp16, as OpenAI's released CLIP weights are (its
    build_model stores the weights in fp16 before clip.load casts them back to fp32 on CPU)."""
    torch.manual_seed(seed)
    model = CLIPModel(config)
    state = randomize(model.state_dict(), seed)
    if fp16_values:
        state = {k: v.half().float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state)
    model.save_pretrained(out_dir)
    return state


def save_clip_processor(out_dir: Path) -> None:
    """A CLIP processor directory as the laion hub repository holds it: tokenizer files + preprocessor_config."""
    tokenizer_dir = out_dir.parent / f".{out_dir.name}-tokenizer"
    build_clip_tokenizer(tokenizer_dir, SD_MAX_LENGTH)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in tokenizer_dir.iterdir():
        shutil.copy(path, out_dir / path.name)
    shutil.rmtree(tokenizer_dir)
    (out_dir / "preprocessor_config.json").write_text(json.dumps(LAION_PREPROCESSOR, indent=2))


def openai_clip_state_dict(hf: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """A transformers CLIPModel state dict in OpenAI CLIP's layout (what `clip.model.build_model` reads)."""
    out = {}
    for tower, prefix, hf_prefix in (("visual", "visual.", "vision_model."), ("text", "", "text_model.")):
        for i in range(layers):
            src, dst = f"{hf_prefix}encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
            for part in ("weight", "bias"):
                out[dst + f"attn.in_proj_{part}"] = torch.cat([hf[src + f"self_attn.{p}_proj.{part}"]
                                                               for p in ("q", "k", "v")])
                out[dst + f"attn.out_proj.{part}"] = hf[src + f"self_attn.out_proj.{part}"]
                out[dst + f"ln_1.{part}"] = hf[src + f"layer_norm1.{part}"]
                out[dst + f"ln_2.{part}"] = hf[src + f"layer_norm2.{part}"]
                out[dst + f"mlp.c_fc.{part}"] = hf[src + f"mlp.fc1.{part}"]
                out[dst + f"mlp.c_proj.{part}"] = hf[src + f"mlp.fc2.{part}"]
    for part in ("weight", "bias"):
        out[f"visual.ln_pre.{part}"] = hf[f"vision_model.pre_layrnorm.{part}"]
        out[f"visual.ln_post.{part}"] = hf[f"vision_model.post_layernorm.{part}"]
        out[f"ln_final.{part}"] = hf[f"text_model.final_layer_norm.{part}"]
    out["visual.conv1.weight"] = hf["vision_model.embeddings.patch_embedding.weight"]
    out["visual.class_embedding"] = hf["vision_model.embeddings.class_embedding"]
    out["visual.positional_embedding"] = hf["vision_model.embeddings.position_embedding.weight"]
    out["visual.proj"] = hf["visual_projection.weight"].T.contiguous()
    out["token_embedding.weight"] = hf["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = hf["text_model.embeddings.position_embedding.weight"]
    out["text_projection"] = hf["text_projection.weight"].T.contiguous()
    out["logit_scale"] = hf["logit_scale"]
    return out


def save_aesthetic_mlp(path: Path, width: int, seed: int) -> None:
    torch.save(randomize(AestheticMLP(width).state_dict(), seed), path)


# ------------------------------------------------------------------------------------------------------- HPS

def save_hps_backbone(out_dir: Path, model_cfg: dict) -> Path:
    """An open_clip hub directory's config (open_clip_config.json), which HPSv2(backbone=...) reads."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    return out_dir


def save_hps_checkpoint(path: Path, model_cfg: dict, seed: int) -> None:
    """What hpsv2 loads: {'state_dict': ...} of the whole open_clip model."""
    backbone = save_hps_backbone(path.parent / f".{path.stem}-config", model_cfg)
    model = open_clip.create_model(f"local-dir:{backbone}", load_weights=False)
    torch.save({"state_dict": randomize(model.state_dict(), seed)}, path)
    shutil.rmtree(backbone)


# ----------------------------------------------------------------------------------------------- ImageReward

def write_med_config(path: Path, vocab_size: int, width: int = 768, layers: int = 2, heads: int = 12,
                     intermediate: int = 1024) -> None:
    """BLIP's med_config.json fields, with a shallower BERT (the reference's reward MLP fixes the width at 768)."""
    path.write_text(json.dumps({
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": width, "initializer_range": 0.02, "intermediate_size": intermediate,
        "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": heads,
        "num_hidden_layers": layers, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": vocab_size,
        "encoder_width": 768, "add_cross_attention": True}, indent=2))


def write_small_vocab(path: Path) -> int:
    """A WordPiece vocabulary in bert's format (specials first), enough for PROMPTS; returns its size."""
    words = sorted({w for p in PROMPTS for w in re.findall(r"[a-z]+", p.lower())})
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(3)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += list("!(),-.") + [str(d) for d in range(10)] + words + ["##s", "##ing", "##ed"]
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return len(tokens)


_TO_REFERENCE_VIT = (
    (r"^embeddings\.class_embedding$", "cls_token"),
    (r"^embeddings\.position_embedding$", "pos_embed"),
    (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"blocks.\1.attn.qkv."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
    (r"^post_layernorm\.", "norm."),
)


def save_image_reward_checkpoint(path: Path, med_config: Path, vision: dict, seed: int) -> None:
    """ImageReward.pt's layout (blip.visual_encoder in timm names, blip.text_encoder, blip.*_proj, mlp) with random
    weights; used where the reference package is not run (behaviour tests)."""
    from transformers import BlipVisionConfig

    config = BlipVisionConfig(**{**VIT_LARGE, **vision})
    model = ImageRewardModel(config, text_config(med_config, config.hidden_size))
    out = {}
    for key, value in randomize(model.state_dict(), seed).items():
        if key.startswith("visual_encoder."):
            name = key[len("visual_encoder."):]
            for pattern, repl in _TO_REFERENCE_VIT:
                name, n = re.subn(pattern, repl, name)
                if n:
                    break
            key = "blip.visual_encoder." + name
        elif key.startswith("text_encoder."):
            key = "blip." + key
        out[key] = value
    width = model.text_encoder.config.hidden_size
    out["blip.vision_proj.weight"] = torch.zeros(256, config.hidden_size)
    out["blip.text_proj.weight"] = torch.zeros(256, width)
    torch.save(out, path)


# ------------------------------------------------------------------------------------------------ all of them

SMALL_BLIP_VIT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                      image_size=64, patch_size=16)


def save_table2_scorers(root: Path) -> dict[str, dict]:
    """Small random checkpoints of the five Table 2 scorers under `root`, in their real layouts, and each
    scorer's constructor arguments (JSON-ready: paths as strings) pointing at them."""
    clip_h = root / "CLIP-ViT-H-14-laion2B-s32B-b79K"
    save_clip_model(clip_h, clip_config(16, "gelu"), seed=0)
    save_clip_processor(clip_h)
    save_clip_model(root / "PickScore_v1", clip_config(16, "gelu"), seed=1)
    backbone = save_hps_backbone(root / "backbone", TINY_VIT_H_14)
    save_hps_checkpoint(root / "HPS_v2_compressed.pt", TINY_VIT_H_14, seed=2)
    save_hps_checkpoint(root / "HPS_v2.1_compressed.pt", TINY_VIT_H_14, seed=3)
    vocab_size = write_small_vocab(root / "vocab.txt")
    write_med_config(root / "med_config.json", vocab_size + 2, width=64, heads=2, intermediate=128)
    save_image_reward_checkpoint(root / "ImageReward.pt", root / "med_config.json", SMALL_BLIP_VIT, seed=4)
    save_clip_model(root / "clip-vit-large-patch14", clip_config(32, "quick_gelu"), seed=5)
    save_aesthetic_mlp(root / "sac+logos+ava1-l14-linearMSE.pth", 32, seed=6)
    return {
        "pickscore": {"model": str(root / "PickScore_v1"), "processor": str(clip_h)},
        "hpsv2": {"checkpoint": str(root / "HPS_v2_compressed.pt"), "backbone": str(backbone)},
        "hpsv2.1": {"checkpoint": str(root / "HPS_v2.1_compressed.pt"), "backbone": str(backbone)},
        "imagereward": {"checkpoint": str(root / "ImageReward.pt"), "med_config": str(root / "med_config.json"),
                        "vocab": str(root / "vocab.txt"), "vision_config": SMALL_BLIP_VIT},
        "aesthetic": {"clip": str(root / "clip-vit-large-patch14"),
                      "mlp": str(root / "sac+logos+ava1-l14-linearMSE.pth")},
    }
