"""Progress a person can read: one "wrote" line per interval per stage, with records, rate and
lag -- never one per batch, never one while nothing was written."""

from __future__ import annotations

from structlog.testing import capture_logs

from sgpipe.runtime.progress import ProgressLog
from sgpipe.runtime.stage import StageLoop
from tests.unit.test_stage_loop import (
    FakeConsumer,
    RecordingDeadLetters,
    RecordingWriter,
    echo,
    options,
    records,
    run_until,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_at_most_one_line_per_interval_with_records_rate_and_lag() -> None:
    clock = Clock()
    progress = ProgressLog(30.0, clock)
    assert progress.record(100, lag=5) is None  # the interval has not passed
    clock.now += 10
    assert progress.record(200, lag=4) is None
    clock.now += 20
    assert progress.record(300, lag=0) == {
        "records": 600,
        "records_per_second": 20.0,
        "seconds": 30.0,
        "total": 600,
        "lag": 0,
    }
    clock.now += 5
    assert progress.record(50, lag=None) is None  # counted for the next line
    clock.now += 25
    assert progress.record(10, lag=None) == {
        "records": 60,
        "records_per_second": 2.0,
        "seconds": 30.0,
        "total": 660,
    }


def test_nothing_written_nothing_logged_and_zero_turns_it_off() -> None:
    clock = Clock()
    idle = ProgressLog(1.0, clock)
    clock.now += 60
    assert idle.record(0, lag=0) is None
    off = ProgressLog(0.0, clock)
    clock.now += 60
    assert off.record(10_000, lag=0) is None


async def test_the_stage_logs_what_it_wrote_once_not_per_batch() -> None:
    consumer = FakeConsumer(records(*[b"event"] * 30))
    writer = RecordingWriter()
    loop = StageLoop(
        options(batch_max_records=5, progress_log_seconds=0.000001),
        consumer,
        echo,
        writer,
        RecordingDeadLetters(),
    )
    with capture_logs() as logs:
        await run_until(loop, lambda: consumer.committed == 30)
    lines = [entry for entry in logs if entry["event"] == "wrote"]
    assert len(writer.written) == 6
    assert sum(line["records"] for line in lines) == 30
    assert lines[-1]["total"] == 30 and lines[-1]["output"] == "test-output"
    assert lines[-1]["stage"] == "test" and lines[-1]["lag"] == 0

    quiet = FakeConsumer(records(*[b"event"] * 30))
    loop = StageLoop(
        options(batch_max_records=5, progress_log_seconds=3600),
        quiet,
        echo,
        RecordingWriter(),
        RecordingDeadLetters(),
    )
    with capture_logs() as logs:
        await run_until(loop, lambda: quiet.committed == 30)
    assert [entry for entry in logs if entry["event"] == "wrote"] == []
