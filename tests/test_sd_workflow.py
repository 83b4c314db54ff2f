"""The SD worlds' branch of the DAG through Snakemake: config/sd15.yaml, sd21.yaml and sdxl.yaml, each pointed at a
tiny pipeline of its topology in hub layout, a released-layout LRM, tiny random scorer checkpoints and a tiny
Pick-a-Pic-layout dataset on disk, run end to end on CPU (a few steps per stage: the LRM, LRM-XL for sdxl, trained
here and LPO optimised against it; sd21 optimised against the released LRM-1.5) and write Table 2 (Table 4 for
sd21) beside the paper's numbers; the three shipped SD configs plan
every rule of the pipeline when their inputs exist and stop, before any job, with one message listing every missing
input when nothing is downloaded."""
import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import yaml
from PIL import Image
from scorer_checkpoints import save_table2_scorers
from test_bad_input import NO_PARTITION
from test_pickapic import write_mpcf
from test_sd_world import IMAGE, save_released_lrm, save_sd15, save_sd21, save_sdxl, tiny_unet

from lpo.config import load_yaml
from lpo.sd import inputs as sd_inputs
from lpo.images import png_bytes
from lpo.world.tokenizer import SD_MAX_LENGTH, build_clip_tokenizer

REPO = Path(__file__).resolve().parents[1]
SPLIT_PROMPTS = {"train": 8, "validation_unique": 3, "test_unique": 3}  # distinct captions, 2 pairs each
TRAINERS = ["sd_reward_lrm", "sd_optimize_lpo", "sd_optimize_diffusion_dpo", "sd_optimize_grpo"]
TRAINING_RULES = ["sd_preferences", *TRAINERS]
EVALUATION_RULES = ["sd_base_model", "sd_official_model", "sd_prompts", "sd_reward_table18", "sd_sample", "sd_score",
                    "sd_report"]
# The tiny runs: a few steps per stage.
FAST = {
    "sd_pipeline": {"images_per_prompt": 2, "steps": 2, "batch_size": 4, "bootstrap": 50, "grid_prompts": 2,
                    "scorer_batch_size": 8},
    "mpcf": {"strategy": 0},
    "lrm": {"steps": 2, "batch_size": 4, "per_device_batch_size": 1, "warmup_steps": 0, "validate_every": 2,
            "inference_steps": 5, "model": {"head_backend": "reference"}},
    "lpo": {"rounds": 1, "num_inference_steps": 2, "sample_batch_size": 2, "train_batch_size": 2,
            "per_device_batch_size": 1, "samples_per_step": 2, "threshold_min": 0.01, "threshold_max": 0.02},
    "grpo": {"rounds": 1, "num_inference_steps": 2, "sample_batch_size": 2, "train_batch_size": 2,
             "per_device_batch_size": 1, "samples_per_step": 2},
    "diffusion_dpo": {"steps": 2, "batch_size": 2, "per_device_batch_size": 1, "warmup_steps": 0},
}
# The end-to-end runs on this machine's CPU: every trainer as two gloo processes (lpo.launch), no GPU asked for,
# in bf16 where the configs train in fp16 (which needs a GPU).
ON_CPU = {
    "compute": {"processes": 2, "exclusive_threads": 1},
    "resources": {"rules": {rule: {"gpu": 0} for rule in TRAINERS}},
    "lpo": {"mixed_precision": "bf16"},
    "grpo": {"mixed_precision": "bf16"},
    "diffusion_dpo": {"mixed_precision": "bf16"},
}
# Per end-to-end world: its model and LRM as the paper's tables name them, and the paper's Table 2 PickScore of its
# Original and LPO rows.
PAPER = {"sd15": ("SD1.5", "LRM-1.5", "20.56", "21.69"), "sd21": ("SD2.1", "LRM-1.5", "20.92", "21.76"),
         "sdxl": ("SDXL", "LRM-XL", "21.65", "22.86")}


def pickapic_dataset(out: Path, seed: int = 0) -> Path:
    """Pick-a-Pic's columns with IMAGE-sized PNGs, saved with save_to_disk."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n_prompts in SPLIT_PROMPTS.items():
        captions = [f"a {c} {s} on a {b} background" for c, s, b in zip(
            rng.choice(["red", "blue", "green", "yellow"], n_prompts), rng.choice(["cube", "ball", "cone"], n_prompts),
            rng.choice(["white", "black"], n_prompts))]
        captions = [f"{c} ({split} {i})" for i, c in enumerate(captions) for _ in range(2)]
        n = len(captions)
        image = lambda: png_bytes(rng.integers(0, 256, (IMAGE, IMAGE, 3), dtype=np.uint8))
        labels = [float(x) for x in rng.choice([0.0, 1.0, 0.5], n, p=[0.45, 0.45, 0.1])]
        splits[split] = datasets.Dataset.from_dict({
            "caption": captions, "jpg_0": [image() for _ in range(n)], "jpg_1": [image() for _ in range(n)],
            "label_0": labels, "label_1": [1 - x for x in labels], "has_label": [True] * n,
            "are_different": [x != 0.5 for x in labels], "num_example_per_prompt": [2] * n,
            "ranking_id": list(range(n)), "image_0_uid": [f"{split}-{i}-0" for i in range(n)],
            "image_1_uid": [f"{split}-{i}-1" for i in range(n)]})
    datasets.DatasetDict(splits).save_to_disk(str(out))
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """Every input of the sd15 and sdxl worlds as local files: tiny pipelines, LRMs, an official UNet, scorers,
    Pick-a-Pic and the MPCF score file."""
    root = tmp_path_factory.mktemp("sd_inputs")
    tokenizer = build_clip_tokenizer(root / "tokenizer", SD_MAX_LENGTH)
    out = {"sd15": save_sd15(root / "sd15", tokenizer), "sd21": save_sd21(root / "sd21", tokenizer),
           "sdxl": save_sdxl(root / "sdxl", tokenizer)}
    out["lrm_sd15"] = save_released_lrm(out["sd15"], root / "lrm_sd15", xl=False)
    out["lrm_sdxl"] = save_released_lrm(out["sdxl"], root / "lrm_sdxl", xl=True)
    for name, xl in (("official_unet", False), ("official_unet_xl", True)):
        out[name] = root / name
        tiny_unet(xl, seed=3).save_pretrained(out[name])
    out["dataset"] = pickapic_dataset(root / "pickapic")
    train = datasets.load_from_disk(str(out["dataset"]))["train"]
    out["mpcf"] = write_mpcf(root / "vqa_aes_clip_score_mp.csv", train)
    out["scorers"] = save_table2_scorers(root / "scorers")
    return out


def world_config(inputs: dict, preset: str = "sd15", name: str = "tinysd") -> dict:
    """The override of config/<preset>.yaml that points every input at the tiny local files."""
    xl = preset == "sdxl"
    unet = str(inputs["official_unet_xl" if xl else "official_unet"])
    return {"world": {"name": name}, **FAST, "sd_world": {
        "base_model": str(inputs[preset]), "vae": None,
        "lrm": str(inputs["lrm_sdxl" if xl else "lrm_sd15"]), "clip_text_projection": None,
        "dataset": str(inputs["dataset"]), "eval_dataset": str(inputs["dataset"]), "mpcf_scores": str(inputs["mpcf"]),
        "train_prompt_count": 4, "eval_prompt_count": SPLIT_PROMPTS["validation_unique"],
        "official_unets": {"lpo": None, "spo": unet, "diffusion_dpo": None} if preset == "sd15" else (
            {"lpo": unet, "spo": unet, "diffusion_dpo": unet} if xl else {}),
        "scorers": inputs["scorers"], "resolution": IMAGE}}


def snakemake(workdir: Path, preset: str, override: dict | None, *args: str, env: dict | None = None):
    """Snakemake on config/<preset>.yaml and `override`; `env` entries set to None are removed."""
    configs = [str(REPO / "config" / f"{preset}.yaml")]
    if override is not None:
        (workdir / "override.yaml").write_text(yaml.safe_dump(override))
        configs.append(str(workdir / "override.yaml"))
    environment = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
                           "--configfile", *configs, *args], capture_output=True, text=True, env=environment)


def planned_rules(stdout: str) -> set[str]:
    """Rule names of the job table `snakemake -n` prints."""
    rules, table = set(), False
    for line in stdout.splitlines():
        parts = line.split()
        if parts[:2] == ["job", "count"]:
            table = True
        elif table and len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
            rules.add(parts[0])
        elif table and parts[:1] == ["total"]:
            break
    return rules


@pytest.fixture(scope="module", params=list(PAPER))
def sd_run(request, inputs, tmp_path_factory) -> tuple[str, Path]:
    """(preset, workdir) of the world's DAG run end to end; one official checkpoint (SPO's) keeps it small."""
    preset = request.param
    workdir = tmp_path_factory.mktemp(f"{preset}_run")
    override = world_config(inputs, preset)
    official = override["sd_world"]["official_unets"]
    if official:  # sd21 has none (Table 4)
        override["sd_world"]["official_unets"] = {"lpo": None, "spo": official["spo"], "diffusion_dpo": None}
    for section, values in ON_CPU.items():
        override[section] = {**override.get(section, {}), **values}
    run = snakemake(workdir, preset, override, "--cores", "2")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return preset, workdir


def test_the_world_runs_end_to_end_and_writes_table2_beside_the_paper(sd_run):
    preset, workdir = sd_run
    model, lrm, original, lpo = PAPER[preset]
    reports = workdir / "reports" / "tinysd"
    with open(reports / "table2.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # SD2.1 ([FT] Table 4): LPO with the released LRM-1.5 only, under the paper's name for it.
    table, method = ("Table 4", "LPO with LRM-1.5") if preset == "sd21" else ("Table 2", "LPO")
    expected = [("Original", "ours"), ("Original", f"paper, [FT] {table}"), (method, "ours (trained here)"),
                (method, f"paper, [FT] {table}")]
    if preset != "sd21":
        expected += [("Diffusion-DPO", "ours (trained here)"), ("Diffusion-DPO", "paper, [FT] Table 2")]
    if preset == "sd15":  # step-wise GRPO beside them, and paper Table 12's row
        expected += [("Step-wise GRPO", "ours (trained here)"), ("Step-wise GRPO", "paper, [FT] Table 12")]
    if preset != "sd21":
        expected += [("SPO", "ours (official checkpoint)"), ("SPO", "paper, [FT] Table 2")]
    assert [(r["method"], r["source"]) for r in rows] == expected
    headers = ["PickScore (~100*cos)", "ImageReward (standardised)", "HPSv2 (cos x100)", "HPSv2.1 (cos x100)",
               "Aesthetic (1-10)"]
    for ours, paper in zip(rows[::2], rows[1::2]):
        assert all(math.isfinite(float(ours[h])) for h in headers)
        low, high = (float(ours[f"{headers[0]} 95% {end}"]) for end in ("low", "high"))
        assert low <= float(ours[headers[0]]) <= high
        assert all(math.isfinite(float(paper[h])) for h in headers)
        assert ours["images_scored"] == str(2 * SPLIT_PROMPTS["validation_unique"])
        assert ours["skipped_undecodable"] == "0"
    assert rows[1]["PickScore (~100*cos)"] == original
    markdown = (reports / "table2.md").read_text()
    assert f"| {model} | {method} | paper, [FT] {table} | {lpo} |" in markdown
    assert "No image failed to decode" in markdown
    assert r"\toprule" in (reports / "table2.tex").read_text()
    table18 = (reports / "table18.md").read_text()
    for row in (f"{lrm} released (t = 200)", f"| {lrm} (t = 0) | paper, [FT] Table 18"):
        assert row in table18
    trained = workdir / "results" / "tinysd" / "reward" / "lrm"
    if preset == "sd21":  # optimised with the released LRM-1.5, as the paper did: no LRM trained here
        assert not trained.exists() and "trained (t = 0)" not in table18
    else:  # the LRM LPO optimised against was trained here, in its family's layout (LRM-XL: both text encoders)
        assert f"{lrm} trained (t = 0)" in table18
        assert (trained / "head.safetensors").is_file() and (trained / "text_encoder_2").is_dir() == (preset == "sdxl")
    grids = ["table2.png", "samples_original.png", "samples_lpo.png"] + (
        [] if preset == "sd21" else ["samples_official_spo.png"])
    for name in grids:
        assert (reports / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_run_sampled_the_same_prompts_and_seeds(sd_run):
    preset, workdir = sd_run
    samples = workdir / "results" / "tinysd" / "sd" / "samples"
    indexes = {run.name: (run / "index.csv").read_text() for run in samples.iterdir()}
    other = "lpo" if preset == "sd21" else "official_spo"
    trained = {"sd15": {"diffusion_dpo", "grpo"}, "sd21": set(), "sdxl": {"diffusion_dpo"}}[preset]
    assert set(indexes) == {"original", "lpo", other, *trained}
    assert len(set(indexes.values())) == 1
    original = np.asarray(Image.open(samples / "original" / "00000.png"))
    assert original.shape == (IMAGE, IMAGE, 3)
    assert not np.array_equal(original, np.asarray(Image.open(samples / other / "00000.png")))
    prompts = json.loads((workdir / "results" / "tinysd" / "sd" / "prompts.json").read_text())
    assert len(prompts["train"]) == 4 and len(prompts["validation_unique"]) == SPLIT_PROMPTS["validation_unique"]


@pytest.mark.parametrize("preset", ["sd15", "sd21", "sdxl"])
def test_the_shipped_configs_plan_every_rule(inputs, tmp_path, preset):
    run = snakemake(tmp_path, preset, world_config(inputs, preset), "-n", "-p", "--cores", "7")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # Each stage's threads come from the config's compute section, never from --cores.
    threads = load_yaml(REPO / "config" / "config.yaml")["compute"]["exclusive_threads"]
    assert "--threads 7" not in run.stdout and "OMP_NUM_THREADS=7" not in run.stdout
    # The trainers start through lpo.launch: a process per GPU the rule is given (the shipped configs: one).
    gpus = load_yaml(REPO / "config" / f"{preset}.yaml")["resources"]["rules"]["sd_optimize_lpo"]["gpu"]
    assert (f"python -m lpo.launch --rule sd_optimize_lpo --gpus {gpus} --processes 2 --threads {threads} -- "
            f"optimize lpo") in run.stdout
    assert f"python -m lpo --threads {threads} sd sample" in run.stdout
    expected = set(EVALUATION_RULES) | {"all"}
    expected |= set(TRAINING_RULES)
    if preset == "sd21":  # Table 4: LPO only, with the released LRM-1.5, no official checkpoints
        expected -= {"sd_reward_lrm", "sd_official_model", "sd_optimize_diffusion_dpo"}
    if preset != "sd15":  # step-wise GRPO (Table 12) is SD1.5's only
        expected -= {"sd_optimize_grpo"}
    assert planned_rules(run.stdout) == expected


def planned_resources(stdout: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, resources) of every job block `snakemake -n` prints."""
    jobs, rule = [], None
    for line in stdout.splitlines():
        if line.startswith(("rule ", "localrule ")) and line.endswith(":"):
            rule = line.split()[1][:-1]
        elif line.strip().startswith("resources:") and rule:
            jobs.append((rule, dict(item.split("=", 1) for item in line.split(":", 1)[1].strip().split(", "))))
            rule = None
    return jobs


def test_the_slurm_profile_plans_every_job_with_gpus_memory_and_time(inputs, tmp_path):
    config = world_config(inputs, "sd15")
    run = snakemake(tmp_path, "sd15", config, "-n", "--profile", str(REPO / "workflow" / "profiles" / "slurm"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    jobs = [(rule, resources) for rule, resources in planned_resources(run.stdout) if rule != "all"]
    assert {rule for rule, _ in jobs} == set(EVALUATION_RULES) | set(TRAINING_RULES)
    requested = load_yaml(REPO / "config" / "sd15.yaml")["resources"]
    for rule, resources in jobs:
        expected = {**requested["default"], **requested["rules"].get(rule, {})}
        assert {k: int(resources[k]) for k in ("gpu", "mem_mb", "runtime")} == expected, rule
        assert resources["slurm_partition"] == "gpu", rule
    assert dict(jobs)["sd_optimize_lpo"]["gpu"] == "1" and dict(jobs)["sd_prompts"]["gpu"] == "0"


def test_the_slurm_profile_runs_without_cores_given_and_stops_without_a_partition(inputs, tmp_path):
    profile = tmp_path / "profile"
    profile.mkdir()
    (profile / "config.yaml").write_text(NO_PARTITION)
    run = snakemake(tmp_path, "sd15", world_config(inputs), "--profile", str(profile))
    assert run.returncode != 0
    assert "lpo: error: the Slurm executor has no slurm_partition for rule(s)" in run.stderr, run.stderr[-3000:]
    assert "sd_reward_lrm" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "results").exists()


def test_with_nothing_downloaded_one_message_lists_every_input(tmp_path):
    run = snakemake(tmp_path, "sd15", None, "-n", env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
                                                       "HF_HUB_CACHE": None, "HUGGINGFACE_HUB_CACHE": None})
    assert run.returncode != 0
    output = run.stdout + run.stderr
    assert output.count("the sd15 world lacks 18 input(s)") == 1
    for key, hub_id in (("base_model", "stable-diffusion-v1-5/stable-diffusion-v1-5"), ("lrm", "casiatao/LRM"),
                        ("dataset", "yuvalkirstain/pickapic_v1"), ("eval_dataset", "pickapic-anonymous/pickapic_v1"),
                        ("official_unets.spo", "SPO-Diffusion-Models/SPO-SD-v1-5_4k-p_10ep"),
                        ("scorers.pickscore.model", "yuvalkirstain/PickScore_v1"),
                        ("scorers.hpsv2.checkpoint", "xswu/HPSv2"), ("mpcf_scores", "vqa_aes_clip_score_mp.csv"),
                        ("scorers.aesthetic.mlp", "sac+logos+ava1-l14-linearMSE.pth")):
        assert f"  - sd_world.{key}: " in output and hub_id in output, key
    assert not (tmp_path / "results").exists()


def test_a_dataset_without_the_expected_columns_is_named_before_any_job(inputs, tmp_path):
    data = datasets.load_from_disk(str(inputs["dataset"]))
    datasets.DatasetDict({k: v.remove_columns(["label_0"]) for k, v in data.items()}).save_to_disk(
        str(tmp_path / "bad"))
    config = world_config(inputs)["sd_world"] | {"preset": "sd15", "dataset": str(tmp_path / "bad")}
    lines = sd_inputs.missing_inputs(config)
    assert sorted(line.split("'")[1] for line in lines) == ["test_unique", "train", "validation_unique"]
    assert all(line.startswith("sd_world.dataset: split '") and str(tmp_path / "bad") in line
               and "lacks column(s) label_0" in line for line in lines)


def test_an_undecodable_image_is_named_and_counted(inputs, tmp_path, capsys, caplog):
    from lpo.evaluate.scorers.__main__ import main
    from lpo.evaluate.scorers.sample_folder import save_image, write_index

    folder = tmp_path / "samples"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        save_image(folder, i, rng.integers(0, 256, (IMAGE, IMAGE, 3), dtype=np.uint8))
    (folder / "00001.png").write_bytes((folder / "00001.png").read_bytes()[:60])  # truncated
    write_index(folder, [{"prompt": "a red cube", "prompt_index": i, "image_index": 0, "seed": 42} for i in range(3)])
    scorers = {k: inputs["scorers"][k] for k in ("pickscore", "aesthetic")}
    assert main(["score", "--scorers", json.dumps(scorers), "--samples", str(folder), "--out",
                 str(tmp_path / "scores.csv"), "--device", "cpu"]) == 0
    rows = list(csv.DictReader(io.StringIO((tmp_path / "scores.csv").read_text())))
    assert [r["decoded"] for r in rows] == ["1", "0", "1"] and rows[1]["pickscore"] == ""
    assert str(folder / "00001.png") in caplog.text and "1 of 3 image(s)" in caplog.text
    bad = {"aesthetic": {**scorers["aesthetic"], "mlp": inputs["scorers"]["hpsv2"]["checkpoint"]}}
    assert main(["score", "--scorers", json.dumps(bad), "--samples", str(folder), "--out",
                 str(tmp_path / "bad.csv")]) == 2
    assert "does not fit" in capsys.readouterr().err


def test_the_sd_rules_pass_snakemake_lint(inputs, tmp_path):
    run = snakemake(tmp_path, "sd15", world_config(inputs), "--lint")
    assert run.returncode == 0 and "Lints for" not in run.stdout + run.stderr, run.stdout[-3000:]


def test_the_html_report_shows_the_table2_plot_and_sample_grids(sd_run, tmp_path):
    preset, workdir = sd_run
    run = snakemake(workdir, preset, yaml.safe_load((workdir / "override.yaml").read_text()), "--cores", "2",
                    "--report", str(tmp_path / "report.html"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    html = (tmp_path / "report.html").read_text()
    other = "samples_lpo.png" if preset == "sd21" else "samples_official_spo.png"  # sd21: no official checkpoints
    assert all(name in html for name in ("table2.png", "samples_original.png", other))


def test_every_trainer_ran_as_two_processes_accumulating_micro_batches(sd_run):
    preset, workdir = sd_run
    results = workdir / "results" / "tinysd"
    # LRM: 4 pairs a step = 2 processes x 2 micro-batches of 1; LPO: 2 tuples and Diffusion-DPO: 2 pairs = 2 x 1 x 1.
    expected = {"reward/lrm_metrics.json": 2, "optimize/lpo_metrics.json": 1, "optimize/diffusion_dpo_metrics.json": 1}
    ran = {name: json.loads((results / name).read_text()) for name in expected if (results / name).is_file()}
    assert "optimize/lpo_metrics.json" in ran and (preset == "sd21") == ("reward/lrm_metrics.json" not in ran)
    for name, metrics in ran.items():
        assert (metrics["processes"], metrics["accumulation_steps"]) == (2, expected[name]), name
