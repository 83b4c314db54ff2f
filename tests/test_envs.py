"""The conda environments (environment.yml, workflow/envs/*.yaml) agree with pyproject.toml, and each rule group's
env names every third-party package its modules import. conda cannot run here, so the files are checked by parsing
them; imports are found statically (ast), following first-party imports from the modules a rule group runs."""
import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = ("lpo", "kernels")
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
    "lpo.yaml": lambda: [p for p in (ROOT / "lpo").rglob("*.py") if p.relative_to(ROOT / "lpo").parts[0] != "scorers"],
    "scorers.yaml": lambda: sorted((ROOT / "lpo" / "scorers").rglob("*.py")),
}
# Snakemake runs the rules from outside their environments, so a rule env does not need it.
ORCHESTRATOR = {"snakemake"}
_REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)$")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(lines: list[str], where: str) -> dict[str, str]:
    """Distribution name -> version specifier ('' when unpinned)."""
    out = {}
    for line in lines:
        match = _REQUIREMENT.match(line.strip())
        assert match, f"{where}: cannot read the requirement {line!r}"
        name = normalise(match[1])
        assert name not in out, f"{where} lists {name} twice"
        out[name] = match[2].replace(" ", "")
    return out


def pyproject() -> tuple[dict[str, str], dict[str, str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return (requirements(project["dependencies"], "pyproject.toml dependencies"),
            requirements(project["optional-dependencies"]["test"], "pyproject.toml test extras"))


def conda_env(path: Path) -> dict:
    """{"conda": conda package specs, "pip": distribution -> specifier, "editable": pip's -e entries}."""
    env = yaml.safe_load(path.read_text())
    conda, pip = [], []
    for entry in env["dependencies"]:
        if isinstance(entry, dict):
            pip += entry["pip"]
        else:
            conda.append(entry)
    editable = [p for p in pip if p.startswith("-e")]
    return {"conda": conda, "pip": requirements([p for p in pip if not p.startswith("-e")], str(path)),
            "editable": editable}


ENV_FILES = sorted((ROOT / "workflow" / "envs").glob("*.yaml"))


def test_every_env_file_has_a_rule_group():
    assert {p.name for p in ENV_FILES} == set(RULE_GROUPS), (
        "map each workflow/envs/*.yaml to the modules its rules run in RULE_GROUPS")


def test_environment_yml_is_pyproject_with_the_test_extras_and_the_project():
    dependencies, test = pyproject()
    env = conda_env(ROOT / "environment.yml")
    assert env["pip"] == dependencies | test
    assert env["editable"] == ["-e ."]


def test_the_lpo_env_lists_pyprojects_dependencies():
    dependencies, _ = pyproject()
    env = conda_env(ROOT / "workflow" / "envs" / "lpo.yaml")
    assert env["pip"] == {k: v for k, v in dependencies.items() if k not in ORCHESTRATOR}


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.name)
def test_rule_envs_agree_with_pyproject(path):
    """Every package a rule env installs is a project dependency with the same version floor, and the Python
    version is environment.yml's."""
    dependencies, _ = pyproject()
    env = conda_env(path)
    assert not env["editable"], f"{path.name}: rules run the checkout via PYTHONPATH, not an installed project"
    for name, spec in env["pip"].items():
        assert name in dependencies, f"{path.name} installs {name}, which pyproject.toml does not depend on"
        assert spec == dependencies[name], (f"{path.name}: {name}{spec} but pyproject.toml has "
                                            f"{name}{dependencies[name]}")
    python = [c for c in conda_env(ROOT / "environment.yml")["conda"] if c.startswith("python")]
    assert [c for c in env["conda"] if c.startswith("python")] == python


# ------------------------------------------------------------------------------------------------- imports

def module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_names(path: Path) -> list[str]:
    """Absolute names of every module `path` imports (at any depth of the file), including `from a import b`'s
    a.b, which may be a submodule."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
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
    modules = rule_group_modules([ROOT / "lpo" / "scorers" / "clip_score.py"])
    names = {str(p.relative_to(ROOT)) for p in modules}
    assert {"lpo/__init__.py", "lpo/scorers/__init__.py", "lpo/scorers/pickscore.py", "lpo/scorers/common.py",
            "lpo/scorers/hps.py"} <= names
    imports = third_party_imports(modules)
    assert {"torch", "torchvision", "transformers", "open_clip", "PIL", "numpy"} <= set(imports)
    assert "diffusers" not in imports


@pytest.mark.parametrize("env_file", sorted(RULE_GROUPS))
def test_rule_group_envs_name_their_imports(env_file):
    imports = third_party_imports(rule_group_modules(RULE_GROUPS[env_file]()))
    unknown = {name: where[:3] for name, where in imports.items() if name not in DISTRIBUTIONS}
    assert not unknown, f"imports with no distribution in tests/test_envs.py DISTRIBUTIONS: {unknown}"
    installed = conda_env(ROOT / "workflow" / "envs" / env_file)["pip"]
    missing = {DISTRIBUTIONS[name]: where[:3] for name, where in imports.items()
               if normalise(DISTRIBUTIONS[name]) not in installed}
    assert not missing, f"workflow/envs/{env_file} lacks packages its rule group imports: {missing}"
