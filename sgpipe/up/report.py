"""The sentences `sgpipe up` ends with: what a stop wrote, and what is left unwritten where.

Pure functions of numbers, so that every wording is tested without a pipeline
(``tests/unit/test_up_report.py``). The numbers come from the children's ``stop report`` lines
(what each stage committed and wrote between its stop signal and its exit) and from counting
the topics past the committed offsets (``backlog.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sgpipe.up.backlog import Backlog

BrokerKind = Literal["durable", "memory", "external"]


@dataclass(frozen=True, slots=True)
class BrokerLocation:
    """Where acknowledged batches wait: the embedded broker's directory, or Kafka's address."""

    kind: BrokerKind
    where: str


@dataclass(frozen=True, slots=True)
class Drained:
    """What the stages did between their stop signal and their exit."""

    ingest_batches: int = 0  # batches acknowledged (requests that were in flight)
    processor_batches: int = 0  # raw batches processed and committed
    processor_events: int = 0  # events written to the events topic
    sink_events: int = 0  # events written to ClickHouse (and committed)

    @classmethod
    def from_reports(
        cls,
        reports: Mapping[str, Mapping[str, Any] | None],
        before: Mapping[str, Mapping[str, float]] | None = None,
    ) -> Drained:
        """From the ``stop report`` lines of the ingest, process and sink children: what each
        did since ``before[stage]`` (its totals when `sgpipe up` began to stop: the sink of an
        in-memory broker is signalled only after the processor drained, and writes meanwhile),
        else since its own stop signal."""

        def number(stage: str, key: str) -> int:
            report = reports.get(stage) or {}
            totals = report.get("totals")
            start = (before or {}).get(stage)
            if isinstance(totals, Mapping) and start is not None:
                return int(_number(totals.get(key)) - start.get(key, 0.0))
            if key.startswith("written:"):
                written = report.get("written")
                output = key.split(":", 1)[1]
                return int(_number(written.get(output) if isinstance(written, Mapping) else 0))
            return int(_number(report.get(key)))

        return cls(
            ingest_batches=number("ingest", "acknowledged"),
            processor_batches=number("process", "committed"),
            processor_events=number("process", "written:events"),
            sink_events=number("sink", "committed"),
        )

    @classmethod
    def total(cls, parts: Iterable[Drained]) -> Drained:
        """What several children did together (the replicas of a stage each report theirs)."""
        result = cls()
        for part in parts:
            result = cls(
                *(getattr(result, name) + getattr(part, name) for name in cls.__dataclass_fields__)
            )
        return result


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def count(number: int, singular: str, plural: str | None = None) -> str:
    return f"{number:,} {singular if number == 1 else (plural or singular + 's')}"


def drained_clause(drained: Drained) -> str:
    parts = []
    if drained.ingest_batches:
        parts.append(
            f"the ingress acknowledged {count(drained.ingest_batches, 'batch', 'batches')}"
        )
    parts.append(
        f"the processor wrote {count(drained.processor_batches, 'raw batch', 'raw batches')} "
        f"as {count(drained.processor_events, 'event')}"
    )
    parts.append(f"the sink wrote {count(drained.sink_events, 'event')} to ClickHouse")
    return "during the stop " + ", ".join(parts[:-1]) + " and " + parts[-1]


def left_clause(left: Backlog | None, location: BrokerLocation, unknown: str | None) -> str:
    """What is acknowledged and not yet written, and where it is (or that it is lost)."""
    if left is None:
        reason = f" ({unknown})" if unknown else ""
        if location.kind == "memory":
            return (
                f"what was left unwritten could not be counted{reason}; whatever it was, it was "
                "in the in-memory broker and is lost"
            )
        return (
            f"what is left unwritten could not be counted{reason}; whatever it is, it stays in "
            f"{_place(location)} and {_when(location)}"
        )
    if left.empty:
        return "nothing acknowledged is left unwritten"
    bound = "" if left.exact else "at least "
    what = (
        f"{bound}{count(left.raw_batches, 'acknowledged raw batch', 'acknowledged raw batches')} "
        f"({count(left.raw_events, 'event')}) not yet processed and "
        f"{bound}{count(left.events, 'event')} not yet written to ClickHouse"
    )
    if location.kind == "memory":
        return f"{what} were in the in-memory broker and are lost"
    return f"{what} are in {_place(location)} and {_when(location)}"


def _place(location: BrokerLocation) -> str:
    if location.kind == "durable":
        return f"the embedded broker at {location.where}"
    return f"Kafka at {location.where}"


def _when(location: BrokerLocation) -> str:
    if location.kind == "durable":
        return "will be processed at the next `sgpipe up`"
    return "will be processed when the processor and the sink run again"


def stop_report(
    drained: Drained, left: Backlog | None, location: BrokerLocation, unknown: str | None = None
) -> str:
    """The first stop's line: what the stop wrote, then what is left."""
    return f"stopped: {drained_clause(drained)}; {left_clause(left, location, unknown)}"


def at_once_report(
    left: Backlog | None, location: BrokerLocation, unknown: str | None = None
) -> str:
    """The second signal's line: what is left unwritten and where."""
    return f"stopped at once: {left_clause(left, location, unknown)}"


def backlog_at_start_report(backlog: Backlog) -> str:
    """The start's line when acknowledged batches were waiting (the stop report's promise)."""
    bound = "" if backlog.exact else "at least "
    return (
        f"backlog at start: {bound}"
        f"{count(backlog.raw_batches, 'acknowledged raw batch', 'acknowledged raw batches')} "
        f"({count(backlog.raw_events, 'event')}) not yet processed and {bound}"
        f"{count(backlog.events, 'event')} not yet written to ClickHouse; processing it now"
    )


def backlog_drained_report(backlog: Backlog, seconds: float) -> str:
    """The line once the backlog found at start is written."""
    return (
        f"backlog drained: the {count(backlog.raw_batches, 'raw batch', 'raw batches')} "
        f"({count(backlog.raw_events, 'event')}) and {count(backlog.events, 'event')} waiting "
        f"at start are in ClickHouse, {seconds:.0f} s after the start"
    )
