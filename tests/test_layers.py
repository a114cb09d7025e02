"""The packages stand the right way up (ISSUE24.md's table): no import runs back up, and no
circle between packages or between the files of one package.

The graph is read with ``ast`` from the installed packages' source (every import: at the top,
inside functions, and under ``TYPE_CHECKING``, since a circle there still ties two files
together). Run as a script to print it: ``python tests/test_layers.py [ROOT]`` (ROOT: a checkout
to read instead of the installed packages, e.g. an older one, to compare).
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from collections import Counter, defaultdict
from pathlib import Path

#: package -> the packages it may import (besides itself); ISSUE24.md's table
ALLOWED: dict[str, set[str]] = {
    "mnistq": set(),
    "model": {"mnistq"},
    "trainer": {"model", "mnistq"},
    "worker": {"model", "mnistq"},
    "producer": {"mnistq"},
    "api": {"mnistq"},
    "report": {"mnistq"},
    "app": {"mnistq", "model", "trainer", "worker", "producer", "api", "report"},
    "testsupport": {"mnistq", "model", "trainer", "worker", "producer", "api", "report", "app"},
}
PACKAGES = tuple(ALLOWED)


def package_dirs(root: Path | None = None) -> dict[str, Path]:
    """Each package's folder: under ``root`` where given (those that exist there), else where
    Python imports it from."""
    if root is not None:
        return {p: root / p for p in PACKAGES if (root / p / "__init__.py").exists()}
    out = {}
    for p in PACKAGES:
        spec = importlib.util.find_spec(p)
        assert spec is not None and spec.submodule_search_locations, f"package {p} is not installed"
        out[p] = Path(next(iter(spec.submodule_search_locations)))
    return out


def _target(module: str, name: str | None, modules: set[str]) -> str:
    """The module an import names: ``from a.b import c`` is the module a.b.c if there is one."""
    if name is not None and f"{module}.{name}" in modules:
        return f"{module}.{name}"
    return module


def imports(dirs: dict[str, Path]) -> dict[str, Counter[str]]:
    """module -> the modules of ours it imports, with how many names it takes from each."""
    files = {
        ".".join((pkg, *f.relative_to(d).with_suffix("").parts)).removesuffix(".__init__"): f
        for pkg, d in dirs.items()
        for f in sorted(d.rglob("*.py"))
    }
    modules = set(files)
    out: dict[str, Counter[str]] = {}
    for mod, path in files.items():
        seen: Counter[str] = Counter()
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    seen[alias.name] += 1
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's own package
                    parts = mod.split(".")[: len(mod.split(".")) - node.level + is_package]
                    base = ".".join([*parts, base] if base else parts)
                for alias in node.names:
                    seen[_target(base, alias.name, modules)] += 1
        out[mod] = Counter({t: n for t, n in seen.items() if t.split(".")[0] in dirs})
    return out


def arrows(graph: dict[str, Counter[str]]) -> Counter[tuple[str, str]]:
    """(package, package) -> names imported across that arrow."""
    out: Counter[tuple[str, str]] = Counter()
    for mod, targets in graph.items():
        for target, n in targets.items():
            a, b = mod.split(".")[0], target.split(".")[0]
            if a != b:
                out[(a, b)] += n
    return out


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected parts of more than one node (or a node importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
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
            if len(part) > 1 or v in edges.get(v, ()):
                found.append(sorted(part))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def package_cycles(graph: dict[str, Counter[str]]) -> list[list[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for a, b in arrows(graph):
        edges[a].add(b)
    return _cycles(edges)


def file_cycles(graph: dict[str, Counter[str]]) -> list[list[str]]:
    """Circles between the files of one package. A package's ``__init__`` importing its own
    modules is no circle: a module of the package importing the package's name is."""
    edges: dict[str, set[str]] = defaultdict(set)
    for mod, targets in graph.items():
        for target in targets:
            if target.split(".")[0] == mod.split(".")[0] and target != mod:
                edges[mod].add(target)
    return _cycles(edges)


def backward(graph: dict[str, Counter[str]]) -> list[str]:
    """Every import that ALLOWED does not allow, as 'module -> module'."""
    return sorted(
        f"{mod} -> {target}"
        for mod, targets in graph.items()
        for target in targets
        if (a := mod.split(".")[0]) != (b := target.split(".")[0]) and b not in ALLOWED[a]
    )


def describe(graph: dict[str, Counter[str]]) -> str:
    lines = [f"{a}->{b} {n}" for (a, b), n in sorted(arrows(graph).items())]
    return "\n".join(lines)


def test_no_import_runs_back_up() -> None:
    graph = imports(package_dirs())
    print(describe(graph))
    assert not backward(graph), "imports not allowed by ISSUE24.md's table:\n" + "\n".join(backward(graph))


def test_no_circle_between_packages() -> None:
    assert package_cycles(imports(package_dirs())) == []


def test_no_circle_between_the_files_of_a_package() -> None:
    assert file_cycles(imports(package_dirs())) == []


def test_the_check_sees_an_arrow_back_up_and_a_circle(tmp_path: Path) -> None:
    """The checks above can fail: a core module importing the API, and two files importing each
    other, are both found."""
    for pkg in ("mnistq", "api"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "mnistq" / "core.py").write_text("from api.client import Client\n")
    (tmp_path / "api" / "client.py").write_text("from api import job\nfrom mnistq import core\n")
    (tmp_path / "api" / "job.py").write_text("def f():\n    from api.client import Client\n")
    graph = imports(package_dirs(tmp_path))
    assert backward(graph) == ["mnistq.core -> api.client"]
    assert package_cycles(graph) == [["api", "mnistq"]]
    assert file_cycles(graph) == [["api.client", "api.job"]]


if __name__ == "__main__":
    g = imports(package_dirs(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
    print(describe(g))
    for what, found in (
        ("back up", backward(g)),
        ("package circles", package_cycles(g)),
        ("file circles", file_cycles(g)),
    ):
        print(f"{what}: {found or 'none'}")
