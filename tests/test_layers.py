"""The package's layering, checked from the source: every import (lazy ones inside functions included) must point
down the layers that docs/architecture.md draws, the core must never reach for torch or a hub library, and no
module but the CLI may write to os.environ.

Layers, bottom to top: core, fileio, formats, targets, merging, api, edges (cli, render, demo).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lorafit"

CORE = {"lorafit.errors", "lorafit.findings", "lorafit.report", "lorafit.user_regex", "lorafit.tensor_info",
        "lorafit.adapter", "lorafit.tree", "lorafit.align", "lorafit.diagnose", "lorafit.version"}
EDGES = {"lorafit.cli", "lorafit.cli_options", "lorafit.cli_output", "lorafit.ci_formats", "lorafit.render",
         "lorafit.demo", "lorafit.__main__", "lorafit.hook"}
# What each layer may import from lorafit (by layer name).
ALLOWED = {
    "core": {"core"},
    "fileio": {"fileio", "errors", "tensor_info"},  # io knows only the error tree and what a header says
    "formats": {"core", "fileio", "formats"},
    "targets": {"core", "fileio", "formats", "targets"},  # a runtime loads some format
    "merging": {"core", "fileio", "merging"},  # the plan is pure; running it reads and writes shards
    "api": {"core", "fileio", "formats", "targets", "merging", "api"},
    "package": {"core", "api"},  # lorafit/__init__.py: the typed public API
    "cli": {"api", "render", "errors", "report", "version", "demo", "cli_options", "cli_output"},
    "cli_options": set(),  # typer option types only
    "cli_output": {"errors", "report", "render", "ci_formats", "api", "fileio"},  # how a command runs, prints
    "ci_formats": {"core"},  # a Report as GitHub annotations or SARIF
    "render": {"core"},
    "demo": {"api", "render", "core"},
    "__main__": {"cli"},
    "hook": {"cli"},
}
# Never imported by the core, not even lazily: the core is plain data and pure functions.
HEAVY = {"torch", "transformers", "peft", "safetensors", "numpy", "huggingface_hub"}


def layer_of(module: str) -> str:
    """The layer of a lorafit module name (or of the pieces `fileio` may name one by one)."""
    parts = module.split(".")
    if module in ("lorafit", "lorafit.testing"):  # the public API, and its pytest helper
        return "package"
    if module in CORE:
        return "core"
    if module in EDGES:
        return parts[1]
    if len(parts) > 1 and parts[1] in ("fileio", "formats", "targets", "merging", "api"):
        return parts[1]
    raise AssertionError(f"{module} belongs to no layer: add it to the layering (tests/test_layers.py and "
                         "docs/architecture.md)")


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[str, int]]:
    """Every module `path` imports (absolute name) with its line, relative imports resolved, lazy ones included."""
    name = module_name(path)
    return imports_in(path.read_text(), name if path.name == "__init__.py" else name.rpartition(".")[0])


def imports_in(source: str, package: str) -> list[tuple[str, int]]:
    """imports_of for a module's source text, `package` being the package it lies in."""
    out: list[tuple[str, int]] = []
    tree = ast.parse(source)
    # Imports for type checkers only never run: `if TYPE_CHECKING:` blocks are left out.
    typing_only = {id(n) for b in ast.walk(tree) if isinstance(b, ast.If) and ast.unparse(b.test) == "TYPE_CHECKING"
                   for stmt in b.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from . import x` may import the submodule x: judge each name that is a module of its own.
            subs = [f"{target}.{a.name}" for a in node.names
                    if (SRC.parent / Path(*f"{target}.{a.name}".split("."))).with_suffix(".py").exists()
                    or (SRC.parent / Path(*f"{target}.{a.name}".split("."))).is_dir()]
            out += [(s, node.lineno) for s in subs] or [(target, node.lineno)]
    return out


MODULES = sorted(SRC.rglob("*.py"))


def _allowed_name(importer_layer: str, imported: str) -> bool:
    allowed = ALLOWED[importer_layer]
    if imported == "lorafit.version":
        return True  # a constant any layer may read
    if importer_layer == "fileio":
        short = imported.split(".")[1] if imported.count(".") >= 1 else imported
        return short in allowed
    if importer_layer in ("cli", "cli_output", "__main__", "hook"):
        return imported.split(".")[1] in allowed
    return layer_of(imported) in allowed


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_imports_point_down_the_layers(path: Path) -> None:
    me = module_name(path)
    mine = layer_of(me)
    bad = [f"line {line}: {me} ({mine}) imports {target} ({layer_of(target)})"
           for target, line in imports_of(path)
           if target.startswith("lorafit") and target != me and not _allowed_name(mine, target)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", [p for p in MODULES if module_name(p) in CORE], ids=lambda p: p.stem)
def test_core_never_imports_heavy_libraries(path: Path) -> None:
    heavy = [f"line {line}: {target}" for target, line in imports_of(path) if target.split(".")[0] in HEAVY]
    assert not heavy, f"{module_name(path)} is core and must stay plain Python: " + ", ".join(heavy)


def _environ_writes(tree: ast.AST) -> list[int]:
    """Lines that assign into, or call a mutating method of, os.environ (or call os.putenv / os.unsetenv)."""
    lines = []
    for node in ast.walk(tree):
        target = None
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for t in targets:
                if isinstance(t, ast.Subscript):
                    target = t.value
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in ("putenv", "unsetenv"):
                lines.append(node.lineno)
            elif node.func.attr in ("setdefault", "update", "pop", "popitem", "clear", "__setitem__"):
                target = node.func.value
        if isinstance(target, ast.Attribute) and target.attr == "environ":
            lines.append(node.lineno)
    return lines


def test_only_the_cli_writes_the_environment() -> None:
    """A library never changes its host's global state; the CLI may set offline mode for its own process."""
    writers = {module_name(p): _environ_writes(ast.parse(p.read_text())) for p in MODULES}
    cli = {"lorafit.cli", "lorafit.cli_output"}
    assert {m: lines for m, lines in writers.items() if lines and m not in cli} == {}
    assert writers["lorafit.cli_output"], "the checker no longer sees the CLI's own offline settings: it is broken"


def test_the_checker_sees_a_violation() -> None:
    """The checks above must be able to fail: a core module importing torch lazily, and an upward import."""
    src = ("def f():\n    import torch\n    from .api.fix import fix\n    import os\n    os.environ['X'] = '1'\n"
           "if TYPE_CHECKING:\n    import transformers\n")
    found = imports_in(src, "lorafit")
    assert ("torch", 2) in found and ("lorafit.api.fix", 3) in found
    assert not any(t == "transformers" for t, _ in found)
    assert not _allowed_name("core", "lorafit.api.fix")
    assert _environ_writes(ast.parse(src)) == [5]
