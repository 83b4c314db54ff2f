"""The claims stage: the verdict rule on constructed intervals, the intervals, and the claims table built from
small inputs in the formats the earlier stages write."""
import json
import math
import re

import numpy as np
import pytest

from lpo.claims.intervals import fisher_z_draws, paired_prompt_bootstrap, pooled_difference
from lpo.claims.report import write_claims_report
from lpo.claims.table import BEYOND, CLAIMS, ClaimInputs, claim_rows
from lpo.claims.verdict import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, Side, verdict
from lpo.tables import read_csv, write_csv

ABOVE_0, RANGE = Side(0.0), Side(2.5, 3.5)


@pytest.mark.parametrize("estimate, low, high, side, expected, reason", [
    (0.10, 0.05, 0.20, ABOVE_0, REPRODUCED, "interval wholly above 0"),
    (-0.10, -0.20, -0.05, ABOVE_0, NOT_REPRODUCED, "interval wholly at or below 0"),
    (0.05, -0.01, 0.10, ABOVE_0, INCONCLUSIVE, "interval straddles 0"),
    # A difference of 0 is no improvement: touching 0 from above leaves it possible, from below excludes the claim.
    (0.05, 0.0, 0.10, ABOVE_0, INCONCLUSIVE, "interval straddles 0"),
    (-0.05, -0.10, 0.0, ABOVE_0, NOT_REPRODUCED, "interval wholly at or below 0"),
    (3.0, 2.6, 3.4, RANGE, REPRODUCED, "interval wholly at or above 2.5"),
    (2.8, 2.5, 3.1, RANGE, REPRODUCED, "interval wholly at or above 2.5"),
    (4.0, 3.6, 4.4, RANGE, REPRODUCED, "interval wholly at or above 2.5; the estimate is above the paper's range "
                                       "(up to 3.5)"),
    (1.9, 1.5, 2.3, RANGE, NOT_REPRODUCED, "interval wholly below 2.5"),
    (2.2, 1.9, 2.5, RANGE, INCONCLUSIVE, "interval straddles 2.5 (the range's lower end)"),
    (2.5, 2.0, 3.0, RANGE, INCONCLUSIVE, "interval straddles 2.5 (the range's lower end)"),
])
def test_the_verdict_rule(estimate, low, high, side, expected, reason):
    assert verdict(estimate, low, high, side) == (expected, reason)


def test_no_estimate_or_no_interval_is_inconclusive_with_the_reason():
    assert verdict(1.91, None, None, RANGE, "one timing per method") == (
        INCONCLUSIVE, "no interval (one timing per method); the estimate alone lies off the claim's side of 2.5")
    assert verdict(0.3, math.nan, math.nan, ABOVE_0) == (
        INCONCLUSIVE, "no interval; the estimate alone lies on the claim's side of 0")
    assert verdict(None, None, None, ABOVE_0, "no run") == (INCONCLUSIVE, "not measured (no run)")
    assert verdict(math.nan, 0.1, 0.2, ABOVE_0)[0] == INCONCLUSIVE
    with pytest.raises(ValueError, match="low end above"):
        verdict(0.1, 0.2, 0.0, ABOVE_0)


def test_the_paired_bootstrap_gives_the_interval_of_the_difference():
    rng = np.random.default_rng(0)
    prompts = np.repeat(np.arange(50), 4)
    base = rng.normal(0, 1, prompts.size) + prompts   # prompts differ far more than the methods do
    e = paired_prompt_bootstrap({"a": base + 0.25, "b": base}, prompts, lambda m: m["a"] - m["b"], 200, 0)
    assert e.mean == pytest.approx(0.25) and e.low == pytest.approx(0.25) and e.high == pytest.approx(0.25)


def test_intervals_without_per_pair_data():
    cells = [{"split": s, "estimate": 0.6, "low": 0.5, "high": 0.7, "pairs": 100} for s in ("v", "v", "t", "t")]
    e = pooled_difference(cells, [{**c, "estimate": 0.5, "low": 0.4, "high": 0.6} for c in cells])
    # Per model: each split's two cells add (se 0.1 / 1.96 each, weight 1/4) and the splits combine in quadrature.
    se = np.sqrt(2 * (2 * 0.25 * 0.1 / 1.959963984540054) ** 2)
    assert e.mean == pytest.approx(0.1)
    assert e.high - e.mean == pytest.approx(1.959963984540054 * np.sqrt(2) * se)
    same = fisher_z_draws({"a": (0.4, 1003), "b": (0.4, 1003)}, lambda m: m["a"] - m["b"], 4000, 0)
    assert same.mean == 0 and same.low < 0 < same.high
    assert same.high == pytest.approx(1.96 * np.sqrt(2 / 1000) * (1 - 0.4 ** 2), rel=0.1)
    with pytest.raises(ValueError, match="fewer than 4 pairs"):
        fisher_z_draws({"a": (0.4, 3)}, lambda m: m["a"], 10, 0)


# ---------------------------------------------------------------------------------------- the claims table

def write(path, rows):
    write_csv(path, rows)
    return path


def accuracy_row(model, split, t, accuracy, pair_type=None):
    row = {"model": model, "split": split, "timestep": t, "accuracy_label": accuracy,
           "label_low": accuracy - 0.02, "label_high": accuracy + 0.02, "accuracy_judge": accuracy,
           "judge_low": accuracy - 0.02, "judge_high": accuracy + 0.02, "pairs_label": 500, "pairs_judge": 500}
    return row if pair_type is None else {**row, "pair_type": pair_type}


def ablation_row(model, varied, strategy, scale, aes, clip):
    return {"model": model, "split": "validation_unique+test_unique", "timestep": 1, "pairs_label": 10000,
            "aesthetic_corr": aes, "clipscore_corr": clip, "vqascore_corr": 0.1, "varied": varied,
            "strategy": strategy, "guidance_scale": scale}


def scores(path, values, prompt_set="eval_seen"):
    """Per-image scores in `lpo evaluate score`'s layout: 20 prompts x 2 seeds."""
    rows = [{"prompt_set": prompt_set, "prompt_index": i // 2, "seed": 100 + i % 2, "prompt": f"p{i // 2}",
             "overall_preference": v, "alignment": 1.0, "aesthetic": 0.5} for i, v in enumerate(values)]
    rows.append({**rows[0], "prompt_set": "eval_heldout", "overall_preference": 99.0})   # not PROMPT_SET
    return write(path, rows)


@pytest.fixture
def inputs(tmp_path):
    accuracy = [accuracy_row(m, s, t, a) for s in ("validation_unique", "test_unique")
                for t in (1, 751, 951) for m, a in (("LRM", 0.8), ("pixel (x0_hat)", 0.5), ("SPM", 0.5))]
    # Rows of one pair type would reverse C1; only the rows over all pairs count.
    accuracy += [accuracy_row("LRM", "validation_unique", 951, 0.1, "cross_source"),
                 accuracy_row("LRM", "validation_unique", 951, 0.8, "all")]
    ablations = [ablation_row("LRM", "strategy", 2, 7.5, 0.4, 0.4),
                 ablation_row("LRM", "guidance_scale", 2, 7.5, 0.4, 0.4),
                 ablation_row("LRM ablation mpcf1", "strategy", 1, 7.5, 0.6, 0.1),
                 ablation_row("LRM ablation mpcf3", "strategy", 3, 7.5, 0.0, 0.6),
                 ablation_row("LRM ablation vfe1", "guidance_scale", 2, 1.0, 0.3, 0.5)]
    cost = [{"method": m, "budget": "-", "preference optimisation (s)": t / 2, "total (s)": t, "total / LPO": t / 100}
            for m, t in (("Diffusion-DPO", 1000.0), ("SPO", 300.0), ("LPO", 100.0), ("Step-wise GRPO", 110.0),
                         ("Step-wise GRPO (8x rounds)", 450.0))]
    base = np.random.default_rng(0).normal(1.4, 0.2, 40)
    half = np.where(np.arange(40) < 20, 0.1, -0.1)   # zero on average, but not within the resampled prompts
    runs = {"lpo": base + 0.5, "spo": base, "diffusion_dpo": base + 0.1, "grpo": base + 0.6, "grpo_8x": base + 0.3,
            "ablation_reference": base,
            "ablation_th0.5": base + half, "ablation_lrmt-zero": base - 1.0}
    variants = {"reference": {"rows": [("threshold", (0.35, 0.5)), ("lrm_timestep", "parent")]},
                "th0.5": {"rows": [("threshold", (0.5, 0.5))]}, "lrmt-zero": {"rows": [("lrm_timestep", "zero")]}}
    high_noise = [high_noise_row("accuracy", "LRM", "", 0.55, 0.52, 0.58),
                  high_noise_row("accuracy", "LRM (calibrated)", "", 0.58, 0.55, 0.61),
                  high_noise_row("accuracy difference", "LRM (calibrated)", "LRM", 0.03, 0.01, 0.05),
                  high_noise_row("accuracy difference", "LRM (M = 16)", "LRM", 0.0, -0.01, 0.01),
                  high_noise_row("ECE ratio (baseline / model)", "LRM (calibrated)", "LRM", 1.5, 1.2, 1.8)]
    return ClaimInputs(write(tmp_path / "reward_accuracy.csv", accuracy),
                       write(tmp_path / "lrm_ablations.csv", ablations), write(tmp_path / "optimize_cost.csv", cost),
                       {name: scores(tmp_path / f"{name}_scores.csv", v) for name, v in runs.items()}, variants,
                       write(tmp_path / "reward_high_noise.csv", high_noise))


def high_noise_row(statistic, model, baseline, estimate, low, high):
    return {"statistic": statistic, "model": model, "baseline": baseline, "timesteps": ">=501", "estimate": estimate,
            "low": low, "high": high, "pairs": 1000}


def test_the_claims_table(inputs):
    rows = {r["claim"]: r for r in claim_rows(inputs, 300, 0)}
    assert list(rows) == [c.key for c in CLAIMS]
    expected = {"C1": (REPRODUCED, 0.3), "C2": (REPRODUCED, 0.4), "C3": (REPRODUCED, 0.3),
                "C4": (NOT_REPRODUCED, -0.1), "C5": (INCONCLUSIVE, 0.0), "C6": (REPRODUCED, 1.0),
                "C7": (INCONCLUSIVE, 3.0)}
    for key, (result, estimate) in expected.items():
        assert (rows[key]["verdict"], rows[key]["estimate"]) == (result, pytest.approx(estimate, abs=1e-9)), key
    assert rows["C1"]["compared"].startswith("t in {751, 951} on validation_unique + test_unique")
    assert rows["C5"]["reason"] == "interval straddles 0"
    assert rows["C7"]["reason"].startswith("no interval (one timing per method")
    assert "Diffusion-DPO / LPO 10.00x" in rows["C7"]["detail"]
    assert re.fullmatch(r"LPO 1\.\d{3}, SPO 1\.\d{3}, Diffusion-DPO 1\.\d{3}", rows["C2"]["detail"])
    # The paper's values of the same statistics, from reports/paper_numbers.yaml.
    assert rows["C2"]["paper_value"] == pytest.approx(21.69 - 21.22)
    assert rows["C3"]["paper_value"] == pytest.approx(0.1136 - 0.1011)
    assert rows["C7"]["paper_value"] == pytest.approx(80 / 23)
    assert rows["C1"]["paper_value"] is None


def test_the_rows_beyond_the_paper(inputs):
    rows = {r["claim"]: r for r in claim_rows(inputs, 300, 0, BEYOND)}
    expected = {"B1": (REPRODUCED, 0.1), "B2": (NOT_REPRODUCED, -0.2), "B3": (REPRODUCED, 0.03),
                "B4": (NOT_REPRODUCED, 1.5), "B5": (INCONCLUSIVE, 0.0)}
    for key, (result, estimate) in expected.items():
        assert (rows[key]["verdict"], rows[key]["estimate"]) == (result, pytest.approx(estimate, abs=1e-9)), key
    assert rows["B1"]["detail"].endswith("preference optimisation 55 s against LPO's 50 s (1.10x)")
    assert rows["B3"]["detail"] == "accuracy against the labels: LRM (calibrated) 0.580, LRM 0.550"
    assert rows["B2"]["paper_value"] == pytest.approx(21.52 - 21.69) and rows["B1"]["paper_value"] is None
    without = ClaimInputs(**{**vars(inputs), "high_noise": None,
                             "scores": {k: v for k, v in inputs.scores.items() if not k.startswith("grpo")}})
    for row in claim_rows(without, 50, 0, BEYOND):
        assert row["verdict"] == INCONCLUSIVE and row["reason"].startswith("not measured ("), row["claim"]


def test_claims_without_their_runs_are_not_measured(inputs):
    rows = {r["claim"]: r for r in claim_rows(ClaimInputs(**{**vars(inputs), "variants": {}}), 50, 0)}
    for key in ("C5", "C6"):
        assert rows[key]["verdict"] == INCONCLUSIVE and rows[key]["reason"].startswith("not measured ("), key


def test_missing_inputs_are_named(inputs, tmp_path):
    inputs.lrm_ablations.unlink()
    with pytest.raises(FileNotFoundError, match=r"LRM ablation table not found at .*lrm_ablations\.csv.*reward_study"):
        claim_rows(inputs, 50, 0)
    write(inputs.reward_accuracy, [{k: v for k, v in accuracy_row("LRM", "v", 951, 0.8).items() if k != "label_low"}])
    with pytest.raises(ValueError, match=r"reward_accuracy\.csv' has no column 'label_low'"):
        claim_rows(inputs, 50, 0)
    without_spo = ClaimInputs(**{**vars(inputs), "scores": {k: v for k, v in inputs.scores.items() if k != "spo"}})
    with pytest.raises(ValueError, match="no per-image scores of 'spo': pass --scores spo="):
        claim_rows(without_spo, 50, 0, CLAIMS[1:2])
    scores(inputs.scores["spo"], np.zeros(38))
    with pytest.raises(ValueError, match="spo_scores.csv' do not hold the same eval_seen prompts and seeds"):
        claim_rows(inputs, 50, 0, CLAIMS[1:2])


def test_the_report_has_a_row_and_a_reason_per_claim(inputs, tmp_path):
    write_claims_report(tmp_path / "out", "test", claim_rows(inputs, 50, 0), 50)
    rows = read_csv(tmp_path / "out" / "claims.csv")
    assert [r["claim"] for r in rows] == [c.key for c in CLAIMS] and all(r["reason"] for r in rows)
    text = (tmp_path / "out" / "claims.md").read_text()
    assert "| C7 LPO trains 2.5-3.5x faster" in text and "3.00x (no interval)" in text
    assert "+1.000 [+1.000, +1.000] | **reproduced**" in text
    write_claims_report(tmp_path / "all", "test", claim_rows(inputs, 50, 0, CLAIMS + BEYOND), 50)
    text = (tmp_path / "all" / "claims.md").read_text()
    paper, beyond = text.split("## Beyond the paper")
    assert "| C7 " in paper and "| B1 " not in paper
    assert "| B4 Thurstone calibration halves" in beyond.split("## What each row compares")[0]


def test_the_cli_names_the_ablation_runs_from_the_config(inputs, tmp_path):
    from lpo.cli import main
    params = {"world": {"name": "test"}, "evaluate": {"bootstrap": 50},
              "lpo_ablations": {"rounds": 2, "thresholds": [[0.5, 0.5], [0.35, 0.5]], "betas": [],
                                "lrm_timesteps": ["zero"], "timestep_ranges": []}}
    scores = [f"{name}={path}" for name, path in inputs.scores.items()]
    assert main(["claims", "report", "--params", json.dumps(params), "--reward-accuracy", str(inputs.reward_accuracy),
                 "--lrm-ablations", str(inputs.lrm_ablations), "--cost", str(inputs.cost), "--scores", *scores,
                 "--out", str(tmp_path / "out")]) == 0
    rows = {r["claim"]: r for r in read_csv(tmp_path / "out" / "claims.csv")}
    assert (rows["C5"]["verdict"], rows["C6"]["verdict"]) == (INCONCLUSIVE, REPRODUCED)
    assert "# The paper's claims in the test world" in (tmp_path / "out" / "claims.md").read_text()
