"""The simulator against the real pipeline: `sgpipe up` (embedded broker and ClickHouse) with a
webhook keyed by `sgpipe keys generate`, fed by `sgpipe simulate` with duplicates. SendGrid's
duplicates must not show: exactly N distinct events through FINAL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import forked
from tests.integration.test_up import SGPIPE, _wait_until_serving, start_pipeline, stop_pipeline

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

EVENTS = 2000


def test_a_simulated_run_with_duplicates_ends_with_exactly_n_events(tmp_path: Path) -> None:
    key_file = tmp_path / "simulator.pem"
    generated = forked.run(
        [*SGPIPE, "keys", "generate", "--out", str(key_file)],
        capture_output=True,
        timeout=60,
        check=True,
    )
    public_key = generated.stdout.decode().strip()
    webhooks = [{"name": "main", "public_keys": [public_key], "timestamp_tolerance": 0}]
    running = start_pipeline(tmp_path, webhooks=webhooks)
    try:
        _wait_until_serving(running)
        simulated = forked.run(
            [
                *SGPIPE,
                "simulate",
                "--url",
                f"{running.base_url}/webhooks/main",
                "--private-key",
                str(key_file),
                "--events",
                str(EVENTS),
                "--duplicates",
                "0.2",
                "--seed",
                "2024",
                # Many small POSTs spread over ~2.4 s: whole batches are re-sent too, and copies
                # reach the processor in different polls, past its best-effort dedup, so
                # exactness has to come from ClickHouse.
                "--rate",
                "1000",
                "--flush-interval",
                "0.1",
                "--json",
            ],
            capture_output=True,
            timeout=300,
            check=False,
        )
        assert simulated.returncode == 0, simulated.stdout.decode() + simulated.stderr.decode()
        summary = json.loads(simulated.stdout)
        assert summary["events"] == summary["events_accepted"] == EVENTS
        assert summary["duplicate_events"] > 100 and summary["resent_batches"] > 0

        running.wait_for(
            "SELECT count(), uniqExact(sg_event_id) FROM email_events FINAL",
            f"{EVENTS}\t{EVENTS}\n",
            timeout=120,
        )
        # Every lifecycle stage made it through the processor, none became a dead letter.
        types = set(running.query("SELECT DISTINCT event FROM email_events FINAL").split())
        assert {"processed", "delivered", "deferred", "bounce", "dropped"} <= types
    finally:
        stop_pipeline(running)
