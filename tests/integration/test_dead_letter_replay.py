"""Dead letters you can see and replay, with a real broker (tansu) and the real engine (chdb
served over HTTP), every sgpipe command a real process.

A batch with garbage elements is dead-lettered per element; `sgpipe dlq list` shows them; a
fix (the processor's record-size limit, which dead-lettered an event too large for it) plus
`sgpipe dlq replay` lands the fixable one exactly once and reports the garbage as
dead-lettered again; replaying again adds nothing."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from schemas.dead_letter import (
    REPLAY_GENERATION_HEADER,
    REPLAY_OF_HEADER,
    DeadLetter,
    dead_letter_headers,
)
from schemas.raw_batch import RawBatch, raw_batch_headers
from sgpipe.runtime.kafka import OutgoingRecord, create_producer, ensure_topics, send_all
from sgpipe.runtime.messages import Message
from sgpipe.runtime.settings import KafkaSettings, Settings
from sgpipe.runtime.stage import BatchInfo
from sinks.clickhouse import TableWriter
from sinks.dead_letters import DEAD_LETTERS, dead_letter_row
from tests import forked
from tests.integration.kafka_tools import FAST_GROUP_SETTINGS, read_topic
from tests.integration.processes import (
    SGPIPE,
    ServedClickHouse,
    StageProcess,
    served_clickhouse,
    start_sgpipe,
    write_config,
)
from tests.raw_auth_support import RAW_AUTH_DOCUMENT, signed_raw_batch_headers

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

# The processor first runs with Kafka's smallest request size: an event over it is dead-
# lettered as event_too_large. The fix is the default (4 MiB).
SMALL_REQUESTS = 1_048_576
BIG_URL = "https://example.com/?" + "q" * 600_000  # ~1.2 MB encoded: raw + url
# Without sg_event_id: it lands with an id derived from its content, which a replay must
# leave unchanged for ClickHouse to keep one row.
BIG_EVENT = (
    b'{"event":"click","email":"big@example.com","timestamp":1700000001,'
    b'"url":"' + BIG_URL.encode() + b'"}'
)
BATCH = (
    b'[{"event":"delivered","sg_event_id":"ev-ok","email":"a@example.com","timestamp":1700000000},'
    b'"not an event",' + BIG_EVENT + b',{"event": tru}]'
)
# On the events topic, in no framing the sink knows: a sink dead letter.
UNDECODABLE = b"garbage\x01\xff"
EVENTS_AFTER_REPLAY = f"a@example.com\tfalse\t0\nbig@example.com\ttrue\t{len(BIG_URL)}\n"
BATCH_HEADERS = raw_batch_headers(
    RawBatch("main", b"[]", 1_700_000_010_000, "req-1", 1_700_000_009, "signature")
)


@pytest.fixture
def clickhouse(tmp_path: Path) -> Iterator[ServedClickHouse]:
    with served_clickhouse(tmp_path / "clickhouse") as served:
        yield served


def config_document(
    servers: str, clickhouse: ServedClickHouse, suffix: str, **kafka: Any
) -> dict[str, Any]:
    return {
        "kafka": {
            "bootstrap_servers": servers,
            **FAST_GROUP_SETTINGS,
            "topics": {
                "raw": f"raw-{suffix}",
                "events": f"events-{suffix}",
                "dead_letter": f"dlq-{suffix}",
                "partitions": 2,
            },
            **kafka,
        },
        "clickhouse": {"url": clickhouse.url, "database": f"db_{suffix}"},
        "processor": {"group_id": f"processor-{suffix}", "health_port": 0},
        "sink": {
            "group_id": f"sink-{suffix}",
            "dead_letter_group_id": f"dead-letters-{suffix}",
            "batch_max_seconds": 0.2,
            "health_port": 0,
        },
        "logging": {"format": "json"},
        "raw_auth": RAW_AUTH_DOCUMENT,
    }


def sgpipe(*args: str) -> Any:
    """Run an sgpipe command to completion; its stdout as JSON."""
    result = forked.run([*SGPIPE, *args], capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def wait_for(clickhouse: ServedClickHouse, sql: str, expected: str, *stages: StageProcess) -> None:
    deadline = time.monotonic() + 90
    last = ""
    while time.monotonic() < deadline:
        try:
            last = clickhouse.query(sql)
        except OSError as exc:  # the sink has not created the table yet
            last = repr(exc)
        if last == expected:
            return
        time.sleep(0.2)
    logs = "\n".join(stage.output() for stage in stages)
    raise AssertionError(f"{sql!r} gave {last!r}, expected {expected!r}\n{logs}")


def by_reason(listing: dict[str, Any]) -> dict[str, tuple[str, int, int]]:
    return {
        entry["reason"]: (entry["stage"], entry["pending"], entry["replayed"])
        for entry in listing["reasons"]
    }


def outcomes(replay: dict[str, Any]) -> dict[tuple[str, int], tuple[str, int, list[str]]]:
    return {
        (letter["reason"], letter["event_index"]): (
            letter["outcome"],
            letter["landed"],
            letter["dead_lettered_again"],
        )
        for letter in replay["letters"]
    }


async def produce(kafka: KafkaSettings, records: list[OutgoingRecord]) -> None:
    await ensure_topics(kafka)
    producer = create_producer(kafka)
    await producer.start()
    try:
        await send_all(producer, records)
    finally:
        await producer.stop()


def test_garbage_is_dead_lettered_per_element_listed_and_a_fix_plus_replay_lands_it_once(
    tmp_path: Path, kafka_bootstrap_servers: str, clickhouse: ServedClickHouse, unique_name: str
) -> None:
    fixed = config_document(kafka_bootstrap_servers, clickhouse, unique_name)
    config = write_config(tmp_path / "sgpipe.yaml", fixed)
    small_config = write_config(
        tmp_path / "small-requests.yaml",
        config_document(
            kafka_bootstrap_servers, clickhouse, unique_name, max_request_size=SMALL_REQUESTS
        ),
    )
    kafka = KafkaSettings.model_validate(fixed["kafka"])
    database = fixed["clickhouse"]["database"]
    batch = RawBatch("main", BATCH, 1_700_000_010_000, "req-1", 1_700_000_009, "signature")
    asyncio.run(
        produce(
            kafka,
            [
                OutgoingRecord(kafka.topics.raw, BATCH, headers=signed_raw_batch_headers(batch)),
                OutgoingRecord(kafka.topics.events, UNDECODABLE),
            ],
        )
    )
    sink = start_sgpipe(["sink"], config, tmp_path / "sink.log")
    processor = start_sgpipe(["process"], small_config, tmp_path / "process-1.log")
    stages = [sink, processor]
    try:
        # Per element: the good event landed, each bad element is its own dead letter.
        wait_for(
            clickhouse,
            f"SELECT sg_event_id FROM {database}.email_events FINAL ORDER BY sg_event_id",
            "ev-ok\n",
            *stages,
        )
        wait_for(
            clickhouse,
            f"SELECT stage, reason, event_index, request_id, length(payload) "
            f"FROM {database}.dead_letters FINAL ORDER BY stage, event_index",
            "process\tnot_an_object\t1\treq-1\t14\n"
            f"process\tevent_too_large\t2\treq-1\t{len(BIG_EVENT)}\n"
            "process\tinvalid_element\t3\treq-1\t14\n"
            f"sink\tundecodable_event\t-1\t\t{len(UNDECODABLE)}\n",
            *stages,
        )

        listing = sgpipe("dlq", "list", "--json", "--config", str(config))
        assert listing["table"] == f"{database}.dead_letters"
        assert (listing["total"], listing["pending"], listing["replayed"]) == (4, 4, 0)
        assert by_reason(listing) == {
            "not_an_object": ("process", 1, 0),
            "event_too_large": ("process", 1, 0),
            "invalid_element": ("process", 1, 0),
            "undecodable_event": ("sink", 1, 0),
        }
        samples = {entry["reason"]: entry["samples"] for entry in listing["reasons"]}
        (not_an_object,) = samples["not_an_object"]
        assert not_an_object["detail"] == "events are JSON objects; got string"
        assert (not_an_object["source_topic"], not_an_object["source_offset"]) == (
            kafka.topics.raw,
            0,
        )
        raw_partition = not_an_object["source_partition"]
        assert not_an_object["event_index"] == 1
        assert not_an_object["payload_excerpt"] == '"not an event"'
        assert (not_an_object["webhook"], not_an_object["request_id"]) == ("main", "req-1")
        (too_large,) = samples["event_too_large"]
        assert too_large["payload_excerpt"].startswith('{"event":"click","email":"big@example')
        assert too_large["payload_excerpt"].endswith("...")
        assert samples["undecodable_event"][0]["payload_excerpt"] == "garbage\\x01\\xff"
        only = sgpipe(
            "dlq", "list", "--json", "--reason", "invalid_element", "--config", str(config)
        )
        assert by_reason(only) == {"invalid_element": ("process", 1, 0)}

        # What a replay would do with the processor of this version and the fixed settings;
        # nothing is sent.
        dry = sgpipe("dlq", "replay", "--dry-run", "--json", "--config", str(config))
        assert outcomes(dry) == {
            ("not_an_object", 1): ("would be dead-lettered again", 0, ["not_an_object"]),
            ("event_too_large", 2): ("would land", 1, []),
            ("invalid_element", 3): ("would be dead-lettered again", 0, ["invalid_element"]),
            ("undecodable_event", -1): ("skipped", 0, []),
        }
        assert sgpipe("dlq", "list", "--json", "--config", str(config))["pending"] == 4

        # The fix: the processor restarts with the default request size.
        assert processor.stop() == 0, processor.output()
        processor = start_sgpipe(["process"], config, tmp_path / "process-2.log")
        stages = [sink, processor]

        first = sgpipe("dlq", "replay", "--json", "--wait", "90", "--config", str(config))
        assert outcomes(first) == {
            ("not_an_object", 1): ("dead-lettered again", 0, ["not_an_object"]),
            ("event_too_large", 2): ("landed", 1, []),
            ("invalid_element", 3): ("dead-lettered again", 0, ["invalid_element"]),
            ("undecodable_event", -1): ("skipped", 0, []),
        }
        skipped = [letter for letter in first["letters"] if letter["outcome"] == "skipped"]
        assert skipped[0]["note"].startswith("not replayable: a sink dead letter")
        # Landed exactly once; the garbage is still one dead letter each, pending again.
        events_sql = (
            f"SELECT email, sg_event_id_generated, length(url) FROM {database}.email_events "
            "FINAL ORDER BY email"
        )
        assert clickhouse.query(events_sql) == EVENTS_AFTER_REPLAY
        after_first = sgpipe("dlq", "list", "--json", "--config", str(config))
        assert by_reason(after_first) == {
            "not_an_object": ("process", 1, 0),
            "event_too_large": ("process", 0, 1),
            "invalid_element": ("process", 1, 0),
            "undecodable_event": ("sink", 1, 0),
        }
        assert {
            sample["replay_generation"]
            for entry in after_first["reasons"]
            if entry["reason"] in ("not_an_object", "invalid_element")
            for sample in entry["samples"]
        } == {1}

        # Replaying again, already replayed letters included, adds nothing.
        second = sgpipe(
            "dlq", "replay", "--include-replayed", "--json", "--wait", "90",
            "--config", str(config),
        )  # fmt: skip
        assert outcomes(second) == outcomes(first)
        assert clickhouse.query(events_sql) == EVENTS_AFTER_REPLAY
        assert clickhouse.query(
            f"SELECT reason, replay_generation, replayed_at IS NULL "
            f"FROM {database}.dead_letters FINAL ORDER BY event_index"
        ) == (
            "undecodable_event\t0\t1\n"
            "not_an_object\t2\t1\n"
            "event_too_large\t0\t0\n"
            "invalid_element\t2\t1\n"
        )
        assert by_reason(sgpipe("dlq", "list", "--json", "--config", str(config))) == by_reason(
            after_first
        )
    finally:
        for stage in stages:
            stage.stop()

    # Each replay went through the raw topic as the batch it came from, marked as a replay.
    raw = asyncio.run(read_topic(kafka_bootstrap_servers, kafka.topics.raw, expected=7))
    replays = [record for record in raw if REPLAY_OF_HEADER in dict(record.headers)]
    assert len(replays) == 6
    first_big = next(r for r in replays if b"big@example.com" in r.value)
    headers = dict(first_big.headers)
    assert headers[REPLAY_OF_HEADER] == f"{kafka.topics.raw}/{raw_partition}/0/2".encode()
    assert headers[REPLAY_GENERATION_HEADER] == b"1"
    assert headers["sgpipe-request-id"] == b"req-1"
    assert headers["sgpipe-received-at-ms"] == b"1700000010000"
    assert first_big.value.startswith(b'[{"event":"click"') and first_big.value.endswith(b'"}]')


def test_a_replay_that_kafka_refuses_leaves_the_letter_pending(
    tmp_path: Path, kafka_bootstrap_servers: str, clickhouse: ServedClickHouse, unique_name: str
) -> None:
    # Mutation caught: marking the letters replayed before Kafka acknowledged their records.
    document = config_document(
        kafka_bootstrap_servers, clickhouse, unique_name, max_request_size=SMALL_REQUESTS
    )
    config = write_config(tmp_path / "sgpipe.yaml", document)
    settings = Settings.model_validate(document)
    # A dead letter bigger than this replay's producer may send (the dead-letter topic took
    # it from a processor with larger requests).
    huge = b'{"event":"open","sg_event_id":"ev-huge","url":"' + b"u" * SMALL_REQUESTS + b'"}'
    letter = DeadLetter(
        "event_too_large", "too large", "process", huge, "raw", 0, 7, 0, list(BATCH_HEADERS)
    )
    row = dead_letter_row(
        Message("dlq", 0, 0, 1_700_000_000_000, None, huge, tuple(dead_letter_headers(letter)))
    )

    async def store_letter() -> None:
        await ensure_topics(settings.kafka)
        writer = TableWriter(settings.clickhouse, None, stage="test", table=DEAD_LETTERS)
        await writer.start()
        try:
            await writer.write([row], BatchInfo({("sgpipe.dead-letter", 0): (0, 0)}))
        finally:
            await writer.stop()

    asyncio.run(store_letter())

    result = forked.run(
        [*SGPIPE, "dlq", "replay", "--wait", "0", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 1, result.stdout + result.stderr
    assert "MessageSizeTooLargeError" in result.stdout + result.stderr
    database = document["clickhouse"]["database"]
    assert (
        clickhouse.query(f"SELECT reason, replayed_at IS NULL FROM {database}.dead_letters FINAL")
        == "event_too_large\t1\n"
    )
    listing = sgpipe("dlq", "list", "--json", "--config", str(config))
    assert (listing["pending"], listing["replayed"]) == (1, 0)
