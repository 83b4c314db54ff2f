"""The step-level sampler shared by LPO and SPO, with hand-made rewards on tiny random UNets (SD1.5-type, and
SDXL-type with added conditions)."""
import math

import pytest
import torch
from tiny_sd import LATENT_SIZE, PROMPTS, SD15_DDIM, SDXL_TEXT_DIMS, TEXT_DIM, tiny_sdxl_unet, tiny_unet

from lpo.optimize.sampler import Conditioning, PromptBatch, cfg_noise, sample_step_pairs
from lpo.optimize.threshold import ddim_steps, threshold_schedule
from lpo.world.base_model import VAEConfig, build_vae

STEPS = ddim_steps(SD15_DDIM, 5)  # t_cur = 801, 601, 401, 201, 1
THRESHOLDS = threshold_schedule(STEPS, "sigma", 0.35, 0.5)
ALL = torch.ones(len(STEPS), dtype=torch.bool)
SPO_RANGE = (STEPS.timesteps - STEPS.steps_offset) <= 750  # SPO's t in [0, 750]
GUIDANCE = 3.0


@pytest.fixture(scope="module")
def unet():
    return tiny_unet().eval()


def prompt_batch(rows: list[int]) -> PromptBatch:
    g = torch.Generator().manual_seed(7)
    embeds = torch.randn(len(PROMPTS), 77, TEXT_DIM, generator=g)
    null = torch.randn(1, 77, TEXT_DIM, generator=g)
    return PromptBatch([PROMPTS[r] for r in rows], torch.tensor(rows), Conditioning(embeds[rows]), Conditioning(null))


def run(unet, reward, rows=(0, 1, 2), optimised=ALL, thresholds=THRESHOLDS, k=4, seed=0):
    generators = [torch.Generator().manual_seed(seed * 1000 + r) for r in rows]
    x = torch.stack([torch.randn(4, LATENT_SIZE, LATENT_SIZE, generator=g) for g in generators])
    return sample_step_pairs(unet, x, STEPS, prompt_batch(list(rows)), reward, thresholds, optimised,
                             samples_per_step=k, guidance_scale=GUIDANCE, generators=generators)


class LatentReward:
    """An LRM stand-in: a score of the noisy candidate latents and the parent timestep t_cur."""

    def __init__(self, scale: float = 60.0):
        self.scale, self.calls = scale, []

    def __call__(self, candidates, t_cur, context):
        scores = self.scale * candidates.flatten(1).mean(1)
        self.calls.append({"candidates": candidates.clone(), "t_cur": t_cur, "parent": context.parent.clone(),
                           "scores": scores})
        return scores


class PixelReward:
    """An SPM stand-in: decodes each candidate's predicted clean latent and scores the image."""

    def __init__(self, vae):
        self.vae, self.calls = vae, []

    def __call__(self, candidates, t_cur, context):
        x0 = context.candidate_x0()
        images = self.vae.decode(x0 / self.vae.config.scaling_factor).sample
        self.calls.append({"candidates": candidates.clone(), "t_next": context.t_next, "x0": x0.clone()})
        return 500.0 * images.flatten(1).mean(1)


def test_keeps_exactly_the_pairs_the_threshold_admits(unet):
    reward = LatentReward()
    samples = run(unet, reward)
    assert [c["t_cur"] for c in reward.calls] == STEPS.timesteps.tolist()
    total_kept = 0
    for i, call in enumerate(reward.calls):
        scores = call["scores"].view(3, 4)
        candidates = call["candidates"].view(3, 4, 4, LATENT_SIZE, LATENT_SIZE)
        s_max, s_min = scores.max(1).values, scores.min(1).values
        p_max = 1 / (1 + torch.exp(s_min - s_max))
        admitted = torch.nonzero((p_max - (1 - p_max)).double() > THRESHOLDS[i]).flatten()
        at_step = samples.step == i
        assert samples.kept[i] == len(admitted)
        assert samples.row[at_step].tolist() == admitted.tolist()
        assert torch.equal(samples.parent[at_step], call["parent"][admitted])
        assert torch.equal(samples.winner[at_step], candidates[admitted, scores[admitted].argmax(1)])
        assert torch.equal(samples.loser[at_step], candidates[admitted, scores[admitted].argmin(1)])
        assert torch.allclose(samples.probability_gap[i].float(), (2 * p_max - 1).float(), atol=1e-6)
        total_kept += len(admitted)
    assert samples.timestep.tolist() == STEPS.timesteps[samples.step].tolist()
    assert samples.prompt.tolist() == samples.row.tolist()  # rows 0, 1, 2 are prompts 0, 1, 2
    assert 0 < total_kept < 3 * len(STEPS), "the test reward should keep some pairs and reject others"


def test_thresholds_decide_alone(unet):
    everything = run(unet, LatentReward(), thresholds=torch.full((len(STEPS),), 1e-9))
    nothing = run(unet, LatentReward(), thresholds=torch.full((len(STEPS),), 0.999999))
    assert everything.kept.tolist() == [3] * len(STEPS) and nothing.kept.sum() == 0
    assert nothing.parent.shape == (0, 4, LATENT_SIZE, LATENT_SIZE) and nothing.step.numel() == 0
    # Which candidate continues does not depend on the scores or the threshold.
    assert torch.equal(everything.final, nothing.final)


def test_same_seed_same_samples_and_rows_do_not_depend_on_the_batch(unet):
    a, b = run(unet, LatentReward()), run(unet, LatentReward())
    assert torch.equal(a.final, b.final) and torch.equal(a.winner, b.winner) and torch.equal(a.kept, b.kept)
    alone = run(unet, LatentReward(), rows=(1,))
    assert torch.allclose(alone.final[0], a.final[1], atol=1e-5)
    assert torch.allclose(alone.winner, a.winner[a.row == 1], atol=1e-5)
    assert not torch.allclose(run(unet, LatentReward(), seed=1).final, a.final)


def test_lpo_and_spo_share_the_sampler(unet):
    torch.manual_seed(3)
    vae = build_vae(VAEConfig(block_out_channels=(8, 16), norm_num_groups=4), 16).eval()
    lpo_reward, spo_reward = LatentReward(), PixelReward(vae)
    lpo = run(unet, lpo_reward, optimised=SPO_RANGE)
    spo = run(unet, spo_reward, optimised=SPO_RANGE)

    # SPO's range: t_cur = 801 is sampled but neither scored nor kept.
    assert STEPS.timesteps[~SPO_RANGE].tolist() == [801]
    assert spo.probability_gap[0].isnan().all() and spo.kept[0] == 0 and spo.timestep.max() <= 601
    assert [c["t_next"] for c in spo_reward.calls] == [401, 201, 1, 0]
    assert [c["t_cur"] for c in lpo_reward.calls] == [601, 401, 201, 1]

    # The SPM input is the DDIM x0 prediction of each candidate at its own timestep t_next.
    first = spo_reward.calls[0]
    candidate, t_next = first["candidates"][5:6], first["t_next"]  # prompt 1, candidate 1
    cond = prompt_batch([0, 1, 2]).cond.map(lambda t: t[1:2])
    eps = cfg_noise(unet, candidate, torch.tensor([t_next]), cond, prompt_batch([0]).null, GUIDANCE)
    alpha = torch.tensor(float(STEPS.alpha_prev[1]))
    with torch.no_grad():
        x0 = (candidate - (1 - alpha).sqrt() * eps) / alpha.sqrt()
    assert torch.allclose(first["x0"][5:6], x0, atol=1e-5)
    assert not torch.allclose(first["x0"][4], first["x0"][5])
    # On the last step the candidates are the final latents and are scored as they are.
    assert torch.equal(spo_reward.calls[-1]["x0"], spo_reward.calls[-1]["candidates"])

    # Reusing the scored candidates' UNet pass to continue gives the trajectory a fresh pass gives.
    assert torch.allclose(lpo.final, spo.final, atol=1e-4)


def test_sampling_builds_no_graph(unet):
    unet.requires_grad_(True)
    samples = run(unet, LatentReward())
    assert not samples.winner.requires_grad and not samples.final.requires_grad


@pytest.mark.parametrize("reward, message", [
    (lambda c, t, ctx: c.flatten(1).mean(1)[:-1], r"expected a tensor of shape \(12,\)"),
    (lambda c, t, ctx: torch.full((len(c),), math.nan), "non-finite scores at t_cur=801"),
    (lambda c, t, ctx: [0.0] * len(c), "one score per candidate")])
def test_bad_rewards_are_named(unet, reward, message):
    with pytest.raises(ValueError, match=message):
        run(unet, reward)


def test_k_below_two_is_refused(unet):
    with pytest.raises(ValueError, match="samples_per_step=1"):
        run(unet, LatentReward(), k=1)


# ---------------------------------------------------------------------------------------------------- SDXL

def sdxl_batch(pooled_shift: float = 0.0, size: int = 64, null_pooled: float = 0.0) -> PromptBatch:
    """Two prompts' SDXL conditioning; `pooled_shift` moves the second prompt's pooled embedding only."""
    g = torch.Generator().manual_seed(11)
    states = torch.randn(2, 77, sum(SDXL_TEXT_DIMS), generator=g)
    pooled = torch.randn(2, SDXL_TEXT_DIMS[1], generator=g) + torch.tensor([[0.0], [pooled_shift]])
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)
    null = Conditioning(torch.zeros(1, 77, sum(SDXL_TEXT_DIMS)),
                        {"text_embeds": torch.full((1, SDXL_TEXT_DIMS[1]), null_pooled), "time_ids": time_ids})
    cond = Conditioning(states, {"text_embeds": pooled, "time_ids": time_ids.expand(2, -1)})
    return PromptBatch(PROMPTS[:2], torch.arange(2), cond, null)


class X0Reward:
    """Scores each candidate's predicted clean latent (the SPM's path) and records it with the candidates."""

    def __init__(self):
        self.calls = []

    def __call__(self, candidates, t_cur, context):
        x0 = context.candidate_x0()
        self.calls.append((candidates.clone(), x0.clone()))
        return 100.0 * x0.flatten(1).mean(1)


def run_sdxl(unet, batch: PromptBatch):
    generators = [torch.Generator().manual_seed(r) for r in range(2)]
    x = torch.stack([torch.randn(4, LATENT_SIZE, LATENT_SIZE, generator=g) for g in generators])
    reward = X0Reward()
    samples = sample_step_pairs(unet, x, STEPS, batch, reward, THRESHOLDS, ALL, samples_per_step=2,
                                guidance_scale=GUIDANCE, generators=generators)
    return samples, reward.calls


def test_sdxl_added_conditions_reach_the_unet_in_sampling_and_x0_prediction():
    unet = tiny_sdxl_unet().eval()
    base, base_calls = run_sdxl(unet, sdxl_batch())
    pooled, pooled_calls = run_sdxl(unet, sdxl_batch(pooled_shift=1.0))
    # The first step's candidates come from the guided pass on the parents, their x0 from the pass on themselves.
    (cand, x0), (cand_p, x0_p) = base_calls[0], pooled_calls[0]
    assert torch.allclose(cand[:2], cand_p[:2], atol=1e-6) and torch.allclose(x0[:2], x0_p[:2], atol=1e-6)
    assert not torch.allclose(cand[2:], cand_p[2:], atol=1e-4) and not torch.allclose(x0[2:], x0_p[2:], atol=1e-4)
    assert not torch.allclose(base.final[1], pooled.final[1], atol=1e-4)
    for other in (sdxl_batch(size=32), sdxl_batch(null_pooled=1.0)):  # time_ids; the null prompt's conditioning
        assert not torch.allclose(run_sdxl(unet, other)[0].final, base.final, atol=1e-4)

    batch, x, t = sdxl_batch(), torch.randn(2, 4, LATENT_SIZE, LATENT_SIZE), torch.tensor([801, 401])
    with torch.no_grad():
        null = batch.null.expand(2)
        cond = unet(x, t, encoder_hidden_states=batch.cond.encoder_hidden_states,
                    added_cond_kwargs=batch.cond.added_cond_kwargs).sample
        uncond = unet(x, t, encoder_hidden_states=null.encoder_hidden_states,
                      added_cond_kwargs=null.added_cond_kwargs).sample
        assert torch.allclose(cfg_noise(unet, x, t, batch.cond, batch.null, 5.0), uncond + 5 * (cond - uncond),
                              atol=1e-5)
