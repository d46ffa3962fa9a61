"""kill -9 of `sgpipe up` itself while the simulator streams: the supervisor dies at once and
its children (broker, storage, ClickHouse, ingress, processor, sink) die with it through
PR_SET_PDEATHSIG, as on a crash or an OOM kill of the whole pipeline. `sgpipe up` is restarted
on the same data dir and port (as systemd or a terminal would); the simulator, like SendGrid,
retries what went unanswered.

The promise (docs/guarantees.md), with the embedded defaults (durable broker): every event the
ingress acknowledged is in ``email_events`` exactly once through FINAL and in the dedup view,
and every refused request got an answer SendGrid retries.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from sgpipe.simulator.keys import generate_private_key, public_key_base64
from tests import forked
from tests.faults.harness import Stream, events_flowing, stream_with_faults
from tests.faults.ledger import (
    DEDUP_VIEW,
    Ledger,
    LedgerReport,
    counts_by_event,
    refusals,
    unacceptable_refusals,
)
from tests.integration.kafka_tools import FAST_GROUP_SETTINGS
from tests.integration.test_up import SGPIPE, START_TIMEOUT
from tests.ports import free_port
from tests.promise_report import REPORT, FaultOutcome
from tests.up_support import served_store_answer

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

KILLS = 2


@dataclass
class Up:
    """`sgpipe up` on a fixed port and data dir, restartable."""

    config: Path
    data_dir: Path
    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None
    # More of `sgpipe up`'s command line (e.g. --processors 2).
    args: tuple[str, ...] = ()

    @property
    def webhook_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/webhooks/main"

    def start(self) -> None:
        with self.log.open("ab") as output:
            self.process = forked.Popen(
                [*SGPIPE, "up", "--config", str(self.config), "--data-dir", str(self.data_dir)]
                + ["--port", str(self.port), *self.args],
                stdout=output,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"sgpipe up exited:\n{self.log.read_text()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2):
                    return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"sgpipe up did not serve:\n{self.log.read_text()}")

    def kill_9(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=30)

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                return self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise
        return self.process.returncode

    def query(self, sql: str) -> str:
        """``sql``'s answer as `sgpipe query` prints it; OSError while the store cannot say.
        Polled every half second: asked over the served store's HTTP interface from this
        process while `sgpipe up` serves it (tests/up_support.py), else by `sgpipe query`."""
        answer = served_store_answer(self.data_dir, sql)
        if answer is not None:
            return answer
        result = forked.run(
            [*SGPIPE, "query", "--config", str(self.config), "--data-dir", str(self.data_dir)]
            + ["--format", "TabSeparated", sql],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise OSError(result.stderr.decode())
        return str(result.stdout.decode())

    def rows_by_event(self, relation: str, final: bool) -> Counter[str]:
        text = self.query(
            f"SELECT sg_event_id, count() FROM {relation}{' FINAL' if final else ''} "
            "GROUP BY sg_event_id"
        )
        return counts_by_event(text)

    def check(self, ledger: Ledger) -> LedgerReport:
        stored = self.rows_by_event("email_events", final=True)
        rows = int(self.query("SELECT count() FROM email_events").strip())
        view = self.rows_by_event(DEDUP_VIEW, final=False)
        return ledger.compare(stored, rows=rows, view=view)

    def stored_rows(self) -> int:
        """Rows in email_events so far, asked of the served store only (no `sgpipe query`
        process per poll); 0 while it starts or before the sink created the table."""
        try:
            answer = served_store_answer(self.data_dir, "SELECT count() FROM email_events")
            return int(answer) if answer is not None else 0
        except (OSError, ValueError):
            return 0

    async def settled_check(self, ledger: Ledger, timeout: float) -> LedgerReport:
        """``check`` polled until nothing acknowledged is missing from the table or the view,
        or ``timeout`` seconds passed (then the last report, for the caller's assertions)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                report: LedgerReport | None = await asyncio.to_thread(self.check, ledger)
            except OSError:
                report = None
            if (report is not None and not report.lost and not report.view_lost) or (
                time.monotonic() >= deadline
            ):
                break
            await asyncio.sleep(0.5)
        assert report is not None, self.log.read_text()[-5000:]
        return report


@dataclass
class Scenario:
    up: Up
    private_key: ec.EllipticCurvePrivateKey
    ledger: Ledger
    stream: Stream


@pytest.fixture
def scenario(tmp_path: Path) -> Iterator[Scenario]:
    private_key = generate_private_key()
    document = {
        "webhooks": [{"name": "main", "public_keys": [public_key_base64(private_key)]}],
        "embedded": {"kafka_port": 0, "clickhouse_http_port": 0},
        "kafka": dict(FAST_GROUP_SETTINGS),
        "sink": {"batch_max_seconds": 0.2},
        "logging": {"format": "json"},
    }
    config = tmp_path / "sgpipe.yaml"
    config.write_text(yaml.safe_dump(document))
    running = Up(config, tmp_path / "data", free_port(), tmp_path / "sgpipe-up.log")
    running.start()
    try:
        yield Scenario(running, private_key, Ledger(), Stream(seed=7070, rate=250.0))
    finally:
        if running.process is not None and running.process.poll() is None:
            running.stop()


async def test_sgpipe_up_killed_9_twice_mid_stream(scenario: Scenario) -> None:
    running, ledger = scenario.up, scenario.ledger
    options = scenario.stream.options(running.webhook_url, scenario.private_key)

    async def faults() -> None:
        for kill in range(1, KILLS + 1):
            await events_flowing(ledger, running.stored_rows, f"before kill {kill}")
            await asyncio.to_thread(running.kill_9)
            # Down for a second, as after a crash: the simulator's POSTs are refused meanwhile.
            await asyncio.sleep(1.0)
            await asyncio.to_thread(running.start)
        await events_flowing(ledger, running.stored_rows, "after the last restart")

    summary = await stream_with_faults(options, ledger, faults)
    assert unacceptable_refusals(summary.responses) == {}, summary.to_dict()
    assert summary.posts_rejected == 0 and summary.ok, summary.to_dict()

    report = await running.settled_check(ledger, 120.0)
    REPORT.record_fault(
        FaultOutcome(
            test="sgpipe up killed -9 mid-stream, restarted",
            faults=KILLS,
            acknowledged=report.acknowledged,
            lost=len(report.lost),
            duplicates=report.duplicates,
            refusals=refusals(summary.responses),
        )
    )
    assert report.holds(), report.describe() + "\n" + running.log.read_text()[-5000:]
    assert report.acknowledged == report.sent
    # Every kill happened while the simulator was sending: some POST went unanswered.
    assert refusals(summary.responses), summary.to_dict()
    assert await asyncio.to_thread(running.stop) == 0, running.log.read_text()[-5000:]
