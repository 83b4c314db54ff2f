"""Step-wise GRPO (lpo/optimize/grpo.py): the advantage and the clipped loss against a hand-computed example, no
KL and no gradient where the policy is the reference and the rewards tie, the sampler's groups and their recorded
log-densities, and the step trainer's GRPO objective trained, resumed after a kill and refused with bad settings."""
import dataclasses
import math

import pytest
import torch
from test_sampler import ALL, GUIDANCE, STEPS, THRESHOLDS, LatentReward, prompt_batch, run
from test_step_trainer import CONFIG, Interrupted, interrupt_after, keep_all, same_weights
from tiny_sd import LATENT_SIZE, PROMPTS, build_tiny_pipeline, tiny_unet

from lpo.config import from_dict
from lpo.optimize.grpo import group_advantages, grpo_loss, step_kl
from lpo.optimize.sampler import sample_step_pairs, step_distribution, step_log_prob
from lpo.optimize.step_trainer import StepPOConfig, train_step_po

GRPO = dataclasses.replace(CONFIG, objective="grpo", beta=0.1, eps=0.1, train_batch_size=2)


def test_advantages_and_clipped_loss_by_hand():
    advantage = group_advantages(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))[0]
    std = math.sqrt((1.5 ** 2 + 0.5 ** 2 + 0.5 ** 2 + 1.5 ** 2) / 3)  # unbiased: 1.29099
    expected = [(r - 2.5) / (std + 1e-4) for r in (1, 2, 3, 4)]
    assert advantage.tolist() == pytest.approx(expected, rel=1e-6)

    # Ratios 1, 1.2, 0.8, 1.05 to the sampling policy, eps = 0.1: the second is clipped to 1.1 but its advantage
    # is negative, so min() keeps the unclipped -0.4648; the third's clipped 0.9 * A exceeds 0.8 * A, so 0.8 * A.
    old = torch.zeros(4)
    log_prob = torch.log(torch.tensor([1.0, 1.2, 0.8, 1.05]))
    a = expected
    surrogate = [1.0 * a[0], 1.2 * a[1], 0.8 * a[2], 1.05 * a[3]]
    loss = grpo_loss(log_prob, old, advantage, kl=torch.zeros(1), eps=0.1, beta=0.1)
    assert loss.item() == pytest.approx(-sum(surrogate) / 4, rel=1e-5)

    # The KL of two Gaussians of sigma 0.5 whose means differ by 0.2 in every element: 0.2^2 / (2 * 0.25) = 0.08;
    # a second group at the reference adds 0, so the mean over groups is 0.04, weighted by beta.
    mean = torch.zeros(2, 4, 2, 2)
    mean[0] += 0.2
    kl = step_kl(mean, torch.zeros(2, 4, 2, 2), torch.full((2, 1, 1, 1), 0.5))
    assert kl.tolist() == pytest.approx([0.08, 0.0])
    flat = torch.zeros(8)
    assert grpo_loss(flat, flat, torch.zeros(8), kl, eps=0.1, beta=0.1).item() == pytest.approx(0.1 * 0.04)


def test_no_kl_and_no_gradient_when_the_policy_is_the_reference_and_rewards_tie():
    advantage = group_advantages(torch.full((3, 4), 2.5))
    assert torch.equal(advantage, torch.zeros(3, 4))
    log_prob = torch.tensor([-1.3, -0.2, -2.0, -0.7], requires_grad=True)
    mean = torch.randn(1, 4, 2, 2, requires_grad=True)
    kl = step_kl(mean, mean.detach(), torch.full((1, 1, 1, 1), 0.05))
    loss = grpo_loss(log_prob, log_prob.detach(), advantage[0], kl, eps=0.1, beta=0.1)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(log_prob.grad, torch.zeros(4))
    assert torch.equal(mean.grad, torch.zeros_like(mean))


def test_groups_need_two_candidates():
    with pytest.raises(ValueError, match="K >= 2"):
        group_advantages(torch.ones(5, 1))


def test_the_sampler_keeps_every_group_without_changing_the_trajectory():
    unet = tiny_unet().eval()
    plain = run(unet, LatentReward())
    generators = [torch.Generator().manual_seed(r) for r in (0, 1, 2)]  # run()'s, seed 0
    x = torch.stack([torch.randn(4, LATENT_SIZE, LATENT_SIZE, generator=g) for g in generators])
    grouped = sample_step_pairs(unet, x, STEPS, prompt_batch([0, 1, 2]), LatentReward(), THRESHOLDS, ALL,
                                samples_per_step=4, guidance_scale=GUIDANCE, generators=generators, keep_groups=True)
    assert plain.groups is None
    assert torch.equal(grouped.final, plain.final) and torch.equal(grouped.winner, plain.winner)
    groups = grouped.groups
    assert groups.candidates.shape == (3 * len(STEPS), 4, 4, LATENT_SIZE, LATENT_SIZE)
    assert groups.scores.shape == groups.log_prob.shape == (3 * len(STEPS), 4)
    assert torch.equal(groups.scores, 60.0 * groups.candidates.flatten(2).mean(2))
    # The recorded density is the one the trainer computes for the unchanged policy: GRPO's ratio starts at 1.
    batch = prompt_batch([0, 1, 2])
    cond = batch.cond.map(lambda t: t[groups.row])
    with torch.no_grad():
        mean, sigma = step_distribution(unet, STEPS, groups.parent, groups.step, cond, batch.null, GUIDANCE)
        again = step_log_prob(groups.candidates.flatten(0, 1), mean.repeat_interleave(4, 0),
                              sigma.repeat_interleave(4, 0)).view(-1, 4)
    assert torch.allclose(again, groups.log_prob, atol=1e-5)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("grpo") / "base")


def test_grpo_trains_and_records_its_objective(base, tmp_path):
    metrics = train_step_po(base, PROMPTS, keep_all, GRPO, 0, tmp_path / "grpo")
    assert metrics["objective"] == "grpo"
    # 2 prompts x 3 steps = 6 groups a round, 2 a step: 3 optimizer steps in each of the 3 rounds.
    assert metrics["optimizer_steps"] == 3 * 3
    assert all(math.isfinite(loss) for _, loss in metrics["loss_curve"])
    assert not same_weights(tmp_path / "grpo", base)


def test_grpo_resumes_after_a_kill_with_the_uninterrupted_weights(base, tmp_path):
    with pytest.raises(Interrupted):
        train_step_po(base, PROMPTS, interrupt_after(2 * 3), GRPO, 0, tmp_path / "resumed")
    resumed = train_step_po(base, PROMPTS, keep_all, GRPO, 0, tmp_path / "resumed")
    uninterrupted = train_step_po(base, PROMPTS, keep_all, dataclasses.replace(GRPO, checkpoint_every=100), 0,
                                  tmp_path / "uninterrupted")
    assert resumed["resumed_from_round"] == 2
    assert resumed["loss_curve"] == uninterrupted["loss_curve"]
    assert same_weights(tmp_path / "resumed", tmp_path / "uninterrupted")


@pytest.mark.parametrize("change, message", [
    ({"samples_per_step": 1}, "lpo.samples_per_step=1: K must be >= 2 to form a group"),
    ({"objective": "ppo"}, "lpo.objective='ppo': use dpo or grpo"),
])
def test_bad_grpo_settings_name_the_key(change, message):
    with pytest.raises(ValueError, match=message):
        from_dict(StepPOConfig, {**dataclasses.asdict(GRPO), **change}, "lpo")


def test_a_saved_reference_equal_to_the_base_trains_the_same_weights(base, tmp_path):
    # The default reference is the policy's UNet with its LoRA disabled, i.e. the base UNet: naming the base
    # pipeline as grpo.reference must give the same run.
    default = train_step_po(base, PROMPTS, keep_all, GRPO, 0, tmp_path / "default")
    named = train_step_po(base, PROMPTS, keep_all, GRPO, 0, tmp_path / "named", reference_dir=base)
    assert [loss for _, loss in named["loss_curve"]] == pytest.approx([loss for _, loss in default["loss_curve"]],
                                                                      abs=1e-6)
    assert same_weights(tmp_path / "named", tmp_path / "default")


@pytest.mark.parametrize("change, message", [
    ({"samples_per_step": 1}, "grpo.samples_per_step=1: K must be >= 2 to form a group"),
    ({"reference": "/nowhere/pipeline"}, r"grpo.reference='/nowhere/pipeline': no saved pipeline UNet there"),
    ({"budgets": []}, r"grpo.budgets=\[\]: give one or more multiples"),
    ({"budgets": [0, 8]}, r"grpo.budgets=\[0, 8\]"),
    ({"objective": "dpo"}, "grpo.objective='dpo': the grpo section trains step-wise GRPO only"),
])
def test_bad_grpo_section_stops_naming_the_key(change, message):
    from lpo.optimize.methods import GRPOConfig
    with pytest.raises(ValueError, match=message):
        from_dict(GRPOConfig, change, "grpo")


def test_grpo_runs_are_named_by_their_budget():
    from lpo.optimize.methods import grpo_runs
    assert grpo_runs((1, 8)) == {"grpo": 1, "grpo_8x": 8}
