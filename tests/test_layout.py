"""The package reads like the DAG: one subpackage per stage, in the DAG's order, and a stage imports only the shared
modules, its own stage and the stages before it. Read statically (ast) from every import in lpo/, the ones inside
functions too: an import that runs against the order or closes a circle is wrong wherever it sits."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lpo"
# The DAG's stages in order (workflow/rules/<stage>.smk); sd, the paper's worlds, drives every stage before it.
STAGES = ("world", "reward", "optimize", "evaluate", "timing", "claims", "sd")
# They gather every stage: the CLI collects the commands, checks the config sections the Snakefile validates.
COLLECTORS = {"lpo.cli", "lpo.checks", "lpo.__main__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> set[str]:
    """The first-party modules `name` imports; `from a import b` counts as a.b when b is a module."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports(name) for name in MODULES}


def stage_of(name: str) -> str | None:
    """The stage subpackage a module belongs to; None for the shared modules at the top of lpo/."""
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in STAGES) else None


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def against_the_order(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for name, targets in sorted(graph.items()):
        if name in COLLECTORS:
            continue
        here = stage_of(name)
        for target in sorted(targets):
            there = stage_of(target)
            where = f"{MODULES[name].relative_to(ROOT)} imports {target}"
            if target in COLLECTORS:
                wrong.append(f"{where}, which collects every stage")
            elif there is not None and here is None:
                wrong.append(f"{where}: a shared module imports the {there} stage")
            elif there is not None and STAGES.index(there) > STAGES.index(here):
                wrong.append(f"{where}: the {there} stage comes after the {here} stage")
    return wrong


def test_every_stage_of_the_dag_has_its_subpackage_and_rule_file():
    rules = {p.stem for p in (ROOT / "workflow" / "rules").glob("*.smk")} - {"common"}
    assert rules == set(STAGES)
    assert all((PACKAGE / stage / "__init__.py").is_file() for stage in STAGES)
    assert all((PACKAGE / stage / "cli.py").is_file() for stage in STAGES), "each stage registers its commands"


def test_no_import_circle():
    found = circles(GRAPH)
    assert not found, "import circles: " + "; ".join(" <-> ".join(str(MODULES[m].relative_to(ROOT)) for m in c)
                                                     for c in found)


def test_every_import_follows_the_dag_order():
    wrong = against_the_order(GRAPH)
    assert not wrong, "\n".join(wrong)


def test_only_the_collecting_cli_imports_the_stages_registrations():
    for name, targets in GRAPH.items():
        for target in targets:
            if target.endswith(".cli") and target != "lpo.cli":
                assert name == "lpo.cli", f"{MODULES[name].relative_to(ROOT)} imports {target}"


@pytest.mark.parametrize("graph, expected", [
    ({"lpo.a": {"lpo.b"}, "lpo.b": {"lpo.a"}, "lpo.c": set()}, [["lpo.a", "lpo.b"]]),
    ({"lpo.a": {"lpo.b"}, "lpo.b": {"lpo.c"}, "lpo.c": {"lpo.a"}}, [["lpo.a", "lpo.b", "lpo.c"]]),
    ({"lpo.a": {"lpo.b"}, "lpo.b": set()}, []),
])
def test_circles_are_found(graph, expected):
    assert circles(graph) == expected


def test_an_import_against_the_order_is_named(monkeypatch):
    monkeypatch.setitem(MODULES, "lpo.reward.x", PACKAGE / "reward" / "x.py")
    monkeypatch.setitem(MODULES, "lpo.io", PACKAGE / "io.py")
    wrong = against_the_order({"lpo.reward.x": {"lpo.sd.cli", "lpo.world.judge"}, "lpo.io": {"lpo.reward.x"},
                               "lpo.cli": {"lpo.sd.cli"}})
    assert wrong == ["lpo/io.py imports lpo.reward.x: a shared module imports the reward stage",
                     "lpo/reward/x.py imports lpo.sd.cli: the sd stage comes after the reward stage"]
