"""The shape of the code, checked: parts name their collaborators instead of taking the whole
Platform, the library never imports a workload, and no private name crosses modules."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "mlplatform"
# The front door and the command line over it build a Platform; every part is handed its
# collaborators instead.
MAY_IMPORT_PLATFORM = {"platform.py", "__init__.py", "cli.py"}


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in ``path``, TYPE_CHECKING and function-level included."""
    out: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_only_the_front_door_imports_platform():
    offenders = []
    for path in _modules():
        rel = path.relative_to(PACKAGE)
        if str(rel) in MAY_IMPORT_PLATFORM:
            continue
        for module, names in _imports(path):
            if module == "mlplatform.platform" or (module == "mlplatform" and "Platform" in names):
                offenders.append(f"{rel}: from {module} import {', '.join(names)}")
    assert not offenders, "parts take their collaborators, not the Platform:\n" + "\n".join(offenders)


def test_the_library_imports_no_workload():
    offenders = [
        f"{path.relative_to(PACKAGE)}: {module}"
        for path in _modules()
        for module, _ in _imports(path)
        if module == "workloads" or module.startswith("workloads.")
    ]
    assert not offenders, offenders


def _is_module(module: str, name: str) -> bool:
    """Whether ``from module import name`` imports a (private) module of the package, which
    conventions allow, rather than a private name inside one."""
    base = PACKAGE.parent.joinpath(*module.split("."))
    return (base / f"{name}.py").exists() or (base / name / "__init__.py").exists()


def test_no_private_name_is_imported_across_modules():
    offenders = [
        f"{path.relative_to(PACKAGE)}: from {module} import {name}"
        for path in _modules()
        for module, names in _imports(path)
        if module.startswith("mlplatform")
        for name in names
        if name.startswith("_") and not name.startswith("__") and not _is_module(module, name)
    ]
    assert not offenders, "make the name public where another module needs it:\n" + "\n".join(offenders)


def _package(module: str) -> str | None:
    """The part of ``mlplatform.<part>...`` a module belongs to (a top-level module is its own part)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "mlplatform" and len(parts) > 1 else None


def test_no_import_cycle_spans_two_parts():
    edges: dict[str, set[str]] = {}
    for path in _modules():
        rel = path.relative_to(PACKAGE)
        source = rel.parts[0].removesuffix(".py")
        for module, names in _imports(path):
            targets = [module] + ([f"{module}.{n}" for n in names] if module == "mlplatform" else [])
            for target in targets:
                part = _package(target)
                if part and part not in (source, "__init__"):
                    edges.setdefault(source, set()).add(part)

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo += edges.get(node, ())
        return False

    cycles = sorted(f"{a} -> {b} -> ... -> {a}" for a, targets in edges.items() for b in targets if reaches(b, a))
    assert not cycles, cycles
