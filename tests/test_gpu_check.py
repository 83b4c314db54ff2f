"""benchmarks/gpu_check.sh refuses in one line where it cannot run: without CUDA, and without the install. Where it
runs, its benchmark command is one pytest accepts and its console summary finds the step-cost report's lines."""
import os
import re
import shlex
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch

from lpo.timing.models import arch_models
from lpo.timing.report import write_step_cost_report
from lpo.timing.step import PartTiming, StepCostMeasurement, TimingConfig

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def gpu_check(python: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT)], env={**os.environ, "PYTHON": python}, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_refuses_in_one_line_and_writes_nothing():
    result = gpu_check(sys.executable)
    assert result.returncode == 2
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("gpu_check: no CUDA device is visible")
    assert not (SCRIPT.parents[1] / "reports" / "gpu" / "cpu").exists()


def test_without_the_install_it_names_the_missing_package(tmp_path):
    venv.create(tmp_path / "bare", with_pip=False)
    result = gpu_check(str(tmp_path / "bare" / "bin" / "python"))
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("gpu_check: torch is not installed")
    assert "pip install -r requirements.lock -e ." in line


# The environment of a pytest run outside this one: an xdist worker's PYTEST_XDIST_WORKER would make the child a
# worker too, and pytest-benchmark turn itself off.
OUTSIDE = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}


def test_the_readme_benchmark_command_is_accepted_by_pytest():
    # Under any xdist --dist (once in pyproject's addopts) pytest-benchmark turns itself off and refuses
    # --benchmark-only.
    result = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "--benchmark-only", "--collect-only",
                             "-q"], cwd=SCRIPT.parents[1], capture_output=True, text=True, timeout=300, env=OUTSIDE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_its_benchmark_command_is_accepted_by_pytest(tmp_path):
    text = SCRIPT.read_text().replace("\\\n", " ")
    [line] = [line for line in text.splitlines() if line.startswith("part benchmarks ")]
    # The script's $out is relative to the repository root (its storage URL is file://./$out/...).
    words = shlex.split(line.replace("$out", os.path.relpath(tmp_path, SCRIPT.parents[1])))
    args = words[words.index("pytest") + 1:]
    assert "--benchmark-only" in args
    result = subprocess.run([sys.executable, "-m", "pytest", *args, "--collect-only"], cwd=SCRIPT.parents[1],
                            capture_output=True, text=True, timeout=300, env=OUTSIDE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "test_step_cost.py" in result.stdout


def test_its_summary_finds_the_step_cost_reports_lines(tmp_path):
    text = SCRIPT.read_text().replace("\\\n", " ")
    [pattern] = re.findall(r'grep -E "\^\(([^)]*)\)"\s+"\$out/step_cost_\$arch\.md"', text)
    medians = {"denoise": 0.02, "x0_prediction": 0.4, "vae_decoding": 0.12, "spm_reward": 0.08, "lrm_reward": 0.2}
    parts = {name: PartTiming((s,), 1) for name, s in medians.items()}
    measurement = StepCostMeasurement(parts, 4, {1: parts["lrm_reward"], 4: PartTiming((0.8,), 4)})
    models = arch_models("sd15", torch.device("cpu"), torch.float32, tiny_widths=True)
    write_step_cost_report(tmp_path, "step_cost_sd15", models, measurement, TimingConfig(), "lpo timing x")
    lines = (tmp_path / "step_cost_sd15.md").read_text().splitlines()
    # Table 5's ratio and the noise-ensembling summary, each on a line of its own.
    for start in pattern.split("|"):
        assert [line for line in lines if line.startswith(start)], start
