"""The floors hold (docs/layers.md): no import circle inside ``harness/``, no module uses another's
private names, the study schema (``harness.config``) stands on the ground floor only, the keys
(``harness.keys``) on the study schema, for its type only, and the store's schema
(``harness.store``) on nothing at all.

The import graph is read from the source with :mod:`ast`, so it sees every import a module can
run: at module level, inside functions (the "lazy" imports that hide a circle from Python but not
from the design) and under ``if TYPE_CHECKING:`` (a type-only import is still a module knowing
about one above it). Nodes are modules (``harness.scheduler`` is the package's ``__init__``);
an edge A -> B means A names B in an import:

- ``import harness.x.y`` and ``from harness.x.y import name`` -> ``harness.x.y``;
  ``from harness.x import y`` -> ``harness.x.y`` when ``y`` is a submodule, else ``harness.x``;
  relative imports are resolved the same way.
- Importing ``harness.pkg.sub`` also runs ``harness/pkg/__init__.py``, but that implied edge to the
  package is left out: a package's ``__init__`` that re-exports its own submodules (the face of
  ``harness.scheduler``) would otherwise be a circle with each of them. A submodule that imports
  its package *by name* (``from harness.scheduler import X`` inside ``harness/scheduler/``) is an
  edge like any other, and a circle with a face that imports it.

``python tests/test_layers.py`` prints the counts (modules, imports, function-level imports,
circles) and every finding, for quoting before and after a change.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "harness"

#: What ``harness.config`` (the study schema) may import, directly or through what it imports, at
#: any level: the ground floor of architecture.md ("config.py: schema only, imports nothing above
#: it"). Errors and the registry are the floor of everything; the rest are the schemas of parts of
#: a study file that other modules read without a study, each pydantic or plain data only: the
#: distributions (methods declare their search spaces with them), the ``search:`` block (the
#: tuner), a routing rule (methods parse theirs), the data set catalogue (names the loaders
#: register, archives the downloader fetches). Nothing here imports torch or numpy.
CONFIG_FLOOR = frozenset({
    "harness",  # the package's __init__ (a docstring and __version__)
    "harness.errors",
    "harness.registry",
    "harness.spaces",
    "harness.search_schema",
    "harness.routing_schema",
    "harness.data",  # an empty __init__
    "harness.data.catalog",
})

#: What ``harness.keys`` (``stable_hash``, ``RESULTS_VERSION``, ``trial_key``) may import, at any
#: depth: the study schema (``trial_key`` takes a ``StudyConfig``; named under ``TYPE_CHECKING``
#: only, so importing the keys runs no harness module) and what that stands on.
KEYS_FLOOR = CONFIG_FLOOR | {"harness.config"}


@dataclass(frozen=True)
class Import:
    """One import statement of a harness module that names harness modules."""

    source: str  # the importing module
    targets: tuple[str, ...]  # the harness modules it names (edges)
    names: tuple[str, ...]  # ``from ... import names`` (empty for ``import x``)
    module: str  # the module the names are taken from (``from module import names``)
    line: int
    in_function: bool
    type_checking: bool

    def where(self) -> str:
        return f"{_path_of(self.source)}:{self.line}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@functools.cache
def harness_modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {_module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def _path_of(module: str) -> str:
    return str(harness_modules()[module].relative_to(ROOT))


def _is_package(module: str, modules: dict[str, Path]) -> bool:
    return modules[module].name == "__init__.py"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, in_function: bool = False, type_checking: bool = False):
    """(import node, in a function, under ``if TYPE_CHECKING``) for every import below ``node``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, in_function, type_checking
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _walk(child, True, type_checking)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), in_function, True)
            for stmt in child.orelse:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), in_function, type_checking)
        else:
            yield from _walk(child, in_function, type_checking)


def _known(dotted: str, modules: dict[str, Path]) -> str:
    """The longest prefix of ``dotted`` that is a harness module."""
    parts = dotted.split(".")
    while parts and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts)


def imports_of(module: str, modules: dict[str, Path] | None = None) -> list[Import]:
    """The imports of ``module`` that name harness modules, resolved to modules."""
    modules = modules if modules is not None else harness_modules()
    tree = ast.parse(modules[module].read_text(), str(modules[module]))
    package = module if _is_package(module, modules) else module.rpartition(".")[0]
    out = []
    for node, in_function, type_checking in _walk(tree):
        if isinstance(node, ast.Import):
            targets = [_known(a.name, modules) for a in node.names if a.name.split(".")[0] == PACKAGE]
            names: tuple[str, ...] = ()
            base = ""
        else:
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != PACKAGE:
                continue
            names = tuple(a.name for a in node.names)
            targets = [f"{base}.{n}" if f"{base}.{n}" in modules else _known(base, modules) for n in names]
        targets = [t for t in dict.fromkeys(targets) if t]
        if targets:
            out.append(Import(module, tuple(targets), names, base, node.lineno, in_function, type_checking))
    return out


def import_graph() -> tuple[dict[str, set[str]], list[Import]]:
    """(module -> the harness modules it imports, every import)."""
    modules = harness_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    every: list[Import] = []
    for m in modules:
        for imp in imports_of(m, modules):
            every.append(imp)
            graph[m].update(t for t in imp.targets if t != m)
    return graph, every


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _cycle_through(start: str, component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest path start -> ... -> start inside the component (to name the circle)."""
    members = set(component)
    parent: dict[str, str] = {start: start}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    return [start]


def describe_circle(component: list[str], graph: dict[str, set[str]], every: list[Import]) -> str:
    """The circle's modules, one shortest loop through the first, and every import inside it."""
    members = set(component)
    loop = " -> ".join(_cycle_through(component[0], component, graph))
    inside = []
    for imp in every:
        for t in imp.targets:
            if imp.source in members and t in members and t != imp.source:
                kind = "in a function" if imp.in_function else "TYPE_CHECKING" if imp.type_checking else "module level"
                inside.append(f"{imp.source} -> {t} ({imp.where()}, {kind})")
    return f"{len(component)} modules, e.g. {loop}; imports inside: " + "; ".join(inside)


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def private_uses() -> list[str]:
    """Imports of a private module (``harness.scheduler._slots``: its package's own) from outside
    its package, of a private name (``_x``: its module's own) from another module, and
    ``module._x`` reads through an imported harness module."""
    modules = harness_modules()
    found = []
    for m, path in modules.items():
        imps = imports_of(m, modules)
        for imp in imps:
            for t in imp.targets:
                parts = t.split(".")
                for i, part in enumerate(parts):
                    if _private(part) and not (m == ".".join(parts[:i]) or m.startswith(".".join(parts[:i]) + ".")):
                        found.append(f"{imp.where()}: imports the private module {t}")
                        break
            for name in imp.names:
                if _private(name) and f"{imp.module}.{name}" not in modules and imp.module != m:
                    found.append(f"{imp.where()}: imports the private name {name} of {imp.module}")
        # ``import harness.train as train; train._gpu_setup`` / ``from harness import train``
        aliases: dict[str, str] = {}
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == PACKAGE and a.asname:
                        aliases[a.asname] = a.name
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
                for a in node.names:
                    if f"{node.module}.{a.name}" in modules:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not _private(node.attr):
                continue
            dotted, value = [node.attr], node.value
            while isinstance(value, ast.Attribute):
                dotted.append(value.attr)
                value = value.value
            if not isinstance(value, ast.Name):
                continue
            head = aliases.get(value.id, value.id if value.id == PACKAGE else None)
            if head is None:
                continue
            owner = ".".join([head, *reversed(dotted[1:])])
            if owner in modules and owner != m:
                found.append(f"{_path_of(m)}:{node.lineno}: reads the private name {node.attr} of {owner}")
    return found


def config_reaches(start: str = "harness.config") -> dict[str, list[str]]:
    """Every harness module that importing ``start`` (``harness.config``) and running all its
    functions can import, with the chain that gets there."""
    graph, _ = import_graph()
    chains = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w not in chains:
                    chains[w] = [*chains[v], w]
                    nxt.append(w)
        frontier = nxt
    return chains


def counts() -> dict[str, object]:
    """The numbers to quote: modules, imports between harness modules (statements), how many of
    them sit inside functions or under TYPE_CHECKING, and the circles."""
    graph, every = import_graph()
    return {
        "modules": len(graph),
        "imports": len(every),
        "function-level imports": sum(i.in_function for i in every),
        "TYPE_CHECKING imports": sum(i.type_checking for i in every),
        "edges": sum(len(v) for v in graph.values()),
        "circles": [describe_circle(c, graph, every) for c in circles(graph)],
    }


def test_no_import_circle_inside_harness():
    graph, every = import_graph()
    found = [describe_circle(c, graph, every) for c in circles(graph)]
    assert not found, "import circles inside harness/:\n" + "\n".join(found)


def test_no_module_uses_another_modules_private_names():
    found = private_uses()
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_the_study_schema_imports_only_the_ground_floor():
    above = {m: chain for m, chain in config_reaches().items() if m != "harness.config" and m not in CONFIG_FLOOR}
    assert not above, "harness.config reaches above the ground floor:\n" + "\n".join(
        " -> ".join(chain) for chain in above.values())


def test_the_ground_floor_is_real_modules():
    assert CONFIG_FLOOR <= set(harness_modules()), CONFIG_FLOOR - set(harness_modules())


def test_the_store_schema_imports_nothing():
    """``harness.store`` (the names of the MLflow store) imports no module at all, harness or not:
    the report, the status and the results API read the store by its names without torch, and
    the schema itself without mlflow."""
    tree = ast.parse(harness_modules()["harness.store"].read_text())
    found = [f"harness/store.py:{n.lineno}" for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
             and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]
    assert not found, f"harness.store imports: {found}"


def test_the_store_records_stand_on_the_store_schema_only():
    """``harness.records`` (typed trial and teacher run tags) reads and writes the store by
    :mod:`harness.store`'s names and imports no other harness module: no torch, no mlflow."""
    reached = set(config_reaches("harness.records")) - {"harness.records"}
    assert reached <= {"harness", "harness.store"}, f"harness.records reaches {sorted(reached)}"


def test_the_keys_stand_on_the_study_schema_for_its_type_only():
    above = {m: chain for m, chain in config_reaches("harness.keys").items() if m != "harness.keys" and m not in KEYS_FLOOR}
    assert not above, "harness.keys reaches above the study schema:\n" + "\n".join(
        " -> ".join(chain) for chain in above.values())
    run_time = [i.where() for i in imports_of("harness.keys") if not i.type_checking]
    assert not run_time, f"harness.keys imports harness modules at run time: {run_time}"


def test_the_built_in_method_is_registered_like_the_baselines():
    """``harness.methods.cka`` comes in through the ``harness.methods`` entry points, as the
    baselines do (``discover()`` imports no method): an install older than pyproject.toml's list
    lacks it, and must be redone (``pip install -e .``)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["harness.methods"]
    installed = {ep.name: ep.value for ep in entry_points(group="harness.methods")}
    assert declared["cka"] == "harness.methods.cka"
    stale = {k: v for k, v in declared.items() if installed.get(k) != v}
    assert not stale, f"entry points {stale} are not installed: reinstall (pip install -e .)"
    assert not any("harness.methods.cka" in i.targets for i in imports_of("harness.methods.base"))


def test_the_graph_sees_every_kind_of_import():
    """The reader itself: relative, lazy, TYPE_CHECKING and submodule-by-name imports resolve."""
    imps = {(i.source, t): i for i in import_graph()[1] for t in i.targets}
    face = imps[("harness.scheduler", "harness.scheduler._slots")]  # a package's own private module
    assert not face.in_function
    assert all(("harness.cli", m) in imps for m in ("harness.config", "harness.errors"))
    assert any(i.in_function for i in imps.values()) and any(i.type_checking for i in imps.values())
    toy = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(toy) == [["a", "b", "c"]]


if __name__ == "__main__":
    c = counts()
    for k, v in c.items():
        if k != "circles":
            print(f"{k}: {v}")
    print(f"circles: {len(c['circles'])}")  # type: ignore[arg-type]
    for line in c["circles"]:  # type: ignore[union-attr]
        print("  " + line)
    print("private uses:")
    for line in private_uses():
        print("  " + line)
    print("config reaches:")
    for m, chain in config_reaches().items():
        if m != "harness.config":
            print(f"  {'ok   ' if m in CONFIG_FLOOR else 'ABOVE'} {' -> '.join(chain)}")
