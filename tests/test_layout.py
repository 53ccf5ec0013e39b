"""Tests of the project's layout: every name a script under experiments/ or teacher/ takes from the
library exists, and the library's imports flow one way (no cycles, nothing from the scripts).
Read with ast: no script is run."""
import ast
import glob
import importlib
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py")))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py"))
                 + glob.glob(os.path.join(ROOT, "teacher", "*.py")))


def tree(path):
    with open(path) as f:
        return ast.parse(f.read(), path)


def used_names(path) -> list:
    """(module, name) for every `from module import name` and every `module.name` of an
    `import module`, for the library's modules and the teacher package."""
    t = tree(path)
    ours = set(LIBRARY) | {"teacher.grounding", "teacher.train"}
    aliases = {}
    used = []
    for node in ast.walk(t):
        if isinstance(node, ast.ImportFrom) and node.module in ours:
            used += [(node.module, a.name) for a in node.names]
        if isinstance(node, ast.ImportFrom) and node.module == "teacher":        # from teacher import grounding
            aliases.update({a.asname or a.name: f"teacher.{a.name}" for a in node.names})
        if isinstance(node, ast.Import):
            aliases.update({a.asname or a.name: a.name for a in node.names if a.name in ours})
    for node in ast.walk(t):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            used.append((aliases[node.value.id], node.attr))
    return used


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_scripts_use_only_names_the_library_has(path):
    used = used_names(path)
    missing = [f"{m}.{n}" for m, n in used if not hasattr(importlib.import_module(m), n)]
    assert not missing, f"{os.path.relpath(path, ROOT)} uses names that do not exist: {missing}"
    assert not [m for m, n in used if n == "main"], "a script imports another script's main"


def library_imports() -> dict:
    """{library module: the library modules and script packages it imports}."""
    graph = {}
    for m in LIBRARY:
        names = set()
        for node in ast.walk(tree(os.path.join(ROOT, m + ".py"))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        graph[m] = names & (set(LIBRARY) | {"teacher", "tests", "experiments"})
    return graph


def test_library_imports_flow_one_way():
    graph = library_imports()
    assert not any(graph[m] & {"teacher", "tests", "experiments"} for m in graph)
    order = []                                             # a topological order exists: no cycle
    todo = dict(graph)
    while todo:
        ready = [m for m, deps in todo.items() if deps <= set(order)]
        assert ready, f"import cycle among {sorted(todo)}"
        order += sorted(ready)
        for m in ready:
            del todo[m]
    assert "distill" not in graph["evaluate"] and "evaluate" in graph["distill"]
    assert graph["seed"] <= {"model"} and graph["ssd"] == set()
