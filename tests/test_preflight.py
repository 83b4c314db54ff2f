"""What the dry run stops on before any job: unwritable output directories, Triton without CUDA, and prompt sets
larger than the world (lpo.checks, run when the Snakefile is parsed)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lpo.checks import check_config, check_cuda, check_output_dirs
from lpo.world.settings import PromptsConfig, WorldConfig, make_prompt_sets

REPO = Path(__file__).resolve().parents[1]
# The default world: 1600 scenes, of which 5 held-out (colour, shape) pairs x 2 sizes x 4 backgrounds x 5 positions.
SEEN, HELDOUT = 1400, 200


def default_config() -> dict:
    return yaml.safe_load((REPO / "config/config.yaml").read_text())


def test_missing_output_directories_that_can_be_created_pass_and_are_not_made(tmp_path):
    check_output_dirs({"world": {"name": "shapes"}}, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_working_directory_stops_naming_the_directory_and_the_fix(tmp_path):
    workdir = tmp_path / "read_only"
    workdir.mkdir()
    workdir.chmod(0o555)
    try:
        if os.access(workdir, os.W_OK):
            pytest.skip("this user (root) writes into read-only directories")
        with pytest.raises(ValueError, match=r"results/shapes .*snakemake -d DIR.*permissions"):
            check_output_dirs({"world": {"name": "shapes"}}, workdir)
    finally:
        workdir.chmod(0o755)


def test_an_output_path_under_a_file_stops_naming_the_directory(tmp_path):
    # No user, root included, can make a directory under a regular file.
    (tmp_path / "results").write_text("")
    with pytest.raises(ValueError, match=r"results directory .*results/shapes .*results is not a directory.*"
                                         r"-d DIR.*move .*results aside"):
        check_output_dirs({"world": {"name": "shapes"}}, tmp_path)


def test_an_unwritable_reports_directory_stops_too(tmp_path):
    (tmp_path / "reports").write_text("")
    with pytest.raises(ValueError, match=r"reports directory .*reports/shapes"):
        check_output_dirs({"world": {"name": "shapes"}}, tmp_path)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_triton_without_cuda_stops_naming_the_key_and_the_fix(no_cuda):
    with pytest.raises(ValueError, match=r"^lrm\.model\.head_backend: triton needs CUDA.*auto.*reference"):
        check_cuda({"lrm": {"model": {"head_backend": "triton"}}})


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_other_backends_need_no_cuda(no_cuda, backend):
    check_cuda({"lrm": {"model": {"head_backend": backend}}})


def test_triton_runs_on_the_cpu_interpreter_or_on_cuda(no_cuda, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_cuda({"lrm": {"model": {"head_backend": "triton"}}})
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_cuda({"lrm": {"model": {"head_backend": "triton"}}})


@pytest.mark.parametrize("sizes, message", [
    ({"train": SEEN - 200 - 200 + 1}, "prompts.train=1001 must be in [1, 1000]"),
    ({"eval_heldout": HELDOUT + 1}, "prompts.eval_heldout=201 must be in [1, 200]"),
    ({"eval_seen": 201}, "prompts.eval_seen=201 must be in [1, prompts.validation_unique=200]"),
    ({"validation_unique": SEEN - 200}, "prompts.validation_unique=1200 and prompts.test_unique=200"),
])
def test_a_prompt_set_larger_than_the_world_stops_the_dry_run(sizes, message):
    config = default_config()
    config["prompts"] = {"train": None, "validation_unique": 200, "test_unique": 200, "eval_seen": None,
                         "eval_heldout": 100, **sizes}
    with pytest.raises(ValueError) as error:
        check_config(config)
    assert message in str(error.value) and ("lower it" in str(error.value) or "lower them" in str(error.value))


def test_the_prompts_stage_raises_the_same_instead_of_capping():
    grammar = WorldConfig().grammar(0)
    with pytest.raises(ValueError, match=r"prompts\.eval_heldout=201 must be in \[1, 200\]"):
        make_prompt_sets(grammar, PromptsConfig(eval_heldout=HELDOUT + 1), 0)
    with pytest.raises(ValueError, match=r"prompts\.train=1201 must be in \[1, 1200\]"):
        make_prompt_sets(grammar, PromptsConfig(train=1201), 0)


def test_every_prompt_the_world_has_can_be_asked_for():
    sets = make_prompt_sets(WorldConfig().grammar(0), PromptsConfig(train=SEEN - 200, eval_heldout=HELDOUT), 0)
    assert {name: len(prompts) for name, prompts in sets.items()} == {
        "train": SEEN - 200, "validation_unique": 100, "test_unique": 100, "eval_seen": 100, "eval_heldout": HELDOUT}


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton has CUDA here")
def test_dry_run_stops_on_triton_without_cuda_before_any_job(tmp_path):
    (tmp_path / "override.yaml").write_text("lrm: {model: {head_backend: triton}}\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                          "-n", "--configfile", str(REPO / "config" / "smoke.yaml"), str(tmp_path / "override.yaml")],
                         capture_output=True, text=True, env=env)
    assert run.returncode != 0, run.stdout[-2000:]
    assert "lrm.model.head_backend: triton needs CUDA" in run.stdout + run.stderr, run.stderr[-2000:]
    assert "Job stats" not in run.stdout + run.stderr
