"""core/ is layered: its packages stand in the pipeline's order and none imports, even lazily inside a
function, a package above it; and no module imports a module that imports it back.

A cycle or an upward arrow hidden behind a function-level import still couples the two (neither can be read,
moved or tested alone), so the graph here counts every `import` and `from ... import` of `glm_cli.core.*`,
wherever it appears in the file. `commands/` is checked for the one direction the house style asks: it may
import core, core never imports commands.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "core"
PACKAGE = "glm_cli.core"


def module_name(path: Path) -> str:
    parts = [*path.relative_to(CORE).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGE, *parts])


def imported_modules(tree: ast.AST, known: set[str]) -> set[str]:
    """Every glm_cli.* module a file imports; `from pkg import mod` counts as importing `pkg.mod`."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
    return {name for name in found if name.startswith("glm_cli.")}


def core_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in CORE.rglob("*.py")}
    known = set(files)
    return {name: imported_modules(ast.parse(path.read_text(), str(path)), known) - {name}
            for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None; depth-first search, iterative so deep graphs cannot overflow."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root] & graph.keys()))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt] & graph.keys())))
    return None


def test_core_has_no_import_cycle():
    cycle = find_cycle(core_graph())
    assert cycle is None, "import cycle in core/: " + " -> ".join(c.removeprefix(PACKAGE + ".") for c in cycle)


# The package order, lowest floor first. A package may import its own modules and any package on a lower
# floor, never one on its own floor or above. The floors follow the pipeline: text (io, then the data
# stages) -> the model and its checkpoint files -> what is built on a checkpoint (quantized formats,
# training) -> generation -> fine-tuning and alignment (they train, and PPO samples with generate) -> the
# loader that dispatches among plain, quantized and adapter checkpoints -> evaluation -> the server.
# The modules directly in core/ (errors, console, allocator, optional, precision, steps) are the ground floor.
FLOORS: list[set[str]] = [
    {"base"},
    {"io"},
    {"clean", "dedup", "tokens"},
    {"model"},
    {"checkpoint"},
    {"quant", "train"},
    {"infer"},
    {"tune"},
    {"load"},
    {"eval"},
    {"serve"},
]
FLOOR = {package: level for level, packages in enumerate(FLOORS) for package in packages}


def package_of(module: str) -> str:
    """`glm_cli.core.tune.peft` -> "tune"; a module directly in core/ (`glm_cli.core.errors`) -> "base"."""
    parts = module.removeprefix(PACKAGE + ".").split(".")
    path = CORE.joinpath(*parts)
    return parts[0] if (CORE / parts[0]).is_dir() and path != CORE else "base"


def package_graph(graph: dict[str, set[str]]) -> dict[str, dict[str, list[str]]]:
    """package -> imported package -> the module-level imports that make the arrow ("a.b -> c.d")."""
    arrows: dict[str, dict[str, list[str]]] = {}
    for module, deps in graph.items():
        for dep in deps:
            if not dep.startswith(PACKAGE + ".") or package_of(dep) == package_of(module):
                continue
            arrows.setdefault(package_of(module), {}).setdefault(package_of(dep), []).append(
                f"{module.removeprefix(PACKAGE + '.')} -> {dep.removeprefix(PACKAGE + '.')}")
    return arrows


def upward_arrows(arrows: dict[str, dict[str, list[str]]], floor: dict[str, int]) -> list[str]:
    return sorted(f"{src} -> {dst} ({', '.join(sorted(why))})"
                  for src, targets in arrows.items() for dst, why in targets.items() if floor[dst] >= floor[src])


def test_every_core_package_has_a_floor():
    packages = {package_of(m) for m in core_graph()}
    assert packages == set(FLOOR), f"give these packages a floor in FLOORS: {sorted(packages ^ set(FLOOR))}"


def test_no_package_imports_one_above_it():
    upward = upward_arrows(package_graph(core_graph()), FLOOR)
    assert not upward, "imports from a lower package up (or across a floor):\n" + "\n".join(upward)


def test_upward_arrow_inside_a_function_is_seen():
    graph = {"glm_cli.core.model.packed_linear": {"glm_cli.core.quant.native"}, "glm_cli.core.quant.native": set()}
    assert upward_arrows(package_graph(graph), FLOOR) == [
        "model -> quant (model.packed_linear -> quant.native)"]
    source = "def prepare(m):\n    from glm_cli.core.quant.native import NativeDecoder\n"
    assert imported_modules(ast.parse(source), {"glm_cli.core.quant.native"}) == {"glm_cli.core.quant.native"}


def test_core_never_imports_commands_or_the_app():
    upward = {name: sorted(d for d in deps if d.startswith(("glm_cli.commands", "glm_cli.app")))
              for name, deps in core_graph().items()}
    upward = {k: v for k, v in upward.items() if v}
    assert not upward, f"core/ modules import the command layer: {upward}"


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"a"}}, ["a", "a"]),
    ({"x": {"b"}, "b": {"c"}, "c": {"b"}}, ["b", "c", "b"]),
])
def test_find_cycle_reports_the_loop(graph, expected):
    assert find_cycle(graph) == expected


def test_function_level_imports_count():
    source = "def f():\n    from glm_cli.core.quant import weight_only\n    import glm_cli.core.io.atomic\n"
    known = {"glm_cli.core.quant.weight_only", "glm_cli.core.io.atomic"}
    assert imported_modules(ast.parse(source), known) == known


# Scripts outside the package (the demo's stages, benchmarks, docs) import glm_cli too, and nothing else
# runs them in the test suite: a module moved in core/ once broke the demo's last stage unseen.
IMPORT_LINE = re.compile(r"from (glm_cli[\w.]*) import ([\w, ]+)")


def outside_imports() -> list[tuple[str, str, str]]:
    """(file:line, module, name) for every `from glm_cli... import name` outside the package sources."""
    files = [*ROOT.glob("bench/*.py"), *ROOT.glob("examples/**/*.sh"), *ROOT.glob("examples/**/*.py"),
             *ROOT.glob("docs/*.md"), ROOT / "README.md", ROOT / "Makefile"]
    found = []
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for match in IMPORT_LINE.finditer(line):
                for name in match.group(2).split(","):
                    if name.strip():
                        found.append((f"{path.relative_to(ROOT)}:{number}", match.group(1), name.strip()))
    return found


def test_every_glm_import_in_scripts_and_docs_resolves():
    missing = []
    for where, module, name in outside_imports():
        try:
            imported = importlib.import_module(module)
        except ImportError as e:
            missing.append(f"{where}: {module} ({e})")
            continue
        submodule = hasattr(imported, "__path__") and importlib.util.find_spec(f"{module}.{name}") is not None
        if not hasattr(imported, name) and not submodule:
            missing.append(f"{where}: {module} has no {name}")
    assert len(outside_imports()) > 20  # the scan sees the benchmarks' imports
    assert not missing, "\n".join(missing)


if __name__ == "__main__":  # print the package-level graph: python tests/cli/test_import_graph.py
    for src, targets in sorted(package_graph(core_graph()).items(), key=lambda kv: FLOOR[kv[0]]):
        print(f"{src:>10} -> {', '.join(sorted(targets, key=lambda p: (-FLOOR[p], p)))}")
