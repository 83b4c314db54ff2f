"""The paper's evaluation scorers (PickScore, HPSv2, HPSv2.1, ImageReward, LAION aesthetic) and MPCF's CLIP score,
on maintained libraries, from local checkpoints only.

A scorer config maps a scorer name to its constructor's path arguments, e.g.
    {"pickscore": {"model": ".../PickScore_v1", "processor": ".../CLIP-ViT-H-14-laion2B-s32B-b79K"},
     "hpsv2": {"checkpoint": ".../HPS_v2_compressed.pt"}}
Every scorer names its scale in `convention`; tables print it in their headers.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lpo.evaluate.scorers.aesthetic import Aesthetic
from lpo.evaluate.scorers.clip_score import CLIPScore
from lpo.evaluate.scorers.common import CheckpointMismatch, Scorer, Scores
from lpo.evaluate.scorers.hps import HPSv2, HPSv21
from lpo.evaluate.scorers.image_reward import ImageReward
from lpo.evaluate.scorers.pickscore import PickScore

SCORERS: dict[str, type[Scorer]] = {cls.name: cls for cls in (PickScore, HPSv2, HPSv21, ImageReward, Aesthetic,
                                                               CLIPScore)}

__all__ = ["SCORERS", "Aesthetic", "CLIPScore", "CheckpointMismatch", "HPSv2", "HPSv21", "ImageReward", "PickScore",
           "Scorer", "Scores", "build_scorer", "missing_checkpoints"]


def _scorer_class(name: str) -> type[Scorer]:
    if name not in SCORERS:
        raise ValueError(f"unknown scorer '{name}' (known: {', '.join(SCORERS)})")
    return SCORERS[name]


def missing_checkpoints(config: Mapping[str, Mapping[str, Any] | None]) -> list[str]:
    """Every missing or incomplete checkpoint of the configured scorers, each naming what to download; empty when
    all are in place. Run it before computing anything."""
    return [problem for name, paths in config.items() for problem in _scorer_class(name).missing(**(paths or {}))]


def build_scorer(name: str, **kwargs: Any) -> Scorer:
    """The scorer `name` built from its constructor arguments (paths, plus `device` and the like)."""
    return _scorer_class(name)(**kwargs)
