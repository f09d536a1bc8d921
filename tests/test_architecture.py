"""The import graph reads as the data flow: no circle, no private name taken across modules, and no stage
importing a later one. Function-level imports count as much as module-level ones."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: stage packages in data-flow order; a module may import its own stage and earlier ones only
STAGES = ("util", "trial", "data", "face", "lesions", "render", "run", "graders", "grade", "analyze", "view", "cli",
          "api")
#: ranks: ``data`` (readers of outside data sets) sits beside ``trial``; ``api`` (the scripting facade, one module)
#: beside ``cli``, both thin layers over the stages
RANK = {"util": 0, "trial": 1, "data": 1, "face": 2, "lesions": 3, "render": 4, "run": 5, "graders": 6,
        "grade": 7, "analyze": 8, "view": 9, "cli": 10, "api": 10}


def project_modules() -> dict[str, Path]:
    """Every module of the installed package, named as it imports (``graders/`` installs as
    ``synthtrial.graders``)."""
    found = {}
    for top, package in ((ROOT / "synthtrial", "synthtrial"), (ROOT / "graders", "synthtrial.graders")):
        for path in sorted(top.rglob("*.py")):
            if path.relative_to(ROOT).parts[:2] == ("synthtrial", "graders"):
                continue  # a development link to graders/ (worktrees), not a second copy
            parts = path.relative_to(top).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def script_files() -> list[Path]:
    return sorted([*(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")])


def imports_of(path: Path, name: str, modules: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """``(module, imported name or None, line)`` for every project import in ``path``, at any depth."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "synthtrial"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if base.split(".")[0] != "synthtrial":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, None, node.lineno) if sub in modules else (base, alias.name, node.lineno))
    return found


def module_aliases(path: Path, modules: dict[str, Path]) -> dict[str, str]:
    """Local names bound to project modules (``import a.b as m``, ``from a import b``)."""
    aliases = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in modules and a.asname:
                    aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "synthtrial":
            for a in node.names:
                if f"{node.module}.{a.name}" in modules:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    return aliases


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else None


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def private_uses(path: Path, own: str | None, modules: dict[str, Path]) -> list[str]:
    """``_name`` taken from another project module, by import or by attribute of a module alias."""
    bad = []
    for module, imported, line in imports_of(path, own or "tests.x", modules):
        if imported and imported.startswith("_") and not imported.startswith("__") and module != own:
            bad.append(f"{shown(path)}:{line}: imports {module}.{imported}")
    aliases = module_aliases(path, modules)
    for node in ast.walk(ast.parse(path.read_text())):
        named = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        for module in named:  # a private module of any package (``typer._click``)
            if any(part.startswith("_") and not part.startswith("__") for part in module.split(".")):
                bad.append(f"{shown(path)}:{node.lineno}: imports the private module {module}")
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            bad.append(f"{shown(path)}:{node.lineno}: uses {aliases[node.value.id]}.{node.attr}")
    return bad


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        ancestors = {".".join(name.split(".")[:k]) for k in range(1, name.count(".") + 1)}
        for module, _, _ in imports_of(path, name, modules):
            # importing a.b.c runs a/__init__ and a.b/__init__ first; a module's own ancestors are already
            # being initialised when it runs (a package gathering its submodules), so only an explicit
            # import of an ancestor counts as an edge to it
            parts = module.split(".")
            implicit = {".".join(parts[:k]) for k in range(1, len(parts))} - ancestors
            targets |= ({module} | implicit) & modules.keys()
        targets.discard(name)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_circle_in_the_import_graph():
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_private_name_across_modules():
    modules = project_modules()
    bad = []
    for name, path in modules.items():
        bad += private_uses(path, name, modules)
    for path in script_files():
        bad += private_uses(path, None, modules)
    assert bad == []


def test_private_check_sees_imports_and_attributes(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from synthtrial.util import errors\nfrom synthtrial.util.errors import _x, __all__\n"
                     "errors._hidden\nerrors.one_line\nfrom typer._click import exceptions\n")
    found = private_uses(probe, None, project_modules())
    assert len(found) == 3 and "errors._x" in found[0]
    assert "errors._hidden" in found[2] and "typer._click" in found[1]


def test_every_package_is_a_known_stage():
    packages = {stage_of(m) for m in project_modules()} - {None}
    assert packages == set(STAGES)


@pytest.mark.parametrize("module", sorted(project_modules()))
def test_no_stage_imports_a_later_stage(module):
    modules = project_modules()
    own = stage_of(module)
    if own is None:  # synthtrial/__init__ (the door to the api facade), __main__ and the leaf version module
        rank = RANK["api"] if module == "synthtrial" else RANK["cli"]
    else:
        rank = RANK[own]
    later = [f"{m} (line {line})" for m, _, line in imports_of(modules[module], module, modules)
             if stage_of(m) and RANK[stage_of(m)] > rank]
    assert later == []


def test_stage_packages_say_what_comes_in_and_goes_out():
    for stage in STAGES:
        init = (ROOT / "graders" if stage == "graders" else ROOT / "synthtrial" / stage) / "__init__.py"
        if not init.exists():  # a stage of one module (api)
            init = ROOT / "synthtrial" / f"{stage}.py"
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "In:" in doc and "Out:" in doc, init
