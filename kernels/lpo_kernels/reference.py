"""The LRM reward head in plain PyTorch (paper Sec. 4.1): the definition the fused Triton head must match.

score_b = exp(logit_scale) * cos(W @ concat_i(mean_hw F_i[b]), T_b); with VFE the mid block (the last map) is pooled
as pool(uncond) + gs * (pool(cond) - pool(uncond)). Pooling accumulates in fp32 and the score is fp32 whatever the
input dtypes. Gradients come from ordinary autograd.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def pool_features(features: Sequence[torch.Tensor], mid_uncond: torch.Tensor | None,
                  guidance_scale: float) -> torch.Tensor:
    """[B, sum C_i] fp32: each map averaged over space (AdaptiveAvgPool2d(1)), the last one VFE-combined."""
    pooled = [x.mean(dim=(2, 3), dtype=torch.float32) for x in features]
    if mid_uncond is not None:
        uncond = mid_uncond.mean(dim=(2, 3), dtype=torch.float32)
        pooled[-1] = uncond + guidance_scale * (pooled[-1] - uncond)
    return torch.cat(pooled, dim=1)


def score_pooled(pooled: torch.Tensor, weight: torch.Tensor, text: torch.Tensor,
                 logit_scale: torch.Tensor) -> torch.Tensor:
    """[B] fp32: exp(logit_scale) * cosine of the projected pooled vector and the text embedding."""
    visual = F.normalize(pooled @ weight.float().T, dim=-1)
    return logit_scale.float().exp().reshape(()) * (visual * F.normalize(text.float(), dim=-1)).sum(-1)


def reward_head_reference(features: Sequence[torch.Tensor], mid_uncond: torch.Tensor | None, guidance_scale: float,
                          weight: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Same contract as `kernels.reward_head`, eager PyTorch only."""
    return score_pooled(pool_features(features, mid_uncond, guidance_scale), weight, text, logit_scale)
