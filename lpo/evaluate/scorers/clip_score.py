"""CLIP score with CLIP-H (`laion/CLIP-ViT-H-14-laion2B-s32B-b79K`), the model MPCF's author names for the
"CLIP Score" column (Kwai-Kolors/LPO issue #3).

Convention: 100 * cos(image, text), NOT clamped at 0 (torchmetrics' max(100 * cos, 0) would turn every negative
cosine into a tie, and MPCF uses score gaps). MPCF's tie threshold |G_C| <= 0.03 is in raw-cosine units, i.e. 3.0 on
this scale. Preprocessing as PickScore (the hub directory's own CLIP processor, PIL backend).
"""
from __future__ import annotations

import os
from typing import ClassVar

import torch

from lpo.evaluate.scorers.common import HF_MODEL_FILES, HF_PROCESSOR_FILES, Checkpoint
from lpo.evaluate.scorers.pickscore import CLIP_H, CLIPPair


class CLIPScore(CLIPPair):
    name = "clipscore"
    convention = "CLIP score: 100 * cos (unclamped)"
    checkpoints: ClassVar[dict[str, Checkpoint]] = {
        "model": Checkpoint(CLIP_H, contents=HF_MODEL_FILES),
        "processor": Checkpoint(CLIP_H, contents=HF_PROCESSOR_FILES, optional=True),
    }

    def __init__(self, model: str | os.PathLike, processor: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu"):
        """`processor` defaults to `model`: the CLIP-H hub directory holds both."""
        super().__init__(model, model if processor is None else processor, device)

    def scale(self) -> torch.Tensor:
        return torch.tensor(100.0)
