"""`lpo timing train-step-arch` times each trainer's step (tiny widths on the CPU), refuses the real sizes without a
GPU, and `lpo plan` turns a timed step into hours; the GPU check's commands parse."""
import csv
import math
import re
import shlex
from pathlib import Path

import pytest
import torch

from lpo.cli import build_parser, main
from lpo.timing.plan import STAGES, Footprint, setting_table
from lpo.timing.train_step import arch_config, per_device_batches

REPO = Path(__file__).resolve().parents[1]


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_tiny_run_writes_a_row_per_stage_and_setting(arch, tmp_path):
    out = tmp_path / "out"
    assert main(["timing", "train-step-arch", "--arch", arch, "--tiny", "--steps", "1", "--per-device-batch", "1",
                 "--out", str(out)]) == 0
    rows = read_rows(out / f"train_step_{arch}_tiny.csv")
    assert [(r["stage"], r["per_device_batch"], r["gradient_checkpointing"]) for r in rows] == [
        (stage, "1", checkpointing) for stage in ("lrm", "lpo", "diffusion_dpo") for checkpointing in ("off", "on")]
    # The configs' precisions, fp16 run in fp32 where accelerate has none (the CPU).
    fp16 = "fp16" if torch.cuda.is_available() else "fp32"
    assert [r["precision"] for r in rows[::2]] == ["bf16", fp16, fp16]
    for r in rows:
        seconds = float(r["seconds_per_step"])
        assert math.isfinite(seconds) and seconds > 0 and r["status"] == "ok" and r["timed_steps"] == "1"
        assert r["peak_gib"] == "n/a" if not torch.cuda.is_available() else float(r["peak_gib"]) > 0
    md = (out / f"train_step_{arch}_tiny.md").read_text()
    assert f"--arch {arch} --tiny" in md and f"torch {torch.__version__}" in md and "Tiny widths" in md
    assert sum(line.startswith(("| LRM |", "| LPO |", "| Diffusion-DPO |")) for line in md.splitlines()) == 6


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_the_real_size_refuses_on_the_cpu_in_one_line(tmp_path, capsys):
    assert main(["timing", "train-step-arch", "--arch", "sdxl", "--out", str(tmp_path / "out")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lpo: error:")]
    assert len(errors) == 1 and "needs a CUDA GPU" in errors[0] and "--tiny" in errors[0]
    assert not (tmp_path / "out").exists()


def test_per_device_batches_for_every_stage_or_one():
    config = arch_config("sd15")
    stages = ["lrm", "lpo", "diffusion_dpo"]
    assert per_device_batches([], config, stages) == {"lrm": [16], "lpo": [10], "diffusion_dpo": [4]}
    assert per_device_batches(["lrm=4", "lrm=16", "2"], config, stages) == {"lrm": [4, 16, 2], "lpo": [2],
                                                                            "diffusion_dpo": [2]}
    for tokens, message in ((["dpo=4"], "'dpo' is not a stage"), (["lrm=0"], "whole number >= 1"),
                            (["x"], "whole number >= 1"), (["lpo=4"], "add it to --stages")):
        with pytest.raises(ValueError, match=message):
            per_device_batches(tokens, config, ["lrm"])


# ------------------------------------------------------------------------------------------------ the plan's hours

def fake(section):
    return Footprint(STAGES[section], trained=1_000_000, frozen=1_000_000, activations=2 ** 20,
                     activations_checkpointed=2 ** 19, what="")


HEADER = ["stage", "per_device_batch", "precision", "gradient_checkpointing", "seconds_per_step", "peak_gib",
          "timed_steps", "status", "device"]


def write_train_steps(root, rows, arch="sd15"):
    folder = root / "nvidia-h100-80gb-hbm3"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"train_step_{arch}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        writer.writerows([[*r, "3", "ok" if r[4] else "out of memory", "NVIDIA H100"] for r in rows])
    return folder / f"train_step_{arch}.csv"


def hours_cells(config, gpu_reports, processes=1):
    sections = ("lrm", "lpo", "diffusion_dpo")
    lines = setting_table(config, "no-such-world", [fake(s) for s in sections], dict.fromkeys(sections, processes),
                          None, "GPU", gpu_reports)
    return {line.split(" | ")[0][2:]: line.split(" | ")[9] for line in lines if line.startswith("| ")
            and not line.startswith("| stage")}, lines


def leading_hours(cell):
    return float(re.match(r"(?:≤ )?([0-9.e+]+) h \(est\.", cell).group(1))


def test_plan_turns_a_timed_train_step_into_hours(tmp_path):
    config = arch_config("sd15")   # LRM 128 pairs x 4000 steps, LPO 40 tuples x 1000 rounds, DPO 2048 x 2000
    path = write_train_steps(tmp_path, [
        ["lrm", 4, "bf16", "off", 0.5, 9.1], ["lrm", 16, "bf16", "off", 1.6, 30.2], ["lrm", 16, "bf16", "on", 2.4, 12],
        ["lpo", 10, "fp16", "off", 0.8, 20], ["diffusion_dpo", 4, "fp16", "on", 0.3, 8],
        ["diffusion_dpo", 8, "fp16", "off", "", "n/a"]])
    cells, lines = hours_cells(config, tmp_path)
    # seconds per micro-batch step x accumulation (global / (processes x per-device)) x optimizer steps / 3600
    assert leading_hours(cells["LRM"]) == pytest.approx(float(f"{1.6 * (128 // 16) * 4000 / 3600:.3g}"))
    assert "x 8 x 4000 optimizer steps" in cells["LRM"] and str(path) in cells["LRM"]
    assert "scaled" not in cells["LRM"]
    # LPO: at most ceil(20 prompts x 20 optimised steps / 40) = 10 optimizer steps a round, 1000 rounds.
    assert cells["LPO"].startswith("≤ ")
    assert leading_hours(cells["LPO"]) == pytest.approx(float(f"{0.8 * 4 * 10 * 1000 / 3600:.3g}"))
    assert "10 a round x 1000 rounds" in cells["LPO"] and "sampling not included" in cells["LPO"]
    assert leading_hours(cells["Diffusion-DPO"]) == pytest.approx(float(f"{0.3 * 512 * 2000 / 3600:.3g}"))
    assert any(line.startswith('- Hours marked "est."') for line in lines)

    # Over 8 processes the accumulation, and so the hours, fall 8-fold.
    cells, _ = hours_cells(config, tmp_path, processes=8)
    assert leading_hours(cells["LRM"]) == pytest.approx(float(f"{1.6 * 1 * 4000 / 3600:.3g}"))


def test_plan_scales_a_step_timed_at_another_batch_and_leaves_the_rest_unmeasured(tmp_path):
    config = arch_config("sd15")
    write_train_steps(tmp_path, [["lrm", 4, "bf16", "off", 0.5, 9.1], ["lrm", 128, "bf16", "off", 9.0, 70],
                                 ["lpo", 10, "fp32", "off", 0.8, 20], ["diffusion_dpo", 4, "fp16", "on", "", "n/a"]])
    cells, lines = hours_cells(config, tmp_path)
    # Batch 16 is nearer 4 than 128 (by ratio): 0.5 s x 16 / 4.
    assert leading_hours(cells["LRM"]) == pytest.approx(float(f"{2.0 * 8 * 4000 / 3600:.3g}"))
    assert "2 s a micro-batch step (scaled from batch 4) x 8 x" in cells["LRM"]
    # Another precision, or a setting that ran out of memory, is no measurement of the plan's setting.
    assert cells["LPO"] == cells["Diffusion-DPO"] == "unmeasured"
    # Nor is another architecture's file, or none at all.
    assert hours_cells(arch_config("sdxl"), tmp_path)[0]["LRM"] == "unmeasured"
    assert hours_cells(config, tmp_path / "none")[0]["LRM"] == "unmeasured"


# ------------------------------------------------------------------------------------------------ the GPU check

def test_the_gpu_check_times_train_steps_with_commands_that_parse():
    script = (REPO / "benchmarks" / "gpu_check.sh").read_text().replace("\\\n", " ")
    parts = {m.group(1): m.group(2) for m in re.finditer(r"^part (\S+) \S+ (.*)$", script, re.M)}
    assert list(parts)[-2:] == ["train_step_sd15", "train_step_sdxl"]
    assert "train_step_sd15 train_step_sdxl" in script  # their reports go into summary.md
    for arch in ("sd15", "sdxl"):
        words = shlex.split(parts[f"train_step_{arch}"].replace('"$out"', "reports/gpu/x"))
        args = build_parser().parse_args(words[words.index("lpo") + 1:])
        assert (args.stage, args.arch, args.tiny) == ("train-step-arch", arch, False)
        batches = per_device_batches(args.per_device_batch, arch_config(arch), args.stages)
        assert set(batches) == {"lrm", "lpo", "diffusion_dpo"} and len(batches["lrm"]) == 2
