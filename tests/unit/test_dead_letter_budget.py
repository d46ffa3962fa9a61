"""The dead-letter limit's arithmetic (``DeadLetterBudget``): source records, not dead letters,
counted over a window of distinct ones; a refused batch counts nothing; a clean batch is never
refused. The stage's side (it pauses instead of stopping, holds the batch, resumes after a
restart) is in tests/unit/test_stage_loop.py."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from sgpipe.runtime.dead_letters import DeadLetterBudget, SourceRecord
from sgpipe.runtime.settings import DeadLetterLimit, Settings


def batch(first: int, dirty: int = 0, clean: int = 0) -> dict[SourceRecord, bool]:
    """``dirty`` source records with dead letters, then ``clean`` ones, from offset ``first``."""
    outcomes = {("raw", 0, first + index): True for index in range(dirty)}
    outcomes.update({("raw", 0, first + dirty + index): False for index in range(clean)})
    return outcomes


def budget(**limit: float) -> DeadLetterBudget:
    return DeadLetterBudget(DeadLetterLimit(**limit), stage="process")  # type: ignore[arg-type]


def test_the_defaults_let_a_few_bad_batches_through_on_a_fresh_stage() -> None:
    # The sequence on a stage that just started: a batch of 101 zeros, one of
    # 2,000,000 zeros (each one source record), then a valid one.
    defaults = DeadLetterBudget(Settings().processor.dead_letters, stage="process")
    assert defaults.admit(batch(0, dirty=1)) is None
    assert defaults.admit(batch(1, dirty=1)) is None
    assert defaults.admit(batch(2, clean=1)) is None


def test_the_ratio_applies_once_min_records_were_seen() -> None:
    limit = budget(max_ratio=0.5, min_records=4, window_records=10)
    assert limit.admit(batch(0, dirty=3)) is None  # 3 of 3, but fewer than 4 seen
    assert limit.admit(batch(3, dirty=1)) == (
        "process: 4 of the last 4 source records had dead letters, over "
        "dead_letters.max_ratio (0.5)"
    )


def test_a_clean_batch_is_never_refused() -> None:
    limit = budget(max_ratio=0.5, min_records=4, window_records=10)
    assert limit.admit(batch(0, dirty=3)) is None
    # 3 of 4 would be over the ratio, but holding a batch without dead letters protects nothing.
    assert limit.admit(batch(3, clean=1)) is None


def test_a_refused_batch_counts_nothing_and_is_refused_again() -> None:
    limit = budget(max_ratio=0.5, min_records=2, window_records=10)
    assert limit.admit(batch(0, clean=1)) is None
    refused = batch(1, dirty=2)
    reason = limit.admit(refused)
    assert reason is not None and reason.startswith("process: 2 of the last 3 source records")
    assert limit.admit(refused) == reason
    # What was refused did not count: a batch of one bad record in two is within the limit.
    assert limit.admit(batch(10, dirty=1, clean=2)) is None


def test_the_window_keeps_only_the_last_window_records_source_records() -> None:
    # Old bad records leave the window ...
    forgets = budget(max_ratio=0.5, min_records=3, window_records=4)
    assert forgets.admit(batch(0, dirty=2)) is None  # fewer than 3 seen
    assert forgets.admit(batch(2, clean=4)) is None  # the window: 4 clean ones
    assert forgets.admit(batch(6, dirty=3)) is None  # 3 of 7 (5 of 9 if nothing left)
    # ... and so do old good ones: a run of bad records is judged against recent traffic.
    recent = budget(max_ratio=0.5, min_records=3, window_records=4)
    assert recent.admit(batch(0, clean=4)) is None
    assert recent.admit(batch(4, dirty=1)) is None  # 1 of 5
    assert recent.admit(batch(5, dirty=1)) is None  # 2 of 5
    assert recent.admit(batch(6, dirty=1)) is not None  # 3 of 5 (3 of 7 if nothing left)


def test_a_record_seen_again_is_not_counted_twice() -> None:
    # A batch re-read after a rebalance (its steps run again) is the same source records.
    limit = budget(max_ratio=0.5, min_records=3, window_records=10)
    once = batch(0, dirty=1, clean=1)
    assert limit.admit(once) is None
    assert limit.admit(once) is None
    assert limit.admit(once) is None
    # Two distinct records in the window, one with dead letters: one more bad one is 2 of 3.
    assert limit.admit(batch(2, dirty=1)) is not None


def test_the_count_limit_counts_source_records_with_dead_letters() -> None:
    limit = budget(max_ratio=1.0, max_count=2, min_records=1, window_records=10)
    assert limit.admit(batch(0, dirty=2, clean=5)) is None
    assert limit.admit(batch(7, dirty=1)) == (
        "process: 3 of the last 8 source records had dead letters, over dead_letters.max_count (2)"
    )


def test_max_ratio_1_and_max_count_0_switch_the_limit_off() -> None:
    off = budget(max_ratio=1.0, max_count=0, min_records=1, window_records=10)
    assert all(off.admit(batch(offset, dirty=1)) is None for offset in range(50))


@pytest.mark.parametrize(
    ("limit", "message"),
    [
        ({"min_records": 200, "window_records": 100}, "min_records (200) is larger than"),
        ({"max_count": 100, "window_records": 100}, "max_count (100) must be below"),
    ],
)
def test_limits_the_window_cannot_hold_are_refused_at_start(
    limit: dict[str, int], message: str
) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        DeadLetterLimit(**limit)
