"""The layers (docs/architecture.md): a core that stands on its own, the platform on top, no cycle.

Every module of the tree is parsed with ``ast`` (nothing is imported or executed). An import is an
edge wherever it is written: at module level or lazily inside a function; only imports under
``if TYPE_CHECKING:`` (annotations, never run) are not. The module names come from pyproject's
package mapping, the one the wheel and the editable install use (``flows/`` is ``rosa2.flows``).
"""

from __future__ import annotations

import ast
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The platform: what drives, deploys, tracks and serves the core. Everything else under rosa2 is
# the core (models, policy, adapter, semantic stream, session, environment, rewards, data, metrics,
# records, report maths, config, env).
PLATFORM = (
    "rosa2.cli", "rosa2.stack", "rosa2.team", "rosa2.bench", "rosa2.profile_session", "rosa2.__main__",
    "rosa2.flows", "rosa2.tasks", "rosa2.sandbox",
)
# Libraries only the platform may use: orchestration, tracking, the container engine, Ray.
PLATFORM_LIBRARIES = ("prefect", "prefect_ray", "mlflow", "docker", "ray")
# Names the tree's folders had before they moved under the project's namespace: an import of one
# would load a second copy of a module from the checkout (or fail where it is installed).
OLD_TOP_LEVEL = ("flows", "tasks", "sandbox")


def package_roots() -> dict[str, Path]:
    """Package name -> folder, as pyproject maps them (packages not mapped sit at their own path)."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = setuptools.get("package-dir", {})
    return {name: ROOT / mapped.get(name, name.replace(".", "/")) for name in setuptools["packages"]}


def modules() -> dict[str, Path]:
    """Every module of the tree by its installed name."""
    found: dict[str, Path] = {}
    for package, folder in package_roots().items():
        for path in sorted(folder.glob("*.py")):
            found[package if path.name == "__init__.py" else f"{package}.{path.stem}"] = path
    return found


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported name, absolute (``from a import b`` -> a.b)
    line: int
    text: str  # the statement as written

    def where(self, files: dict[str, Path]) -> str:
        return f"{files[self.source].relative_to(ROOT)}:{self.line}"


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST):
    """Every node below ``node`` except the bodies of ``if TYPE_CHECKING:`` (their ``else`` runs)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _type_checking(child):
            for other in child.orelse:
                yield other
                yield from _walk(other)
            continue
        yield child
        yield from _walk(child)


def imports_of(name: str, path: Path) -> list[Import]:
    """What ``name`` imports: ``import a.b`` -> a.b; ``from a import b`` -> a.b (a module or a name
    in a); relative imports resolved against the module's package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in _walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(name, alias.name, node.lineno, f"import {alias.name}") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            written = f"from {'.' * node.level}{node.module or ''} import "
            found += [Import(name, f"{base}.{alias.name}" if alias.name != "*" else base, node.lineno, written + alias.name) for alias in node.names]
    return found


def resolve(target: str, files: dict[str, Path]) -> str | None:
    """The tree's module an import runs: the longest prefix of ``target`` that is one (``from
    rosa2.config import X`` runs rosa2.config); None for a library."""
    parts = target.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in files:
            return candidate
    return None


def in_layer(module: str, layer: tuple[str, ...]) -> bool:
    return any(module == top or module.startswith(top + ".") for top in layer)


def graph() -> tuple[dict[str, Path], dict[str, list[tuple[str, Import]]]]:
    files = modules()
    edges: dict[str, list[tuple[str, Import]]] = {name: [] for name in files}
    for name, path in files.items():
        for imp in imports_of(name, path):
            target = resolve(imp.target, files)
            if target is not None and target != name:
                edges[name].append((target, imp))
    return files, edges


def cycles(edges: dict[str, list[tuple[str, Import]]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target, _ in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_pyproject_lists_every_package_of_the_tree():
    # packages are listed by hand (the folders are mapped), so a new subpackage must be added there
    roots = package_roots()
    listed = set(roots)
    for package, folder in roots.items():
        for init in folder.glob("*/__init__.py"):
            sub = f"{package}.{init.parent.name}"
            assert sub in listed or init.parent in roots.values(), f"{init.parent.relative_to(ROOT)} is a package not in pyproject's [tool.setuptools] packages"
    assert {roots[p].relative_to(ROOT).as_posix() for p in ("rosa2.flows", "rosa2.tasks", "rosa2.sandbox")} == {"flows", "tasks", "sandbox"}


def test_the_core_imports_nothing_of_the_platform():
    files, edges = graph()
    core = [m for m in files if not in_layer(m, PLATFORM)]
    assert "rosa2.session" in core and "rosa2.rewards.code" in core and "rosa2.report" in core
    bad = []
    for module in core:
        for imp in imports_of(module, files[module]):
            target = resolve(imp.target, files)
            if target is not None and in_layer(target, PLATFORM):
                bad.append(f"{imp.where(files)}: core module {module} imports platform module {target} ({imp.text})")
            elif imp.target.split(".")[0] in PLATFORM_LIBRARIES:
                bad.append(f"{imp.where(files)}: core module {module} imports {imp.target.split('.')[0]}, a platform library ({imp.text})")
    assert not bad, "\n".join(bad)


def package_graph(files: dict[str, Path], edges: dict[str, list[tuple[str, Import]]]) -> dict[str, list[tuple[str, Import]]]:
    """The same edges between units: each subpackage (rosa2.rewards, rosa2.sandbox, ...) is one,
    each module directly under rosa2 is one."""
    packages = sorted((p for p in package_roots() if p != "rosa2"), key=len, reverse=True)

    def unit(module: str) -> str:
        return next((p for p in packages if module == p or module.startswith(p + ".")), module)

    units: dict[str, list[tuple[str, Import]]] = {unit(m): [] for m in files}
    for module, out in edges.items():
        units[unit(module)] += [(unit(t), imp) for t, imp in out if unit(t) != unit(module)]
    return units


def _cycle_report(files: dict[str, Path], edges: dict[str, list[tuple[str, Import]]], what: str) -> list[str]:
    bad = []
    for component in cycles(edges):
        members = set(component)
        links = [f"    {imp.where(files)}: {imp.source} -> {t} ({imp.text})" for m in component for t, imp in edges[m] if t in members]
        bad.append(f"import cycle among {what} {', '.join(component)}:\n" + "\n".join(links))
    return bad


def test_no_import_cycle_between_modules():
    files, edges = graph()
    bad = _cycle_report(files, edges, "modules")
    assert not bad, "\n".join(bad)


def test_no_import_cycle_between_packages():
    # rosa2.rewards -> rosa2.sandbox -> rosa2.rewards is a cycle even when no two modules close it
    files, edges = graph()
    bad = _cycle_report(files, package_graph(files, edges), "packages")
    assert not bad, "\n".join(bad)


def test_the_core_finds_the_docker_sandbox_through_the_installed_entry_point():
    # the inversion that lets the core's code reward run in the sandbox without importing it
    from rosa2.rewards.code import DEFAULT_RUNNER, RUNNERS, _runner_factory
    from rosa2.sandbox import shared

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][RUNNERS]
    assert declared[DEFAULT_RUNNER] == "rosa2.sandbox:shared"
    assert in_layer(declared[DEFAULT_RUNNER].partition(":")[0], PLATFORM)
    assert _runner_factory() is shared  # what the installed metadata says (re-install after editing pyproject)


def test_nothing_imports_the_old_top_level_names():
    # flows/, tasks/ and sandbox/ are rosa2.flows, rosa2.tasks and rosa2.sandbox; tests and
    # benchmarks included (from the repository root ``import tasks`` would still find the folder)
    sources = list(modules().items())
    for folder in ("tests", "benchmarks"):
        sources += [(p.relative_to(ROOT).with_suffix("").as_posix().replace("/", "."), p) for p in sorted((ROOT / folder).rglob("*.py"))]
    bad = []
    for name, path in sources:
        for imp in imports_of(name, path):
            if imp.target.split(".")[0] in OLD_TOP_LEVEL:
                bad.append(f"{path.relative_to(ROOT)}:{imp.line}: {imp.text}: the package is rosa2.{imp.target.split('.')[0]} now")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_cycles_and_lazy_imports(tmp_path):
    # the analysis itself: a lazy import is an edge, a TYPE_CHECKING one is not
    a = tmp_path / "a.py"
    a.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import c\ndef f():\n    from pkg import b\n")
    b = tmp_path / "b.py"
    b.write_text("import pkg.a\n")
    c = tmp_path / "c.py"
    c.write_text("from . import a\n")
    files = {"pkg.a": a, "pkg.b": b, "pkg.c": c}
    edges = {n: [(resolve(i.target, files), i) for i in imports_of(n, p)] for n, p in files.items()}
    edges = {n: [(t, i) for t, i in e if t is not None] for n, e in edges.items()}
    assert [t for t, _ in edges["pkg.a"]] == ["pkg.b"]
    assert [t for t, _ in edges["pkg.c"]] == ["pkg.a"]
    assert cycles(edges) == [["pkg.a", "pkg.b"]]
