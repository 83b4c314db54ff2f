"""The lock (requirements.lock) is what every install path installs: the README's commands, .ci/run, environment.yml
and the rules' conda envs (workflow/envs/*.yaml, written from the lock by .ci/envs.py); it pins every package
pyproject.toml's ranges need, inside those ranges; and each rule group's env names every third-party package its
modules import. conda cannot run here, so the env files are checked by parsing them; imports are found statically
(ast), following first-party imports from the modules a rule group runs."""
import ast
import importlib.metadata
import importlib.util
import os
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
SCORERS = ROOT / "lpo" / "evaluate" / "scorers"
INSTALL = "pip install -r requirements.lock -e ."
_spec = importlib.util.spec_from_file_location("lock_envs", ROOT / ".ci" / "envs.py")
envs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(envs)
# First-party import name -> the folder holding it.
FIRST_PARTY = {"lpo": ROOT, "lpo_kernels": ROOT / "kernels"}
# Import name -> distribution name. An import not listed here fails the test, naming it, so the table is extended
# deliberately (and the package added where it belongs) rather than guessed.
DISTRIBUTIONS = {
    "PIL": "pillow", "accelerate": "accelerate", "datasets": "datasets", "diffusers": "diffusers",
    "huggingface_hub": "huggingface-hub", "jsonschema": "jsonschema", "matplotlib": "matplotlib", "numpy": "numpy",
    "open_clip": "open-clip-torch", "pandas": "pandas", "peft": "peft", "pyarrow": "pyarrow",
    "safetensors": "safetensors", "scipy": "scipy", "sklearn": "scikit-learn", "snakemake": "snakemake",
    "torch": "torch", "torchvision": "torchvision", "tqdm": "tqdm", "transformers": "transformers",
    "triton": "triton", "yaml": "pyyaml",
}
# Each env file and the modules its rule group runs (first-party imports are followed from these).
RULE_GROUPS = {
    "lpo.yaml": lambda: [p for p in (ROOT / "lpo").rglob("*.py") if not p.is_relative_to(SCORERS)],
    "scorers.yaml": lambda: sorted(SCORERS.rglob("*.py")),
}
normalise = envs.normalise
PINS, REQUIRES = envs.read_lock()


def conda_env(path: Path) -> dict:
    """{"conda": conda package specs, "pip": pip's lines}."""
    env = yaml.safe_load(path.read_text())
    conda, pip = [], []
    for entry in env["dependencies"]:
        if isinstance(entry, dict):
            pip += entry["pip"]
        else:
            conda.append(entry)
    return {"conda": conda, "pip": pip}


def pins(lines: list[str], where: str) -> dict[str, str]:
    out = {}
    for line in lines:
        name, sep, version = line.partition("==")
        assert sep and name and version, f"{where}: {line!r} is not an exact pin"
        out[normalise(name)] = version
    return out


ENV_FILES = sorted((ROOT / "workflow" / "envs").glob("*.yaml"))


def test_every_env_file_has_a_rule_group():
    assert {p.name for p in ENV_FILES} == set(RULE_GROUPS) == set(envs.HEADERS), (
        "map each workflow/envs/*.yaml to the modules its rules run in RULE_GROUPS and to its packages in .ci/envs.py")


def test_the_readme_and_ci_install_the_lock_and_the_project():
    readme = (ROOT / "README.md").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("python3 -m venv")]
    assert len(commands) == 2 and all(INSTALL in c for c in commands), commands
    assert INSTALL in (ROOT / ".ci" / "run").read_text()


def test_environment_yml_is_the_lock_and_the_project():
    env = conda_env(ROOT / "environment.yml")
    assert env["pip"] == ["-r requirements.lock", "-e ."]
    assert [c for c in env["conda"] if c.startswith("python")] == [envs.PYTHON]


def test_rule_envs_are_what_the_lock_gives():
    assert envs.main(check=True) == 0, "workflow/envs/*.yaml are stale: run `python3 .ci/envs.py`"
    for path in ENV_FILES:
        env = conda_env(path)
        assert {name: PINS[name] for name in pins(env["pip"], path.name)} == pins(env["pip"], path.name)
        assert [c for c in env["conda"] if c.startswith("python")] == [envs.PYTHON]


def test_the_lock_pins_every_requirement_inside_pyprojects_ranges():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"] + [s for extra in project["optional-dependencies"].values() for s in extra]:
        requirement = Requirement(spec)
        name = normalise(requirement.name)
        assert name in PINS, f"requirements.lock lacks {name}: refresh it with `bash .ci/lock`"
        assert requirement.specifier.contains(Version(PINS[name]), prereleases=True), (
            f"requirements.lock pins {name}=={PINS[name]}, outside pyproject.toml's {spec!r}")


def test_the_lock_knows_what_each_package_requires():
    """The env files are closures over the lock's "# via" lines; a misread would drop packages silently."""
    assert {"torch", "safetensors", "huggingface-hub"} <= REQUIRES["accelerate"]
    assert "kernels" in REQUIRES["transformers"]
    closure = envs.closure(["open-clip-torch"], PINS, REQUIRES)
    assert {"torch", "torchvision", "timm", "ftfy", "regex"} <= set(closure)


@pytest.mark.skipif(bool(os.environ.get("LPO_UNLOCKED")), reason="LPO_UNLOCKED: the newest releases (.ci/drift)")
def test_the_installed_versions_are_the_locks():
    """The suite runs on the lock: an environment installed by the README's command holds exactly its versions."""
    wrong = {}
    for name, version in PINS.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed is None or Version(installed) != Version(version):
            wrong[name] = (version, installed)
    assert not wrong, f"(locked, installed) differ; reinstall with `{INSTALL}`: {wrong}"


# ------------------------------------------------------------------------------------------------- imports

def module_file(name: str) -> Path | None:
    base = FIRST_PARTY[name.split(".")[0]].joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_names(path: Path) -> list[str]:
    """Absolute names of every module `path` imports (at any depth of the file), including `from a import b`'s
    a.b, which may be a submodule."""
    root = ROOT / "kernels" if path.is_relative_to(ROOT / "kernels") else ROOT
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return names


def rule_group_modules(roots: list[Path]) -> set[Path]:
    """The roots and every first-party module they import, transitively (with the packages' __init__ files,
    which run on import)."""
    seen, todo = set(), list(roots)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_names(path):
            parts = name.split(".")
            if parts[0] in FIRST_PARTY:
                todo += [f for i in range(1, len(parts) + 1) if (f := module_file(".".join(parts[:i])))]
    return seen


def third_party_imports(modules: set[Path]) -> dict[str, list[str]]:
    """Top-level third-party import name -> the modules importing it."""
    out: dict[str, list[str]] = {}
    for path in sorted(modules):
        for name in imported_names(path):
            top = name.split(".")[0]
            where = str(path.relative_to(ROOT))
            if (top and top not in sys.stdlib_module_names and top not in FIRST_PARTY and top != "__future__"
                    and where not in out.get(top, [])):
                out.setdefault(top, []).append(where)
    return out


def test_the_static_import_scan_follows_first_party_imports():
    modules = rule_group_modules([SCORERS / "clip_score.py"])
    names = {str(p.relative_to(ROOT)) for p in modules}
    assert {"lpo/__init__.py", "lpo/evaluate/__init__.py", "lpo/evaluate/scorers/__init__.py",
            "lpo/evaluate/scorers/pickscore.py", "lpo/evaluate/scorers/common.py",
            "lpo/evaluate/scorers/hps.py"} <= names
    imports = third_party_imports(modules)
    assert {"torch", "torchvision", "transformers", "open_clip", "PIL", "numpy"} <= set(imports)
    assert "diffusers" not in imports


@pytest.mark.parametrize("env_file", sorted(RULE_GROUPS))
def test_rule_group_envs_name_their_imports(env_file):
    imports = third_party_imports(rule_group_modules(RULE_GROUPS[env_file]()))
    unknown = {name: where[:3] for name, where in imports.items() if name not in DISTRIBUTIONS}
    assert not unknown, f"imports with no distribution in tests/test_envs.py DISTRIBUTIONS: {unknown}"
    installed = pins(conda_env(ROOT / "workflow" / "envs" / env_file)["pip"], env_file)
    missing = {DISTRIBUTIONS[name]: where[:3] for name, where in imports.items()
               if normalise(DISTRIBUTIONS[name]) not in installed}
    assert not missing, f"workflow/envs/{env_file} lacks packages its rule group imports: {missing}"
