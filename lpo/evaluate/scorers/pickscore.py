"""PickScore (Kirstain et al. 2023): a CLIP-H fine-tuned on Pick-a-Pic, scored as its model card does.

Reference (the `yuvalkirstain/PickScore_v1` model card): processor = AutoProcessor of
`laion/CLIP-ViT-H-14-laion2B-s32B-b79K`, model = AutoModel of `yuvalkirstain/PickScore_v1`;
score = logit_scale.exp() * cos(image_embeds, text_embeds), embeddings L2-normalised by their norm.

Preprocessing is the processor's, with the PIL backend that transformers 4 (the model card's era) used by default:
convert to RGB, PIL bicubic resize of the shorter side to 224, centre crop 224 (top-left offset rounded down),
rescale 1/255, CLIP normalisation; text: CLIP BPE, truncated to 77 tokens, padded to the longest in the batch.
(transformers 5 defaults to a torchvision backend whose antialiased resize differs slightly.)
"""
from __future__ import annotations

import abc
import os
from typing import ClassVar

import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

from lpo.evaluate.scorers.common import (HF_MODEL_FILES, HF_PROCESSOR_FILES, Checkpoint, Scorer, l2_normalize,
                                         load_pretrained)

CLIP_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class CLIPPair(Scorer):
    """A transformers CLIPModel and its processor; the score is `scale * cos(image, text)`."""
    max_length = 77

    def __init__(self, model: str | os.PathLike, processor: str | os.PathLike, device: str | torch.device = "cpu"):
        super().__init__(device)
        model_dir = self._require("model", model)
        processor_dir = self._require("processor", processor)
        self.model: CLIPModel = load_pretrained(CLIPModel, model_dir, f"{self.name}.model").to(self.device)
        self.image_processor = CLIPImageProcessorPil.from_pretrained(processor_dir, local_files_only=True)
        self.tokenizer = CLIPTokenizer.from_pretrained(processor_dir, local_files_only=True)

    @abc.abstractmethod
    def scale(self) -> torch.Tensor:
        """The factor on the cosine that defines the score's convention."""

    def embed(self, images: list[Image.Image], prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised (image, text) embeddings, (B, D) each."""
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        # Projections applied by hand: get_*_features returns tensors in transformers 4 and outputs in 5.
        image = self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output)
        text = self.model.text_projection(self.model.text_model(input_ids=tokens["input_ids"],
                                                                attention_mask=tokens["attention_mask"]).pooler_output)
        return l2_normalize(image), l2_normalize(text)

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        image, text = self.embed(images, prompts)
        return self.scale() * (image * text).sum(-1)


class PickScore(CLIPPair):
    name = "pickscore"
    convention = "PickScore: logit_scale.exp() * cos (~100 * cos)"
    checkpoints: ClassVar[dict[str, Checkpoint]] = {
        "model": Checkpoint("yuvalkirstain/PickScore_v1", contents=HF_MODEL_FILES),
        "processor": Checkpoint(CLIP_H, contents=HF_PROCESSOR_FILES),
    }

    def scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

