"""`sgpipe up`'s embedded services on ports of their own (issue 19): with nothing pinned, two
`sgpipe up` on two data dirs, with only `--port` differing, both start, and `sgpipe query`
finds each one's ClickHouse through its data dir."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests import forked
from tests.integration.kafka_tools import FAST_GROUP_SETTINGS
from tests.integration.test_up import (
    SGPIPE,
    RunningPipeline,
    _wait_until_serving,
    stop_pipeline,
)
from tests.ports import free_port
from tests.sendgrid_vector import PUBLIC_KEY

pytest.importorskip("chdb")

pytestmark = pytest.mark.clickhouse

# No embedded port in it: the defaults are what is tested. (The in-memory broker keeps two
# pipelines light on a shared machine; the port choice is the same for the durable one.)
CONFIG = {
    "webhooks": [{"name": "main", "public_keys": [PUBLIC_KEY], "timestamp_tolerance": 0}],
    "embedded": {"broker_storage": "memory"},
    "kafka": dict(FAST_GROUP_SETTINGS),
    "logging": {"format": "json"},
}


def start_up(directory: Path, config: Path) -> RunningPipeline:
    directory.mkdir()
    port = free_port()
    log = directory / "sgpipe-up.log"
    data_dir = directory / "data"
    with log.open("wb") as output:
        process = forked.Popen(
            [*SGPIPE, "up", "--config", str(config), "--data-dir", str(data_dir)]
            + ["--port", str(port)],
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    return RunningPipeline(process, f"http://127.0.0.1:{port}", data_dir, config, log)


def sgpipe_query(running: RunningPipeline, sql: str) -> str:
    # The same config file for both: only the data dir tells them apart.
    result = forked.run(
        [*SGPIPE, "query", "--config", str(running.config), "--data-dir", str(running.data_dir)]
        + [sql],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    return str(result.stdout.decode())


def test_two_ups_with_only_the_ingress_port_differing_both_start(tmp_path: Path) -> None:
    config = tmp_path / "sgpipe.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    first = start_up(tmp_path / "a", config)
    second = start_up(tmp_path / "b", config)
    try:
        _wait_until_serving(first)
        _wait_until_serving(second)
        states = [
            json.loads((running.data_dir / "sgpipe-up.json").read_text())
            for running in (first, second)
        ]
        clickhouse_urls = {state["clickhouse_url"] for state in states}
        brokers = {state["kafka_bootstrap_servers"] for state in states}
        assert len(clickhouse_urls) == 2 and len(brokers) == 2, states
        for running, state in zip((first, second), states, strict=True):
            # Where BI tools connect is said at start, and it is where the store is.
            lines = [json.loads(line) for line in running.log.read_text().splitlines()]
            said = [line for line in lines if line.get("event") == "BI tools connect to"]
            assert said and said[0]["url"] == state["clickhouse_url"], running.log.read_text()
            assert said[0]["user"] == "sgpipe_bi"
        # `sgpipe query --data-dir D` reaches D's own store.
        sgpipe_query(first, "CREATE DATABASE only_in_a")
        count = "SELECT count() FROM system.databases WHERE name = 'only_in_a'"
        assert sgpipe_query(first, count) == "1\n"
        assert sgpipe_query(second, count) == "0\n"
    finally:
        stop_pipeline(first)
        stop_pipeline(second)
    assert first.process.returncode == 0, first.log.read_text()
    assert second.process.returncode == 0, second.log.read_text()
