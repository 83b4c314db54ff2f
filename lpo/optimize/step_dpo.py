"""SPO's step-level DPO objective, as LPO trains with it ([FT] Eq. 6; official `ddim_with_logprob.py`,
`train_lpo.py`).

For a kept tuple (x_t, x_w, x_l) the policy and the frozen reference each give log p(x | x_t), the Gaussian density
of the DDIM eta = 1 step (mean from the guided noise prediction, std sigma_t) averaged over latent elements, as the
official code does (a sum would scale beta by the latent size). With r = clamp(exp(logp_theta - logp_ref), 1 - eps,
1 + eps) the loss is -mean log sigmoid(beta (log r_w - log r_l)).

The clamp is on the ratio, exactly as in the official code, so a tuple whose ratio has left [1 - eps, 1 + eps]
contributes no gradient (a hard trust region, unlike PPO's min(r A, clip(r) A)); the paper's prose omits it.
log sigmoid is computed as F.logsigmoid, equal to the official log(sigmoid(.)) wherever that is finite.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lpo.optimize.sampler import Conditioning, step_distribution, step_log_prob
from lpo.optimize.threshold import DDIMSteps


def pair_log_probs(unet, steps: DDIMSteps, parent: torch.Tensor, winner: torch.Tensor, loser: torch.Tensor,
                   step: torch.Tensor, cond: Conditioning | torch.Tensor, null: Conditioning | torch.Tensor,
                   guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(winner | parent), log p(loser | parent)) under `unet`; winner and loser share the parent, so one
    guided UNet pass gives both. step: (P,) indices into `steps`; cond: the P tuples' prompts, null: one row."""
    mean, sigma = step_distribution(unet, steps, parent, step, cond, null, guidance_scale)
    return step_log_prob(winner, mean, sigma), step_log_prob(loser, mean, sigma)


def clipped_ratio(log_prob: torch.Tensor, reference_log_prob: torch.Tensor, eps: float) -> torch.Tensor:
    """clamp(p_theta / p_ref, 1 - eps, 1 + eps); zero gradient where the ratio is clamped."""
    return torch.clamp(torch.exp(log_prob - reference_log_prob), 1 - eps, 1 + eps)


def step_dpo_loss(log_prob_w: torch.Tensor, log_prob_l: torch.Tensor, reference_w: torch.Tensor,
                  reference_l: torch.Tensor, beta: float = 500.0, eps: float = 0.1) -> torch.Tensor:
    """-mean log sigmoid(beta (log r_w - log r_l)) over the P tuples."""
    log_ratio_w = clipped_ratio(log_prob_w.float(), reference_w.float(), eps).log()
    log_ratio_l = clipped_ratio(log_prob_l.float(), reference_l.float(), eps).log()
    return -F.logsigmoid(beta * (log_ratio_w - log_ratio_l)).mean()
