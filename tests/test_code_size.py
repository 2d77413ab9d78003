"""No class or function of the package (benchmarks and recipes aside) grows past 300 lines, docstrings excluded."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lightning_hpsgd"
LIMIT = 300


def lines_without_docstrings(node: ast.AST) -> int:
    """The physical lines of a top-level class or function, less those of every docstring inside it."""
    lines = set(range(node.lineno, node.end_lineno + 1))  # type: ignore[attr-defined]
    for sub in ast.walk(node):
        body = getattr(sub, "body", None)
        if isinstance(sub, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body:
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                if isinstance(first.value.value, str):
                    lines -= set(range(first.lineno, first.end_lineno + 1))  # type: ignore[operator]
    return len(lines)


def test_every_class_and_function_is_under_300_lines_without_docstrings():
    sizes = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if {"bench", "recipes"} & set(path.relative_to(PACKAGE).parts):
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                sizes[f"{path.relative_to(PACKAGE)}:{node.name}"] = lines_without_docstrings(node)
    assert sizes, "no code found"
    too_long = {name: n for name, n in sizes.items() if n >= LIMIT}
    assert not too_long, f"split these (lines, docstrings excluded): {too_long}"
    assert sizes["engine.py:HPSGDEngine"] > 100  # the count sees the engine itself
