"""The import layers of the package (docs/ARCHITECTURE.md), checked on the source.

Every module under ``moecompress/`` (and ``cli/`` / ``kernels/``, which install as ``moecompress.cli`` /
``moecompress.kernels``) is parsed with ``ast``; every ``import`` / ``from ... import`` in it, at the top
level or inside a function (a lazy import is still a dependency), gives an edge to the moecompress
module it names. Then:

* a module never imports a module of a HIGHER layer (:data:`LAYERS`, lowest first);
* there is no import cycle, neither between modules nor between the units of the table (subpackages
  and top-level modules, which same-layer imports could still tie into a knot);
* every moecompress module named by an import exists (a lazy import of a moved module fails only
  when its function runs);
* the names families use (config keys, router / shared-gate names, tokenizer files) are listed once,
  in :mod:`moecompress.model.families`: no other module spells two of one list out again.

Two kinds of edges are not counted, by construction of Python's import system:

* importing the bare package ``moecompress`` (``import moecompress`` for ``__version__`` or to make
  sure the quantizer is registered): every ``moecompress.x`` import runs the package ``__init__``
  first anyway, so it adds no dependency; the ``__init__`` itself is a facade (registration + the
  lazily imported public API) outside the layers;
* the implicit import of a parent package's ``__init__`` when a submodule is imported.

Known exceptions are edges that the current code has and should lose; each names why and who fixes
it. The last test fails when one is no longer needed, so the list only shrinks.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOT_PACKAGE = "moecompress"
# Import name -> folder (pyproject's package-dir mapping).
PACKAGE_DIRS = {"moecompress": REPO / "moecompress", "moecompress.cli": REPO / "cli", "moecompress.kernels": REPO / "kernels"}

# Lowest first. A unit is a subpackage (``moecompress.model``) or a top-level module
# (``moecompress.errors``); units on one line form one layer and may import each other.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "validation", "report", "parallel"),  # leaves: user errors, option checks, markdown/figure helpers, torch.distributed plumbing
    ("quant", "algorithms"),  # packing format, grid, GPTQ, bit allocation, native config; tensor math
    ("kernels",),  # dequant-GEMM kernels and torch twins (read quant.format)
    ("model",),  # MoE view, family names, layer-by-layer loading, driver
    ("analysis", "calibration"),  # super experts; calibration sources, EBSS, router statistics
    ("modules",),  # runtime nn.Modules and the HF quantizer that rebuilds them
    ("export",),  # checkpoint writer, plain HF (pruned/merged), compressed-tensors, lint
    ("passes",),  # one module per pass over a layer
    ("evaluate",),  # perplexity of a saved model
    ("api", "jobs", "jobs_experts", "demo"),  # the Python API (jobs*, demo: the legacy api modules)
    ("pipeline",),  # YAML -> the same API calls
    ("cli", "__main__"),  # typer commands: parse, call the API, render; `python -m moecompress` (torchrun -m)
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}

# Edges the code has and should lose: (importer, imported) -> why it is tolerated, who removes it.
# Neither the layer check nor the cycle checks count them. Remove the entry with the import.
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {}
# Modules that still spell out a list of moecompress.model.families: module -> why tolerated.
KNOWN_DUPLICATES: dict[str, str] = {}
# Imports of moecompress modules that no longer exist: (importer, missing module) -> why tolerated.
KNOWN_MISSING: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    where: str  # file:line

    def __str__(self) -> str:
        return f"{self.importer} -> {self.imported} ({self.where})"


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the installed packages (package -> its __init__)."""
    found: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


MISSING = "missing:"  # prefix of an edge's target that names no module of the package


def _imports(module: str, source: str, where: str, known: set[str], is_package: bool = False) -> list[Edge]:
    """The moecompress imports in one module's source (every level of nesting); ``where``: its file."""
    edges = []
    for node in ast.walk(ast.parse(source, filename=where)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package
                base = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                origin = f"{base}.{node.module}" if node.module else base
            else:
                origin = node.module or ""
            # ``from pkg import sub`` names the submodule when there is one, else an attribute of pkg.
            targets = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in known else origin for alias in node.names]
        for target in targets:
            if target != ROOT_PACKAGE and not target.startswith(ROOT_PACKAGE + "."):
                continue
            if target in (module, ROOT_PACKAGE):
                continue
            # A name that is no module is missing (recorded as such: the missing-module test reports it).
            edges.append(Edge(module, target if target in known else f"{MISSING}{target}", f"{where}:{node.lineno}"))
    return edges


def _module_edges(name: str, path: Path, known: set[str]) -> list[Edge]:
    return _imports(name, path.read_text(), str(path.relative_to(REPO)), known, is_package=path.name == "__init__.py")


def unit_of(module: str) -> str | None:
    """``moecompress.model.view`` -> ``model``; the root package itself -> None (outside the layers)."""
    if module == ROOT_PACKAGE:
        return None
    return module.split(".")[1]


def import_graph() -> list[Edge]:
    """Every import edge between modules of the package, plus edges to missing modules (``missing:``)."""
    modules = _modules()
    known = set(modules)
    return [edge for name, path in modules.items() for edge in _module_edges(name, path, known)]


def _present(edges: list[Edge]) -> list[Edge]:
    """Edges between existing modules that are not known exceptions: what the layers and cycles are checked on."""
    return [e for e in edges if not e.imported.startswith(MISSING) and (e.importer, e.imported) not in KNOWN_EXCEPTIONS]


def layer_violations(edges: list[Edge]) -> list[str]:
    problems = []
    for edge in _present(edges):
        src, dst = unit_of(edge.importer), unit_of(edge.imported)
        if src is None:
            continue  # the package facade
        for unit in (src, dst):
            if unit not in RANK:
                problems.append(f"{unit!r} is in no layer of tests/test_architecture.py LAYERS (edge {edge}); add it")
        if src in RANK and dst in RANK and RANK[dst] > RANK[src]:
            problems.append(f"{edge}: layer {src!r} must not import the higher layer {dst!r}")
    return sorted(set(problems))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a node path) per strongly connected component with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    counter = 0

    def visit(root: str) -> None:  # iterative Tarjan: no recursion limit on long chains
        nonlocal counter
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    cycles = []
    for component in components:  # a shortest path back to the start, inside the component
        start = min(component)
        paths = {start: [start]}
        frontier = [start]
        cycle = None
        while frontier and cycle is None:
            nxt = []
            for node in frontier:
                for child in sorted(graph.get(node, ())):
                    if child == start:
                        cycle = paths[node] + [start]
                        break
                    if child in component and child not in paths:
                        paths[child] = paths[node] + [child]
                        nxt.append(child)
                if cycle:
                    break
            frontier = nxt
        cycles.append(cycle)
    return cycles


def cycles_in(edges: list[Edge], by_unit: bool) -> list[str]:
    graph: dict[str, set[str]] = defaultdict(set)
    for edge in _present(edges):
        a, b = edge.importer, edge.imported
        if by_unit:
            a, b = unit_of(a), unit_of(b)
            if a is None or b is None or a == b:
                continue
        graph[a].add(b)
    return [" -> ".join(cycle) for cycle in _cycles(graph)]


@pytest.fixture(scope="module")
def edges() -> list[Edge]:
    return import_graph()


def test_the_scan_sees_the_package(edges):
    modules = _modules()
    for name in ("moecompress.model.view", "moecompress.cli.main", "moecompress.kernels.moe_gemm", "moecompress.modules.packed"):
        assert name in modules
    assert any(e.importer == "moecompress.cli.main" for e in edges)


def test_lower_layers_never_import_higher_ones(edges):
    problems = layer_violations(edges)
    assert not problems, "import layer violations (docs/ARCHITECTURE.md):\n" + "\n".join(problems)


def test_no_import_cycle_between_modules(edges):
    cycles = cycles_in(edges, by_unit=False)
    assert not cycles, "import cycles between modules:\n" + "\n".join(cycles)


def test_no_import_cycle_between_subpackages(edges):
    cycles = cycles_in(edges, by_unit=True)
    assert not cycles, "import cycles between subpackages / top-level modules:\n" + "\n".join(cycles)


def test_every_imported_module_exists(edges):
    missing = sorted(
        str(e) for e in edges if e.imported.startswith(MISSING) and (e.importer, e.imported[len(MISSING):]) not in KNOWN_MISSING
    )
    assert not missing, "imports of moecompress modules that do not exist:\n" + "\n".join(missing)


def _family_lists() -> dict[str, set[str]]:
    from moecompress.model import families

    return {
        name: set(value)
        for name, value in vars(families).items()
        if name.isupper() and isinstance(value, tuple) and value and all(isinstance(v, str) for v in value)
    }


def family_list_copies(source: str, lists: dict[str, set[str]]) -> list[str]:
    """Literal tuples / lists / sets of strings in ``source`` holding two or more names of one families list."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and node.elts and all(
            isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts
        ):
            values = {e.value for e in node.elts}
            hits += [f"line {node.lineno}: {sorted(values & names)} (families.{name})" for name, names in lists.items() if len(values & names) >= 2]
    return hits


def test_family_names_are_listed_once():
    lists = _family_lists()
    problems = []
    for name, path in _modules().items():
        if name == "moecompress.model.families" or name in KNOWN_DUPLICATES:
            continue
        problems += [f"{path.relative_to(REPO)} {hit}" for hit in family_list_copies(path.read_text(), lists)]
    assert not problems, "import these lists from moecompress.model.families instead:\n" + "\n".join(problems)
    # and the check does see a copy
    assert family_list_copies('KEYS = ("num_experts", "n_routed_experts")\n', lists)


def test_the_check_catches_an_upward_import():
    """The acceptance case of issue 16: ``import moecompress.cli`` inside model/view.py must fail."""
    modules = _modules()
    source = modules["moecompress.model.view"].read_text() + "\n\ndef _late():\n    import moecompress.cli\n"
    extra = _imports("moecompress.model.view", source, "moecompress/model/view.py", set(modules))
    others = [e for e in import_graph() if e.importer != "moecompress.model.view"]
    problems = layer_violations(others + extra)
    assert any("moecompress.model.view -> moecompress.cli" in p and "'model' must not import the higher layer 'cli'" in p for p in problems)
    assert cycles_in(others + extra, by_unit=True)  # cli imports model: the new edge closes a cycle too


def test_known_exceptions_are_still_needed(edges):
    present = {(e.importer, e.imported.removeprefix(MISSING)) for e in edges}
    stale = sorted(f"{a} -> {b}" for a, b in {**KNOWN_EXCEPTIONS, **KNOWN_MISSING} if (a, b) not in present)
    modules, lists = _modules(), _family_lists()
    stale += sorted(
        f"{m} (KNOWN_DUPLICATES)" for m in KNOWN_DUPLICATES if m not in modules or not family_list_copies(modules[m].read_text(), lists)
    )
    assert not stale, "these known exceptions are gone from the code; delete them from KNOWN_EXCEPTIONS:\n" + "\n".join(stale)
