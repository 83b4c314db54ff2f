"""benchmarks/gpu_check.sh refuses in one line where it cannot run: without CUDA, and without the install."""
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch

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
