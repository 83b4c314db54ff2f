"""The DDIM eta = 1 schedule and the dynamic threshold against paper.md's tables (SD1.5 schedule, 20 steps)."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from tiny_sd import SD15_DDIM

from lpo.optimize.threshold import check_threshold, ddim_steps, threshold_schedule

# paper.md §2.3, in the table's order t_cur = 1, 51, ..., 951.
PAPER_T = list(range(1, 952, 50))
PAPER_SIGMA = [.0206, .0406, .1673, .2144, .2509, .2836, .3144, .3442, .3732, .4016, .4293, .4565, .4829, .5087,
               .5336, .5576, .5807, .6029, .6241, .6444]
PAPER_TH_SD15 = [.3500, .3548, .3853, .3966, .4054, .4132, .4206, .4278, .4348, .4416, .4483, .4548, .4612, .4674,
                 .4734, .4791, .4847, .4900, .4951, .5000]
PAPER_TH_SDXL = [.4500, .4548, .4853, .4966, .5054, .5132, .5206, .5278, .5348, .5416, .5483, .5548, .5612, .5674,
                 .5734, .5791, .5847, .5900, .5951, .6000]


@pytest.fixture(scope="module")
def sd15():
    return ddim_steps(SD15_DDIM, 20)


def ascending(values: torch.Tensor) -> list[float]:
    return values.flip(0).tolist()


def test_sd15_schedule_is_the_leading_grid(sd15):
    assert ascending(sd15.timesteps) == PAPER_T
    assert ascending(sd15.prev_timesteps) == [t - 50 for t in PAPER_T]
    assert sd15.steps_offset == 1 and sd15.prediction_type == "epsilon"


def test_sigma_reproduces_the_paper_table(sd15):
    assert np.round(ascending(sd15.sigma), 4).tolist() == PAPER_SIGMA


@pytest.mark.parametrize("low, high, row", [(0.35, 0.5, PAPER_TH_SD15), (0.45, 0.6, PAPER_TH_SDXL)])
def test_sigma_threshold_reproduces_the_paper_rows(sd15, low, high, row):
    assert np.round(ascending(threshold_schedule(sd15, "sigma", low, high)), 4).tolist() == row


def test_sigma_matches_the_diffusers_scheduler(sd15):
    scheduler = DDIMScheduler.from_config(SD15_DDIM)
    scheduler.set_timesteps(20)
    for t, prev, sigma in zip(sd15.timesteps, sd15.prev_timesteps, sd15.sigma):
        variance = scheduler._get_variance(int(t), int(prev))
        assert float(sigma) == pytest.approx(float(variance) ** 0.5, rel=1e-5)
    # The last step goes to final_alpha_cumprod = alphas_cumprod[0] (set_alpha_to_one=False), not to 1.
    assert float(sd15.alpha_prev[-1]) == pytest.approx(float(scheduler.alphas_cumprod[0]))


def test_set_alpha_to_one_makes_the_last_step_deterministic():
    steps = ddim_steps({**SD15_DDIM, "set_alpha_to_one": True}, 20)
    assert float(steps.alpha_prev[-1]) == 1.0 and float(steps.sigma[-1]) == 0.0


def test_variance_and_linear_mappings(sd15):
    variance = threshold_schedule(sd15, "variance", 0.35, 0.5)
    sigma_sq = sd15.sigma ** 2
    expected = 0.35 + (sigma_sq - sigma_sq.min()) / (sigma_sq.max() - sigma_sq.min()) * 0.15
    assert torch.allclose(variance, expected)
    assert variance[1:-1].lt(threshold_schedule(sd15, "sigma", 0.35, 0.5)[1:-1]).all()  # sigma^2 is convex in t
    linear = threshold_schedule(sd15, "linear", 0.35, 0.5)
    # The official "linear" mapping: th_min + (t - 1) / (951 - 1) * (th_max - th_min).
    assert torch.allclose(linear, 0.35 + (sd15.timesteps.double() - 1) / 950 * 0.15)
    assert torch.equal(threshold_schedule(sd15, "constant", 0.3, 0.3), torch.full((20,), 0.3, dtype=torch.float64))


def test_other_step_counts_get_their_own_schedule():
    steps = ddim_steps(SD15_DDIM, 10)
    assert steps.timesteps.tolist() == list(range(901, 0, -100))
    th = threshold_schedule(steps, "sigma", 0.35, 0.5)
    assert float(th.max()) == pytest.approx(0.5) and float(th.min()) == pytest.approx(0.35)


@pytest.mark.parametrize("strategy, low, high, key", [
    ("sigma", 0.0, 0.5, "threshold_min"), ("sigma", 0.35, 1.0, "threshold_max"), ("sigma", -0.1, 0.5, "threshold_min"),
    ("sigma", 0.5, 0.35, "threshold_min=0.5 > threshold_max"), ("cosine", 0.35, 0.5, "threshold='cosine'"),
    ("constant", 0.3, 0.4, "threshold='constant'")])
def test_bad_thresholds_name_the_key(strategy, low, high, key):
    with pytest.raises(ValueError, match=key.replace("(", r"\(")):
        check_threshold(strategy, low, high)


@pytest.mark.parametrize("change, key", [({"clip_sample": True}, "clip_sample"),
                                         ({"prediction_type": "sample"}, "prediction_type")])
def test_unsupported_scheduler_configs_are_refused(change, key):
    with pytest.raises(ValueError, match=key):
        ddim_steps({**SD15_DDIM, **change}, 20)
