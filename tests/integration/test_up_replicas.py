"""`sgpipe up --processors N --sinks M`: each replica its own supervised child with its own
health port, learned from the child's status pipe -- not from its log, which here is set to
warnings only, so no "consuming" or "serving health endpoints" line is ever written."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from sgpipe.up.layout import state_file
from tests.integration.kafka_tools import FAST_GROUP_SETTINGS
from tests.integration.processes import http_get, metric
from tests.integration.test_up import (
    START_TIMEOUT,
    RunningPipeline,
    post,
    signed_headers,
    start_pipeline,
    stop_pipeline,
)
from tests.sendgrid_vector import BODY

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]


def wait_until_ready(running: RunningPipeline) -> dict[str, Any]:
    """Until the ingress's /readyz (which fronts the supervisor and every stage) answers 200;
    returns the state file then."""
    deadline = time.monotonic() + START_TIMEOUT
    last: tuple[int, str] = (0, "")
    while time.monotonic() < deadline:
        assert running.process.poll() is None, running.log.read_text()[-5000:]
        with contextlib.suppress(OSError):
            last = http_get(f"{running.base_url}/readyz")
        if last[0] == 200:
            state: dict[str, Any] = json.loads(state_file(running.data_dir).read_text())
            return state
        time.sleep(0.2)
    raise AssertionError(
        f"sgpipe up not ready within {START_TIMEOUT} s: {last}\n{running.log.read_text()[-5000:]}"
    )


def logged(running: RunningPipeline, event: str) -> list[dict[str, Any]]:
    entries = []
    for line in running.log.read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == event:
                entries.append(entry)
    return entries


def test_two_processors_and_two_sinks_each_with_their_own_health_port(tmp_path: Path) -> None:
    running = start_pipeline(
        tmp_path,
        # Three sinks asked, two partitions: two run.
        args=("--processors", "2", "--sinks", "3"),
        embedded={"kafka_port": 0, "clickhouse_http_port": 0, "broker_storage": "memory"},
        kafka={
            **FAST_GROUP_SETTINGS,
            "topics": {"partitions": 2},
        },
        logging={"format": "json", "level": "warning"},
    )
    try:
        state = wait_until_ready(running)
        children = state["children"]
        assert sorted(children) == [
            "clickhouse",
            "ingest",
            "process",
            "process-2",
            "sink",
            "sink-2",
        ]
        stage_children = {
            name: children[name] for name in ("process", "process-2", "sink", "sink-2")
        }
        ports = {child["port"] for child in stage_children.values()}
        assert len(ports) == 4 and None not in ports
        for name, child in stage_children.items():
            assert child["role"] == name.split("-")[0] and child["restarts"] == 0
            code, body = http_get(f"{child['url']}/healthz")
            assert (code, json.loads(body)["stage"]) == (200, child["role"])
            # Each one consumes: its own /readyz counts its own assigned partition.
            code, body = http_get(f"{child['url']}/readyz")
            assert code == 200, (name, body)
        assert children["ingest"]["port"] == int(running.base_url.rsplit(":", 1)[1])
        # Nothing of this came from a log line: the stages logged no info at all.
        assert not logged(running, "consuming")
        assert not logged(running, "serving health endpoints")
        (cut,) = logged(
            running,
            "fewer processes than asked: a stage never runs more "
            "consumers than its input topic has partitions",
        )
        assert (cut["role"], cut["asked"], cut["running"]) == ("sink", 3, 2)
        code, supervisor = http_get(f"{state['health_url']}/metrics")
        assert code == 200
        for name in children:
            assert f'sgpipe_up_child_restarts_total{{child="{name}",stage="up"}} 0.0' in supervisor

        status, _, _ = post(f"{running.base_url}/webhooks/main", BODY, signed_headers())
        assert status == 200
        running.wait_for("SELECT count() FROM email_events FINAL", "1\n")
        # The ingress's /metrics adds up the replicas: the one event, written once.
        _, merged = http_get(f"{running.base_url}/metrics")
        assert (
            metric(merged, "sgpipe_records_produced_total", stage="process", output="events") == 1
        )

        running.process.send_signal(signal.SIGTERM)
        assert running.process.wait(timeout=120) == 0, running.log.read_text()[-5000:]
    finally:
        stop_pipeline(running)
