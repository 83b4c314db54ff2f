"""HPSv2 and HPSv2.1 (Wu et al. 2023): open_clip ViT-H-14 with the whole state dict replaced by an HPS checkpoint.

Reference: `hpsv2.img_score.score` of the hpsv2/hpsv2x packages. It builds ViT-H-14 (the laion2B weights it
downloads are overwritten by the checkpoint, so none are needed here), loads `checkpoint['state_dict']` strictly,
and scores diag(image_features @ text_features.T) with both features L2-normalised: a raw cosine, which the
paper's tables show x100.

Preprocessing is that package's `preprocess_val` (built with light_augmentation=True), which differs from
open_clip's usual one: the image becomes a [0, 1] tensor FIRST, its longer side is resized to 224 by bicubic
interpolation on the float tensor (antialiased: torchvision's default since 0.17), the shorter side is padded with
zeros to a 224 square (left/top get the smaller half), then CLIP normalisation. The reference keeps RGBA images
as 4 channels (which the ViT then rejects); here every image is converted to RGB. Text: open_clip's CLIP BPE
tokenizer, 77 tokens.
"""
from __future__ import annotations

import os
from typing import ClassVar
from pathlib import Path

import open_clip
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from lpo.evaluate.scorers.common import (CLIP_MEAN, CLIP_STD, Checkpoint, Scorer, check_state_dict,
                                         load_state_dict_file, quiet_loading)
from lpo.evaluate.scorers.pickscore import CLIP_H


def hps_transform(image: Image.Image, size: int) -> torch.Tensor:
    """hpsv2's ResizeMaxSize on a tensor, then normalisation; (3, size, size)."""
    x = TF.to_tensor(image.convert("RGB"))
    height, width = x.shape[1:]
    scale = size / float(max(height, width))
    if scale != 1.0:
        x = TF.resize(x, [round(height * scale), round(width * scale)],
                      interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    pad_h, pad_w = size - x.shape[1], size - x.shape[2]
    x = TF.pad(x, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return TF.normalize(x, CLIP_MEAN, CLIP_STD)


class HPSv2(Scorer):
    name = "hpsv2"
    convention = "HPSv2: cos(image, text); tables show x100"
    checkpoints: ClassVar[dict[str, Checkpoint]] = {
        "checkpoint": Checkpoint("xswu/HPSv2", "HPS_v2_compressed.pt"),
        # An open_clip hub directory whose open_clip_config.json sets the architecture (default: ViT-H-14).
        "backbone": Checkpoint(CLIP_H, contents=("open_clip_config.json",), optional=True),
    }

    def __init__(self, checkpoint: str | os.PathLike, backbone: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu"):
        super().__init__(device)
        path = self._require("checkpoint", checkpoint)
        state = load_state_dict_file(path, f"{self.name}.checkpoint")
        state = state.get("state_dict", state)
        name = "ViT-H-14" if backbone is None else f"local-dir:{self._require('backbone', backbone)}"
        with quiet_loading():
            model = open_clip.create_model(name, pretrained=None, load_weights=False)
        check_state_dict({k: v.shape for k, v in model.state_dict().items()}, state, path, f"{self.name}.checkpoint")
        model.load_state_dict(state)
        self.model = model.float().eval().to(self.device)
        self.size = _square_size(model.visual.image_size, path)
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        pixels = torch.stack([hps_transform(im, self.size) for im in images]).to(self.device)
        image = self.model.encode_image(pixels, normalize=True)
        text = self.model.encode_text(self.tokenizer(prompts).to(self.device), normalize=True)
        return (image * text).sum(-1)


class HPSv21(HPSv2):
    name = "hpsv2.1"
    convention = "HPSv2.1: cos(image, text); tables show x100"
    checkpoints: ClassVar[dict[str, Checkpoint]] = {
        **HPSv2.checkpoints, "checkpoint": Checkpoint("xswu/HPSv2", "HPS_v2.1_compressed.pt")}


def _square_size(image_size: int | tuple[int, int], where: Path) -> int:
    if isinstance(image_size, int):
        return image_size
    if image_size[0] != image_size[1]:
        raise ValueError(f"HPS preprocessing pads to a square, but the model for '{where}' takes {image_size}")
    return image_size[0]
