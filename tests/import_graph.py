"""The import graph of some packages, read from their source (nothing is imported).

    graph = ImportGraph.read(root, ["mimo_jax", "launch"])
    graph.cycles()          # [[module, ...], ...]: strongly connected groups of 2+ modules
    graph.inner_imports     # [(file, imported module), ...]: imports inside a def or a class

An edge A -> B means A's module body (not its functions) imports B, one of the read packages'
modules: `from P import name` names P.name when that is a module, else P (as pylint counts:
a package's __init__ importing its own modules is no cycle).
Imports under `if TYPE_CHECKING:` never run and are left out. This is the check pylint's
`cyclic-import` and `import-outside-toplevel` make, in milliseconds instead of minutes.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib


def _module_name(root: pathlib.Path, path: pathlib.Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement may bind: every module and module.name it names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: resolved against this module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


@dataclasses.dataclass
class ImportGraph:
    """Module-level import edges between the read packages' modules, and inner imports."""

    edges: dict[str, set[str]]
    inner_imports: list[tuple[str, str]]

    @classmethod
    def read(cls, root: pathlib.Path, packages: list[str]) -> "ImportGraph":
        files = {_module_name(root, p): p for package in packages
                 for p in sorted((root / package).rglob("*.py"))}
        edges: dict[str, set[str]] = {module: set() for module in files}
        inner: list[tuple[str, str]] = []
        for module, path in files.items():
            is_package = path.name == "__init__.py"
            tree = ast.parse(path.read_text(), filename=str(path))
            for node, top_level in _walk_imports(tree):
                names = _imported_names(node, module, is_package)
                if not top_level:
                    inner.append((str(path.relative_to(root)), names[0]))
                    continue
                is_from = isinstance(node, ast.ImportFrom)
                edges[module] |= _targets(names, is_from, files) - {module}
        return cls(edges, inner)

    def cycles(self) -> list[list[str]]:
        """Every strongly connected group of two or more modules (Tarjan), each sorted."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        groups: list[list[str]] = []

        def visit(node: str) -> None:
            index[node] = low[node] = len(index)
            stack.append(node)
            on_stack.add(node)
            for nxt in sorted(self.edges[node]):
                if nxt not in index:
                    visit(nxt)
                    low[node] = min(low[node], low[nxt])
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))

        for node in sorted(self.edges):
            if node not in index:
                visit(node)
        return sorted(groups)


def _targets(names: list[str], is_from: bool, modules: dict) -> set[str]:
    """The modules of ours an import statement names: for `from P import x, y`, P.x and P.y
    where they are modules, else P; for `import P.m`, P.m."""
    if not is_from:
        return {name for name in names if name in modules}
    submodules = {name for name in names[1:] if name in modules}
    return submodules or ({names[0]} & set(modules))


def _walk_imports(tree: ast.Module):
    """(import node, whether it runs with the module body) for every import of the file."""
    def walk(nodes, top_level):
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                yield node, top_level
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                                   ast.Lambda)):
                yield from walk(ast.iter_child_nodes(node), False)
            elif isinstance(node, ast.If) and top_level and _is_type_checking(node):
                yield from walk(node.orelse, True)
            else:
                yield from walk(ast.iter_child_nodes(node), top_level)
    yield from walk(tree.body, True)
