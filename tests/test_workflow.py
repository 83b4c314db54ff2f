"""The smoke world's stages end to end through Snakemake, then checks of what they wrote."""
import hashlib
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest

from lpo.optimize.ablations import PROMPT_SET as ABLATION_PROMPT_SET
from lpo.tables import read_csv
from lpo.world.preferences import COLUMNS, SPLITS

REPO = Path(__file__).resolve().parents[1]
WORLD_RULES = ["world_prompts", "world_corpus", "world_tokenizer", "world_judge", "world_vae", "world_base_model",
               "world_clip", "world_side_scorers", "world_preferences", "sample_base", "world_report"]
REWARD_RULES = ["reward_mpcf", "reward_lrm", "reward_lrm_calibrated", "reward_pixel", "reward_spm", "reward_study"]


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
                           "--configfile", str(REPO / "config" / "smoke.yaml"), *args],
                          capture_output=True, text=True)


@pytest.fixture(scope="session")
def smoke(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("smoke")
    run = snakemake(workdir, "--cores", "2")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return workdir


def test_every_world_stage_ran_with_a_log(smoke):
    for rule in WORLD_RULES + REWARD_RULES:
        assert (smoke / "results/smoke/logs" / f"{rule}.log").exists(), rule
    assert "Nothing to be done" in snakemake(smoke, "--cores", "2", "-n").stdout


def test_world_report(smoke):
    report = smoke / "reports/smoke"
    text = (report / "world.md").read_text()
    for heading in ("VAE reconstruction", "Judge: attribute accuracy", "Base model on the evaluation prompts",
                    "Preference data", "Pairs per source pair", "Stage costs"):
        assert heading in text
    assert "eval_heldout" in text and "eval_seen" in text
    csv = (report / "world.csv").read_text()
    assert "overall_alignment" in csv and "label_agreement" in csv and "tie_rate" in csv
    assert (report / "base_samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_preference_dataset_has_pick_a_pic_layout(smoke):
    prefs = smoke / "results/smoke/preferences"
    dataset = datasets.load_from_disk(str(prefs / "dataset"))
    prompts = json.loads((smoke / "results/smoke/world/prompts.json").read_text())
    assert set(dataset) == set(SPLITS)
    for split in SPLITS:
        d = dataset[split]
        assert tuple(d.column_names) == COLUMNS
        assert set(d["label_0"]) <= {0.0, 0.5, 1.0}
        assert set(d["caption"]) <= set(prompts[split])
    heldout = set(prompts["eval_heldout"])
    assert not heldout & {c for split in SPLITS for c in dataset[split]["caption"]}
    stats = json.loads((prefs / "stats.json").read_text())
    assert stats["train"]["pairs_per_prompt"] > 1
    # Every configured source (the snapshot included) draws images, and the rows name them as Pick-a-Pic does.
    sources = {(s["checkpoint"], s["guidance_scale"]) for s in _smoke_config()["preferences"]["sources"]}
    train = dataset["train"]
    named = {*zip(train["model_0"], train["guidance_scale_0"]), *zip(train["model_1"], train["guidance_scale_1"])}
    assert named == {("base" if c == "final" else f"base-step{c}", g) for c, g in sources}
    assert (smoke / "results/smoke/world/base_model_snapshots" / "step40" / "model_index.json").exists()
    mpcf = (prefs / "mpcf_scores.csv").read_text().splitlines()
    assert len(mpcf) - 1 == sum(len(dataset[s]) for s in SPLITS)
    assert {"aesthetic_gap", "clipscore_gap", "vqascore_gap", "different_flag"} <= set(mpcf[0].split(","))


def test_world_clip_loss_falls_on_the_smoke_world(smoke):
    metrics = json.loads((smoke / "results/smoke/world/clip_metrics.json").read_text())
    curve = [loss for _, loss in metrics["loss_curve"]]
    assert len(curve) >= 2 and curve[-1] < curve[0]
    assert (smoke / "results/smoke/world/clip/model.safetensors").exists()


def test_saved_pipeline_loads_offline_and_samples(smoke):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(str(smoke / "results/smoke/world/base_model"),
                                                   local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a small red circle on a gray background, on the left", num_inference_steps=2, output_type="np")
    assert out.images.shape == (1, 32, 32, 3)
    assert len(pipe.tokenizer) == 49408


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    # Snakemake marks directory outputs with a timestamp file of its own; everything else must match.
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name != ".snakemake_timestamp"):
        h.update(f.relative_to(path).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_preference_stage_is_byte_identical_when_rerun(smoke, tmp_path):
    """The same seed gives the same dataset bytes: rerun the stage from the smoke world's models, launched as the
    workflow launches it on 2 cores (two one-thread processes; another split of the batches may round a rare pixel
    differently)."""
    world = smoke / "results/smoke/world"
    log = (smoke / "results/smoke/logs/world_preferences.log")
    assert log.exists()
    config = _smoke_config()
    params = json.dumps({"seed": config["seed"], "world": config["world"], "preferences": config["preferences"]})
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lpo",
              "--threads", "1"]
    run = subprocess.run([*launch, "world", "preferences", "--params", params,
                          "--model", str(world / "base_model"), "--snapshots", str(world / "base_model_snapshots"),
                          "--judge", str(world / "judge"),
                          "--side-scorers", str(world / "side_scorers"), "--prompts", str(world / "prompts.json"),
                          "--out", str(tmp_path / "prefs")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _digest(tmp_path / "prefs") == _digest(smoke / "results/smoke/preferences")
    images = datasets.load_from_disk(str(tmp_path / "prefs/dataset"))["train"]["jpg_0"]
    assert len(set(images)) > 1


@pytest.mark.parametrize("cores", ["1", "4"])
def test_the_core_count_changes_no_weight(smoke, tmp_path, cores):
    """The LRM the smoke world trained under --cores 2, retrained under another core count (4 on this 2-core machine
    once gave its process two threads): the same bytes, since the split of the work comes from the config."""
    copy = tmp_path / "smoke"
    shutil.copytree(smoke, copy, symlinks=True)  # keeps the mtimes: nothing upstream of the LRM is out of date
    run = snakemake(copy, "--forcerun", "reward_lrm", "--cores", cores, "results/smoke/reward/lrm")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    log = (run.stdout + run.stderr).splitlines()
    assert {line.split()[1].rstrip(":") for line in log if line.startswith(("rule ", "localrule "))} == {"reward_lrm"}
    assert _digest(copy / "results/smoke/reward/lrm") == _digest(smoke / "results/smoke/reward/lrm")


def _smoke_config() -> dict:
    import yaml
    base = yaml.safe_load((REPO / "config/config.yaml").read_text())
    for key, value in yaml.safe_load((REPO / "config/smoke.yaml").read_text()).items():
        base[key] = {**base[key], **value} if isinstance(value, dict) else value
    return base


def test_unknown_config_key_stops_before_any_job(tmp_path):
    run = snakemake(tmp_path, "-n", "--config", "vae={'stepz': 3}")
    assert run.returncode != 0
    assert "stepz" in run.stdout + run.stderr


def overriding(tmp_path: Path, text: str) -> tuple[str, ...]:
    """Config files: the smoke world's, then `text` over it (--config would pass nested numbers as strings)."""
    (tmp_path / "override.yaml").write_text(text + "\n")
    return "--configfile", str(REPO / "config" / "smoke.yaml"), str(tmp_path / "override.yaml")


@pytest.mark.parametrize("preferences, key", [
    ("{'sources': [{'checkpoint': 'final', 'guidance_scale': 5.0}, {'checkpoint': 33, 'guidance_scale': 5.0}]}",
     "checkpoint(s) [33]"),
    ("{'sources': []}", "sources"),
    ("{'sources': [{'checkpoint': 'final', 'guidance_scale': -1.0}]}", "guidance_scale"),
])
def test_a_bad_source_list_stops_before_any_job(tmp_path, preferences, key):
    run = snakemake(tmp_path, "-n", *overriding(tmp_path, f"preferences: {preferences}"))
    assert run.returncode != 0 and key in run.stdout + run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "results").exists()


def test_a_changed_source_mix_reruns_exactly_what_follows_the_data(smoke, tmp_path):
    run = snakemake(smoke, "-n", *overriding(tmp_path, "preferences: {same_source_share: 0.5}"))
    assert run.returncode == 0, run.stderr[-2000:]
    jobs = {line.split()[1].rstrip(":") for line in run.stdout.splitlines() if line.startswith(("rule ", "localrule "))}
    assert {"world_preferences", "reward_mpcf", "reward_lrm", "reward_pixel", "world_report"} <= jobs
    assert not jobs & {"world_corpus", "world_judge", "world_vae", "world_base_model", "world_clip",
                       "world_side_scorers", "sample_base"}


def test_samples_cover_both_prompt_sets(smoke):
    with np.load(smoke / "results/smoke/samples/base.npz") as samples:
        assert set(samples["prompt_set"]) == {"eval_seen", "eval_heldout"}
        assert samples["images"].dtype == np.uint8
    # The ablation runs are sampled on the one set their tables read.
    ablation_samples = sorted((smoke / "results/smoke/samples").glob("ablation_*.npz"))
    assert ablation_samples
    for path in ablation_samples:
        with np.load(path) as samples:
            assert set(samples["prompt_set"]) == {ABLATION_PROMPT_SET}


def test_workflow_passes_snakemake_lint(tmp_path):
    run = snakemake(tmp_path, "--lint")
    assert run.returncode == 0 and "Lints for" not in run.stdout + run.stderr, run.stdout[-3000:]


def test_reward_study_report(smoke):
    report = smoke / "reports/smoke"
    text = (report / "reward.md").read_text()
    for heading in ("MPCF: pairs kept", "paper Table 18", "Accuracy against noise", "paper Table 7", "paper Table 8"):
        assert heading in text
    rows = read_csv(report / "reward_accuracy.csv")
    assert {"LRM", "pixel (x0_hat)", "SPM", "oracle (judge's order)"} <= {r["model"] for r in rows}
    # Every timestep of the 20-step grid for each split and pair type that has decided pairs; the smoke world's
    # 16 pairs a split may hold no decided pair of one type (all ties), and then that (split, type) has no row.
    cells = Counter((r["split"], r["pair_type"]) for r in rows if r["model"] == "LRM")
    assert set(cells.values()) == {20}
    assert {split for split, pair_type in cells if pair_type == "all"} == {"validation_unique", "test_unique"}
    assert {pair_type for _, pair_type in cells} == {"all", "same_source", "cross_source"}
    for split, pair_type in cells:
        if pair_type != "all":
            decided = [r for r in rows if r["model"] == "LRM" and (r["split"], r["pair_type"]) == (split, pair_type)]
            every = [r for r in rows if r["model"] == "LRM" and (r["split"], r["pair_type"]) == (split, "all")]
            assert 0 < int(decided[0]["pairs_label"]) <= int(every[0]["pairs_label"])
    # The LRM ablations are scored at the lowest timestep only, where their tables (paper Tables 7, 8) are.
    ablations = {r["model"] for r in rows if r["model"].startswith("LRM ablation")}
    assert ablations and {int(r["timestep"]) for r in rows if r["model"] in ablations} == {
        min(int(r["timestep"]) for r in rows)}
    assert (report / "reward_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lrm = smoke / "results/smoke/reward/lrm"
    assert {"unet", "text_encoder", "head.safetensors"} <= {p.name for p in lrm.iterdir()}


def test_the_stages_beyond_the_paper(smoke):
    report = smoke / "reports/smoke"
    rows = read_csv(report / "reward_accuracy.csv")
    timesteps = sorted({int(r["timestep"]) for r in rows})
    # The calibrated LRM at every timestep; the LRM's 4-fold ensembling (smoke.yaml) at t >= 501 only.
    assert {int(r["timestep"]) for r in rows if r["model"] == "LRM (calibrated)"} == set(timesteps)
    assert {int(r["timestep"]) for r in rows if r["model"] == "LRM (M = 4)"} == {t for t in timesteps if t >= 501}
    calibration = read_csv(report / "reward_calibration.csv")
    assert {r["model"] for r in calibration} == {"LRM", "LRM (calibrated)"}
    assert {r["timestep"] for r in calibration} == {*map(str, timesteps), ">=501"}
    high = {(r["statistic"], r["model"]) for r in read_csv(report / "reward_high_noise.csv")}
    assert {("accuracy difference", "LRM (calibrated)"), ("accuracy difference", "LRM (M = 4)"),
            ("ECE ratio (baseline / model)", "LRM (calibrated)")} <= high
    metrics = json.loads((smoke / "results/smoke/reward/lrm_calibrated_metrics.json").read_text())
    assert metrics["train_pairs"] > 0
    # Step-wise GRPO: one run per budget, in the optimisation and cost tables.
    for run, rounds in (("grpo", 2), ("grpo_8x", 16)):
        trained = json.loads((smoke / f"results/smoke/optimize/{run}_metrics.json").read_text())
        assert (trained["objective"], trained["rounds"]) == ("grpo", rounds)
    text = (report / "optimize.md").read_text()
    assert "| Step-wise GRPO |" in text and "| Step-wise GRPO (8x rounds) |" in text and "Table 12" in text
    claims = {r["claim"]: r for r in read_csv(report / "claims.csv")}
    assert {"B1", "B2", "B3", "B4", "B5"} <= set(claims) and all(claims[k]["reason"] for k in claims)


def test_reward_scaling_is_opt_in_and_reports_every_share(smoke):
    report = smoke / "reports/smoke"
    assert not (report / "reward_scaling.md").exists()  # not part of `all`
    run = snakemake(smoke, "--cores", "2", "reports/smoke/reward_scaling.md")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (smoke / "results/smoke/logs/reward_scaling.log").exists()
    rows = read_csv(report / "reward_scaling.csv")
    assert [(r["labels"], float(r["fraction"])) for r in rows] == [
        ("dataset", 0.5), ("judge", 0.5), ("dataset", 1.0), ("judge", 1.0)]
    pairs = [int(r["train_pairs"]) for r in rows]
    assert pairs[0] == pairs[1] < pairs[2] == pairs[3]
    assert all(0 <= float(r["accuracy_judge"]) <= 1 for r in rows)
    assert (report / "reward_scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_judge_agreement_is_opt_in_and_scores_every_split(smoke):
    report = smoke / "reports/smoke"
    assert not (report / "judge_agreement.md").exists()  # not part of `all`
    run = snakemake(smoke, "--cores", "2", "reports/smoke/judge_agreement.md")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = read_csv(report / "judge_agreement.csv")
    assert {r["split"] for r in rows} == {"validation_unique", "test_unique", "validation_unique+test_unique"}
    assert {r["judge"] for r in rows} == {"world judge (oracle)", "judge 1 (another seed)"}
    assert all(float(r["order_agreement"]) == 1.0 for r in rows if r["judge"] == "world judge (oracle)")
    assert all(0 <= float(r["accuracy_label"]) <= 1 for r in rows)


def test_html_report_holds_the_plots_and_sample_grids(smoke, tmp_path):
    run = snakemake(smoke, "--cores", "2", "--report", str(tmp_path / "report.html"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    html = (tmp_path / "report.html").read_text()
    for name in ("reward_accuracy.png", "training_curves.png", "samples_base.png", "samples_lpo.png",
                 "samples_spo.png", "samples_diffusion_dpo.png"):
        assert name in html, name
