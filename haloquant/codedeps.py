"""The project modules a module can execute: its import graph, read from the source.

A stage's cached output is a function of its code, so its cache key must hash every project
module it can run — not a hand-kept list that goes stale (a sweep point runs allocate, quantize and
the exporters; a helper moves to another module). This walks the import statements of a module's
source (module level and inside functions alike: a lazy import still runs), follows those that
resolve to the project's own packages, and returns their files. Third-party code is outside the
graph; its versions enter cache keys separately (tasks/__init__.py `runtimes`).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path


def imported_names(source: str, package: str, module_level: bool = False) -> set[str]:
    """Fully qualified names a source imports ("from a.b import c" gives a.b and a.b.c); with
    `module_level`, only the imports that run when it is imported."""
    names: set[str] = set()
    tree = ast.parse(source)
    nodes = (n for top in tree.body for n in ast.walk(top) if not isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef))) \
        if module_level else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


@functools.cache
def module_file(name: str) -> Path | None:
    """The source file of a module or package (its __init__.py), None if it is not one."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError, AttributeError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def project_modules(roots: list[str], prefixes: tuple[str, ...] = ("haloquant",)) -> dict[str, Path]:
    """Module name → file of every module under `prefixes` that `roots` import, transitively, the
    roots and the packages containing each module included (importing a.b runs a/__init__.py).
    A package's __init__ adds only its module-level imports: lazy imports inside a package's
    functions are a registry's (tasks/__init__.py imports each stage in its own run function),
    and pulling them in would make every stage depend on every other."""
    seen: dict[str, Path] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen or not name.split(".")[0] in prefixes:
            continue
        path = module_file(name)
        if path is None:
            continue
        seen[name] = path
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        todo.extend(parents)
        todo.extend(n for n in imported_names(path.read_text(encoding="utf-8"), package, module_level=is_package)
                    if n.split(".")[0] in prefixes)
    return dict(sorted(seen.items()))
