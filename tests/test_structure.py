"""The package's shape, read from its source with ast (docs/ARCHITECTURE.md): imports only go down the
layers, no import cycle (module level or inside functions), no private name borrowed from another module,
no module over 400 lines. Each check runs on a small hand-made package first, so that a check that could
never fail would fail here."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "attnprobe"
MAX_LINES = 400
# layer of each top-level part of the package: a module may import its own part or a lower layer
LAYERS = {"errors": 0, "method": 1, "models": 1, "settings": 2, "io": 3, "training": 4, "stages": 5, "api": 6,
          "app": 7, "cli": 8, "__init__": 8}


def modules(root: Path) -> dict[str, Path]:
    """{dotted name below the package: file}: 'io.atomic', 'api', 'settings' (a package's __init__)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, str, int]]:
    """(imported module, imported name or '', line) of every import of the package in `path`, at any depth.
    `from . import x` where x is a module counts as importing module x."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    if name == "__init__":
        here = []
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if not (node.module or "").startswith("attnprobe"):
                    continue
                base = node.module.split(".")[1:]
            else:
                base = here[:len(here) - node.level + 1] + (node.module.split(".") if node.module else [])
            target = ".".join(base)
            for alias in node.names:
                sub = ".".join([*base, alias.name])
                if sub in known:
                    found.append((sub, "", node.lineno))
                else:
                    found.append((target or "__init__", alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("attnprobe."):
                    found.append((alias.name.split(".", 1)[1], "", node.lineno))
    return found


def graph(root: Path) -> tuple[dict[str, set[str]], list[str]]:
    """(module -> modules it imports, problems: private names borrowed, long modules)."""
    mods = modules(root)
    edges, problems = {}, []
    for name, path in mods.items():
        edges[name] = set()
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            problems.append(f"{name}: {lines} lines (at most {MAX_LINES})")
        for target, imported, line in imports(name, path, set(mods)):
            if target not in mods and target != "__init__":
                problems.append(f"{name}:{line} imports {target}, which is not a module of the package")
                continue
            if target != name:
                edges[name].add(target)
            if imported.startswith("_") and not imported.startswith("__"):
                problems.append(f"{name}:{line} imports the private name {imported} from {target}")
    return edges, problems


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected part with more than one module (Tarjan), as a sorted list."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                found.append(sorted(part))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def upward(edges: dict[str, set[str]]) -> list[str]:
    """Imports of a higher layer, or of another part of the same layer."""
    bad = []
    for source, targets in edges.items():
        top = source.split(".")[0]
        for target in targets:
            other = target.split(".")[0]
            if top == other:
                continue
            if LAYERS[other] >= LAYERS[top]:
                bad.append(f"{source} imports {target} (layer {LAYERS[other]} >= {LAYERS[top]})")
    return bad


def test_checks_catch_a_bad_package(tmp_path):
    """A made-up package with a cycle through a function-level import, a private import, an upward import
    and a long module: each is found."""
    pkg = tmp_path / "attnprobe"
    (pkg / "io").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "io" / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("class AttnprobeError(Exception):\n    pass\n")
    (pkg / "io" / "a.py").write_text("from .b import helper\n")
    (pkg / "io" / "b.py").write_text("def helper():\n    from .a import x\n\n\ndef _hidden():\n    pass\n")
    (pkg / "io" / "c.py").write_text("from .b import _hidden\nfrom ..api import run\n" + "x = 1\n" * MAX_LINES)
    (pkg / "api.py").write_text("def run():\n    pass\n")
    edges, problems = graph(pkg)
    assert cycles(edges) == [["io.a", "io.b"]]
    assert any("private name _hidden" in p for p in problems)
    assert any(p.startswith("io.c: 402 lines") for p in problems)
    assert upward(edges) == ["io.c imports api (layer 6 >= 3)"]


@pytest.fixture(scope="module")
def package():
    return graph(PACKAGE)


def test_no_import_cycle(package):
    assert cycles(package[0]) == []


def test_imports_only_go_down(package):
    assert upward(package[0]) == []


def test_no_private_names_borrowed_and_no_long_module(package):
    assert package[1] == []


def test_every_part_has_a_layer():
    assert {name.split(".")[0] for name in modules(PACKAGE)} <= set(LAYERS)
