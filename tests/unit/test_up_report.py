"""The lines `sgpipe up` ends with, for every case: what a stop wrote, what it left and where."""

from __future__ import annotations

import pytest

from sgpipe.up.backlog import Backlog
from sgpipe.up.report import BrokerLocation, Drained, at_once_report, stop_report

DURABLE = BrokerLocation("durable", "sgpipe-data/broker")
MEMORY = BrokerLocation("memory", "")
EXTERNAL = BrokerLocation("external", "kafka-1:9092")
LEFT = Backlog(raw_batches=3, raw_events=120, events=450)


def test_a_clean_stop_says_what_it_wrote() -> None:
    drained = Drained(ingest_batches=0, processor_batches=3, processor_events=10, sink_events=10)
    assert stop_report(drained, Backlog(), MEMORY) == (
        "stopped: during the stop the processor wrote 3 raw batches as 10 events and the sink "
        "wrote 10 events to ClickHouse; nothing acknowledged is left unwritten"
    )


def test_requests_in_flight_at_the_stop_are_counted_and_numbers_are_singular_when_one() -> None:
    drained = Drained(ingest_batches=1, processor_batches=1, processor_events=1, sink_events=1)
    assert stop_report(drained, Backlog(), DURABLE) == (
        "stopped: during the stop the ingress acknowledged 1 batch, the processor wrote 1 raw "
        "batch as 1 event and the sink wrote 1 event to ClickHouse; nothing acknowledged is "
        "left unwritten"
    )


@pytest.mark.parametrize(
    ("location", "where"),
    [
        (
            DURABLE,
            "are in the embedded broker at sgpipe-data/broker and will be processed at the next "
            "`sgpipe up`",
        ),
        (MEMORY, "were in the in-memory broker and are lost"),
        (
            EXTERNAL,
            "are in Kafka at kafka-1:9092 and will be processed when the processor and the sink "
            "run again",
        ),
    ],
)
def test_a_stop_at_once_says_what_is_left_and_where(location: BrokerLocation, where: str) -> None:
    assert at_once_report(LEFT, location) == (
        "stopped at once: 3 acknowledged raw batches (120 events) not yet processed and 450 "
        f"events not yet written to ClickHouse {where}"
    )


def test_a_count_cut_short_is_a_lower_bound() -> None:
    left = Backlog(raw_batches=3, raw_events=120, events=1_450, exact=False)
    assert at_once_report(left, DURABLE).startswith(
        "stopped at once: at least 3 acknowledged raw batches (120 events) not yet processed "
        "and at least 1,450 events not yet written"
    )
    assert not left.empty


@pytest.mark.parametrize(
    ("location", "ending"),
    [
        (
            DURABLE,
            "whatever it is, it stays in the embedded broker at sgpipe-data/broker and will be "
            "processed at the next `sgpipe up`",
        ),
        (MEMORY, "whatever it was, it was in the in-memory broker and is lost"),
    ],
)
def test_a_backlog_that_cannot_be_counted_says_why_and_where(
    location: BrokerLocation, ending: str
) -> None:
    line = at_once_report(None, location, "the broker is unreachable")
    assert line.startswith("stopped at once: what ")
    assert "could not be counted (the broker is unreachable); " in line
    assert line.endswith(ending)


def test_drained_counts_from_the_moment_up_began_to_stop() -> None:
    # The sink of an in-memory broker is signalled after the processor drained; what it wrote
    # meanwhile belongs to the stop too.
    reports = {
        "ingest": {"acknowledged": 0, "totals": {"acknowledged": 7}},
        "process": {"committed": 3, "written": {"events": 10}},
        "sink": {"committed": 0, "totals": {"committed": 110, "written:email_events": 110}},
    }
    before = {"ingest": {"acknowledged": 6.0}, "sink": {"committed": 100.0}}
    assert Drained.from_reports(reports, before) == Drained(
        ingest_batches=1, processor_batches=3, processor_events=10, sink_events=10
    )
    # A stage that never reported (killed) counts as nothing written.
    assert Drained.from_reports({"process": None}) == Drained()
