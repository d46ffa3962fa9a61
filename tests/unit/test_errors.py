"""The one table that says which failures are retried, dead-lettered or fatal."""

from __future__ import annotations

import errno

import pytest
from aiokafka import errors as kafka
from clickhouse_connect.driver import exceptions as ch

from processors.errors import InvalidBatch, InvalidEvent
from schemas.email_event import UnknownWriterSchema
from sgpipe.runtime.errors import (
    CLICKHOUSE_FATAL_CODES,
    CLICKHOUSE_RETRIABLE_CODES,
    ErrorClass,
    FatalStageError,
    InvalidMessage,
    classify,
    clickhouse_error_code,
    describe,
    step_error_class,
)
from sgpipe.runtime.schema_registry_errors import SchemaRegistryError

RETRIABLE, POISON, FATAL = ErrorClass.RETRIABLE, ErrorClass.POISON, ErrorClass.FATAL


def server_error(code: int, name: str) -> ch.DatabaseError:
    """What clickhouse-connect raises for an error answer from the server."""
    return ch.DatabaseError(
        f"Received ClickHouse exception, code: {code}, server response: Code: {code}. "
        f"DB::Exception: something. ({name}) (version 26.9.2.1)",
        code=code,
        name=name,
    )


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        # Poison: the record can never succeed.
        pytest.param(InvalidMessage("x", "y"), POISON, id="invalid-message"),
        pytest.param(InvalidBatch("invalid_json", "..."), POISON, id="invalid-batch"),
        pytest.param(InvalidEvent("missing_event", "..."), POISON, id="invalid-event"),
        # Kafka: transient broker answers and connection trouble.
        pytest.param(kafka.KafkaConnectionError("no broker"), RETRIABLE, id="kafka-connection"),
        pytest.param(kafka.KafkaTimeoutError(), RETRIABLE, id="kafka-client-timeout"),
        pytest.param(kafka.RequestTimedOutError(), RETRIABLE, id="kafka-request-timeout"),
        pytest.param(kafka.NotLeaderForPartitionError(), RETRIABLE, id="kafka-not-leader"),
        pytest.param(kafka.LeaderNotAvailableError(), RETRIABLE, id="kafka-leader-election"),
        pytest.param(kafka.UnknownTopicOrPartitionError(), RETRIABLE, id="kafka-topic-missing"),
        pytest.param(kafka.NotEnoughReplicasError(), RETRIABLE, id="kafka-isr-shrunk"),
        pytest.param(kafka.NodeNotReadyError(), RETRIABLE, id="kafka-node-not-ready"),
        pytest.param(kafka.UnknownError(), RETRIABLE, id="kafka-unknown-tansu-storage-down"),
        pytest.param(kafka.KafkaStorageError(), RETRIABLE, id="kafka-storage"),
        pytest.param(kafka.GroupCoordinatorNotAvailableError(), RETRIABLE, id="kafka-coordinator"),
        # Kafka: configuration and permissions.
        pytest.param(kafka.TopicAuthorizationFailedError(), FATAL, id="kafka-topic-acl"),
        pytest.param(kafka.GroupAuthorizationFailedError(), FATAL, id="kafka-group-acl"),
        pytest.param(kafka.SaslAuthenticationFailed(), FATAL, id="kafka-sasl"),
        pytest.param(kafka.MessageSizeTooLargeError(), FATAL, id="kafka-message-size-limit"),
        pytest.param(kafka.UnsupportedVersionError(), FATAL, id="kafka-unsupported-version"),
        pytest.param(kafka.IllegalStateError(), FATAL, id="kafka-unknown-non-retriable"),
        # ClickHouse: transport.
        pytest.param(ch.OperationalError("Network Error: refused"), RETRIABLE, id="ch-unreachable"),
        pytest.param(
            ch.DatabaseError("HTTP driver received HTTP status 503"), RETRIABLE, id="ch-http-503"
        ),
        pytest.param(
            ch.DatabaseError("HTTP driver received HTTP status 404"), FATAL, id="ch-http-404"
        ),
        # ClickHouse: server codes.
        pytest.param(server_error(241, "MEMORY_LIMIT_EXCEEDED"), RETRIABLE, id="ch-memory"),
        pytest.param(server_error(252, "TOO_MANY_PARTS"), RETRIABLE, id="ch-too-many-parts"),
        pytest.param(server_error(159, "TIMEOUT_EXCEEDED"), RETRIABLE, id="ch-timeout"),
        pytest.param(server_error(516, "AUTHENTICATION_FAILED"), FATAL, id="ch-auth"),
        pytest.param(server_error(497, "ACCESS_DENIED"), FATAL, id="ch-access"),
        pytest.param(server_error(60, "UNKNOWN_TABLE"), FATAL, id="ch-unknown-table"),
        pytest.param(server_error(16, "NO_SUCH_COLUMN_IN_TABLE"), FATAL, id="ch-no-column"),
        pytest.param(server_error(53, "TYPE_MISMATCH"), FATAL, id="ch-type-mismatch"),
        pytest.param(server_error(9999, "SOMETHING_NEW"), FATAL, id="ch-unknown-code"),
        pytest.param(
            ch.OperationalError("code: 516 after retry", code=516), FATAL, id="ch-auth-after-retry"
        ),
        # ClickHouse: raised client-side, before anything is sent.
        pytest.param(ch.DataError("cannot serialize a str as UInt64"), FATAL, id="ch-data"),
        pytest.param(ch.ProgrammingError("bad column list"), FATAL, id="ch-programming"),
        # Python's own.
        pytest.param(ConnectionResetError(), RETRIABLE, id="connection-reset"),
        pytest.param(TimeoutError(), RETRIABLE, id="timeout"),
        pytest.param(TimeoutError(), RETRIABLE, id="asyncio-timeout"),
        pytest.param(OSError(errno.EHOSTUNREACH, "unreachable"), RETRIABLE, id="os-network"),
        pytest.param(FatalStageError("stop"), FATAL, id="fatal-stage"),
        pytest.param(TypeError("a bug"), FATAL, id="bug"),
        # The event contract and its registry.
        # Record content, whatever it names: poison, never fatal.
        pytest.param(UnknownWriterSchema("an unknown writer schema"), POISON, id="unknown-writer"),
        pytest.param(SchemaRegistryError("down"), RETRIABLE, id="registry-unreachable"),
        pytest.param(SchemaRegistryError("5xx", status=503), RETRIABLE, id="registry-5xx"),
        pytest.param(SchemaRegistryError("busy", status=429), RETRIABLE, id="registry-429"),
        pytest.param(SchemaRegistryError("creds", status=401), FATAL, id="registry-auth"),
        pytest.param(SchemaRegistryError("incompatible", status=409), FATAL, id="registry-409"),
        pytest.param(KeyError("a bug"), FATAL, id="bug-key"),
    ],
)
def test_every_error_has_its_class(error: BaseException, expected: ErrorClass) -> None:
    assert classify(error) is expected


def test_the_clickhouse_code_tables_do_not_overlap() -> None:
    assert not set(CLICKHOUSE_RETRIABLE_CODES) & set(CLICKHOUSE_FATAL_CODES)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ch.DatabaseError("x", code=60), 60),
        (RuntimeError("Code: 241. DB::Exception: Memory limit (MEMORY_LIMIT_EXCEEDED)"), 241),
        (RuntimeError("Received ClickHouse exception, code: 516, server response: ..."), 516),
        (RuntimeError("no code here"), None),
    ],
)
def test_clickhouse_error_codes_are_read_from_the_attribute_or_the_text(
    error: BaseException, code: int | None
) -> None:
    assert clickhouse_error_code(error) == code


def test_describe_is_one_short_line() -> None:
    long_error = ValueError("first line " + "x" * 1000 + "\nsecond line with a body")
    text = describe(long_error)
    assert "\n" not in text
    assert text.startswith("ValueError: first line")
    assert len(text) < 330
    assert describe(KeyError()) == "KeyError"
    # aiokafka puts the class name into the message itself: not twice.
    assert describe(kafka.KafkaConnectionError("Unable to bootstrap")) == (
        "KafkaConnectionError: Unable to bootstrap"
    )


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ValueError("this record breaks the step"), POISON),
        (KeyError("a bug this record triggers"), POISON),
        (InvalidMessage("x", "y"), POISON),
        (UnknownWriterSchema("bytes that look framed with an unknown schema"), POISON),
        (FatalStageError("stop"), FATAL),
        (MemoryError(), FATAL),
    ],
)
def test_what_a_pure_step_raises_is_poison_unless_the_stage_cannot_go_on(
    error: BaseException, expected: ErrorClass
) -> None:
    assert step_error_class(error) is expected


def test_the_sink_names_each_column_that_does_not_fit_the_contract() -> None:
    from schemas.event_fields import clickhouse_columns
    from sinks.clickhouse import table_mismatches

    table = dict(clickhouse_columns())
    assert table_mismatches(table) == []
    # A storage choice that inserts the same values is fine.
    table["event"] = "String"
    table["pool"] = "Tuple(name Nullable(String), id Nullable(UInt64))"
    assert table_mismatches(table) == []
    table["sg_event_id"] = "UInt64"
    table["email"] = "String"
    del table["attempt"]
    assert table_mismatches(table) == [
        "column sg_event_id is UInt64, expected String",
        "column email is String, expected Nullable(String)",
        "column attempt is missing",
    ]


def test_a_tuple_column_as_clickhouse_describes_it_fits() -> None:
    from schemas.event_fields import clickhouse_columns
    from sinks.clickhouse import table_mismatches

    table = dict(clickhouse_columns())
    # DESCRIBE TABLE's own layout of the pool column.
    table["pool"] = "Tuple(\n    name LowCardinality(Nullable(String)),\n    id Nullable(UInt64))"
    assert table_mismatches(table) == []
