"""Every metric sgpipe exports, defined once (arroyo's ``metric_defs.py``).

Names follow Prometheus conventions: the ``sgpipe_`` prefix, ``_total`` on counters, base units
(``_seconds``, ``_bytes``). Every series carries a ``stage`` label (``ingest``, ``process``,
``sink``, ``dead_letters``) so that the stages of one ``sgpipe up`` can be told apart after
their metrics are merged. Labels are low-cardinality by design: webhook names, event types,
reason codes and error classes, never ids, addresses or topics chosen by data.

One registry per process (``REGISTRY``), not prometheus-client's global one, so a process
exports exactly what sgpipe defines. The README's "Metrics" section documents each metric and
what an alert on it means; ``tests/unit/test_metrics.py`` keeps the two in step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

REGISTRY: Final = CollectorRegistry(auto_describe=True)

# Stage label values: the command that runs the stage; `sgpipe sink` also runs the
# dead-letter sink (dead-letter topic -> ClickHouse), labelled apart so that its consumer's
# series (lag, commits, readiness) do not mix with the events sink's.
STAGE_INGEST: Final = "ingest"
STAGE_PROCESS: Final = "process"
STAGE_SINK: Final = "sink"
STAGE_DEAD_LETTERS: Final = "dead_letters"
# `sgpipe up` itself, for what it runs besides the stages (the embedded broker).
STAGE_UP: Final = "up"

# Seconds; from a fast in-memory ack to a slow ClickHouse insert.
_LATENCY_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
_SIZE_BUCKETS: Final = (1, 10, 50, 100, 500, 1_000, 5_000, 10_000, 50_000, 100_000)

# --- ingress ------------------------------------------------------------------------------------

INGEST_REQUESTS: Final = Counter(
    "sgpipe_ingest_requests_total",
    "Webhook POSTs by outcome: accepted (2xx after the Kafka ack), unauthorized (401), "
    "unknown_webhook (404; webhook label 'unknown'), too_large (413), bad_request (400, 411, 415), "
    "timeout (408, body too slow), client_disconnected (gone before the body was complete), "
    "unavailable (503 from Kafka, SendGrid retries), overloaded (503: ingest.max_in_flight_bytes "
    "reached).",
    ["stage", "webhook", "outcome"],
    registry=REGISTRY,
)
INGEST_VERIFICATION_FAILURES: Final = Counter(
    "sgpipe_ingest_verification_failures_total",
    "Requests that failed authentication, by reason code (invalid_signature, missing_signature, "
    "stale_timestamp, invalid_token, ...).",
    ["stage", "webhook", "reason"],
    registry=REGISTRY,
)
INGEST_AUTH_FAILURES: Final = Counter(
    "sgpipe_ingest_auth_failures_total",
    "Webhook POSTs refused by authentication, by method (signature, token) and reason "
    "(missing_signature, invalid_signature, stale_timestamp, missing_token, expired, "
    "not_yet_valid, wrong_issuer, wrong_audience, unknown_kid, disallowed_algorithm, "
    "invalid_token_signature, malformed_token, jwks_unavailable).",
    ["stage", "webhook", "method", "reason"],
    registry=REGISTRY,
)
OAUTH_TOKEN_REQUESTS: Final = Counter(
    "sgpipe_oauth_token_requests_total",
    "Requests to the built-in token endpoint POST /oauth/token by outcome: issued, "
    "invalid_client, invalid_request, unsupported_grant_type, busy (503: too many secret "
    "checks at once).",
    ["stage", "outcome"],
    registry=REGISTRY,
)
INGEST_IN_FLIGHT_BYTES: Final = Gauge(
    "sgpipe_ingest_in_flight_bytes",
    "Bytes reserved by requests between the start of their body and Kafka's answer; at "
    "ingest.max_in_flight_bytes further requests get 503 (outcome overloaded).",
    ["stage"],
    registry=REGISTRY,
)
INGEST_DELIVERY_DELAY_SECONDS: Final = Histogram(
    "sgpipe_ingest_delivery_delay_seconds",
    "Per accepted signed batch: arrival minus its signed timestamp. SendGrid retries for 24 h "
    "and then drops a batch: a tail towards 86400 s means the limit is near.",
    ["stage", "webhook"],
    buckets=(1, 10, 60, 300, 900, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 20 * 3600, 24 * 3600),
    registry=REGISTRY,
)
INGEST_REPEATED_BATCHES: Final = Counter(
    "sgpipe_ingest_repeated_batches_total",
    "Signed batches whose body was seen before in a bounded recent window, by whether the "
    "signed timestamp was the same (a retry not re-signed) or new (re-signed).",
    ["stage", "webhook", "timestamp"],
    registry=REGISTRY,
)
INGEST_REQUEST_SECONDS: Final = Histogram(
    "sgpipe_ingest_request_duration_seconds",
    "Time from the start of the request's handling (head received) to the answer, per webhook "
    "('unknown' for names no webhook has).",
    ["stage", "webhook"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
INGEST_PUBLISH_SECONDS: Final = Histogram(
    "sgpipe_ingest_publish_duration_seconds",
    "Time for Kafka to acknowledge a raw batch (acks=all), per attempt, failed ones included.",
    ["stage"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
INGEST_RECEIVED_BYTES: Final = Counter(
    "sgpipe_ingest_received_bytes_total",
    "Request body bytes received, per webhook (as sent, before any decompression).",
    ["stage", "webhook"],
    registry=REGISTRY,
)
INGEST_CONNECTIONS_REJECTED: Final = Counter(
    "sgpipe_ingest_connections_rejected_total",
    "Connections closed or requests refused by the ingress's own limits, by reason: "
    "too_many_connections (503 at accept), header_timeout (request head not complete in time), "
    "body_timeout (408), idle_timeout (keep-alive connection idle), headers_too_large (431), "
    "malformed (the HTTP parser refused the request; 400).",
    ["stage", "reason"],
    registry=REGISTRY,
)
INGEST_OPEN_CONNECTIONS: Final = Gauge(
    "sgpipe_ingest_open_connections",
    "Connections the ingress holds open now (compare with ingest.max_connections).",
    ["stage"],
    registry=REGISTRY,
)
INGEST_PUBLISH_FAILURES: Final = Counter(
    "sgpipe_ingest_publish_failures_total",
    "Raw batches Kafka did not acknowledge (each answered 503), by reason: timeout, "
    "not_connected, or the Kafka client's error class (KafkaConnectionError, "
    "NotLeaderForPartitionError, ...).",
    ["stage", "reason"],
    registry=REGISTRY,
)

# --- consuming stages ------------------------------------------------------------------------

RECORDS_CONSUMED: Final = Counter(
    "sgpipe_records_consumed_total",
    "Kafka records polled by the stage.",
    ["stage"],
    registry=REGISTRY,
)
RECORDS_PRODUCED: Final = Counter(
    "sgpipe_records_produced_total",
    "Records the stage wrote and had acknowledged (Kafka records, ClickHouse rows), by output.",
    ["stage", "output"],
    registry=REGISTRY,
)
DEAD_LETTERS: Final = Counter(
    "sgpipe_dead_letters_total",
    "Records sent to the dead-letter topic, by reason code.",
    ["stage", "reason"],
    registry=REGISTRY,
)
DUPLICATES_DROPPED: Final = Counter(
    "sgpipe_duplicates_dropped_total",
    "Events dropped by the processor's best-effort sg_event_id window (ClickHouse makes "
    "deduplication exact; this only saves work).",
    ["stage"],
    registry=REGISTRY,
)
COERCION_ERRORS: Final = Counter(
    "sgpipe_coercion_errors_total",
    "Event fields that could not be coerced to their declared type (the event is kept, the "
    "field left null and named in coercion_errors), by field.",
    ["stage", "field"],
    registry=REGISTRY,
)
PII_MASKED: Final = Counter(
    "sgpipe_pii_masked_total",
    "Personal fields (email, ip, useragent) the PII policy hashed or dropped, by field and "
    "mode; each such event's raw was re-serialized.",
    ["stage", "field", "mode"],
    registry=REGISTRY,
)
CONSUMER_LAG: Final = Gauge(
    "sgpipe_consumer_lag",
    "Records between the stage's position and the end of each partition it owns.",
    ["stage", "partition"],
    registry=REGISTRY,
)
OFFSET_RESETS: Final = Counter(
    "sgpipe_offset_resets_total",
    "Committed offsets found out of range (the broker lost or deleted data) and reset to the "
    "earliest offset.",
    ["stage"],
    registry=REGISTRY,
)
REBALANCES: Final = Counter(
    "sgpipe_rebalances_total",
    "Consumer group rebalances this stage took part in (each revocation of its partitions: a "
    "consumer joined, left, died or timed out, or the group coordinator forgot this member). "
    "Records read and not yet committed were left to the partitions' next owner.",
    ["stage"],
    registry=REGISTRY,
)
FLUSH_RECORDS: Final = Histogram(
    "sgpipe_flush_records",
    "Records per write (flush) of the stage.",
    ["stage"],
    buckets=_SIZE_BUCKETS,
    registry=REGISTRY,
)
FLUSH_SECONDS: Final = Histogram(
    "sgpipe_flush_duration_seconds",
    "Time to run the steps on a batch and write it, retries included.",
    ["stage"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
ERRORS: Final = Counter(
    "sgpipe_errors_total",
    "Failures by class: retriable (backed off and retried), poison (the record was "
    "dead-lettered) and fatal (the stage stopped).",
    ["stage", "error_class"],
    registry=REGISTRY,
)
RETRIES: Final = Counter(
    "sgpipe_retries_total",
    "Retries of a failed write after a retriable error.",
    ["stage"],
    registry=REGISTRY,
)
DEAD_LETTER_LIMIT_TRIPPED: Final = Gauge(
    "sgpipe_dead_letter_limit_tripped",
    "1 while the dead-letter limit holds the stage paused (it consumes nothing until it is "
    "restarted), else 0.",
    ["stage"],
    registry=REGISTRY,
)
LAST_COMMIT: Final = Gauge(
    "sgpipe_last_commit_timestamp_seconds",
    "Unix time of the stage's last successful offset commit.",
    ["stage"],
    registry=REGISTRY,
)
READY: Final = Gauge(
    "sgpipe_ready",
    "1 while the stage is ready (connected, assigned or serving, not stalled), else 0.",
    ["stage"],
    registry=REGISTRY,
)

# --- ClickHouse ------------------------------------------------------------------------------

CLICKHOUSE_INSERTED_ROWS: Final = Counter(
    "sgpipe_clickhouse_inserted_rows_total",
    "Rows inserted into ClickHouse, by table.",
    ["stage", "table"],
    registry=REGISTRY,
)
CLICKHOUSE_INSERT_SECONDS: Final = Histogram(
    "sgpipe_clickhouse_insert_duration_seconds",
    "Time of one successful ClickHouse insert, by table.",
    ["stage", "table"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)


# --- embedded broker (sgpipe up only) ----------------------------------------------------------
# The embedded broker is supervised by the `sgpipe up` process itself, so its series carry
# stage="up" (the command that runs it), never one of the three pipeline stages.

EMBEDDED_RESTARTS: Final = Counter(
    "sgpipe_embedded_restarts_total",
    "Embedded broker processes (service: storage = SeaweedFS, broker = tansu) that died while "
    "`sgpipe up` ran and were restarted. Any increase deserves a look at <data-dir>/broker/logs.",
    ["stage", "service"],
    registry=REGISTRY,
)
EMBEDDED_RETENTION_DELETED_BATCHES: Final = Counter(
    "sgpipe_embedded_retention_deleted_batches_total",
    "Record batches the embedded broker's retention deleted (expired and committed by every "
    "sgpipe group of their topic).",
    ["stage"],
    registry=REGISTRY,
)
EMBEDDED_RETENTION_DELETED_BYTES: Final = Counter(
    "sgpipe_embedded_retention_deleted_bytes_total",
    "Bytes of the record batches the embedded broker's retention deleted.",
    ["stage"],
    registry=REGISTRY,
)


RECEIVED_TO_STORED_SECONDS: Final = Histogram(
    "sgpipe_received_to_stored_seconds",
    "For the oldest event of each insert into email_events: seconds from the ingress receiving "
    "its batch (the 2xx follows within milliseconds) to the insert returning -- an upper bound "
    "of every event's 2xx -> row latency in that insert.",
    ["stage"],
    buckets=(0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0),
    registry=REGISTRY,
)

OLDEST_UNWRITTEN_SECONDS: Final = Gauge(
    "sgpipe_oldest_unwritten_seconds",
    "Age (by its Kafka timestamp) of the oldest record the stage holds but has not written and "
    "committed yet; 0 while it holds none.",
    ["stage"],
    registry=REGISTRY,
)


# --- sgpipe up's supervisor ------------------------------------------------------------------

UP_CHILD_RESTARTS: Final = Counter(
    "sgpipe_up_child_restarts_total",
    "Processes `sgpipe up` runs as its children (child: ingest, process, process-2, ..., sink, "
    "sink-2, ..., clickhouse) that "
    "died without being asked to and were restarted. Any increase deserves a look at "
    "<data-dir>/logs/<child>.log.",
    ["stage", "child"],
    registry=REGISTRY,
)


def stop_counters(stage: str, families: Iterable[Metric] | None = None) -> dict[str, float]:
    """Running totals of what the stage ``stage`` committed and wrote, for a report of what a
    stop did (the difference of two readings): ``committed`` records (their offsets committed
    after the write), ``written:<output>`` records per output, ``dead_letters`` and, for the
    ingress, ``acknowledged`` batches. From this process's registry, or from ``families``
    (another process's exposition, parsed)."""
    totals: dict[str, float] = {
        "committed": 0.0,
        "dead_letters": 0.0,
        "acknowledged": 0.0,
    }
    for family in REGISTRY.collect() if families is None else families:
        for sample in family.samples:
            if sample.labels.get("stage") != stage:
                continue
            if sample.name == "sgpipe_flush_records_sum":
                totals["committed"] += sample.value
            elif sample.name == "sgpipe_records_produced_total":
                key = f"written:{sample.labels['output']}"
                totals[key] = totals.get(key, 0.0) + sample.value
            elif sample.name == "sgpipe_dead_letters_total":
                totals["dead_letters"] += sample.value
            elif (
                sample.name == "sgpipe_ingest_requests_total"
                and sample.labels.get("outcome") == "accepted"
            ):
                totals["acknowledged"] += sample.value
    return totals


def render() -> tuple[bytes, str]:
    """This process's metrics in the Prometheus text format, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
