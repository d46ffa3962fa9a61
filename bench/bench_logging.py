"""Cost of one log line through the one-stream configuration, as a ratio against a baseline
measured in the same run.

- ours: ``configure_logging("info", "json")``, an sgpipe event (e.g. the ingress's "accepted
  raw batch", one per request) and a standard-library record (aiokafka's) through the
  ProcessorFormatter handler;
- baseline: structlog printing JSON straight to the stream with the processors the foundation
  had (before library loggers were routed in, fields capped and logger names added).

Run: ``.venv/bin/python -m bench.bench_logging``. Prints figures; asserts nothing about time.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import structlog

from sgpipe.runtime.logs import configure_logging

LINES = 20_000


def per_line_microseconds(emit: Callable[[], None], repeat: int = 9) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(LINES):
            emit()
        best = min(best, time.perf_counter() - started)
    return best / LINES * 1e6


def main() -> None:
    with open(os.devnull, "w", encoding="utf-8") as sink:
        structlog.configure(
            processors=[
                structlog.contextvars.merge_contextvars,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.JSONRenderer(),
            ],
            wrapper_class=structlog.make_filtering_bound_logger(20),
            logger_factory=structlog.PrintLoggerFactory(file=sink),
            cache_logger_on_first_use=True,
        )
        direct = structlog.get_logger("bench")
        baseline = per_line_microseconds(
            lambda: direct.info("accepted raw batch", webhook="main", bytes=786_432)
        )

        configure_logging("info", "json", stream=sink)
        routed = structlog.get_logger("bench")
        ours = per_line_microseconds(
            lambda: routed.info("accepted raw batch", webhook="main", bytes=786_432)
        )
        filtered = per_line_microseconds(lambda: routed.debug("not shown at info"))
        library = logging.getLogger("aiokafka.bench")
        foreign = per_line_microseconds(lambda: library.warning("Heartbeat failed for group"))
    print(f"structlog straight to the stream (baseline): {baseline:6.1f} us/line")
    print(
        f"an sgpipe event, one-stream configuration:   {ours:6.1f} us/line "
        f"({ours / baseline:.2f}x baseline)"
    )
    print(
        f"a library record through the handler:        {foreign:6.1f} us/line "
        f"({foreign / baseline:.2f}x baseline)"
    )
    print(f"a debug line filtered out at info:           {filtered:6.2f} us/line")


if __name__ == "__main__":
    main()
