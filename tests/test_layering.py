"""The package's layers import downwards only: model code knows nothing of how experts are served, and nothing
below the engine knows the engine or the server."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import localmoe

PACKAGE = Path(localmoe.__file__).parent
FORBIDDEN = {
    "layers": ("experts", "engine", "server"),
    "models": ("experts", "engine", "server"),
    "experts": ("engine", "server"),
}


def imported_modules(path: Path) -> set[str]:
    """Every module a source file imports, at any depth (including imports only for type checking)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # from localmoe import engine
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_go_downwards_only(package):
    sources = sorted((PACKAGE / package).glob("*.py"))
    assert sources
    wrong = {f"{path.name} imports {name}" for path in sources for name in imported_modules(path)
             for below in FORBIDDEN[package] if name == f"localmoe.{below}" or name.startswith(f"localmoe.{below}.")}
    assert not wrong, sorted(wrong)


def test_the_check_sees_a_forbidden_import(tmp_path):
    source = tmp_path / "moe.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from localmoe.experts.cache import X\n")
    assert "localmoe.experts.cache" in imported_modules(source)
