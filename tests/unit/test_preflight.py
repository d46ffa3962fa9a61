"""Preflight: which ports `sgpipe up` claims, how a busy one is reported, the data-dir lock."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sgpipe.preflight import (
    LOCK_FILE,
    PortClaim,
    PreflightFailed,
    Problem,
    check_ports,
    check_up,
    data_dir_holder,
    lock_data_dir,
    up_port_claims,
)
from sgpipe.runtime.settings import (
    ClickHouseSettings,
    EmbeddedSettings,
    IngestSettings,
    KafkaSettings,
    Settings,
)


@pytest.fixture
def listening() -> Iterator[int]:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


def free_settings() -> Settings:
    """Every port 0: nothing to check."""
    return Settings(
        ingest=IngestSettings(port=0),
        embedded=EmbeddedSettings(kafka_port=0, clickhouse_http_port=0),
    )


def test_up_claims_only_the_embedded_services_it_will_start() -> None:
    embedded = up_port_claims(Settings())
    assert [(c.setting, c.port) for c in embedded] == [
        ("ingest.port", 8080),
        # Unset by default: free ports chosen when the services start (issue 19).
        ("embedded.kafka_port", 0),
        ("embedded.storage_port", 0),  # 0: recorded or free, checked when the storage starts
        ("embedded.clickhouse_http_port", 0),
    ]
    pinned = Settings(embedded=EmbeddedSettings(kafka_port=19092, clickhouse_http_port=18123))
    assert [(c.setting, c.port) for c in up_port_claims(pinned)][1::2] == [
        ("embedded.kafka_port", 19092),
        ("embedded.clickhouse_http_port", 18123),
    ]
    in_memory = Settings(embedded=EmbeddedSettings(broker_storage="memory"))
    assert "embedded.storage_port" not in [c.setting for c in up_port_claims(in_memory)]
    external = Settings(
        kafka=KafkaSettings(bootstrap_servers="kafka:9092"),
        clickhouse=ClickHouseSettings(url="http://clickhouse:8123"),
    )
    assert [c.setting for c in up_port_claims(external)] == ["ingest.port"]


def test_a_busy_port_names_its_setting_and_variable(listening: int) -> None:
    claim = PortClaim("embedded.kafka_port", "127.0.0.1", listening)
    assert check_ports([claim]) == [
        Problem(
            f"embedded.kafka_port {listening} is in use; "
            "set embedded.kafka_port or SGPIPE_EMBEDDED__KAFKA_PORT"
        )
    ]


def test_a_busy_port_is_found_from_the_wildcard_address(listening: int) -> None:
    claim = PortClaim("ingest.port", "0.0.0.0", listening, "--port")
    assert check_ports([claim]) == [
        Problem(
            f"ingest.port {listening} is in use; set ingest.port or SGPIPE_INGEST__PORT (or --port)"
        )
    ]


def test_a_free_port_and_port_zero_pass() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert check_ports([PortClaim("ingest.port", "127.0.0.1", port)]) == []
    assert check_ports([PortClaim("ingest.port", "127.0.0.1", 0)]) == []


def test_a_host_that_is_not_ours() -> None:
    # TEST-NET-1 (RFC 5737): never an address of this machine.
    claim = PortClaim("embedded.kafka_port", "192.0.2.1", 9092)
    assert check_ports([claim]) == [
        Problem("embedded.host 192.0.2.1 is not an address of this machine; set embedded.host")
    ]


def test_two_settings_claiming_one_port() -> None:
    claims = [
        PortClaim("ingest.port", "0.0.0.0", 18080),
        PortClaim("embedded.kafka_port", "127.0.0.1", 18080),
    ]
    assert check_ports(claims) == [
        Problem(
            "ingest.port and embedded.kafka_port are both 18080; "
            "set embedded.kafka_port or SGPIPE_EMBEDDED__KAFKA_PORT"
        )
    ]


def test_check_up_creates_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    assert check_up(free_settings(), data_dir) == []
    assert not data_dir.exists()


def test_the_lock_records_its_holder_and_is_released(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    lock = lock_data_dir(data_dir, "up")
    try:
        record = json.loads((data_dir / LOCK_FILE).read_text())
        assert record == {"pid": os.getpid(), "command": "up"}
        # flock is per open file description: a second lock, even from this process, fails.
        with pytest.raises(PreflightFailed) as caught:
            lock_data_dir(data_dir, "query")
        assert caught.value.problems == [
            Problem(f"data dir {data_dir} is in use by another sgpipe up (pid {os.getpid()})")
        ]
        assert check_up(free_settings(), data_dir) == caught.value.problems
    finally:
        lock.release()
    assert data_dir_holder(data_dir) is None
    assert check_up(free_settings(), data_dir) == []
    lock_data_dir(data_dir, "query").release()


def test_a_crashed_holder_leaves_no_lock(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, sys; from pathlib import Path; from sgpipe.preflight import lock_data_dir;"
            "lock_data_dir(Path(sys.argv[1]), 'up'); os._exit(9)",
            str(data_dir),
        ],
        check=False,
    )
    assert (data_dir / LOCK_FILE).exists()
    assert data_dir_holder(data_dir) is None
    lock_data_dir(data_dir, "up").release()


def test_a_data_dir_in_use_hides_the_port_problems(tmp_path: Path, listening: int) -> None:
    # The ports are most likely the holder's own: one line about the data dir says it all.
    settings = Settings(
        ingest=IngestSettings(port=listening, host="127.0.0.1"),
        embedded=EmbeddedSettings(kafka_port=0, clickhouse_http_port=0),
    )
    lock = lock_data_dir(tmp_path, "up")
    try:
        problems = check_up(settings, tmp_path)
    finally:
        lock.release()
    assert [problem.message for problem in problems] == [
        f"data dir {tmp_path} is in use by another sgpipe up (pid {os.getpid()})"
    ]
    assert [problem.message for problem in check_up(settings, tmp_path)] == [
        f"ingest.port {listening} is in use; set ingest.port or SGPIPE_INGEST__PORT (or --port)"
    ]
