"""reports/<world>/optimize.md and its tables on a tiny fake input: paper-form tables, cost ratios, ablation rows
beside the paper's numbers, LaTeX, plots and sample grids."""
import csv

import numpy as np
import pytest

from lpo.optimize.ablations import ablation_variants
from lpo.evaluate.scores import EvaluateConfig, summarise
from lpo.latex import escape, latex
from lpo.optimize.methods import LPOConfig
from lpo.evaluate.report import ablation_rows, cost_rows, write_optimize_report
from lpo.samples import SampleSet
from lpo.world.grammar import ATTRIBUTES

PNG = b"\x89PNG\r\n\x1a\n"


def score_rows(overall: list[float], prompt_set="eval_seen"):
    """Two prompts, two images each; every other metric follows `overall`."""
    out = []
    for i, value in enumerate(overall):
        out.append({"prompt_set": prompt_set, "prompt_index": i // 2, "seed": 100 + i, "prompt": f"p{i // 2}",
                    "overall_preference": value, "alignment": float(value > 1), "soft_alignment": value / 2,
                    **{f"accuracy_{a}": float(value > 1) for a in ATTRIBUTES}, "aesthetic": value / 2,
                    "defect_rate": float(value < 1), "pixel_reward": 10 * value})
    return out


def step_metrics(reward, sampling, optimisation, reward_model, kept):
    return {"device_seconds": {"reward": reward, "sampling": sampling, "optimisation": optimisation},
            "cost": {"reward_models": {}, "reward_modelling_seconds": reward_model,
                     "preference_optimisation_seconds": reward + sampling + optimisation},
            "loss_curve": [[1, 0.69], [2, 0.6], [3, 0.5]], "device": "cpu", "rounds": 2, "optimizer_steps": 3,
            "per_timestep": {"timestep": [751, 501, 251, 1], "pairs_scored": [10, 10, 10, 10],
                             "pairs_kept": kept}}


@pytest.fixture
def fake():
    lpo = {**LPOConfig(timestep_range=(0, 950)).__dict__, "timestep_range": [0, 950]}
    variants = ablation_variants(lpo, {"rounds": 2, "thresholds": [], "betas": [100.0, 500.0],
                                       "lrm_timesteps": ["zero"], "timestep_ranges": []})
    scores = {"base": score_rows([0.5, 0.5, 0.5, 0.5]), "lpo": score_rows([1.5, 1.5, 0.5, 0.5]),
              "spo": score_rows([0.5, 0.7, 0.5, 0.5]), "diffusion_dpo": score_rows([0.4, 0.5, 0.5, 0.5]),
              "ablation_reference": score_rows([1.5, 1.5, 0.5, 0.5]),
              "ablation_beta100": score_rows([0.9, 0.5, 0.5, 0.5]),
              "ablation_lrmt-zero": score_rows([0.1, 0.1, 0.1, 0.1])}
    summaries = []
    for name, rows in scores.items():
        summaries += summarise(rows, None if name == "base" else scores["base"], EvaluateConfig(bootstrap=50), 0,
                               name)
    training = {"lpo": step_metrics(2.0, 4.0, 4.0, 10.0, [1, 2, 3, 4]),
                "spo": step_metrics(24.0, 4.0, 2.0, 30.0, [0, 1, 1, 1]),
                "diffusion_dpo": {"device_seconds": {"optimisation": 100.0}, "device": "cpu",
                                  "cost": {"reward_models": {}, "reward_modelling_seconds": 0.0,
                                           "preference_optimisation_seconds": 100.0}, "steps": 2,
                                  "loss_curve": [[1, 0.7], [2, 0.65]]},
                "ablation_reference": step_metrics(1, 1, 1, 10.0, [5, 5, 5, 5]),
                "ablation_beta100": step_metrics(1, 1, 1, 10.0, [1, 1, 1, 1]),
                "ablation_lrmt-zero": step_metrics(1, 1, 1, 10.0, [0, 0, 0, 0])}
    return summaries, training, variants


def test_cost_rows_are_table_6_with_ratios_to_lpo(fake):
    _, training, _ = fake
    rows = {r["method"]: r for r in cost_rows(training, {"lpo": 33.0}, {"lpo": 4, "spo": 4})}
    assert list(rows) == ["Diffusion-DPO", "SPO", "LPO"]
    assert (rows["LPO"]["reward modelling (s)"], rows["LPO"]["preference optimisation (s)"],
            rows["LPO"]["total (s)"]) == (10.0, 10.0, 20.0)
    assert rows["SPO"]["total / LPO"] == 3.0 and rows["Diffusion-DPO"]["total / LPO"] == 5.0
    # Step reward per candidate: 2 s over 40 scored steps x K = 4 candidates.
    assert rows["LPO"]["reward ms / candidate"] == 12.5 and rows["SPO"]["reward ms / candidate"] == 150.0
    assert rows["LPO"]["budget"] == "2 rounds, 3 optimizer steps"
    assert rows["Diffusion-DPO"]["budget"] == "2 optimizer steps"
    assert rows["LPO"]["rule wall (s)"] == 33.0 and rows["SPO"]["rule wall (s)"] == "-"
    assert (rows["LPO"]["paper total (h)"], rows["SPO"]["paper total / LPO"],
            rows["Diffusion-DPO"]["paper total / LPO"]) == (23, 3.48, 10.43)


def test_grpo_runs_join_the_main_and_cost_tables(fake):
    from lpo.evaluate.report import main_rows
    summaries, training, _ = fake
    grpo = {"objective": "grpo", **step_metrics(3.0, 4.0, 5.0, 10.0, [0, 0, 0, 0])}
    training = {**training, "grpo_8x": grpo, "grpo": grpo}
    rows = {r["method"]: r for r in cost_rows(training, {"grpo": 40.0}, {"lpo": 4, "grpo": 4, "grpo_8x": 4})}
    assert list(rows) == ["Diffusion-DPO", "SPO", "LPO", "Step-wise GRPO", "Step-wise GRPO (8x rounds)"]
    assert rows["Step-wise GRPO"]["total / LPO"] == 1.1 and rows["Step-wise GRPO"]["rule wall (s)"] == 40.0
    # Only the 8x run has the paper's counterpart: Table 12's 64 A100-h of GRPO with LPO's 15-h LRM.
    assert rows["Step-wise GRPO"]["paper total (h)"] == "-"
    assert (rows["Step-wise GRPO (8x rounds)"]["paper preference optimisation (h)"],
            rows["Step-wise GRPO (8x rounds)"]["paper total (h)"]) == (64, 79)
    scores = summarise(score_rows([1.0, 1.0, 0.5, 0.5]), score_rows([0.5] * 4), EvaluateConfig(bootstrap=50), 0,
                       "grpo")
    methods = [r["method"] for r in main_rows(summaries + scores, "eval_seen")]
    assert methods == ["Base model", "Diffusion-DPO", "SPO", "LPO", "Step-wise GRPO"]


def test_ablation_rows_share_the_reference_and_sit_beside_the_paper(fake):
    summaries, training, variants = fake
    tables = ablation_rows(summaries, training, variants, "eval_seen")
    assert list(tables) == ["beta", "lrm_timestep"]
    beta = tables["beta"]
    assert [r["value"] for r in beta] == ["100", "500 *"]
    assert [r["paper PickScore"] for r in beta] == [21.68, 21.69] and beta[1]["paper GenEval"] == 48.39
    assert beta[1]["pairs kept"] == "20 (0.50)" and beta[0]["pairs kept"] == "4 (0.10)"
    # The reference won 2 of 4 images and tied the rest: 0.75.
    assert beta[1]["win rate vs base"].startswith("0.750")
    assert [r["value"] for r in tables["lrm_timestep"]] == ["parent t_cur (official) *", "always 0"]
    assert tables["lrm_timestep"][1]["paper PickScore"] == 19.64


def test_report_writes_every_table_plot_and_grid(fake, tmp_path):
    summaries, training, variants = fake
    rng = np.random.default_rng(0)
    grid = SampleSet(rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), np.array(["p0", "p0", "p1", "p1"]),
                     np.array(["eval_seen"] * 4), np.array([0, 0, 1, 1]), np.array([100, 101, 102, 103]))
    write_optimize_report(tmp_path, "tiny", summaries, training, variants, {"lpo": 33.0}, {"lpo": 4, "spo": 4},
                          ["setting one"], {"base": grid, "lpo": grid}, grid_prompts=2)
    text = (tmp_path / "optimize.md").read_text()
    for heading in ("Main results (paper Table 2 form)", "### eval_seen", "Training cost (paper Table 6 form)",
                    "Sampling threshold ([FT] Table 10)", "beta ([FT] Table 23)", "LRM input timestep ([FT] Table 22)",
                    "Optimised timestep range ([FT] Table 9)", "setting one", "training_curves.png",
                    "samples_lpo.png"):
        assert heading in text
    assert "(not run in this config)" in text  # thresholds and ranges were not ablated
    # Table 2 form: the LPO row's means and its win rate (2 wins, 2 ties of 4: 0.75); the paper's row beside.
    lpo_row = next(line for line in text.splitlines() if line.startswith("| LPO | train prompts + LRM"))
    assert "| 1.000 [" in lpo_row and lpo_row.rstrip(" |").split("| ")[-1].startswith("0.750")
    assert "| LPO | PaP v1 | 21.69 | 0.6588 |" in text
    with open(tmp_path / "optimize_main.csv") as f:
        main = list(csv.DictReader(f))
    assert {r["method"] for r in main} == {"base", "lpo", "spo", "diffusion_dpo"}
    assert "ablation_beta100" in (tmp_path / "optimize_ablations.csv").read_text()
    assert "paper total (h)" in (tmp_path / "optimize_cost.csv").read_text()
    tex = (tmp_path / "optimize.tex").read_text()
    assert tex.count(r"\begin{tabular}") == 4  # main table of the one prompt set, cost, two ablations
    assert r"win rate vs base" in tex and r"\toprule" in tex
    for png in ("training_curves.png", "samples_base.png", "samples_lpo.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG


def test_latex_escapes_and_aligns():
    text = latex([{"method": "LPO_1 & co", "score": 0.123456, "n": 3}, {"method": "50%", "score": 1.0, "n": 4}],
                 caption="a_b", label="tab:x")
    assert r"\begin{tabular}{lrr}" in text
    assert r"LPO\_1 \& co & 0.1235 & 3 \\" in text and r"50\% & 1 & 4 \\" in text
    assert r"\caption{a\_b}" in text and r"\label{tab:x}" in text
    assert escape(r"a\b{c}~^#$") == r"a\textbackslash{}b\{c\}\textasciitilde{}\textasciicircum{}\#\$"
    with pytest.raises(ValueError, match="at least one row"):
        latex([])
