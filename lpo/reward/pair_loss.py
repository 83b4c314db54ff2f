"""The preference pair loss every reward model of the harness trains with (LRM, pixel reward model, SPM).

As the official LRM trainer (`loss_type: pair`): cross-entropy of the two-way softmax of the scores against the
label (1/0, 0/1 or 0.5/0.5); ties get log 0.5 added so that a perfect tie prediction costs 0; each pair is weighted
by 1 / num_example_per_prompt, normalised over the batch, and the weighted losses are summed.

The two-way softmax is the Bradley-Terry likelihood P(0 > 1) = sigmoid(s_0 - s_1). Given per-pair uncertainties
`scale` s(t), the Thurstone likelihood of a noise-calibrated LRM replaces it (DiNa-LRM, arXiv 2602.11146):
P(0 > 1 | t) = Phi((s_0 - s_1) / (sqrt(2) s(t))), each image's reward read with N(0, s(t)^2) noise; a tie's soft
label 0.5 / 0.5 is treated exactly as under Bradley-Terry (costing 0 when the model says 0.5).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def pair_log_probabilities(score_0: torch.Tensor, score_1: torch.Tensor, scale: torch.Tensor | None = None
                           ) -> torch.Tensor:
    """(B, 2) log P(0 > 1), log P(1 > 0): Bradley-Terry without `scale`, Thurstone with the (B,) uncertainties."""
    if scale is None:
        return F.log_softmax(torch.stack([score_0, score_1], dim=1).float(), dim=1)
    z = (score_0.float() - score_1.float()) / (math.sqrt(2.0) * scale.float())
    return torch.stack([torch.special.log_ndtr(z), torch.special.log_ndtr(-z)], dim=1)


def pair_loss(score_0: torch.Tensor, score_1: torch.Tensor, label_0: torch.Tensor,
              examples_per_prompt: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """score_*: (B,) rewards of image 0 / 1; label_0: (B,) in {1, 0, 0.5}; examples_per_prompt: (B,) counts;
    scale: (B,) Thurstone uncertainties s(t), None for Bradley-Terry."""
    log_p = pair_log_probabilities(score_0, score_1, scale)
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
