"""docs/guarantees.md names the test behind every promise: each must exist, so the page cannot
promise what no test proves any more."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GUARANTEES = ROOT / "docs" / "guarantees.md"
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }


def test_every_test_the_guarantees_name_exists() -> None:
    references = REFERENCE.findall(GUARANTEES.read_text())
    assert len(references) >= 40  # the page is the whole promise, not a sample
    missing = [
        f"{path}::{name}"
        for path, name in references
        if not (ROOT / path).is_file() or name not in _test_functions(ROOT / path)
    ]
    assert missing == []


def test_every_fault_test_is_named_in_the_guarantees() -> None:
    named = set(REFERENCE.findall(GUARANTEES.read_text()))
    for path in sorted((ROOT / "tests" / "faults").glob("test_*.py")):
        relative = str(path.relative_to(ROOT))
        for name in _test_functions(path):
            if "throughput" in name:  # a measurement for the summary, not a promise
                continue
            assert (relative, name) in named, f"{relative}::{name} is not in docs/guarantees.md"
