"""Every failure a stage meets is one of three classes, decided here and nowhere else.

* **retriable** -- the infrastructure is unavailable for now (broker or ClickHouse down, a
  timeout, a leader election): back off, keep the batch, retry; the stall shows in
  ``/readyz`` and ``sgpipe_errors_total{error_class="retriable"}``.
* **poison** -- this record can never succeed (it does not parse, names a writer schema nobody
  knows, a pure step rejected it): dead-letter it with its reason and move on. Whatever bytes
  and headers a record carries, it is never more than poison: only the environment is fatal.
* **fatal** -- nothing will succeed until a person acts (wrong credentials, a table that does
  not match the contract, a broker that rejects our configuration, a bug, never a record's
  content): stop the stage
  with a clear message and exit code 3, without committing, so Kubernetes restarts it and
  the restarts surface the problem.

Kafka and ClickHouse error codes map to classes in the two tables below; unknown errors are
fatal, because retrying something not understood stalls silently.
"""

from __future__ import annotations

import asyncio
import re
from enum import StrEnum
from typing import Final

from aiokafka import errors as kafka_errors

from schemas.email_event import UnknownWriterSchema
from sgpipe.runtime.schema_registry_errors import SchemaRegistryError


class ErrorClass(StrEnum):
    RETRIABLE = "retriable"
    POISON = "poison"
    FATAL = "fatal"


class InvalidMessage(ValueError):
    """A record (or one element of it) can never be processed: poison.

    ``reason`` is a stable code for metrics and replay filters; ``detail`` is for people.
    Stages raise it (or a subclass) from their pure steps.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class FatalStageError(RuntimeError):
    """The stage must stop: ``str(exc)`` is the one line an operator reads."""


# --- Kafka -------------------------------------------------------------------------------------

# aiokafka marks most transient broker answers ``retriable``; these are transient too.
_KAFKA_RETRIABLE: Final[tuple[type[BaseException], ...]] = (
    kafka_errors.KafkaTimeoutError,  # a send or request that timed out client-side
    kafka_errors.KafkaUnavailableError,
    kafka_errors.RequestTimedOutError,
    kafka_errors.BrokerNotAvailableError,
    kafka_errors.ReplicaNotAvailableError,
    kafka_errors.RebalanceInProgressError,
    kafka_errors.ProducerClosed,  # the producer is being restarted under us
    # The broker's catch-all. tansu answers it while its storage (SeaweedFS) is down, and
    # Apache Kafka uses it for unexpected server-side failures: transient either way.
    kafka_errors.UnknownError,
)
# Configuration or permission problems: retrying changes nothing.
_KAFKA_FATAL: Final[tuple[type[BaseException], ...]] = (
    kafka_errors.TopicAuthorizationFailedError,
    kafka_errors.GroupAuthorizationFailedError,
    kafka_errors.ClusterAuthorizationFailedError,
    kafka_errors.SaslAuthenticationFailed,
    kafka_errors.AuthenticationFailedError,
    kafka_errors.AuthenticationMethodNotSupported,
    kafka_errors.UnsupportedSaslMechanismError,
    kafka_errors.IllegalSaslStateError,
    # The broker refuses a record we sized within kafka.max_request_size: the broker's
    # message.max.bytes is lower than ours. A configuration mismatch, not one bad record.
    kafka_errors.MessageSizeTooLargeError,
    kafka_errors.RecordTooLargeError,
    kafka_errors.RecordListTooLargeError,
    kafka_errors.InvalidRequiredAcksError,
    kafka_errors.UnsupportedVersionError,
    kafka_errors.UnsupportedCodecError,
    kafka_errors.KafkaConfigurationError,
    kafka_errors.InvalidTopicError,
)

# --- ClickHouse (src/Common/ErrorCodes.cpp) -------------------------------------------------

CLICKHOUSE_RETRIABLE_CODES: Final[dict[int, str]] = {
    3: "UNEXPECTED_END_OF_FILE",
    159: "TIMEOUT_EXCEEDED",
    164: "READONLY",  # a replica gone read-only (lost Keeper) recovers by itself
    202: "TOO_MANY_SIMULTANEOUS_QUERIES",
    203: "NO_FREE_CONNECTION",
    209: "SOCKET_TIMEOUT",
    210: "NETWORK_ERROR",
    225: "NO_ZOOKEEPER",
    236: "ABORTED",
    241: "MEMORY_LIMIT_EXCEEDED",
    242: "TABLE_IS_READ_ONLY",
    252: "TOO_MANY_PARTS",
    285: "TOO_FEW_LIVE_REPLICAS",
    286: "UNSATISFIED_QUORUM_FOR_PREVIOUS_WRITE",
    319: "UNKNOWN_STATUS_OF_INSERT",
    394: "QUERY_WAS_CANCELLED",
    425: "SYSTEM_ERROR",
    439: "CANNOT_SCHEDULE_TASK",
    999: "KEEPER_EXCEPTION",
    1000: "POCO_EXCEPTION",
}
CLICKHOUSE_FATAL_CODES: Final[dict[int, str]] = {
    16: "NO_SUCH_COLUMN_IN_TABLE",
    27: "CANNOT_PARSE_INPUT_ASSERTION_FAILED",
    47: "UNKNOWN_IDENTIFIER",
    53: "TYPE_MISMATCH",
    60: "UNKNOWN_TABLE",
    62: "SYNTAX_ERROR",
    70: "CANNOT_CONVERT_TYPE",
    81: "UNKNOWN_DATABASE",
    192: "UNKNOWN_USER",
    193: "WRONG_PASSWORD",
    321: "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE",
    497: "ACCESS_DENIED",
    516: "AUTHENTICATION_FAILED",
}
# "Code: 60. DB::Exception: ..." (server text) or "Received ClickHouse exception, code: 60".
_CLICKHOUSE_CODE = re.compile(r"\bcode:\s*(\d+)", re.IGNORECASE)
# clickhouse-connect's error for an HTTP failure without a ClickHouse code; a 5xx from a
# proxy or an overloaded server is transient, like ClickHouse's own retriable codes.
_HTTP_STATUS = re.compile(r"HTTP status (\d{3})")


def clickhouse_error_code(exc: BaseException) -> int | None:
    """The ClickHouse error code of an exception: clickhouse-connect's ``code`` attribute,
    else the ``Code: N`` in its text."""
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    match = _CLICKHOUSE_CODE.search(str(exc))
    return int(match.group(1)) if match else None


def classify(exc: BaseException) -> ErrorClass:
    """The class of ``exc``; see the module docstring. Never raises."""
    if isinstance(exc, InvalidMessage | UnknownWriterSchema):
        return ErrorClass.POISON
    if isinstance(exc, FatalStageError):
        return ErrorClass.FATAL
    if isinstance(exc, SchemaRegistryError):
        # Unreachable, 5xx or 429: transient. 401/403 (credentials), 409/422 (an
        # incompatible schema under the subject): a person must act.
        return ErrorClass.RETRIABLE if exc.retriable else ErrorClass.FATAL
    if isinstance(exc, kafka_errors.KafkaError):
        return _classify_kafka(exc)
    clickhouse = _classify_clickhouse(exc)
    if clickhouse is not None:
        return clickhouse
    if isinstance(exc, ConnectionError | TimeoutError | asyncio.TimeoutError):
        return ErrorClass.RETRIABLE
    if isinstance(exc, OSError) and exc.errno is not None:
        # Socket-level failures (unreachable host, reset, refused) on any client.
        return ErrorClass.RETRIABLE
    return ErrorClass.FATAL


def step_error_class(exc: BaseException) -> ErrorClass:
    """The class of an exception raised by a pure step for one record.

    A pure step is deterministic, so whatever it raises for a record it will always raise
    for it: poison -- a record naming an unknown writer schema included (its bytes came from
    whoever could produce to the topic) -- except for the errors that say the *stage* cannot
    go on (an explicit fatal error, memory exhaustion)."""
    if isinstance(exc, FatalStageError | MemoryError):
        return ErrorClass.FATAL
    return ErrorClass.POISON


def _classify_kafka(exc: kafka_errors.KafkaError) -> ErrorClass:
    if isinstance(exc, _KAFKA_FATAL):
        return ErrorClass.FATAL
    if isinstance(exc, _KAFKA_RETRIABLE) or getattr(exc, "retriable", False):
        return ErrorClass.RETRIABLE
    return ErrorClass.FATAL


def _classify_clickhouse(exc: BaseException) -> ErrorClass | None:
    """None when ``exc`` is not a clickhouse-connect error."""
    try:
        from clickhouse_connect.driver import exceptions as ch
    except ImportError:  # pragma: no cover - clickhouse-connect is a core dependency
        return None
    if not isinstance(exc, ch.Error):
        return None
    code = clickhouse_error_code(exc)
    if code in CLICKHOUSE_FATAL_CODES:
        return ErrorClass.FATAL
    if isinstance(exc, ch.OperationalError):
        # Connection refused/reset, timeouts: the server is not reachable now.
        return ErrorClass.RETRIABLE
    if isinstance(exc, ch.ProgrammingError | ch.DataError | ch.NotSupportedError):
        # Raised client-side before anything is sent: our statement or our rows do not fit
        # the table (a schema mismatch) or the driver.
        return ErrorClass.FATAL
    if code is not None:
        return ErrorClass.RETRIABLE if code in CLICKHOUSE_RETRIABLE_CODES else ErrorClass.FATAL
    status = _HTTP_STATUS.search(str(exc))
    if status and status.group(1).startswith("5"):
        return ErrorClass.RETRIABLE
    return ErrorClass.FATAL


def describe(exc: BaseException, limit: int = 300) -> str:
    """One short line for logs: the type and the first line of the message, capped (error
    texts can carry whole queries or request bytes)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if len(text) > limit:
        text = text[:limit] + "..."
    name = type(exc).__name__
    if text.startswith(f"{name}: "):  # aiokafka's messages already start with the class name
        return text
    return f"{name}: {text}" if text else name
