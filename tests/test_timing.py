"""The step-cost table (paper Table 5): its arithmetic, its measurement on tiny random models, its report and CLI."""
import copy
import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from tiny_sd import build_tiny_pipeline

from lpo.cli import main
from lpo.reward.lrm import LatentRewardModel, LRMConfig
from lpo.reward.pixel import PixelReward, PixelRewardConfig
from lpo.reward.spm import SPM, SPMConfig
from lpo.timing.models import arch_models, random_world_models
from lpo.timing.report import device_name, paper_table5, table5_rows, write_step_cost_report
from lpo.timing.step import PartTiming, StepCostMeasurement, StepParts, TimingConfig, measure_step_cost, spm_over_lrm
from lpo.world.clip import CLIPArchitecture
from lpo.world.pipeline import load_pipeline

CPU = torch.device("cpu")
QUICK = TimingConfig(warmup=1, repeats=2)
# [FT] Table 5's header, as the paper prints it.
PAPER_COLUMNS = ["Reward model", "Denoising step (x_{t+1}→x_t)", "x̂_{0,t} prediction", "VAE decoding",
                 "Reward prediction", "Total with K=4"]


def measurement(denoise, x0, decode, spm, lrm, k, ensembled=None):
    """Part medians as if measured (one timed call each); `ensembled`: M > 1 -> the M-fold LRM reward's median."""
    medians = {"denoise": denoise, "x0_prediction": x0, "vae_decoding": decode, "spm_reward": spm, "lrm_reward": lrm}
    parts = {name: PartTiming((s,), 1) for name, s in medians.items()}
    ensembling = {1: parts["lrm_reward"], **{m: PartTiming((s,), m) for m, s in (ensembled or {}).items()}}
    return StepCostMeasurement(parts, k, ensembling)


def test_paper_rows_add_up_to_the_papers_totals_and_ratio():
    rows, entry = paper_table5()
    stated = {r["reward_model"]: r["total"] for r in entry["rows"]}
    assert [r.reward_model for r in rows] == ["SPM", "LRM"] and entry["samples_per_step"] == 4
    for r in rows:
        assert math.isclose(r.total, stated[r.reward_model], abs_tol=1e-9)
    assert round(spm_over_lrm(rows), 1) == 6.2  # "only 1/6 that of SPM"


@pytest.mark.parametrize("k", [2, 4, 7])
def test_totals_are_denoise_plus_k_per_candidate_parts(k):
    spm, lrm = measurement(0.02, 0.4, 0.12, 0.08, 0.2, k).table()
    # Batches of K candidates: per candidate = batch / K, so K x per candidate = the batch.
    assert (spm.x0_prediction, spm.vae_decoding, spm.reward_prediction) == pytest.approx((0.4 / k, 0.12 / k, 0.08 / k))
    assert spm.total == pytest.approx(0.02 + 0.4 + 0.12 + 0.08)
    assert (lrm.x0_prediction, lrm.vae_decoding) == (0.0, 0.0)
    assert lrm.total == pytest.approx(0.02 + 0.2)
    assert spm_over_lrm([spm, lrm]) == pytest.approx(0.62 / 0.22)


def test_ensembling_rows_are_denoise_plus_the_m_fold_reward_and_m1_is_the_lrm_row():
    result = measurement(0.02, 0.4, 0.12, 0.08, 0.2, 4, {4: 0.8, 16: 3.1})
    spm, lrm = result.table()
    single, four, sixteen = result.ensembling_table()
    assert [r.draws for r in (single, four, sixteen)] == [1, 4, 16]
    assert single.step == lrm and single.over_single == 1.0 and single.over_spm == lrm.total / spm.total
    assert four.step.total == pytest.approx(0.02 + 0.8) and sixteen.step.total == pytest.approx(0.02 + 3.1)
    assert four.over_single == pytest.approx(0.82 / 0.22) and sixteen.over_spm == pytest.approx(3.12 / 0.62)


@pytest.mark.parametrize("draws, message", [((0,), r"timing\.ensemble_draws=\[0\]: every M must be >= 1"),
                                            ((1, -4), r"timing\.ensemble_draws=\[1, -4\]: every M must be >= 1"),
                                            ((), r"timing\.ensemble_draws=\[\]: name at least one M"),
                                            ((4, 4), r"timing\.ensemble_draws=\[4, 4\]: name each M once")])
def test_bad_ensemble_draws_are_refused_naming_the_key(draws, message):
    with pytest.raises(ValueError, match=message):
        TimingConfig(ensemble_draws=draws)


def test_table_columns_are_table5s():
    rows = table5_rows(measurement(0.02, 0.4, 0.12, 0.08, 0.2, 4).table(), "ours")
    assert [[c.lower() for c in r] for r in rows] == [[c.lower() for c in PAPER_COLUMNS]] * 2
    assert rows[1]["x̂_{0,t} prediction"] == "0" and rows[0]["x̂_{0,t} prediction"].startswith("K × ")


@pytest.fixture(scope="module")
def world_models():
    params = yaml.safe_load((Path(__file__).parents[1] / "config/config.yaml").read_text())
    return random_world_models(params, CPU, torch.float32)


def test_measures_every_part_on_random_world_sized_models(world_models):
    result = measure_step_cost(world_models, QUICK)
    assert {name: t.rows for name, t in result.parts.items()} == {
        "denoise": 2, "x0_prediction": 8, "vae_decoding": 4, "spm_reward": 4, "lrm_reward": 8}
    assert all(len(t.seconds) == 2 and min(t.seconds) > 0 for t in result.parts.values())
    # Noise ensembling: a row per configured M; M = 1 is the plain LRM reward itself, M > 1 is timed M-fold.
    assert QUICK.ensemble_draws == (1, 4, 16)
    assert {m: t.rows for m, t in result.ensembling.items()} == {1: 8, 4: 32, 16: 128}
    assert result.ensembling[1] is result.parts["lrm_reward"]
    assert all(len(t.seconds) == 2 and min(t.seconds) > 0 for t in result.ensembling.values())
    assert [r.draws for r in result.ensembling_table()] == [1, 4, 16]
    assert result.ensembling_table()[0].step == result.table()[1]
    parts = StepParts(world_models, 4, 5.0)
    assert parts.t_cur == 451 and int(parts.next[0]) == 401  # the middle step of SD's 20-step DDIM grid
    candidates = parts.denoise()
    images = parts.vae_decoding(parts.x0_prediction(candidates))
    assert candidates.shape == (4, 4, 8, 8) and images.shape == (4, 3, 32, 32)
    for scores in (parts.spm_reward(images), parts.lrm_reward(candidates)):
        assert scores.shape == (4,) and torch.isfinite(scores).all()


def test_the_m_fold_part_calls_the_lrm_once_on_m_times_k_rows(world_models):
    seen = []
    hook = world_models.lrm.register_forward_pre_hook(lambda module, args: seen.append(len(args[0])))
    try:
        measure_step_cost(world_models, TimingConfig(warmup=1, repeats=2, ensemble_draws=(3, 1)))
    finally:
        hook.remove()
    # 3 lrm_reward calls on K rows, then 3 M-fold calls on M*K rows; M = 1 is not timed again.
    assert seen == [4] * 3 + [12] * 3


def test_the_m_fold_reward_is_the_mean_of_m_single_draw_rewards(world_models):
    parts = StepParts(world_models, 4, 5.0)
    noise, ids = parts.ensemble_inputs(3)
    assert noise.shape == (12, 4, 8, 8) and ids["input_ids"].shape[0] == 12
    assert torch.equal(parts.ensemble_inputs(3)[0], noise)  # fixed and seeded
    with torch.no_grad():
        scores = parts.lrm_ensemble_reward(parts.candidates, noise, ids)
        # Draw d of candidate k is row d*K + k: the same candidate's M re-noisings, scored one draw at a time.
        a = parts.alpha
        single = [world_models.lrm(a.sqrt() * parts.candidates + (1 - a).sqrt() * noise[d * 4:(d + 1) * 4],
                                   parts.t_cur, **parts.lrm_ids) for d in range(3)]
    assert scores.shape == (4,)
    torch.testing.assert_close(scores, torch.stack(single).mean(0), rtol=1e-4, atol=1e-4)


def test_report_puts_the_papers_numbers_beside_ours(world_models, tmp_path):
    result = measurement(0.02, 0.4, 0.12, 0.08, 0.2, 4, {4: 0.8})
    write_step_cost_report(tmp_path, "step_cost", world_models, result, QUICK, "lpo timing step-cost --out x")
    md = (tmp_path / "step_cost.md").read_text()
    for text in ("paper Table 5", device_name(CPU), "`lpo timing step-cost --out x`", "0.243 s", "0.039 s",
                 "K × 0.031 s", "6.2×", "2.8×", "| SPM (paper, 1x A100) |", "| LRM (ours) |", "What each column"):
        assert text in md, text
    with open(tmp_path / "step_cost.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["source"], r["reward_model"]) for r in rows] == [
        ("ours", "SPM"), ("ours", "LRM"), ("[FT] Table 5", "SPM"), ("[FT] Table 5", "LRM")]
    for r in rows:
        parts = sum(float(r[c]) for c in ("x0_prediction_s", "vae_decoding_s", "reward_prediction_s"))
        assert float(r["total_s"]) == pytest.approx(float(r["denoise_s"]) + int(r["samples_per_step"]) * parts)
    assert float(rows[2]["spm_over_lrm"]) == pytest.approx(0.243 / 0.039)
    tex = (tmp_path / "step_cost.tex").read_text()
    assert r"\begin{tabular}" in tex and "Total (K=4)" in tex and "K x 0.019 s" in tex
    # Noise ensembling: its own section and CSV; Table 5's rows above are unchanged.
    ensembling = md.split("## LRM noise ensembling", 1)[1]
    for text in ("| 1 | 1 | 0.2 s |", "| 0.22 s | 1× | 0.35× |", "| 4 | 4 | 0.8 s |", "| 0.82 s | 3.7× | 1.3× |",
                 "LRM step with noise ensembling (× the M = 1 step, × the SPM step): M = 1: **1×**, 0.35×; M = 4: "
                 "**3.7×**, 1.3×."):
        assert text in ensembling, text
    with open(tmp_path / "step_cost_ensembling.csv", newline="") as f:
        ensembled = list(csv.DictReader(f))
    assert [int(r["draws"]) for r in ensembled] == [1, 4]
    assert float(ensembled[0]["total_s"]) == float(rows[1]["total_s"])  # M = 1 is the LRM row
    assert float(ensembled[1]["total_s"]) == pytest.approx(0.82)
    assert float(ensembled[1]["total_over_m1"]) == pytest.approx(0.82 / 0.22)
    assert float(ensembled[1]["total_over_spm"]) == pytest.approx(0.82 / 0.62)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_arch_models_time_on_cpu_only_with_tiny_widths(arch):
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        arch_models(arch, CPU, torch.float32)
    models = arch_models(arch, CPU, torch.float32, tiny_widths=True)
    assert (models.lrm.text_encoder_2 is not None) == (arch == "sdxl")
    assert (models.cond.added_cond_kwargs is not None) == (arch == "sdxl")
    result = measure_step_cost(models, TimingConfig(warmup=0, repeats=1))
    assert all(t.median > 0 for t in result.parts.values())


def save_world(root):
    """A tiny base model, LRM and SPM saved in the layouts the DAG writes."""
    model = build_tiny_pipeline(root / "base_model")
    pipe = load_pipeline(model)
    torch.manual_seed(0)
    LatentRewardModel(copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder), pipe.tokenizer,
                      LRMConfig()).save(root / "lrm")
    pixel = PixelReward(PixelRewardConfig(), CLIPArchitecture(width=8, embed_dim=16, text_width=16, text_layers=1,
                                                              text_heads=2), pipe.tokenizer, step_aware=True)
    SPM(pixel, pipe, SPMConfig()).save(root / "spm")
    return model, root / "lrm", root / "spm"


def test_cli_times_saved_models_and_rejects_bad_input(tmp_path, capsys):
    model, lrm, spm = save_world(tmp_path)
    params = json.dumps({"world": {"name": "tiny"}, "timing": {"warmup": 0, "repeats": 2}})
    out = tmp_path / "reports"
    args = ["timing", "step-cost", "--params", params, "--model", str(model), "--lrm", str(lrm), "--spm", str(spm),
            "--out", str(out)]
    assert main(args) == 0
    md = (out / "step_cost.md").read_text()
    assert "trained models of the tiny world" in md and f"--lrm {lrm}" in md and "Latents 4×8×8" in md
    assert (out / "step_cost.csv").exists() and (out / "step_cost.tex").exists()
    with open(out / "step_cost_ensembling.csv", newline="") as f:
        assert [int(r["draws"]) for r in csv.DictReader(f)] == [1, 4, 16]

    capsys.readouterr()
    assert main([*args[:7], str(tmp_path / "missing"), *args[8:]]) == 2
    assert "LRM directory not found" in capsys.readouterr().err
    bad = json.dumps({"timing": {"samples_per_step": 1}})
    assert main([*args[:3], bad, *args[4:]]) == 2
    assert "samples_per_step" in capsys.readouterr().err
    for draws in ([0], []):
        assert main([*args[:3], json.dumps({"timing": {"ensemble_draws": draws}}), *args[4:]]) == 2
        assert "timing.ensemble_draws" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*args, "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
        assert main(["timing", "step-cost-arch", "--arch", "sdxl", "--out", str(out)]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
