"""`sgpipe top --once` against a running `sgpipe up` with traffic: a row for every stage, with
rates that move, found through the data dir alone -- as an operator runs it."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from tests import forked
from tests.integration.test_up import SGPIPE, start_pipeline, stop_pipeline
from tests.up_support import (
    WebhookKey,
    events_body,
    get,
    post,
    served_store_answer,
    wait_until,
)

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]


def test_top_once_shows_every_stage_moving(tmp_path: Path) -> None:
    key = WebhookKey.generate()
    running = start_pipeline(tmp_path, webhooks=key.webhooks)
    stop_posting = threading.Event()
    posted: list[int] = []

    def traffic() -> None:
        # Valid events, and in every tenth batch one element that is not an object: the
        # dead-letter path moves too, well within the dead-letter limit (half the batches).
        index = 0
        while not stop_posting.is_set():
            body = events_body(f"top-{index}", 20)
            if index % 10 == 0:
                body = body[:-1] + b",0]"
            posted.append(post(f"{running.base_url}/webhooks/main", body, key.headers(body)))
            index += 1
            stop_posting.wait(0.05)

    try:
        wait_until(
            lambda: (running.data_dir / "sgpipe-up.json").exists() and _ready(running.base_url),
            120,
            "sgpipe up to be ready",
        )
        poster = threading.Thread(target=traffic, daemon=True)
        poster.start()
        wait_until(
            lambda: posted.count(200) >= 5 and dead_letter_stored(running.data_dir),
            120,
            "accepted batches and a stored dead letter",
        )
        result = forked.run(
            [*SGPIPE, "top", "--data-dir", str(running.data_dir), "--once", "--json"]
            + ["--interval", "3"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr.decode()
        snapshot: dict[str, Any] = json.loads(result.stdout)
        screen = forked.run(
            [*SGPIPE, "top", "--data-dir", str(running.data_dir), "--once"],
            capture_output=True,
            timeout=60,
            check=False,
        )
    finally:
        stop_posting.set()
        stop_pipeline(running)

    rows = {row["stage"]: row for row in snapshot["stages"]}
    assert list(rows) == ["ingest", "process", "sink", "dead_letters"], snapshot
    for stage in ("ingest", "process", "sink"):
        assert rows[stage]["in_per_second"] > 0, (stage, snapshot)
        assert rows[stage]["out_per_second"] > 0, (stage, snapshot)
        assert rows[stage]["ready"] is True, (stage, snapshot)
    assert rows["process"]["dead_letters"] > 0
    assert rows["dead_letters"]["ready"] is True
    assert rows["sink"]["last_commit_age_seconds"] is not None
    assert snapshot["received_to_stored_p50_seconds"] is not None
    assert snapshot["stored_last_minute"] > 0
    assert screen.returncode == 0, screen.stderr.decode()
    text = screen.stdout.decode()
    for stage in rows:
        assert stage in text


def dead_letter_stored(data_dir: Path) -> bool:
    """Polled from this process: no `sgpipe query` process per poll."""
    try:
        answer = served_store_answer(data_dir, "SELECT count() > 0 FROM dead_letters")
    except OSError:  # the sink has not created the table yet
        return False
    return answer == "1\n"


def _ready(base_url: str) -> bool:
    try:
        status, _ = get(f"{base_url}/readyz")
    except OSError:  # not listening yet
        return False
    return status == 200


def test_top_without_a_running_pipeline_says_so_in_one_line(tmp_path: Path) -> None:
    result = forked.run(
        [*SGPIPE, "top", "--data-dir", str(tmp_path), "--once"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "no sgpipe up is running on" in lines[0], lines
