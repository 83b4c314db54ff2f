"""No import name of ours hides an installed distribution's. A package or module of ours that sits on sys.path under
a name some installed distribution also provides wins over it (the path is searched front to back): transformers
imports the distribution `kernels`, and our kernels/ folder, once a package on the repository root, broke it."""
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Every folder of ours that lands on sys.path, and who puts it there: the repository root (the Snakefile, the rules'
# PYTHONPATH, `python -m` and `python -c` from the root), kernels/ (the same, for lpo_kernels), tests/ and
# benchmarks/ (pytest inserts the folder of a conftest.py that has no __init__.py beside it).
IMPORT_ROOTS = [ROOT, ROOT / "kernels", ROOT / "tests", ROOT / "benchmarks"]
OURS = "lpo"


def provided_names(folder: Path) -> set[str]:
    """The top-level names `import` finds in `folder` as a module or a regular package. A folder without
    __init__.py (config/, kernels/ itself) is a namespace portion, which a regular package anywhere on the path
    beats, so it hides nothing."""
    names = set()
    for entry in folder.iterdir():
        if entry.is_dir() and (entry / "__init__.py").is_file():
            names.add(entry.name)
        elif entry.is_file() and entry.suffix in (".py", ".so", ".pyd"):
            names.add(entry.name.split(".")[0])
    return names


def collisions(folders: list[Path]) -> list[str]:
    """One line per name of ours that an installed distribution (other than this project) also provides."""
    provided_by = importlib.metadata.packages_distributions()
    found = []
    for folder in folders:
        for name in sorted(provided_names(folder)):
            others = sorted({d for d in provided_by.get(name, []) if d.lower() != OURS})
            if others:
                where = folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder
                found.append(f"{where}/{name} (import name {name!r}) hides the installed "
                             f"distribution {', '.join(others)}")
    return found


def test_no_import_name_of_ours_is_an_installed_distributions():
    assert not collisions(IMPORT_ROOTS), "rename these: " + "; ".join(collisions(IMPORT_ROOTS))


def test_the_project_provides_lpo_and_lpo_kernels_and_no_bare_kernels():
    names = set().union(*(provided_names(folder) for folder in IMPORT_ROOTS))
    assert {"lpo", "lpo_kernels"} <= names
    assert "kernels" not in names
    assert set(importlib.metadata.distribution(OURS).read_text("top_level.txt").split()) == {"lpo", "lpo_kernels"}


def test_a_module_named_after_an_installed_distribution_is_reported_with_both_names(tmp_path):
    (tmp_path / "yaml.py").write_text("")
    (tmp_path / "lpo_tools").mkdir()
    (tmp_path / "lpo_tools" / "__init__.py").write_text("")
    (tmp_path / "notes").mkdir()   # no __init__.py: a namespace portion, hides nothing
    (tmp_path / "notes" / "x.py").write_text("")
    [line] = collisions([tmp_path])
    assert "'yaml'" in line and "pyyaml" in line.lower()


def run_python(args: list[str], cwd: Path, rules_path: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Python from `cwd`, with the Snakefile's import roots as PYTHONPATH as the rules have them, or with none (the
    installed project alone)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    if rules_path:
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "kernels")])
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_transformers_and_the_sdxl_pipeline_import_after_our_kernels_from_the_repository_root():
    """The imports that broke: transformers' modeling utilities import the distribution `kernels`, and diffusers'
    SDXL pipeline imports those; our kernel module first, from the root, as `python -c` there puts it on the path."""
    script = ("import importlib.util, json, lpo_kernels\n"
              "import transformers.modeling_utils\n"
              "from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipeline\n"
              "spec = importlib.util.find_spec('kernels')\n"
              "print(json.dumps({'ours': lpo_kernels.__file__, 'kernels': spec and spec.origin}))\n")
    result = run_python(["-c", script], cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(found["ours"]).is_relative_to(ROOT / "kernels" / "lpo_kernels")
    try:
        distribution = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the distribution `kernels` is not installed: nothing to shadow")
    assert found["kernels"] and Path(found["kernels"]).is_relative_to(distribution.locate_file("")), found


@pytest.mark.parametrize("where", ["root, as the rules run it", "elsewhere, installed"])
def test_the_cli_starts_from_any_working_directory(where, tmp_path):
    root = where.startswith("root")
    result = run_python(["-m", "lpo", "--help"], cwd=ROOT if root else tmp_path, rules_path=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world" in result.stdout
