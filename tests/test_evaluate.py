"""Evaluation math on hand-made numbers: per-image rows, win rate against the base model with ties, and
bootstrap intervals that resample whole prompts within each prompt set."""
import numpy as np
import pytest

from lpo.evaluate.scores import EvaluateConfig, paired_with_base, score_rows, summarise, win_values
from lpo.samples import SampleSet
from lpo.world.grammar import ATTRIBUTES
from lpo.world.judge import Verdict


def rows(prompt_set, prompt_index, seeds, overall, **other):
    """Score rows as `evaluate score` writes them; metrics not given are 0."""
    out = []
    for i, (p, s, o) in enumerate(zip(prompt_index, seeds, overall)):
        row = {"prompt_set": prompt_set, "prompt_index": p, "seed": s, "prompt": f"prompt {p}",
               "overall_preference": o, **{k: v[i] for k, v in other.items()}}
        for metric in ("alignment", "soft_alignment", *(f"accuracy_{a}" for a in ATTRIBUTES), "aesthetic",
                       "defect_rate", "pixel_reward"):
            row.setdefault(metric, 0.0)
        out.append(row)
    return out


def metric(summary, prompt_set, name):
    found, = [r for r in summary if r["prompt_set"] == prompt_set and r["metric"] == name]
    return found


def test_win_values_count_ties_half():
    method = np.array([0.9, 0.2, 0.5, 0.50004, 0.7])
    base = np.array([0.1, 0.3, 0.5, 0.5, 0.69])
    assert win_values(method, base).tolist() == [1.0, 0.0, 0.5, 1.0, 1.0]
    assert win_values(method, base, tie_band=0.02).tolist() == [1.0, 0.0, 0.5, 0.5, 0.5]


def test_win_rate_pairs_images_by_prompt_and_seed_whatever_the_order():
    base = rows("eval_seen", [0, 0, 1, 1], [10, 11, 12, 13], [0.5, 0.5, 0.5, 0.5])
    # The method's rows in another order: its image of seed 13 wins, seed 12 ties, seeds 10 and 11 lose.
    method = rows("eval_seen", [1, 0, 1, 0], [13, 11, 12, 10], [0.9, 0.1, 0.5, 0.2])
    summary = summarise(method, base, EvaluateConfig(bootstrap=200), 0, "lpo")
    assert metric(summary, "eval_seen", "win_rate")["mean"] == pytest.approx((1 + 0 + 0.5 + 0) / 4)
    assert [r["seed"] for r in paired_with_base(method, base)] == [13, 11, 12, 10]


def test_a_method_image_without_a_base_twin_is_named():
    base = rows("eval_seen", [0], [10], [0.5])
    with pytest.raises(ValueError, match=r"1 of spo's images .* \('eval_seen', 0, 11\)"):
        summarise(rows("eval_seen", [0], [11], [0.5]), base, EvaluateConfig(bootstrap=10), 0, "spo")


def test_bootstrap_resamples_whole_prompts_within_each_set():
    # eval_seen: prompt 0 has three images scoring 1, prompt 1 one image scoring 0. Resampling prompts gives
    # image-weighted means of {0, 0} -> 0, {1, 1} -> 1 or {0, 1} -> 0.75 only; resampling images would not.
    seen = rows("eval_seen", [0, 0, 0, 1], [1, 2, 3, 4], [1.0, 1.0, 1.0, 0.0])
    # eval_heldout reuses prompt index 0 with other values: a separate summary, not pooled with eval_seen.
    heldout = rows("eval_heldout", [0, 0], [5, 6], [0.2, 0.4])
    summary = summarise(seen + heldout, None, EvaluateConfig(bootstrap=2000), 3, "base")
    s = metric(summary, "eval_seen", "overall_preference")
    assert s["mean"] == 0.75 and (s["images"], s["prompts"]) == (4, 2)
    assert s["ci_low"] == 0.0 and s["ci_high"] == 1.0
    h = metric(summary, "eval_heldout", "overall_preference")
    assert h["mean"] == pytest.approx(0.3) and h["ci_low"] == h["ci_high"] == pytest.approx(0.3)
    assert not any(r["metric"] == "win_rate" for r in summary)


def test_bootstrap_interval_is_that_of_the_prompt_means():
    """Per-prompt means 0.0, 0.5, 1.0 with two images each: the interval is the bootstrap of those three."""
    data = rows("eval_seen", [0, 0, 1, 1, 2, 2], range(6), [0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    s = metric(summarise(data, None, EvaluateConfig(bootstrap=4000), 0, "base"), "eval_seen",
               "overall_preference")
    draws = np.random.default_rng(0).integers(0, 3, size=(4000, 3))
    means = np.array([0.0, 0.5, 1.0])[draws].mean(1)
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((np.quantile(means, 0.025), np.quantile(means, 0.975)))


def test_score_rows_carry_every_metric_of_the_judge_and_the_pixel_reward():
    n = 2
    samples = SampleSet(np.zeros((n, 4, 4, 3), np.uint8), np.array(["a", "b"]), np.array(["eval_seen"] * 2),
                        np.array([0, 1]), np.array([7, 8]))
    correct = np.array([[True] * len(ATTRIBUTES), [False] + [True] * (len(ATTRIBUTES) - 1)])
    verdict = Verdict(probs_correct=correct * 0.9, correct=correct, alignment=np.array([0.9, 0.7]),
                      aligned=correct.all(1), defects=np.zeros((n, 5)), defective=np.array([False, True]),
                      aesthetic=np.array([1.0, 0.4]), overall=np.array([1.9, 1.1]))
    out = score_rows(samples, verdict, np.array([3.0, 2.0]))
    assert out[1] == {"prompt_set": "eval_seen", "prompt_index": 1, "seed": 8, "prompt": "b",
                      "overall_preference": 1.1, "alignment": 0.0, "soft_alignment": 0.7,
                      **{f"accuracy_{a}": float(a != ATTRIBUTES[0]) for a in ATTRIBUTES}, "aesthetic": 0.4,
                      "defect_rate": 1.0, "pixel_reward": 2.0}
    with pytest.raises(ValueError, match="2 images but 2 judge verdicts and 1 pixel rewards"):
        score_rows(samples, verdict, np.array([3.0]))


@pytest.mark.parametrize("change, message", [({"bootstrap": 0}, "evaluate.bootstrap"),
                                             ({"tie_band": -1.0}, "evaluate.tie_band")])
def test_bad_settings_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        EvaluateConfig(**change)
