"""The package's import graph, read with ``ast`` from every module under ``bitray/`` (nothing is imported).

Edges are every ``import bitray...`` / ``from bitray... import ...`` (relative ones too), both those at
module level and those inside functions (lazy imports still tie two modules together); each edge says
which it is. Imports under ``if TYPE_CHECKING:`` never run: they count for the layering, not for cycles.
``from bitray.pkg import name`` points at the submodule ``bitray.pkg.name`` when there is one, else at
``bitray.pkg``; the implicit import of a module's parent packages is not an edge.

Checked:

- no import cycles between modules;
- the layering: a module imports only from its own layer or the layers below it:
  0. foundation: the package root, errors, redaction, config, storage, images, precision, hyperrule,
     locks, prefetch, ray_session, mlflow_client, examples, testhooks, collection (the layout of an
     output root's versions: storage only);
  1. models and MLflow: ``bitray.model`` (architecture, weights, export, registry, pyfunc), tracking;
  2. pipelines: ``bitray.embed``, ``bitray.finetune``, jobs;
  3. applications: outputs, ``bitray.search``, schedule, ``bitray.serve`` (a top-level module or package
     not named here is put in this layer);
  4. entry points: ``bitray.cli``, ``bitray.__main__`` -- so nothing else under ``bitray/`` imports the CLI.
"""

from __future__ import annotations

import ast
import graphlib
from dataclasses import dataclass
from pathlib import Path

import bitray

ROOT = Path(bitray.__file__).resolve().parent
LAYERS = [
    {
        "bitray",
        "errors",
        "redaction",
        "config",
        "storage",
        "images",
        "precision",
        "hyperrule",
        "locks",
        "prefetch",
        "ray_session",
        "mlflow_client",
        "examples",
        "testhooks",
        "collection",
    },
    {"model", "tracking"},
    {"embed", "finetune", "jobs"},
    {"outputs", "search", "schedule", "serve"},
    {"cli", "__main__"},
]
APPLICATIONS = 3


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    in_function: bool
    type_checking: bool

    def __str__(self) -> str:
        where = "in a function" if self.in_function else "at module level"
        return f"{self.source} -> {self.target} (line {self.line}, {where})"


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = ["bitray", *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


class Imports(ast.NodeVisitor):
    def __init__(self, name: str, is_package: bool, known: set[str]) -> None:
        self.name, self.is_package, self.known = name, is_package, known
        self.edges: list[Edge] = []
        self.depth = 0
        self.type_checking = 0

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        test = ast.unparse(node.test)
        guarded = test in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        self.type_checking += guarded
        for child in node.body:
            self.visit(child)
        self.type_checking -= guarded
        for child in node.orelse:
            self.visit(child)

    def _add(self, target: str, node: ast.stmt) -> None:
        if target == "bitray" or target.startswith("bitray."):
            self.edges.append(Edge(self.name, target, node.lineno, self.depth > 0, self.type_checking > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.name.split(".")[: None if self.is_package else -1]
            base = base[: len(base) - node.level + 1]
            module = ".".join([*base, *([node.module] if node.module else [])])
        else:
            module = node.module or ""
        for alias in node.names:
            submodule = f"{module}.{alias.name}"
            self._add(submodule if submodule in self.known else module, node)


def import_edges() -> list[Edge]:
    found = modules()
    edges = []
    for name, path in sorted(found.items()):
        visitor = Imports(name, path.name == "__init__.py", set(found))
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        edges += [e for e in visitor.edges if e.target != name]
    return edges


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else module
    return next((i for i, names in enumerate(LAYERS) if top in names), APPLICATIONS)


def test_the_graph_is_read():
    """A guard against a reader that finds nothing (and so trivially passes the checks below)."""
    edges = import_edges()
    assert len(modules()) > 50
    assert any(str(e).startswith("bitray.cli.embed -> bitray.embed") for e in edges)
    assert any(e.in_function for e in edges) and any(not e.in_function for e in edges)


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    runtime = [e for e in import_edges() if not e.type_checking]
    for edge in runtime:
        graph.setdefault(edge.source, set()).add(edge.target)
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        cycle = exc.args[1]
        steps = [
            next(str(e) for e in runtime if (e.source, e.target) == pair)
            for pair in zip(cycle, cycle[1:], strict=False)
        ]
        raise AssertionError("import cycle:\n  " + "\n  ".join(steps)) from None


def test_layers_import_only_downward():
    upward = [
        f"{e} imports layer {layer_of(e.target)} from layer {layer_of(e.source)}"
        for e in import_edges()
        if layer_of(e.target) > layer_of(e.source)
    ]
    assert not upward, "\n".join(upward)
