"""kill -9 of `sgpipe up` on the durable embedded broker: the broker and its storage die with
it, a restart on the same data dir keeps every acknowledged batch and resumes from the
committed offsets."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition

from sgpipe.embedded.topics import embedded_topics
from sgpipe.runtime.settings import Settings
from tests.integration.test_up import (
    RunningPipeline,
    _wait_until_serving,
    post,
    signed_headers,
    start_pipeline,
    stop_pipeline,
)
from tests.sendgrid_vector import BODY

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]


def committed_raw_batches(bootstrap_servers: str) -> int:
    """Offsets the processor committed on the raw topic, summed over its partitions."""
    defaults = Settings()

    async def read() -> int:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
        await admin.start()
        try:
            partitions = [
                TopicPartition(defaults.kafka.topics.raw, number)
                for number in range(embedded_topics(defaults.kafka.topics).partitions)
            ]
            offsets = await admin.list_consumer_group_offsets(
                defaults.processor.group_id, partitions=partitions
            )
        finally:
            await admin.close()
        return sum(max(meta.offset, 0) for meta in offsets.values())

    return asyncio.run(read())


def wait_refused(host: str, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=1).close()
        except OSError:
            return
        time.sleep(0.1)
    raise AssertionError(f"{host}:{port} still accepts connections: an orphan survived")


def kill_9(running: RunningPipeline) -> tuple[int, int]:
    """SIGKILL `sgpipe up`; returns the broker and storage ports it had, once both closed."""
    state = json.loads((running.data_dir / "sgpipe-up.json").read_text())
    broker_port = int(state["kafka_bootstrap_servers"].rsplit(":", 1)[1])
    storage_port = json.loads((running.data_dir / "broker" / "ports.json").read_text())["s3"]
    running.process.kill()
    running.process.wait(timeout=30)
    # PR_SET_PDEATHSIG: tansu and weed go down with their parent.
    wait_refused("127.0.0.1", broker_port)
    wait_refused("127.0.0.1", storage_port)
    return broker_port, storage_port


def restart(tmp_path: Path) -> RunningPipeline:
    running = start_pipeline(tmp_path)
    _wait_until_serving(running)
    return running


def test_kill_9_of_up_loses_no_acknowledged_batch_and_resumes_offsets(tmp_path: Path) -> None:
    first = restart(tmp_path)
    try:
        status, _, _ = post(f"{first.base_url}/webhooks/main", BODY, signed_headers())
        assert status == 200
        first.wait_for("SELECT count() FROM email_events FINAL", "1\n")
        state = json.loads((first.data_dir / "sgpipe-up.json").read_text())
        deadline = time.monotonic() + 30
        while committed_raw_batches(state["kafka_bootstrap_servers"]) != 1:
            assert time.monotonic() < deadline, "the processor never committed its batch"
            time.sleep(0.2)
        kill_9(first)
    finally:
        stop_pipeline(first)

    second = restart(tmp_path)
    try:
        state = json.loads((second.data_dir / "sgpipe-up.json").read_text())
        # Committed offsets survived the kill: the processor resumes after its batch.
        assert committed_raw_batches(state["kafka_bootstrap_servers"]) == 1
        assert second.query("SELECT count() FROM email_events FINAL") == "1\n"
        # A batch acknowledged right before the next kill -9 ...
        status, headers, _ = post(f"{second.base_url}/webhooks/main", BODY, signed_headers())
        assert status == 200
        acknowledged = headers["X-Request-Id"]
        kill_9(second)
    finally:
        stop_pipeline(second)

    third = restart(tmp_path)
    try:
        # ... is in ClickHouse after the restart (the newer copy replaces the older one).
        third.wait_for("SELECT request_id FROM email_events FINAL", f"{acknowledged}\n")
    finally:
        stop_pipeline(third)


def test_a_taken_storage_port_stops_up_with_exit_code_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        running = start_pipeline(tmp_path, embedded={"storage_port": port})
        try:
            assert running.process.wait(timeout=60) == 2
        finally:
            stop_pipeline(running)
    assert f"embedded.storage_port {port}" in running.log.read_text()
