"""The package layering: runtime imports flow strictly down, offline tools stay out.

Every module of `ascend_llm/` and `calib/` is parsed (no import runs); only module-level imports
count (those inside functions and under `if TYPE_CHECKING:` are lazy by design). A module may
import its own package, any package of a lower layer and the small leaves; `ascend_llm` never
imports `calib`; no two files import each other, directly or around a loop.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A package may import packages of its own layer or below, never above.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("numerics",),                                                    # pure tensor math
    ("ascend_llm", "platform", "config", "sampling_params", "outputs"),  # small leaves (the root is lazy)
    ("ops",),
    ("distributed",),
    ("loader",),
    ("quant",),
    ("layers",),
    ("models",),
    ("graph",),
    ("export",),
    ("spec_decode", "eval"),
    ("executor",),
    ("engine",),
    ("llm",),
    ("server",),
    ("cli",),
    ("calib",),                                                       # offline tools, outside the runtime
)
RANK = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}

# Upward imports still in the tree, as "importer -> imported" module pairs. The list may only
# shrink: a new upward import fails, and so does an entry here that no longer exists.
KNOWN_UPWARD: frozenset[str] = frozenset()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    paths = [*ROOT.glob("ascend_llm/**/*.py"), *ROOT.glob("calib/**/*.py")]
    return {module_name(p): p for p in paths}


def package_of(module: str) -> str:
    """The layer key: `calib`, the root `ascend_llm`, or the first component below it."""
    parts = module.split(".")
    if parts[0] == "calib" or len(parts) == 1:
        return parts[0]
    return parts[1]


def _is_type_checking(test: ast.expr) -> bool:
    return "TYPE_CHECKING" in ast.unparse(test)


def _top_level_imports(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """Import statements run when the module is imported (try / if bodies included)."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and not _is_type_checking(node.test):
            found += _top_level_imports(node.body) + _top_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            found += _top_level_imports(node.body) + _top_level_imports(node.orelse)
            found += _top_level_imports(node.finalbody)
            for handler in node.handlers:
                found += _top_level_imports(handler.body)
    return found


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The module `name` lives in: itself, or the longest known prefix (an attribute import)."""
    parts = name.split(".")
    while parts and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts) or None


def imported_modules(module: str, path: Path, modules: dict[str, Path],
                     tree: ast.Module | None = None) -> set[str]:
    """Project modules `module` imports at module level (a submodule when `from pkg import sub`)."""
    targets: set[str] = set()
    for node in _top_level_imports((tree or ast.parse(path.read_text())).body):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            source = _absolute(node, module, path.name == "__init__.py")
            names = [f"{source}.{alias.name}" for alias in node.names]
        for name in names:
            target = _known(name, modules)
            if target is not None and target != module:
                targets.add(target)
    return targets


def all_imported_modules(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules `module` imports anywhere: lazy imports in functions, and modules named
    in a string (importlib.import_module, registries of backend modules) included."""
    tree = ast.parse(path.read_text())
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    named = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in modules}
    return imported_modules(module, path, modules, ast.Module(body=nodes, type_ignores=[])) | named


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {m: imported_modules(m, p, modules) for m, p in modules.items()}


def upward_imports(graph: dict[str, set[str]]) -> set[str]:
    found = set()
    for importer, targets in graph.items():
        for target in targets:
            if RANK[package_of(target)] > RANK[package_of(importer)]:
                found.add(f"{importer} -> {target}")
    return found


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
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
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


# What the runtime starts from: the public faces (LLM, `ascend-llm`, the server, ONNX export).
RUNTIME_ROOTS = ("ascend_llm", "ascend_llm.llm", "ascend_llm.cli", "ascend_llm.server.api_server",
                 "ascend_llm.export.__main__")


def reachable(roots: tuple[str, ...], edges: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(edges.get(module, ()))
    return seen


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_every_package_has_a_layer(graph) -> None:
    unknown = sorted({package_of(m) for m in graph} - set(RANK))
    assert not unknown, f"packages without a layer in tests/test_layering.py: {unknown}"


def test_imports_flow_down(graph) -> None:
    found = upward_imports(graph)
    new = sorted(found - KNOWN_UPWARD)
    assert not new, "upward imports (importer -> imported):\n" + "\n".join(new)
    gone = sorted(KNOWN_UPWARD - found)
    assert not gone, "fixed: remove from KNOWN_UPWARD:\n" + "\n".join(gone)


def test_the_runtime_never_imports_calib(graph) -> None:
    offenders = sorted(f"{m} -> {t}" for m, ts in graph.items() if package_of(m) != "calib"
                       for t in ts if package_of(t) == "calib")
    assert not offenders, "\n".join(offenders)


def test_no_import_cycles_between_files(graph) -> None:
    cycles = import_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_every_runtime_module_serves_the_runtime() -> None:
    """Offline tools live in calib/: each ascend_llm module is reached (lazy imports included)
    from LLM, the CLI or the server."""
    modules = all_modules()
    edges = {m: all_imported_modules(m, p, modules) for m, p in modules.items()}
    # a package's __init__ runs whenever one of its modules is imported
    for module in modules:
        parent = module.rpartition(".")[0]
        if parent in modules:
            edges[module].add(parent)
    unused = sorted(m for m in set(modules) - reachable(RUNTIME_ROOTS, edges) if package_of(m) != "calib")
    assert not unused, "ascend_llm modules no runtime entry point imports (offline tools go to calib/):\n" + \
        "\n".join(unused)


def test_no_import_cycles_between_packages(graph) -> None:
    packages: dict[str, set[str]] = defaultdict(set)
    for importer, targets in graph.items():
        packages[package_of(importer)] |= {package_of(t) for t in targets} - {package_of(importer)}
    cycles = import_cycles(dict(packages))
    assert not cycles, "package cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_checker_sees_upward_imports_cycles_and_lazy_imports(tmp_path) -> None:
    """The checker itself, on a made-up tree: a layer violation, a cycle, and imports it must ignore."""
    files = {
        "ascend_llm/ops/a.py": "from ascend_llm.quant import b\n",
        "ascend_llm/quant/b.py": "import ascend_llm.quant.c\n",
        "ascend_llm/quant/c.py": "from . import b\nfrom typing import TYPE_CHECKING\n"
                                 "if TYPE_CHECKING:\n    from ascend_llm.engine import d\n"
                                 "def f():\n    from ascend_llm.engine import d\n",
        "ascend_llm/engine/d.py": "try:\n    from ascend_llm.ops.a import x\nexcept ImportError:\n    pass\n",
    }
    modules = {}
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        modules[".".join(Path(rel).with_suffix("").parts)] = path
    graph = {m: imported_modules(m, p, modules) for m, p in modules.items()}
    assert graph == {"ascend_llm.ops.a": {"ascend_llm.quant.b"}, "ascend_llm.quant.b": {"ascend_llm.quant.c"},
                     "ascend_llm.quant.c": {"ascend_llm.quant.b"}, "ascend_llm.engine.d": {"ascend_llm.ops.a"}}
    assert upward_imports(graph) == {"ascend_llm.ops.a -> ascend_llm.quant.b"}
    assert import_cycles(graph) == [["ascend_llm.quant.b", "ascend_llm.quant.c"]]
