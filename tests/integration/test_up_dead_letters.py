"""Dead letters under `sgpipe up` (embedded broker and ClickHouse, a real process): they are
kept in ClickHouse, so they survive a restart; `sgpipe dlq list` reads them through the running
store and, with nothing running, straight from the data directory; `sgpipe dlq replay` finds
the embedded broker through the state file."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests import forked
from tests.integration.test_up import (
    SGPIPE,
    RunningPipeline,
    _wait_until_serving,
    post,
    start_pipeline,
    stop_pipeline,
)
from tests.up_support import served_store_answer, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

BODY = (
    b'[{"event":"open","sg_event_id":"ev-1","email":"a@example.com","timestamp":1700000000},'
    b'"not an event"]'
)


def dlq(running: RunningPipeline, *args: str) -> Any:
    result = forked.run(
        [*SGPIPE, "dlq", *args, "--json", "--config", str(running.config),
         "--data-dir", str(running.data_dir)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def letters_stored(running: RunningPipeline) -> str | None:
    try:
        return served_store_answer(running.data_dir, "SELECT count() FROM dead_letters")
    except OSError:  # the sink has not created the table yet
        return None


def counts(listing: dict[str, Any]) -> list[tuple[str, str, int, int]]:
    return [(r["stage"], r["reason"], r["pending"], r["replayed"]) for r in listing["reasons"]]


def test_dead_letters_survive_a_restart_and_are_listed_and_replayed_under_up(
    tmp_path: Path,
) -> None:
    running = start_pipeline(tmp_path, webhooks=[{"name": "main", "allow_unsigned": True}])
    try:
        _wait_until_serving(running)
        status, _, _ = post(
            f"{running.base_url}/webhooks/main", BODY, {"Content-Type": "application/json"}
        )
        assert status == 200
        # The letter stored (polled from this process: no `sgpipe dlq` process per poll)...
        wait_until(lambda: letters_stored(running) == "1\n", 60, "the dead letter stored")
        # ...then listed through the running store (its state file names the endpoint and
        # credentials).
        deadline = time.monotonic() + 60
        while not (listing := dlq(running, "list"))["reasons"] and time.monotonic() < deadline:
            time.sleep(0.3)
        assert counts(listing) == [("process", "not_an_object", 1, 0)]
        assert listing["reasons"][0]["samples"][0]["payload_excerpt"] == '"not an event"'
    finally:
        stop_pipeline(running)
    assert running.process.returncode == 0, running.log.read_text()

    # Nothing runs: read from the data directory itself.
    stopped = dlq(running, "list")
    assert counts(stopped) == [("process", "not_an_object", 1, 0)]
    # In a pipe, without --json: tab-separated counts under a header line.
    tsv = forked.run(
        [*SGPIPE, "dlq", "list", "--config", str(running.config),
         "--data-dir", str(running.data_dir)],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert [line.split("\t")[:4] for line in tsv.splitlines()] == [
        ["stage", "reason", "pending", "replayed"],
        ["process", "not_an_object", "1", "0"],
    ]
    assert dlq(running, "replay", "--dry-run")["letters"][0]["outcome"] == (
        "would be dead-lettered again"
    )

    # Started again: the letter is still there, and a replay finds the embedded broker.
    running = start_pipeline(tmp_path, webhooks=[{"name": "main", "allow_unsigned": True}])
    try:
        _wait_until_serving(running)
        replay = dlq(running, "replay", "--wait", "60")
        assert [(r["outcome"], r["dead_lettered_again"]) for r in replay["letters"]] == [
            ("dead-lettered again", ["not_an_object"])
        ]
        listing = dlq(running, "list")
        assert counts(listing) == [("process", "not_an_object", 1, 0)]
        assert listing["reasons"][0]["samples"][0]["replay_generation"] == 1
        running.wait_for("SELECT sg_event_id FROM email_events FINAL", "ev-1\n")
    finally:
        stop_pipeline(running)
