"""The preference pair loss every reward model of the harness trains with (LRM, pixel reward model, SPM).

As the official LRM trainer (`loss_type: pair`): cross-entropy of the two-way softmax of the scores against the
label (1/0, 0/1 or 0.5/0.5); ties get log 0.5 added so that a perfect tie prediction costs 0; each pair is weighted
by 1 / num_example_per_prompt, normalised over the batch, and the weighted losses are summed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def pair_loss(score_0: torch.Tensor, score_1: torch.Tensor, label_0: torch.Tensor,
              examples_per_prompt: torch.Tensor | None = None) -> torch.Tensor:
    """score_*: (B,) rewards of image 0 / 1; label_0: (B,) in {1, 0, 0.5}; examples_per_prompt: (B,) counts."""
    log_p = F.log_softmax(torch.stack([score_0, score_1], dim=1).float(), dim=1)
    label_0 = label_0.to(log_p)
    losses = -(label_0 * log_p[:, 0] + (1 - label_0) * log_p[:, 1])
    losses = losses + torch.where(label_0 == 0.5, math.log(0.5), 0.0)
    if examples_per_prompt is None:
        weights = torch.full_like(losses, 1.0 / len(losses))
    else:
        inverse = 1.0 / examples_per_prompt.to(log_p)
        weights = inverse / inverse.sum()
    return (losses * weights).sum()


def pair_accuracy(score_0: torch.Tensor, score_1: torch.Tensor, label_0: torch.Tensor) -> torch.Tensor:
    """Share of decided pairs (label 1 or 0) the scores order as the label does; ties are left out.
    Equal scores count as half right."""
    decided = label_0 != 0.5
    right = torch.where(score_0 == score_1, 0.5, ((score_0 > score_1) == (label_0 == 1)).float())
    return right[decided].mean()
