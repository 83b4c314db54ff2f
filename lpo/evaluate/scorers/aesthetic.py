"""LAION aesthetic predictor v2 ("improved aesthetic predictor", Schuhmann 2022): a linear MLP on the L2-normalised
CLIP ViT-L/14 image embedding, trained to predict 1-10 ratings (SAC + LAION-Logos + AVA, MSE loss).

Reference: christophschuhmann/improved-aesthetic-predictor `simple_inference.py` (not on PyPI); the image-reward
package's `AestheticScore` repeats it. Embedding: OpenAI CLIP ViT-L/14 `encode_image` (= transformers
CLIPVisionModelWithProjection's `image_embeds` for `openai/clip-vit-large-patch14`), divided by its L2 norm.
MLP (`sac+logos+ava1-l14-linearMSE.pth` keys `layers.{0,2,4,6,7}`): Linear(768, 1024), Dropout(0.2),
Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1), no activations.

Preprocessing, as OpenAI CLIP's `clip.load` transform: PIL bicubic resize of the shorter side to 224, centre crop,
RGB, CLIP normalisation. The prompt is ignored.
"""
from __future__ import annotations

import os
from typing import ClassVar

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import CLIPVisionModelWithProjection

from lpo.evaluate.scorers.common import (HF_MODEL_FILES, Checkpoint, Scorer, check_state_dict, clip_transform,
                                         load_pretrained, load_state_dict_file)


class AestheticMLP(nn.Module):
    def __init__(self, width: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Aesthetic(Scorer):
    name = "aesthetic"
    convention = "LAION aesthetic: predicted 1-10 rating"
    checkpoints: ClassVar[dict[str, Checkpoint]] = {
        "clip": Checkpoint("openai/clip-vit-large-patch14", contents=HF_MODEL_FILES),
        "mlp": Checkpoint("GitHub christophschuhmann/improved-aesthetic-predictor", "sac+logos+ava1-l14-linearMSE.pth",
                          url="https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                              "sac%2Blogos%2Bava1-l14-linearMSE.pth"),
    }

    def __init__(self, clip: str | os.PathLike, mlp: str | os.PathLike, device: str | torch.device = "cpu"):
        super().__init__(device)
        self.clip = load_pretrained(CLIPVisionModelWithProjection, self._require("clip", clip),
                                    f"{self.name}.clip").to(self.device)
        path = self._require("mlp", mlp)
        head = AestheticMLP(self.clip.config.projection_dim)
        state = load_state_dict_file(path, f"{self.name}.mlp")
        check_state_dict({k: v.shape for k, v in head.state_dict().items()}, state, path, f"{self.name}.mlp")
        head.load_state_dict(state)
        self.mlp = head.float().eval().to(self.device)
        self.size = self.clip.config.image_size

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        pixels = torch.stack([clip_transform(im, self.size) for im in images]).to(self.device)
        embedding = F.normalize(self.clip(pixel_values=pixels).image_embeds, dim=-1)
        return self.mlp(embedding).squeeze(-1)
