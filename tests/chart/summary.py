"""What the image and chart tests established, printed at the end of the pytest run (the
terminal summary hook in tests/chart/conftest.py), so `make test` closes with the values, the
scanners' results and what was validated, not only a count of tests. Tests record a finding
only after their assertions passed."""

from __future__ import annotations

FINDINGS: dict[str, list[str]] = {}


def record(topic: str, text: str) -> None:
    FINDINGS.setdefault(topic, []).append(text)
