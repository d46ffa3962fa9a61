"""`sgpipe up`'s children as data: the table's counts, start and stop order, and the status
messages a child reports its ports and readiness with."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from sgpipe.embedded.child import RestartBackoff
from sgpipe.runtime import status
from sgpipe.runtime.settings import ConfigError, Settings, read_settings
from sgpipe.runtime.status import StatusMessage, parse_status
from sgpipe.up.children import ReadyCondition
from sgpipe.up.report import Drained
from sgpipe.up.supervisor import (
    ChildSpec,
    children_table,
    clamp_to_partitions,
    replica_count,
)

DATA_DIR = Path("/tmp/sgpipe-table-test")


def table(
    settings: Settings, *, drain: bool, processors: int = 1, sinks: int = 1
) -> dict[str, ChildSpec]:
    specs = children_table(
        settings, processors=processors, sinks=sinks, drain=drain, data_dir=DATA_DIR
    )
    return {spec.role: spec for spec in specs}


@pytest.mark.parametrize(
    ("setting", "cores", "expected"),
    [(None, 1, 1), (None, 2, 1), (None, 3, 1), (None, 8, 4), (3, 2, 3), (1, 16, 1)],
)
def test_a_stage_runs_one_process_per_two_cores_unless_set(
    setting: int | None, cores: int, expected: int
) -> None:
    assert replica_count(setting, cores) == expected


def test_more_consumers_than_partitions_are_cut_with_a_warning() -> None:
    with capture_logs() as logs:
        assert clamp_to_partitions("sink", 5, "sgpipe.events", 3) == 3
        assert clamp_to_partitions("process", 2, "sgpipe.raw", 2) == 2
        assert clamp_to_partitions("process", 4, "sgpipe.raw", None) == 4  # unknown: kept
    (warning,) = logs
    assert warning["log_level"] == "warning"
    assert (warning["role"], warning["asked"], warning["running"], warning["topic"]) == (
        "sink",
        5,
        3,
        "sgpipe.events",
    )


def test_replicas_are_named_after_their_role() -> None:
    specs = table(Settings(), drain=False, processors=3, sinks=2)
    assert specs["process"].names == ["process", "process-2", "process-3"]
    assert specs["sink"].names == ["sink", "sink-2"]
    assert specs["ingest"].names == ["ingest"]


def test_stop_order_ingress_first_then_stages_then_the_store() -> None:
    durable = table(Settings(), drain=False)
    assert durable["ingest"].stop_rank < durable["process"].stop_rank
    # A durable broker keeps what the processors write: processors and sinks stop together.
    assert durable["process"].stop_rank == durable["sink"].stop_rank
    assert durable["sink"].stop_rank < durable["clickhouse"].stop_rank
    memory = table(Settings(), drain=True)
    # The in-memory broker: the sinks still read what the processors write while draining.
    assert memory["ingest"].stop_rank < memory["process"].stop_rank < memory["sink"].stop_rank
    assert memory["sink"].stop_rank < memory["clickhouse"].stop_rank
    assert memory["process"].extra_args == ("--drain",) == memory["sink"].extra_args
    assert durable["process"].extra_args == ()


def test_start_order_what_waits_for_what() -> None:
    durable = table(Settings(), drain=False)
    assert durable["ingest"].start_after == ()  # its 2xx means "in Kafka"
    assert durable["sink"].start_after == ("clickhouse",)
    assert durable["sink"].first_alone  # one sink migrates the database, then the others
    memory = table(Settings(), drain=True)
    assert set(memory["ingest"].start_after) == {"process", "sink"}
    external = table(
        Settings.model_validate({"clickhouse": {"url": "http://ch:8123"}}), drain=False
    )
    assert "clickhouse" not in external
    assert external["sink"].start_after == ()


def test_ready_conditions_are_status_messages() -> None:
    specs = table(Settings(), drain=False)
    consuming = StatusMessage("consuming")
    health = StatusMessage("listening", "health", 1234)
    ingress = StatusMessage("listening", "ingress", 8080)
    clickhouse = StatusMessage("listening", "clickhouse", 8123, "http://127.0.0.1:8123")
    assert specs["process"].ready.met_by(consuming) and not specs["process"].ready.met_by(health)
    assert specs["ingest"].ready.met_by(ingress) and not specs["ingest"].ready.met_by(health)
    assert specs["clickhouse"].ready.met_by(clickhouse)
    assert not ReadyCondition("listening", "clickhouse").met_by(ingress)


def test_status_messages_round_trip_through_a_pipe() -> None:
    read_end, write_end = os.pipe()
    status.open_status_channel(write_end)
    try:
        status.report_listening("health", 41233)
        status.report_listening("clickhouse", 8123, url="http://127.0.0.1:8123")
        status.report("consuming")
    finally:
        status.open_status_channel(None)  # closes the write end
    with os.fdopen(read_end, "rb") as lines:
        messages = [parse_status(line) for line in lines]
    assert messages == [
        StatusMessage("listening", "health", 41233),
        StatusMessage("listening", "clickhouse", 8123, "http://127.0.0.1:8123"),
        StatusMessage("consuming"),
    ]


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b"[1, 2]",
        b'{"event": "consuming", "port": 1}',  # a log line is not a status message
        b'{"sgpipe_status": "exploded"}',
    ],
)
def test_anything_else_on_the_status_pipe_is_ignored(line: bytes) -> None:
    assert parse_status(line) is None


def test_a_bad_port_in_a_status_message_is_not_taken() -> None:
    message = parse_status(b'{"sgpipe_status": "listening", "service": "nope", "port": true}')
    assert message == StatusMessage("listening", None, None, None)


def test_without_a_channel_reporting_does_nothing() -> None:
    status.open_status_channel(None)
    status.report("consuming")  # a stage run by hand (Kubernetes): no supervisor to tell


def test_processor_and_sink_counts_are_settings_and_flags(tmp_path: Path) -> None:
    config = tmp_path / "sgpipe.yaml"
    config.write_text("up:\n  processors: 3\n")
    loaded = read_settings(config, {}, {"up.sinks": 2})
    assert (loaded.settings.up.processors, loaded.settings.up.sinks) == (3, 2)
    assert Settings().up.processors is None and Settings().up.sinks is None
    with pytest.raises(ConfigError, match=r"up\.processors \(command line\)"):
        read_settings(None, {}, {"up.processors": 0})  # --processors 0
    with pytest.raises(ConfigError, match="SGPIPE_UP__SINKS"):
        read_settings(None, {"SGPIPE_UP__SINKS": "0"}, {})


def test_one_restart_backoff_doubles_to_its_cap_and_starts_over_after_a_stable_run() -> None:
    """The policy of `sgpipe up`'s children and of the embedded broker's processes alike."""
    backoff = RestartBackoff()
    crash_loop = [backoff.next_delay(up_seconds=0.1) for _ in range(9)]
    assert crash_loop == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert backoff.next_delay(up_seconds=61.0) == 0.5  # it had run fine for a minute
    assert backoff.next_delay(up_seconds=1.0) == 1.0


def test_the_stop_report_adds_up_what_each_replica_drained() -> None:
    first = Drained.from_reports({"process": {"committed": 2, "written": {"events": 7}}})
    second = Drained.from_reports({"process": {"committed": 1, "written": {"events": 3}}})
    sink = Drained.from_reports({"sink": {"committed": 10}})
    assert Drained.total([first, second, sink]) == Drained(
        processor_batches=3, processor_events=10, sink_events=10
    )
