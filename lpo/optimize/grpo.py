"""Step-wise GRPO with the LRM ([FT] App. B, Table 12: SD1.5, K = 4, beta = 0.1, eps = 0.1, 20 steps), the third
objective of the shared step trainer (`lpo.optimize.step_trainer`, `objective: grpo`).

The paper states the ingredients but not the formula, and ships no code ([FT] App. B; `../shared/spec/paper.md`).
What this module implements, and why:

- **Groups.** At every optimised step of a trajectory the sampler's K candidates share the parent x_{t+1} (the
  sampler of LPO and SPO, unchanged: same candidates, same continuation); all K are kept, with no validity
  threshold (a group carries its signal in its advantages, and a group of equal rewards has none).
- **Advantage.** A_i = (r_i - mean(r)) / (std(r) + 1e-4) over the group's K rewards, std the unbiased sample
  standard deviation, as TRL's GRPOTrainer computes it. The 1e-4 floor keeps a group of (near) ties from dividing by
  zero; such a group's advantages are (near) zero, so it does not move the policy.
- **Ratio.** rho_i = p_theta(x_i | x_{t+1}) / p_old(x_i | x_{t+1}), where p_old is the policy that sampled the round
  (its step density is recorded by the sampler as it draws, so no extra UNet pass) and log p is the Gaussian
  log-density of the eta = 1 DDIM step averaged over latent elements, exactly as the step-DPO objective's.
- **Loss.** PPO's clipped surrogate, -min(rho A, clip(rho, 1 - eps, 1 + eps) A), averaged over every candidate of
  the mini-batch, plus beta times the KL divergence of the policy's step distribution from the reference's, averaged
  over its groups. Both step distributions are Gaussians of the same sigma_t, so the KL is exact and needs no
  sample: |mu_theta - mu_ref|^2 / (2 sigma_t^2), averaged over latent elements as the log-densities are (DPOK's
  per-step KL; >= 0, and 0 with a zero gradient where the policy equals the reference). DeepSeekMath's sampled k3
  estimator, exp(log p_ref - log p_theta) - (log p_ref - log p_theta) - 1, was tried first: at the last, nearly
  noiseless steps sigma_t is small, a candidate's log-density ratio reaches tens, and the estimate reached 1.5e9 in
  one optimizer step of the default world's 8x run (clipped gradients kept the run finite).
  The reference is the frozen base UNet (the LoRA adapters disabled), as in LPO, or `grpo.reference`.
- **Rounds and updates.** One round samples `sample_batch_size` prompts' trajectories; its groups are shuffled and
  taken `train_batch_size` groups at a time (every candidate of a group in the same mini-batch, so the policy's and
  the reference's step distribution, which depend on the parent alone, are computed once per group), one optimizer
  step each and one pass over the round (so p_old is the policy of the round's first update, and rho moves away
  from 1 only within a round).
"""
from __future__ import annotations

import torch

ADVANTAGE_FLOOR = 1e-4


def group_advantages(scores: torch.Tensor) -> torch.Tensor:
    """(G, K) group-normalised rewards of (G, K) scores: (r - mean) / (std + 1e-4) within each group."""
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"group scores of shape {tuple(scores.shape)}: GRPO needs groups of K >= 2 candidates")
    scores = scores.double()
    return ((scores - scores.mean(1, keepdim=True)) / (scores.std(1, keepdim=True) + ADVANTAGE_FLOOR)).float()


def step_kl(mean: torch.Tensor, reference_mean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """(G,) KL(N(mean, sigma^2) || N(reference_mean, sigma^2)) of each group's step, averaged over latent elements;
    mean, reference_mean (G, C, H, W), sigma broadcastable to them."""
    return ((mean.float() - reference_mean.float()) ** 2 / (2 * sigma.float() ** 2)).flatten(1).mean(1)


def grpo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantage: torch.Tensor, kl: torch.Tensor,
              eps: float = 0.1, beta: float = 0.1) -> torch.Tensor:
    """The clipped surrogate loss averaged over the P candidates plus beta times the mean of `kl` over the groups
    (see the module docstring); log_prob, old_log_prob, advantage (P,): the candidates' log-densities under the
    trained and the sampling policy and their advantages; kl (G,): step_kl of their groups."""
    ratio = (log_prob.float() - old_log_prob.float()).exp()
    surrogate = torch.minimum(ratio * advantage, ratio.clamp(1 - eps, 1 + eps) * advantage)
    return -surrogate.mean() + beta * kl.float().mean()
