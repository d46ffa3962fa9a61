"""Two `make bench` results side by side: each figure's value and ratio-to-baseline in A and in
B, and B's ratio over A's (ratios are what compare across runs: each baseline was measured in its
own run, on the same machine load as its figure).

Run: ``.venv/bin/python -m bench.compare A.json B.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def load(path: str) -> tuple[str, dict[str, dict[str, Any]]]:
    document = json.loads(Path(path).read_text())
    return document["commit"], {figure["name"]: figure for figure in document["figures"]}


def show(value: float | None, suffix: str = "") -> str:
    return "-" if value is None else f"{value:,.2f}{suffix}"


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: python -m bench.compare A.json B.json")
    name_a, a = load(argv[0])
    name_b, b = load(argv[1])
    print(f"A = {name_a}, B = {name_b}")
    header = f"{'figure':<58}{'A value':>12}{'B value':>12}{'A ratio':>9}{'B ratio':>9}{'B/A':>8}"
    print(header)
    for name in [*a, *(n for n in b if n not in a)]:
        fa, fb = a.get(name), b.get(name)
        ra = fa["ratio"] if fa else None
        rb = fb["ratio"] if fb else None
        va = fa["value"] if fa else None
        vb = fb["value"] if fb else None
        # Compare the ratios when both have a baseline, else the raw values.
        left, right = (ra, rb) if ra is not None and rb is not None else (va, vb)
        change = right / left if left and right is not None else None
        print(
            f"{name:<58}{show(va):>12}{show(vb):>12}{show(ra, 'x'):>9}{show(rb, 'x'):>9}"
            f"{show(change, 'x'):>8}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
