"""The processor's collector tuning (processors/stage.py): in force while any stage of the
process runs, undone when the last one stops, whatever order they stop in."""

from __future__ import annotations

import gc

from processors.stage import PROCESSOR_GC_THRESHOLDS, collector_tuned_for_batches


def test_the_tuning_holds_while_a_stage_runs_and_is_undone_after_the_last() -> None:
    before = gc.get_threshold()
    assert before != PROCESSOR_GC_THRESHOLDS
    first = collector_tuned_for_batches()
    second = collector_tuned_for_batches()
    first.__enter__()
    assert gc.get_threshold() == PROCESSOR_GC_THRESHOLDS
    assert gc.get_freeze_count() > 0  # the start-up heap is out of the collector's walks
    second.__enter__()
    first.__exit__(None, None, None)  # the first stage stops while the second still runs
    assert gc.get_threshold() == PROCESSOR_GC_THRESHOLDS
    second.__exit__(None, None, None)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_the_tuning_is_undone_when_the_stage_fails() -> None:
    before = gc.get_threshold()
    try:
        with collector_tuned_for_batches():
            raise RuntimeError("the stage failed")
    except RuntimeError:
        pass
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
