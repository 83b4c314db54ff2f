"""Step-level DPO: the DDIM eta = 1 log-probability, the clipped ratio and the loss."""
import math

import pytest
import torch
from diffusers import DDIMScheduler
from tiny_sd import LATENT_SIZE, SD15_DDIM, TEXT_DIM, tiny_unet

from lpo.optimize.sampler import cfg_noise, ddim_mean, step_coefficients, step_log_prob
from lpo.optimize.step_dpo import clipped_ratio, pair_log_probs, step_dpo_loss
from lpo.optimize.step_trainer import add_lora, reference_model
from lpo.optimize.threshold import ddim_steps

STEPS = ddim_steps(SD15_DDIM, 20)
SHAPE = (4, LATENT_SIZE, LATENT_SIZE)


def test_step_log_prob_by_hand():
    x_prev = torch.tensor([[1.0, 2.0]])
    mean = torch.tensor([[0.5, 2.5]])
    # Each element: -(0.5)^2 / (2 * 0.5^2) - log 0.5 - log sqrt(2 pi); the mean over elements is the same.
    expected = -0.5 - math.log(0.5) - 0.5 * math.log(2 * math.pi)
    assert step_log_prob(x_prev, mean, torch.tensor(0.5)).item() == pytest.approx(expected, rel=1e-6)


def test_cfg_noise_combines_the_two_predictions():
    unet = tiny_unet().eval()
    g = torch.Generator().manual_seed(0)
    x, embeds, null = torch.randn(2, *SHAPE, generator=g), torch.randn(2, 77, TEXT_DIM, generator=g), \
        torch.randn(1, 77, TEXT_DIM, generator=g)
    t = torch.tensor([951, 1])
    with torch.no_grad():
        cond = unet(x, t, encoder_hidden_states=embeds).sample
        uncond = unet(x, t, encoder_hidden_states=null.expand(2, -1, -1)).sample
        assert torch.allclose(cfg_noise(unet, x, t, embeds, null, 5.0), uncond + 5.0 * (cond - uncond), atol=1e-5)
        assert torch.equal(cfg_noise(unet, x, t, embeds, null, 1.0), cond)


def test_log_prob_equals_the_ddim_step_by_hand():
    """Samples made by diffusers' DDIMScheduler.step(eta=1) with known noise z have, per element,
    log N = -z^2 / 2 - log sigma_t - log sqrt(2 pi): the mean over elements is known without the mean formula."""
    unet = tiny_unet().eval()
    scheduler = DDIMScheduler.from_config(SD15_DDIM)
    scheduler.set_timesteps(20)
    g = torch.Generator().manual_seed(1)
    step = torch.tensor([0, 7, 19])  # t_cur = 951, 601, 1 (the last step goes to final_alpha_cumprod)
    parent = torch.randn(3, *SHAPE, generator=g)
    embeds, null = torch.randn(3, 77, TEXT_DIM, generator=g), torch.randn(1, 77, TEXT_DIM, generator=g)
    z_w, z_l = torch.randn(3, *SHAPE, generator=g), torch.randn(3, *SHAPE, generator=g)
    timesteps = STEPS.timesteps[step]
    with torch.no_grad():
        eps = cfg_noise(unet, parent, timesteps, embeds, null, 5.0)
        winner = torch.cat([scheduler.step(eps[i:i + 1], int(t), parent[i:i + 1], eta=1.0,
                                           variance_noise=z_w[i:i + 1]).prev_sample for i, t in enumerate(timesteps)])
        loser = torch.cat([scheduler.step(eps[i:i + 1], int(t), parent[i:i + 1], eta=1.0,
                                          variance_noise=z_l[i:i + 1]).prev_sample for i, t in enumerate(timesteps)])
        log_w, log_l = pair_log_probs(unet, STEPS, parent, winner, loser, step, embeds, null, 5.0)
    sigma = torch.tensor([scheduler._get_variance(int(t), int(t) - 50).item() ** 0.5 for t in timesteps])
    for z, got in ((z_w, log_w), (z_l, log_l)):
        expected = -0.5 * z.pow(2).flatten(1).mean(1) - sigma.log() - 0.5 * math.log(2 * math.pi)
        # float32 rounding of x_prev, divided by sigma_t ~ 0.02 at the last step, limits the agreement.
        assert torch.allclose(got, expected, atol=2e-3), (got, expected)


def test_clamp_zeroes_the_gradient_outside_the_trust_region():
    log_prob = torch.tensor([0.2, 0.05, -0.2], requires_grad=True)
    ratio = clipped_ratio(log_prob, torch.zeros(3), eps=0.1)
    assert ratio.tolist() == pytest.approx([1.1, math.exp(0.05), 0.9])
    ratio.sum().backward()
    assert log_prob.grad.tolist() == pytest.approx([0.0, math.exp(0.05), 0.0])


def test_loss_formula():
    g = torch.Generator().manual_seed(2)
    log_w, log_l, ref_w, ref_l = (torch.randn(6, generator=g) * 0.1 for _ in range(4))
    beta, eps = 500.0, 0.1
    r_w = torch.clamp(torch.exp(log_w - ref_w), 1 - eps, 1 + eps)
    r_l = torch.clamp(torch.exp(log_l - ref_l), 1 - eps, 1 + eps)
    expected = -torch.log(torch.sigmoid(beta * (torch.log(r_w) - torch.log(r_l)))).mean()
    assert step_dpo_loss(log_w, log_l, ref_w, ref_l, beta, eps).item() == pytest.approx(expected.item(), rel=1e-5)
    # Policy equal to the reference: log 2.
    assert step_dpo_loss(log_w, log_l, log_w, log_l).item() == pytest.approx(math.log(2))
    # Stable where log(sigmoid(.)) underflows: both ratios at opposite clamp ends, beta large.
    far = step_dpo_loss(torch.tensor([-1.0]), torch.tensor([1.0]), torch.zeros(1), torch.zeros(1), beta=5000.0)
    assert math.isfinite(far.item()) and far.item() == pytest.approx(5000 * 2 * math.atanh(0.1) * 1, rel=1e-3)


def test_gradient_moves_the_policy_toward_the_winner():
    unet = tiny_unet().eval()
    params = add_lora(unet, rank=4, seed=0)
    g = torch.Generator().manual_seed(3)
    step = torch.tensor([3, 10, 15, 18])
    parent = torch.randn(4, *SHAPE, generator=g)
    embeds, null = torch.randn(4, 77, TEXT_DIM, generator=g), torch.randn(1, 77, TEXT_DIM, generator=g)
    with torch.no_grad(), reference_model(unet):
        eps = cfg_noise(unet, parent, STEPS.timesteps[step], embeds, null, 5.0)
    alpha, alpha_prev, sigma = step_coefficients(STEPS, step, parent)
    mean, _ = ddim_mean(parent, eps, alpha, alpha_prev, sigma)
    winner = mean + sigma * torch.randn(4, *SHAPE, generator=g)
    loser = mean + sigma * torch.randn(4, *SHAPE, generator=g)
    args = (STEPS, parent, winner, loser, step, embeds, null, 5.0)
    with torch.no_grad(), reference_model(unet):
        ref_w, ref_l = pair_log_probs(unet, *args)

    def margin() -> float:
        with torch.no_grad():
            log_w, log_l = pair_log_probs(unet, *args)
        return (log_w - log_l).mean().item()

    optimizer = torch.optim.AdamW(params, lr=1e-3)
    before, losses = margin(), []
    for _ in range(5):
        log_w, log_l = pair_log_probs(unet, *args)
        loss = step_dpo_loss(log_w, log_l, ref_w, ref_l)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # gaussian LoRA init: policy == reference
    assert margin() > before + 1e-3 and losses[-1] < losses[0]
    with torch.no_grad(), reference_model(unet):  # the reference did not move
        assert torch.equal(pair_log_probs(unet, *args)[0], ref_w)
