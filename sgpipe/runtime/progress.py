"""Progress a person can read: at most one ``wrote`` line per interval per stage.

A stage that logged every batch would drown its own log at 20,000 events/s, and one that logs
nothing leaves an operator guessing whether a backlog is moving. So each consuming stage sums
what it committed and, at most once per ``interval_seconds`` (and only when it wrote anything),
logs the records, their rate over the interval and the stage's consumer lag.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class ProgressLog:
    """Counts committed records; ``record`` returns the fields of a line when one is due."""

    def __init__(
        self, interval_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._interval = interval_seconds
        self._clock = clock
        self._since = clock()
        self._records = 0
        self._total = 0

    def record(self, records: int, lag: int | None) -> dict[str, Any] | None:
        """Add ``records`` just committed; the line's fields once the interval has passed
        since the last line (None otherwise, and always with an interval of 0: off)."""
        self._records += records
        self._total += records
        if self._interval <= 0:
            return None
        now = self._clock()
        elapsed = now - self._since
        if elapsed < self._interval or self._records == 0:
            return None
        line: dict[str, Any] = {
            "records": self._records,
            "records_per_second": round(self._records / elapsed, 1),
            "seconds": round(elapsed, 1),
            "total": self._total,
        }
        if lag is not None:
            line["lag"] = lag
        self._since = now
        self._records = 0
        return line
