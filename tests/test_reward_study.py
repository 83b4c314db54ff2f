"""The reward study's accuracy tables on constructed pairs with known answers: rows per pair type, and the oracle
(the judge's order against the labels) as their ceiling."""
import numpy as np
import pytest

from lpo.preference_data import PreferencePairs
from lpo.reward.study import ORACLE, SplitData, accuracy_rows


def split_data(n=400, seed=0, same_source=True):
    rng = np.random.default_rng(seed)
    gap = rng.normal(size=n)
    # Labels follow the judge on 80% of the pairs; a tenth are ties.
    label = np.where(rng.random(n) < 0.8, gap > 0, gap <= 0).astype(float)
    label[rng.random(n) < 0.1] = 0.5
    images = np.zeros((n, 2, 2, 3), np.uint8)
    pairs = PreferencePairs(images, images, ["a caption"] * n, label, np.ones(n, np.int64), np.arange(n), "test", n)
    same = (np.arange(n) % 3 == 0) if same_source else None
    return SplitData(pairs, gap, {"aesthetic": gap}, same)


def test_rows_per_pair_type_count_their_pairs():
    data = split_data()
    rows = accuracy_rows("m", "test", 1, (-data.judge_gap, data.judge_gap), data, 200, 0)
    by_type = {r["pair_type"]: r for r in rows}
    assert set(by_type) == {"all", "same_source", "cross_source"}
    decided = data.pairs.label_0 != 0.5
    assert by_type["all"]["pairs_label"] == decided.sum()
    assert by_type["same_source"]["pairs_label"] + by_type["cross_source"]["pairs_label"] == decided.sum()
    assert by_type["same_source"]["pairs_label"] == (decided & data.same_source).sum()
    # A reward that reverses the judge is always wrong against the judge, whatever the pairs.
    assert all(r["accuracy_judge"] == 0.0 for r in rows)


def test_the_oracle_scores_the_label_agreement():
    data = split_data()
    (row,) = [r for r in accuracy_rows(ORACLE, "test", 1, data.oracle(), data, 200, 0) if r["pair_type"] == "all"]
    decided = data.pairs.label_0 != 0.5
    agreement = np.mean((data.pairs.label_0[decided] == 1.0) == (data.judge_gap[decided] > 0))
    assert row["accuracy_label"] == pytest.approx(agreement)
    assert row["accuracy_judge"] == 1.0
    assert row["label_low"] <= agreement <= row["label_high"]


def test_correlations_and_a_dataset_without_sources():
    data = split_data(same_source=False)
    s0, s1 = data.judge_gap, np.zeros_like(data.judge_gap)
    # A side scorer whose winner-minus-loser gap is the model's own correlates 1 with it.
    data.side_gaps["aesthetic"] = np.where(data.pairs.label_0 == 1.0, s0 - s1, s1 - s0)
    rows = accuracy_rows("m", "test", 1, (s0, s1), data, 200, 0, with_correlations=True)
    assert [r["pair_type"] for r in rows] == ["all"]
    assert rows[0]["aesthetic_corr"] == pytest.approx(1.0)


class CountingPredictor:
    def __init__(self):
        self.calls = 0

    def from_latents(self, latents, timestep, captions):
        self.calls += 1
        return latents * 2


def test_shared_clean_images_decode_each_batch_once():
    import torch

    from lpo.reward.study import SharedCleanImages
    predictor = CountingPredictor()
    x0_hat = SharedCleanImages(predictor)
    latents, captions = torch.ones(2, 4, 2, 2), ["a", "b"]
    first = x0_hat(latents, 501, captions)
    assert x0_hat(latents, 501, captions) is first and predictor.calls == 1  # the second scorer of the batch
    x0_hat(latents, 1, captions)  # another timestep
    x0_hat(latents.clone(), 1, captions)  # another batch with equal values
    assert predictor.calls == 3


def test_noise_ensembling_averages_independent_draws(tmp_path):
    import torch
    from tiny_sd import IMAGE_SIZE, build_tiny_pipeline

    from lpo.reward.lrm_training import LatentEncoder, noisy_pair_latents
    from lpo.reward.study import ensemble_scores_at, noise_key, pair_scores_at
    encoder = LatentEncoder(build_tiny_pipeline(tmp_path / "base"), "cpu")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    pairs = PreferencePairs(images[:3], images[3:], ["a", "b", "c"], np.array([1.0, 0.0, 0.5]), np.ones(3, np.int64),
                            np.arange(10, 13), "test", 3)
    scorers = {"mean latent": lambda latents, t, captions: latents.flatten(1).mean(1)}
    one = pair_scores_at(scorers, encoder, pairs, 501, 0, batch_size=2)["mean latent"]
    four = pair_scores_at(scorers, encoder, pairs, 501, 0, batch_size=2, draws=4)["mean latent"]
    t = torch.full((3,), 501)
    single = [noisy_pair_latents(encoder, pairs, t, [noise_key(0, 501, int(r), d) for r in pairs.rows]
                                 ).flatten(1).mean(1).numpy() for d in range(4)]
    assert np.array_equal(one[0], single[0][:3]) and np.array_equal(one[1], single[0][3:])  # M = 1: draw 0 alone
    assert np.allclose(four[0], np.mean(single, axis=0)[:3], atol=1e-6)
    assert np.allclose(four[1], np.mean(single, axis=0)[3:], atol=1e-6)
    assert len({s.tobytes() for s in single}) == 4  # independent draws
    with pytest.raises(ValueError, match="M >= 1"):
        pair_scores_at(scorers, encoder, pairs, 501, 0, batch_size=2, draws=0)
    # Several Ms share their draws: each is the mean of the first M, M = 1 the single draw.
    nested = ensemble_scores_at(scorers, encoder, pairs, 501, 0, 2, (1, 2, 4))["mean latent"]
    assert np.array_equal(nested[1][0], one[0]) and np.allclose(nested[4][1], four[1], atol=1e-6)
    assert np.allclose(nested[2][0], np.mean(single[:2], axis=0)[:3], atol=1e-6)


def test_high_noise_rows_pool_timesteps_per_pair_and_pair_the_difference():
    from lpo.reward.study import high_noise_rows
    label = np.array([1.0, 1.0, 0.0, 0.0, 0.5])
    # (pairs, 2 timesteps) scores of images 0 and 1; pair 4 is a tie, left out.
    s0_a, s1_a = np.array([[2, 2], [2, 2], [0, 0], [0, 1], [0, 0]]), np.zeros((5, 2))
    s1_a[3] = [1, 0]
    s0_b, s1_b = np.array([[2, 0], [2, 0], [0, 1], [1, 0], [0, 0]]), np.array([[0, 1], [0, 1], [1, 0], [0, 1], [0, 0]])
    rows = high_noise_rows({"a": (s0_a, s1_a), "b": (s0_b, s1_b)}, [("a", "b")], label, [501, 951], 200, 0)
    by = {(r["statistic"], r["model"]): r for r in rows}
    # a: pairs 0 and 1 right at both t, pair 2 a reward tie at both (a half), pair 3 right at 501 and wrong at 951.
    assert by["accuracy", "a"]["estimate"] == pytest.approx((1 + 1 + 0.5 + 0.5) / 4)
    # b: every pair right at one timestep and wrong at the other.
    assert by["accuracy", "b"]["estimate"] == pytest.approx(0.5)
    difference = by["accuracy difference", "a"]
    assert difference["baseline"] == "b" and difference["estimate"] == pytest.approx(0.25)
    assert difference["low"] <= difference["estimate"] <= difference["high"]
    assert {r["timesteps"] for r in rows} == {">=501"} and {r["pairs"] for r in rows} == {4}


def test_calibration_rows_per_timestep_and_pooled_at_high_noise():
    from lpo.reward.study import RewardStudyConfig, calibration_rows
    from lpo.stats import calibration_error
    rng = np.random.default_rng(0)
    label = np.where(rng.random(300) < 0.7, 1.0, 0.0)
    label[:20] = 0.5
    # A confident model at t = 1 and a hedging one at t = 951, against labels that are 1 70% of the time.
    p = np.stack([np.full(300, 0.95), np.full(300, 0.7)], 1)
    rows, (ece, draws) = calibration_rows("m", [1, 951], [951], p, label, RewardStudyConfig(bootstrap=100), 0)
    outcome = (label[20:] == 1.0).astype(float)
    assert [r["timestep"] for r in rows] == [1, 951, ">=951"]
    assert rows[0]["ece"] == pytest.approx(calibration_error(p[20:, 0], outcome))
    assert rows[0]["ece"] > rows[1]["ece"] and rows[1]["ece"] == pytest.approx(abs(0.7 - outcome.mean()))
    assert rows[2]["ece"] == pytest.approx(rows[1]["ece"]) == pytest.approx(ece)
    assert len(draws) == 100 and rows[2]["ece_low"] <= ece <= rows[2]["ece_high"]
    assert rows[0]["mean_confidence"] == pytest.approx(0.95) and rows[0]["pairs"] == 280


@pytest.mark.parametrize("change, message", [
    ({"ensemble_draws": [1, 4]}, r"reward_study.ensemble_draws=\[1, 4\]: every M must be >= 2"),
    ({"calibration_bins": 0}, "reward_study.calibration_bins=0 must be >= 1"),
])
def test_bad_study_settings_name_the_key(change, message):
    from lpo.config import from_dict
    from lpo.reward.study import RewardStudyConfig
    with pytest.raises(ValueError, match=message):
        from_dict(RewardStudyConfig, change, "reward_study")
