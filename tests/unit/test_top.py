"""`sgpipe top`'s arithmetic on real Prometheus expositions: rates per stage from two readings,
readiness from /readyz, the latency quantile from histogram buckets, and the rendered screen."""

from __future__ import annotations

import io
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from rich.console import Console

from sgpipe.top import Reading, frame, frame_as_json, merge_readings, parse_exposition, render


class Pipeline:
    """A registry shaped like the merged /metrics of `sgpipe up` (the same names and labels as
    sgpipe/runtime/metrics.py), so that readings are real expositions."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sgpipe_ingest_requests_total", "", ["stage", "webhook", "outcome"], registry=r
        )
        self.consumed = Counter("sgpipe_records_consumed_total", "", ["stage"], registry=r)
        self.produced = Counter(
            "sgpipe_records_produced_total", "", ["stage", "output"], registry=r
        )
        self.inserted = Counter(
            "sgpipe_clickhouse_inserted_rows_total", "", ["stage", "table"], registry=r
        )
        self.dead = Counter("sgpipe_dead_letters_total", "", ["stage", "reason"], registry=r)
        self.errors = Counter("sgpipe_errors_total", "", ["stage", "error_class"], registry=r)
        self.retries = Counter("sgpipe_retries_total", "", ["stage"], registry=r)
        self.lag = Gauge("sgpipe_consumer_lag", "", ["stage", "partition"], registry=r)
        self.ready = Gauge("sgpipe_ready", "", ["stage"], registry=r)
        self.commit = Gauge("sgpipe_last_commit_timestamp_seconds", "", ["stage"], registry=r)
        self.oldest = Gauge("sgpipe_oldest_unwritten_seconds", "", ["stage"], registry=r)
        self.latency = Histogram(
            "sgpipe_received_to_stored_seconds",
            "",
            ["stage"],
            buckets=(0.5, 1.0, 2.0, 5.0),
            registry=r,
        )
        for stage in ("ingest", "process", "sink", "dead_letters"):
            self.ready.labels(stage).set(1)

    def read(self, at: float, readyz: dict[str, object] | None = None) -> Reading:
        return parse_exposition(generate_latest(self.registry).decode(), at, readyz)


def readings(first: Callable[[Pipeline], None], then: Callable[[Pipeline], None]) -> list[Reading]:
    pipeline = Pipeline()
    first(pipeline)
    before = pipeline.read(100.0)
    then(pipeline)
    return [before, pipeline.read(102.0)]


def test_rates_per_stage_are_the_increase_over_the_window() -> None:
    def flow(p: Pipeline) -> None:
        p.requests.labels("ingest", "main", "accepted").inc(10)
        p.requests.labels("ingest", "main", "invalid_signature").inc(2)
        p.consumed.labels("process").inc(10)
        p.produced.labels("process", "events").inc(400)
        p.consumed.labels("sink").inc(400)
        p.inserted.labels("sink", "email_events").inc(380)
        p.consumed.labels("dead_letters").inc(4)
        p.inserted.labels("dead_letters", "dead_letters").inc(4)

    history = readings(lambda p: None, flow)
    rows = {row.stage: row for row in frame(history).rows}

    assert list(rows) == ["ingest", "process", "sink", "dead_letters"]
    assert rows["ingest"].in_per_second == 6.0  # every request
    assert rows["ingest"].out_per_second == 5.0  # acknowledged ones
    assert rows["process"].in_per_second == 5.0
    assert rows["process"].out_per_second == 200.0
    assert rows["sink"].in_per_second == 200.0
    assert rows["sink"].out_per_second == 190.0
    assert rows["dead_letters"].out_per_second == 2.0
    assert frame(history).stored_last_minute == 190.0 * 60
    assert frame(history).stored_last_minute_estimated


def test_a_counter_that_went_down_counts_from_zero_a_restarted_process() -> None:
    pipeline = Pipeline()
    pipeline.consumed.labels("sink").inc(1000)
    before = pipeline.read(100.0)
    restarted = Pipeline()
    restarted.consumed.labels("sink").inc(30)
    rows = {row.stage: row for row in frame([before, restarted.read(101.0)]).rows}
    assert rows["sink"].in_per_second == 30.0


def test_lag_dead_letters_retries_errors_and_commit_age() -> None:
    def state(p: Pipeline) -> None:
        p.lag.labels("sink", "0").set(7)
        p.lag.labels("sink", "1").set(5)
        p.dead.labels("process", "not_an_object").inc(3)
        p.errors.labels("sink", "retriable").inc(4)
        p.errors.labels("sink", "poison").inc(0)
        p.retries.labels("sink").inc(4)
        p.commit.labels("sink").set(90.0)
        p.oldest.labels("sink").set(12.5)
        p.oldest.labels("process").set(0.5)

    history = readings(state, lambda p: None)
    snapshot = frame(history)
    rows = {row.stage: row for row in snapshot.rows}
    assert rows["sink"].lag == 12
    assert rows["process"].dead_letters == 3
    assert rows["sink"].retries == 4
    assert rows["sink"].errors == {"retriable": 4}
    assert rows["sink"].last_commit_age_seconds == 12.0
    assert rows["ingest"].last_commit_age_seconds is None
    assert snapshot.oldest_unwritten_seconds == 12.5


def test_readiness_comes_from_readyz_checks_by_stage() -> None:
    pipeline = Pipeline()
    readyz: dict[str, object] = {
        "status": "not_ready",
        "checks": {
            "ingest.publisher": {"ok": True, "detail": ""},
            "sink.progress": {"ok": False, "detail": "stalled for 300 s"},
        },
    }
    snapshot = frame([pipeline.read(1.0, readyz), pipeline.read(2.0, readyz)])
    rows = {row.stage: row for row in snapshot.rows}
    assert rows["ingest"].ready is True
    assert rows["sink"].ready is False
    assert rows["process"].ready is True  # no check named for it: its sgpipe_ready gauge
    assert snapshot.ready is False
    assert snapshot.failing_checks == ["sink.progress"]


def test_latency_quantiles_interpolate_the_buckets_of_the_window() -> None:
    def observe(p: Pipeline) -> None:
        for seconds in (0.2, 0.3, 0.7, 0.8, 1.5, 1.6, 1.7, 1.8, 3.0, 4.0):
            p.latency.labels("sink").observe(seconds)

    snapshot = frame(readings(lambda p: p.latency.labels("sink").observe(60), observe))
    # 10 observations in the window: 2 <= 0.5, 4 <= 1, 8 <= 2, 10 <= 5.
    assert snapshot.received_to_stored_p50_seconds == 1.25
    assert snapshot.received_to_stored_p99_seconds is not None
    assert 4.8 < snapshot.received_to_stored_p99_seconds <= 5.0


def test_one_minute_of_history_gives_the_exact_count_stored_in_the_last_minute() -> None:
    pipeline = Pipeline()
    history = [pipeline.read(0.0)]
    pipeline.inserted.labels("sink", "email_events").inc(600)
    history.append(pipeline.read(60.0))
    pipeline.inserted.labels("sink", "email_events").inc(10)
    history.append(pipeline.read(61.0))
    snapshot = frame(history)
    assert not snapshot.stored_last_minute_estimated
    assert round(snapshot.stored_last_minute or 0) == round(610 * 60 / 61)


def test_several_metrics_urls_merge_into_one_reading() -> None:
    process, sink = Pipeline(), Pipeline()
    process.consumed.labels("process").inc(3)
    sink.consumed.labels("sink").inc(5)
    merged = merge_readings([process.read(1.0), sink.read(1.5)])
    assert merged.total("sgpipe_records_consumed_total", stage="process") == 3
    assert merged.total("sgpipe_records_consumed_total", stage="sink") == 5
    assert merged.at == 1.5


def test_the_screen_and_the_json_show_every_stage() -> None:
    def flow(p: Pipeline) -> None:
        p.requests.labels("ingest", "main", "accepted").inc(4)
        p.errors.labels("sink", "retriable").inc(2)

    snapshot = frame(readings(lambda p: None, flow))
    output = io.StringIO()
    Console(file=output, width=160, color_system=None).print(render(snapshot, "http://x"))
    screen = output.getvalue()
    for text in ("sgpipe top", "ingest", "process", "sink", "dead_letters", "retriable 2"):
        assert text in screen
    document = frame_as_json(snapshot)
    stages = document["stages"]
    assert isinstance(stages, list)
    assert [stage["stage"] for stage in stages] == ["ingest", "process", "sink", "dead_letters"]
    assert stages[0]["out_per_second"] == 2.0


def test_a_stage_run_by_several_processes_under_up_shows_how_many() -> None:
    """`sgpipe up --processors 2`: the supervisor's per-child series name the replicas."""
    pipeline = Pipeline()
    restarts = Counter(
        "sgpipe_up_child_restarts_total", "", ["stage", "child"], registry=pipeline.registry
    )
    for child in ("ingest", "process", "process-2", "sink", "clickhouse"):
        restarts.labels("up", child).inc(0)
    snapshot = frame([pipeline.read(100.0), pipeline.read(102.0)])
    processes = {row.stage: row.processes for row in snapshot.rows}
    assert processes["process"] == 2 and processes["sink"] == 1 and processes["ingest"] == 1
    assert processes["dead_letters"] is None  # runs inside the sink's process
    output = io.StringIO()
    Console(file=output, width=160, color_system=None).print(render(snapshot, "http://x"))
    assert "process x2" in output.getvalue()
