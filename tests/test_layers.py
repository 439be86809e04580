"""The import graph of the four packages: no cycle, no arrow against the layers.

The graph is built from the source with ``ast``; nothing is imported. Every ``import`` and
``from ... import`` statement is an arrow, wherever it stands: at module level, inside a
function (a lazy import is still a dependency) or under ``if TYPE_CHECKING:``. ``import a.b``
points to ``a.b``; ``from a import b`` points to the module ``a.b`` when there is one, else to
``a``. Arrows to modules outside the four packages are dropped. A package's ``__init__`` is a
module of its own, and importing ``a.b`` is not counted as importing ``a`` (Python runs
``a/__init__`` first, but a package facade that imports its submodules is the usual pattern,
not a cycle).

Layers, bottom to top: ``datasets`` <- ``methods`` <- ``benchmark`` <- ``reports``, with
``benchmark.cli`` (the command line) on top of everything, and ``reports`` reading
``benchmark`` only through the result store. Module and function sizes against the targets of
issue 16 (600 and 80 lines) are reported by an ``xfail`` test whose reason lists them.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The packages, bottom layer first.
PACKAGES = ("datasets", "methods", "benchmark", "reports")
LAYER = {package: rank for rank, package in enumerate(PACKAGES)}
#: Modules allowed to import packages above their own layer: the CLI on top.
UPWARD_ALLOWED = {"benchmark.cli": {"reports"}}
#: The only ``benchmark`` modules that ``reports`` may import.
REPORTS_FROM_BENCHMARK = {"benchmark.store"}
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    """``benchmark/perf/cli.py`` -> ``benchmark.perf.cli``; ``a/b/__init__.py`` -> ``a.b``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def module_files() -> dict[str, Path]:
    """Module name -> source file, for every module of the four packages."""
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "__pycache__" not in path.parts:
                files[module_name(path)] = path
    return files


def _resolve(name: str, known: set[str]) -> str | None:
    """The longest prefix of ``name`` that is a known module (``a.b.func`` -> ``a.b``)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def _from_base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module named by ``from <node.module> import ...`` (relative ones too)."""
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join([*parts, *([node.module] if node.module else [])])


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The known modules that ``module`` imports anywhere in its source."""
    targets: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets |= {_resolve(alias.name, known) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(module, path.name == "__init__.py", node)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.add(submodule if submodule in known else _resolve(base, known))
    return {t for t in targets if t is not None and t != module}


@functools.cache
def import_graph() -> dict[str, frozenset[str]]:
    """Module -> the modules of the four packages it imports."""
    files = module_files()
    known = set(files)
    return {m: frozenset(imports_of(m, path, known)) for m, path in files.items()}


def strongly_connected(graph: dict[str, frozenset[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (the cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layer_violations(graph: dict[str, frozenset[str]]) -> list[str]:
    """Every arrow from a lower layer to a higher one (and reports past the store)."""
    bad = []
    for module, targets in sorted(graph.items()):
        own = module.split(".")[0]
        for target in sorted(targets):
            package = target.split(".")[0]
            upward = LAYER[package] > LAYER[own]
            if upward and package not in UPWARD_ALLOWED.get(module, set()):
                bad.append(f"{module} -> {target} ({own} is below {package})")
            if own == "reports" and package == "benchmark":
                if target not in REPORTS_FROM_BENCHMARK:
                    bad.append(f"{module} -> {target} (reports read benchmark via the store)")
    return bad


def oversized(max_module: int, max_function: int) -> list[str]:
    """Modules over ``max_module`` lines and functions over ``max_function`` lines."""
    found = []
    for module, path in sorted(module_files().items()):
        text = path.read_text()
        if (n := len(text.splitlines())) > max_module:
            found.append(f"{module} ({n} lines)")
        found += [
            f"{module}.{name}() ({lines} lines)"
            for name, lines in function_sizes(text)
            if lines > max_function
        ]
    return found


def function_sizes(source: str) -> list[tuple[str, int]]:
    """``(qualified name, lines from def to its last line)`` of every function in ``source``."""
    sizes = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    sizes.append((name, child.end_lineno - child.lineno + 1))
                walk(child, f"{name}.")
            else:
                walk(child, prefix)

    walk(ast.parse(source), "")
    return sizes


# ---- the graph and the checks themselves ----------------------------------------------------
def test_graph_covers_the_packages_and_sees_every_kind_of_import():
    graph = import_graph()
    assert {m.split(".")[0] for m in graph} == set(PACKAGES)
    assert "benchmark.kernels" in graph["benchmark.evaluate.sweep"]  # from benchmark import kernels
    assert "methods.base" in graph["methods.cam"]  # module level
    assert "reports" in graph["benchmark.cli"]  # inside a function: from reports import ...
    assert "datasets" in graph["benchmark.cli"]  # inside a function: import datasets


def test_graph_builder_on_a_small_package(tmp_path):
    source = (
        "import pkg.b\n"
        "from pkg import c, helper\n"
        "from .c import thing\n"
        "def f():\n"
        "    from pkg.d import x\n"
        "    import numpy\n"
    )
    known = {"pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d"}
    path = tmp_path / "a.py"
    path.write_text(source)
    assert imports_of("pkg.a", path, known) == {"pkg.b", "pkg.c", "pkg", "pkg.d"}


def test_cycle_and_layer_checks_catch_what_they_should():
    graph = {
        "methods.a": frozenset({"methods.b", "benchmark.x"}),
        "methods.b": frozenset({"methods.a"}),
        "benchmark.x": frozenset(),
        "benchmark.cli": frozenset({"reports.r"}),
        "reports.r": frozenset({"benchmark.cache", "benchmark.store"}),
        "benchmark.cache": frozenset(),
        "benchmark.store": frozenset({"benchmark.cache"}),
    }
    assert strongly_connected(graph) == [["methods.a", "methods.b"]]
    assert layer_violations(graph) == [
        "methods.a -> benchmark.x (methods is below benchmark)",
        "reports.r -> benchmark.cache (reports read benchmark via the store)",
    ]


# ---- the rules -----------------------------------------------------------------------------
def test_no_import_cycles():
    graph = import_graph()
    cycles = strongly_connected(graph)
    shown = [", ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) for c in cycles]
    assert not cycles, "import cycles:\n" + "\n".join(shown)


def test_no_arrow_against_the_layers():
    bad = layer_violations(import_graph())
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


# ---- sizes (issue 16's targets): reported, not enforced yet -------------------------------
def test_size_measurement():
    source = "def f():\n    x = 1\n\n    return x\n\n\nclass C:\n    def g(self):\n        pass\n"
    assert function_sizes(source) == [("f", 4), ("C.g", 2)]


_OVERSIZED = oversized(MAX_MODULE_LINES, MAX_FUNCTION_LINES)


@pytest.mark.xfail(
    bool(_OVERSIZED),
    strict=False,
    reason=f"over {MAX_MODULE_LINES}-line modules / {MAX_FUNCTION_LINES}-line functions "
    f"({len(_OVERSIZED)}): " + "; ".join(_OVERSIZED),
)
def test_modules_and_functions_within_size_targets():
    assert not _OVERSIZED, "\n".join(_OVERSIZED)
