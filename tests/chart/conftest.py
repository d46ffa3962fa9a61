"""Prints what the image and chart tests validated at the end of the run."""

from __future__ import annotations

import pytest

from tests.chart.summary import FINDINGS


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FINDINGS:
        return
    terminalreporter.section("container image and Helm chart")
    for topic, texts in FINDINGS.items():
        terminalreporter.write_line(f"{topic}: {'; '.join(texts)}")
