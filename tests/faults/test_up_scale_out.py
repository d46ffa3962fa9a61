"""Scale-out and scale-in under `sgpipe up` (issue 16): `sgpipe up --processors 2 --sinks 2`
on the durable embedded broker while the simulator streams a seeded event set; a third
processor and a third sink -- started by hand from the configs `sgpipe up` generated for its
own, as a Kubernetes replica or a KEDA scale-up would be -- join, take partitions and leave,
once with SIGTERM and once with kill -9 (its membership then times out).

The promise: every acknowledged event is stored exactly once (FINAL and the dedup view
``email_events_dedup``); the two processors and two sinks under `sgpipe up` ride every
rebalance out (``sgpipe_up_child_restarts_total`` 0, the same PIDs from start to end); the
third ones stop cleanly on SIGTERM; `sgpipe up` stops cleanly at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sgpipe.simulator.keys import generate_private_key, public_key_base64
from sgpipe.up.layout import LOG_DIR, RUN_DIR, state_file
from tests import forked
from tests.faults.harness import (
    FAULT_WAIT_SECONDS,
    SERVICE_TIMEOUT,
    Stage,
    Stream,
    log_events,
    stream_with_faults,
    wait_for,
)
from tests.faults.ledger import Ledger, refusals, unacceptable_refusals
from tests.faults.test_faults import REVOKED
from tests.faults.test_up_killed import Up
from tests.integration.kafka_tools import FAST_GROUP_SETTINGS
from tests.integration.processes import SGPIPE, http_get
from tests.ports import free_port
from tests.promise_report import REPORT, FaultOutcome

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

SURVIVORS = ("process", "process-2", "sink", "sink-2")


@pytest.fixture
def up(tmp_path: Path) -> Iterator[tuple[Up, Any]]:
    private_key = generate_private_key()
    document = {
        "webhooks": [{"name": "main", "public_keys": [public_key_base64(private_key)]}],
        "embedded": {"kafka_port": 0, "clickhouse_http_port": 0},
        # Four partitions: with three consumers each still owns one.
        "kafka": {
            **FAST_GROUP_SETTINGS,
            "topics": {"partitions": 4},
        },
        "sink": {"batch_max_seconds": 0.2},
        "logging": {"format": "json"},
    }
    config = tmp_path / "sgpipe.yaml"
    config.write_text(yaml.safe_dump(document))
    running = Up(
        config,
        tmp_path / "data",
        free_port(),
        tmp_path / "sgpipe-up.log",
        args=("--processors", "2", "--sinks", "2"),
    )
    running.start()
    try:
        yield running, private_key
    finally:
        if running.process is not None and running.process.poll() is None:
            running.stop()


def state(running: Up) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(state_file(running.data_dir).read_text())
    return loaded


def every_child_ready(running: Up) -> bool:
    try:
        code, _ = http_get(f"http://127.0.0.1:{running.port}/readyz")
    except OSError:
        return False
    return code == 200


class HandStarted:
    """A third `sgpipe process`/`sgpipe sink` beside `sgpipe up`'s, from its generated config."""

    def __init__(self, running: Up, stage: Stage, number: int) -> None:
        self.stage = stage
        self.log = running.log.with_name(f"third-{stage}-{number}.log")
        config = running.data_dir / RUN_DIR / f"{stage}.yaml"
        with self.log.open("wb") as output:
            self.process = forked.Popen(
                [*SGPIPE, stage, "--config", str(config)],
                stdout=output,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def owns_partitions(self) -> bool:
        assert self.process.poll() is None, f"a third {self.stage} exited:\n{self.output()}"
        return any(
            entry.get("stage") == self.stage and entry.get("partitions")
            for entry in log_events(self.output(), "partitions assigned")
        )


async def test_a_third_processor_and_sink_join_and_leave_sgpipe_ups_two_and_two(
    up: tuple[Up, Any],
) -> None:
    running, private_key = up
    await wait_for(lambda: every_child_ready(running), "every child of sgpipe up ready")
    at_start = state(running)["children"]
    assert set(SURVIVORS) <= set(at_start), at_start
    thirds: list[HandStarted] = []
    ledger = Ledger()

    async def join_and_leave(stage: Stage) -> None:
        for leave in (signal.SIGTERM, signal.SIGKILL):
            third = HandStarted(running, stage, len(thirds) + 1)
            thirds.append(third)
            await wait_for(third.owns_partitions, f"a third {stage} owning partitions")
            third.process.send_signal(leave)
            code = await asyncio.to_thread(third.process.wait, SERVICE_TIMEOUT)
            if leave == signal.SIGTERM:
                assert code == 0, third.output()[-3000:]

    async def faults() -> None:
        await asyncio.gather(join_and_leave("process"), join_and_leave("sink"))

    # As long as the joins and leaves take, at least 8 s.
    stream = Stream(seed=1616, seconds=8.0)
    summary = await stream_with_faults(
        stream.options(running.webhook_url, private_key), ledger, faults
    )
    assert unacceptable_refusals(summary.responses) == {}, summary.to_dict()
    assert summary.posts_rejected == 0 and summary.ok, summary.to_dict()

    report = await running.settled_check(ledger, FAULT_WAIT_SECONDS)
    REPORT.record_fault(
        FaultOutcome(
            test="sgpipe up 2+2: a third processor and sink join and leave (SIGTERM, kill -9)",
            faults=4,
            acknowledged=report.acknowledged,
            lost=len(report.lost),
            duplicates=report.duplicates,
            refusals=refusals(summary.responses),
        )
    )
    assert report.holds(), report.describe() + "\n" + running.log.read_text()[-5000:]
    assert report.acknowledged == report.sent

    # The survivors took part in every rebalance and never died: not restarted, same PIDs.
    at_end = state(running)
    code, exposition = http_get(f"{at_end['health_url']}/metrics")
    assert code == 200
    for name in SURVIVORS:
        series = f'sgpipe_up_child_restarts_total{{child="{name}",stage="up"}} 0.0'
        assert series in exposition, (name, running.log.read_text()[-5000:])
        assert at_end["children"][name]["pid"] == at_start[name]["pid"], name
        # ... and they did take part: each gave its partitions up at every join and leave.
        own_log = (running.data_dir / LOG_DIR / f"{name}.log").read_text(errors="replace")
        stage = name.split("-")[0]
        revoked = [entry for entry in log_events(own_log, REVOKED) if entry.get("stage") == stage]
        assert len(revoked) >= 2, (name, own_log[-3000:])
    # Two left on SIGTERM (cleanly), two were killed.
    codes = sorted(third.process.returncode for third in thirds)
    assert codes == [-signal.SIGKILL, -signal.SIGKILL, 0, 0], codes
    assert await asyncio.to_thread(running.stop) == 0, running.log.read_text()[-5000:]
