"""Imports only point down the layers: shell -> stages -> runtime -> schemas."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SHELL = (
    "sgpipe.cli",
    "sgpipe.up",
    "sgpipe.embedded",
    "sgpipe.__main__",
    "sgpipe.simulator",
    "sgpipe.dlq",
    "sgpipe.store",
    "sgpipe.migrate",
    "sgpipe.forget",
    "sgpipe.top",
    "sgpipe.report",
    "sgpipe.webhooks",
)
STAGES = ("ingest", "processors", "sinks")
RUNTIME = ("sgpipe.runtime",)
SCHEMAS = ("schemas",)

# What each layer's modules may not import.
FORBIDDEN = {
    "schemas": SHELL + STAGES + RUNTIME,
    "sgpipe/runtime": SHELL + STAGES,
    "ingest": SHELL + ("processors", "sinks"),
    "processors": SHELL + ("ingest", "sinks"),
    "sinks": SHELL + ("ingest", "processors"),
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def violates(module: str, forbidden: tuple[str, ...]) -> bool:
    return any(module == name or module.startswith(name + ".") for name in forbidden)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_import_points_up(layer: str) -> None:
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files, layer
    violations = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in files
        for module in sorted(imported_modules(path))
        if violates(module, FORBIDDEN[layer])
    ]
    assert violations == []
