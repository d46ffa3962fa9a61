"""``sgpipe top``: a live terminal view of a running pipeline, like ``vector top``.

It reads what the stages already export -- Prometheus ``/metrics`` and ``/readyz`` -- from the
ingress port of ``sgpipe up`` (which merges every stage's, found through the data dir's state
file) or from any list of ``--metrics-url`` (say, Kubernetes port-forwards to each stage). No
new protocol: whatever Prometheus scrapes, top shows.

Rates need two readings: a frame is the difference between the latest scrape and the one
before it (``--once`` takes two, ``--interval`` apart). The data path is pure --
``parse_exposition`` -> ``Reading`` -> ``frame(previous, current)`` -> ``render`` -- and only
``scrape`` does I/O, so the arithmetic is tested on real expositions without a terminal.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# The stages top has a row for, in pipeline order; a process that exports another stage label
# gets a row too, after these.
STAGE_ORDER = ("ingest", "process", "sink", "dead_letters")

# What "in" and "out" mean per stage: (metric, label filter) pairs summed.
_Selector = tuple[str, Mapping[str, str]]
_IN: Mapping[str, _Selector] = {
    "ingest": ("sgpipe_ingest_requests_total", {}),
}
_OUT: Mapping[str, _Selector] = {
    "ingest": ("sgpipe_ingest_requests_total", {"outcome": "accepted"}),
    "process": ("sgpipe_records_produced_total", {"output": "events"}),
    "sink": ("sgpipe_clickhouse_inserted_rows_total", {"table": "email_events"}),
    "dead_letters": ("sgpipe_clickhouse_inserted_rows_total", {}),
}
_CONSUMED = "sgpipe_records_consumed_total"
_STORED: _Selector = ("sgpipe_clickhouse_inserted_rows_total", {"stage": "sink"})

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Reading:
    """One scrape: every sample by (name, labels), the readiness checks, and when."""

    at: float
    samples: Mapping[tuple[str, Labels], float]
    checks: Mapping[str, tuple[bool, str]] = field(default_factory=dict)
    ready: bool | None = None

    def total(self, name: str, **labels: str) -> float:
        return sum(
            value
            for (sample, sample_labels), value in self.samples.items()
            if sample == name and _matches(sample_labels, labels)
        )

    def values(self, name: str, **labels: str) -> list[tuple[Labels, float]]:
        return [
            (sample_labels, value)
            for (sample, sample_labels), value in self.samples.items()
            if sample == name and _matches(sample_labels, labels)
        ]

    def stages(self) -> list[str]:
        seen = {
            dict(labels).get("stage", "")
            for (name, labels) in self.samples
            if name.startswith("sgpipe_")
        }
        seen.discard("")
        seen.discard("up")
        known = [stage for stage in STAGE_ORDER if stage in seen]
        return known + sorted(seen - set(STAGE_ORDER))


def _matches(labels: Labels, wanted: Mapping[str, str]) -> bool:
    present = dict(labels)
    return all(present.get(key) == value for key, value in wanted.items())


def parse_exposition(text: str, at: float, readyz: Mapping[str, object] | None = None) -> Reading:
    """A Reading of Prometheus text ``text`` scraped at ``at`` (and a ``/readyz`` answer)."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            samples[key] = samples.get(key, 0.0) + float(sample.value)
    checks: dict[str, tuple[bool, str]] = {}
    ready: bool | None = None
    if readyz is not None:
        raw = readyz.get("checks")
        if isinstance(raw, Mapping):
            for name, check in raw.items():
                if isinstance(check, Mapping):
                    checks[str(name)] = (bool(check.get("ok")), str(check.get("detail", "")))
        ready = readyz.get("status") == "ready"
    return Reading(at, samples, checks, ready)


def merge_readings(readings: Sequence[Reading]) -> Reading:
    """Several processes' readings (``--metrics-url`` each) as one."""
    samples: dict[tuple[str, Labels], float] = {}
    checks: dict[str, tuple[bool, str]] = {}
    for reading in readings:
        for key, value in reading.samples.items():
            samples[key] = samples.get(key, 0.0) + value
        checks.update(reading.checks)
    states = [reading.ready for reading in readings if reading.ready is not None]
    return Reading(
        max((reading.at for reading in readings), default=time.time()),
        samples,
        checks,
        all(states) if states else None,
    )


@dataclass(frozen=True)
class StageRow:
    stage: str
    ready: bool | None
    in_per_second: float | None
    out_per_second: float | None
    lag: float | None
    dead_letters: float
    retries: float
    errors: Mapping[str, float]
    last_commit_age_seconds: float | None
    # How many processes run the stage under `sgpipe up` (--processors, --sinks), from the
    # supervisor's per-child series; None elsewhere (and for a stage inside another's process).
    processes: int | None = None


@dataclass(frozen=True)
class Frame:
    """What one screen shows."""

    at: float
    rows: list[StageRow]
    ready: bool | None
    received_to_stored_p50_seconds: float | None
    received_to_stored_p99_seconds: float | None
    stored_last_minute: float | None
    stored_last_minute_estimated: bool
    oldest_unwritten_seconds: float | None
    failing_checks: list[str]


def frame(history: Sequence[Reading]) -> Frame:
    """The frame for the newest reading of ``history`` (oldest first, at least one)."""
    current = history[-1]
    previous = history[-2] if len(history) > 1 else None
    elapsed = current.at - previous.at if previous is not None else 0.0

    def rate(name: str, **labels: str) -> float | None:
        if previous is None or elapsed <= 0:
            return None
        delta = current.total(name, **labels) - previous.total(name, **labels)
        # A counter that went down belongs to a restarted process: count from zero.
        return (delta if delta >= 0 else current.total(name, **labels)) / elapsed

    children = [
        dict(labels).get("child", "")
        for labels, _ in current.values("sgpipe_up_child_restarts_total", stage="up")
    ]
    rows = []
    for stage in current.stages():
        in_name, in_labels = _IN.get(stage, (_CONSUMED, {}))
        out_name, out_labels = _OUT.get(stage, ("sgpipe_records_produced_total", {}))
        lag_values = current.values("sgpipe_consumer_lag", stage=stage)
        commits = current.values("sgpipe_last_commit_timestamp_seconds", stage=stage)
        commit_at = max((value for _, value in commits), default=0.0)
        errors = {
            dict(labels).get("error_class", "?"): value
            for labels, value in current.values("sgpipe_errors_total", stage=stage)
            if value
        }
        ready_values = current.values("sgpipe_ready", stage=stage)
        rows.append(
            StageRow(
                stage=stage,
                ready=_stage_ready(stage, current, ready_values),
                in_per_second=rate(in_name, stage=stage, **in_labels),
                out_per_second=rate(out_name, stage=stage, **out_labels),
                lag=sum(value for _, value in lag_values) if lag_values else None,
                dead_letters=current.total("sgpipe_dead_letters_total", stage=stage),
                retries=current.total("sgpipe_retries_total", stage=stage),
                errors=errors,
                last_commit_age_seconds=current.at - commit_at if commit_at > 0 else None,
                processes=sum(1 for c in children if c == stage or c.startswith(f"{stage}-"))
                or None,
            )
        )

    stored_name, stored_labels = _STORED
    minute_ago = [reading for reading in history if current.at - reading.at >= 60.0]
    estimated = not minute_ago
    stored: float | None
    if minute_ago:
        base = minute_ago[-1]
        stored = current.total(stored_name, **stored_labels) - base.total(
            stored_name, **stored_labels
        )
        stored *= 60.0 / max(current.at - base.at, 1e-9)
    else:
        per_second = rate(stored_name, **stored_labels)
        stored = per_second * 60.0 if per_second is not None else None

    oldest = [value for _, value in current.values("sgpipe_oldest_unwritten_seconds")]
    p50, p99 = (
        _histogram_quantile(current, previous, "sgpipe_received_to_stored_seconds", q)
        for q in (0.5, 0.99)
    )
    return Frame(
        at=current.at,
        rows=rows,
        ready=current.ready,
        received_to_stored_p50_seconds=p50,
        received_to_stored_p99_seconds=p99,
        stored_last_minute=stored,
        stored_last_minute_estimated=estimated,
        oldest_unwritten_seconds=max(oldest) if oldest else None,
        failing_checks=sorted(name for name, (ok, _) in current.checks.items() if not ok),
    )


def _stage_ready(
    stage: str, reading: Reading, gauges: Sequence[tuple[Labels, float]]
) -> bool | None:
    # /readyz names checks "<stage>.<check>": the most direct answer when it is there.
    checks = [ok for name, (ok, _) in reading.checks.items() if name.startswith(f"{stage}.")]
    if checks:
        return all(checks)
    if gauges:
        return all(value >= 1 for _, value in gauges)
    return None


def _histogram_quantile(
    current: Reading, previous: Reading | None, name: str, quantile: float
) -> float | None:
    """Prometheus's histogram_quantile over the buckets' increase since ``previous`` (or
    their totals when that window saw no observation), by linear interpolation."""

    def buckets(reading: Reading) -> dict[float, float]:
        found: dict[float, float] = {}
        for labels, value in reading.values(f"{name}_bucket"):
            bound = dict(labels).get("le")
            if bound is not None:
                upper = float("inf") if bound == "+Inf" else float(bound)
                found[upper] = found.get(upper, 0.0) + value
        return found

    now = buckets(current)
    if previous is not None:
        before = buckets(previous)
        window = {bound: count - before.get(bound, 0.0) for bound, count in now.items()}
        if window and max(window.values()) > 0 and min(window.values()) >= 0:
            now = window
    ordered = sorted(now.items())
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = quantile * ordered[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return None


# --- rendering -------------------------------------------------------------------------------


def _number(value: float | None, suffix: str = "") -> str:
    if value is None:
        return "-"
    if value >= 10_000:
        return f"{value / 1000:,.0f}k{suffix}"
    if value >= 100 or value == int(value):
        return f"{value:,.0f}{suffix}"
    return f"{value:,.1f}{suffix}"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def render(snapshot: Frame, source: str) -> object:
    """A rich renderable of the frame (a header and one row per stage)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    state = {True: "[green]ready[/]", False: "[red]not ready[/]", None: "[yellow]?[/]"}
    stored = _number(snapshot.stored_last_minute)
    if snapshot.stored_last_minute_estimated and snapshot.stored_last_minute is not None:
        stored = f"~{stored}"
    header = Text.from_markup(
        f"[bold]sgpipe top[/]  {source}  {state[snapshot.ready]}\n"
        f"2xx->row p50 {_age(snapshot.received_to_stored_p50_seconds)} "
        f"p99 {_age(snapshot.received_to_stored_p99_seconds)}   "
        f"stored last minute {stored}   "
        f"oldest unwritten {_age(snapshot.oldest_unwritten_seconds)}"
    )
    table = Table(expand=False, show_edge=False, pad_edge=False)
    for column, justify in (
        ("stage", "left"),
        ("state", "left"),
        ("in/s", "right"),
        ("out/s", "right"),
        ("lag", "right"),
        ("dead letters", "right"),
        ("retries", "right"),
        ("errors", "left"),
        ("last commit", "right"),
    ):
        # The stage's name is never cut; the other columns give way on a narrow terminal.
        table.add_column(
            column,
            justify=justify,  # type: ignore[arg-type]
            no_wrap=column == "stage",
            min_width=len("dead_letters") if column == "stage" else None,
        )
    for row in snapshot.rows:
        errors = ", ".join(f"{name} {_number(count)}" for name, count in sorted(row.errors.items()))
        table.add_row(
            row.stage + (f" x{row.processes}" if row.processes and row.processes > 1 else ""),
            state[row.ready],
            _number(row.in_per_second),
            _number(row.out_per_second),
            _number(row.lag),
            _number(row.dead_letters),
            _number(row.retries),
            errors or "-",
            _age(row.last_commit_age_seconds) + (" ago" if row.last_commit_age_seconds else ""),
        )
    parts: list[object] = [header, table]
    if snapshot.failing_checks:
        parts.append(Text("failing checks: " + ", ".join(snapshot.failing_checks), style="red"))
    return Group(*parts)  # type: ignore[arg-type]


def frame_as_json(snapshot: Frame) -> dict[str, object]:
    return {
        "at": snapshot.at,
        "ready": snapshot.ready,
        "received_to_stored_p50_seconds": snapshot.received_to_stored_p50_seconds,
        "received_to_stored_p99_seconds": snapshot.received_to_stored_p99_seconds,
        "stored_last_minute": snapshot.stored_last_minute,
        "oldest_unwritten_seconds": snapshot.oldest_unwritten_seconds,
        "failing_checks": snapshot.failing_checks,
        "stages": [
            {
                "stage": row.stage,
                "ready": row.ready,
                "in_per_second": row.in_per_second,
                "out_per_second": row.out_per_second,
                "lag": row.lag,
                "dead_letters": row.dead_letters,
                "retries": row.retries,
                "errors": dict(row.errors),
                "last_commit_age_seconds": row.last_commit_age_seconds,
                "processes": row.processes,
            }
            for row in snapshot.rows
        ],
    }


# --- I/O -------------------------------------------------------------------------------------


class TopError(Exception):
    """Nothing to watch: no running `sgpipe up` on the data dir, or no URL answered."""


def metrics_urls_from_data_dir(data_dir: Path) -> list[str]:
    """The base URL that answers for every stage of the `sgpipe up` running on ``data_dir``."""
    from sgpipe.up.layout import state_file

    path = state_file(data_dir)
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise TopError(
            f"no sgpipe up is running on {data_dir} ({path} is missing); start it, or pass "
            "--metrics-url"
        ) from None
    except (OSError, ValueError) as exc:
        raise TopError(f"cannot read {path}: {exc}") from None
    # The ingress port answers for every stage (its /metrics merges the others'); the
    # supervisor's own health port only for the stages behind the ingress.
    url = state.get("ingest_url") or state.get("health_url")
    if not isinstance(url, str) or not url:
        raise TopError(f"{path} names no health URL; is sgpipe up still starting?")
    return [url]


def _base(url: str) -> str:
    url = url.rstrip("/")
    return url[: -len("/metrics")] if url.endswith("/metrics") else url


async def scrape(urls: Sequence[str], timeout_seconds: float = 5.0) -> Reading:
    """One reading of every URL's ``/metrics`` and ``/readyz``, merged."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=timeout_seconds)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one(url: str) -> Reading:
            base = _base(url)
            try:
                async with session.get(base + "/metrics") as response:
                    if response.status != 200:
                        raise TopError(f"{base}/metrics answered HTTP {response.status}")
                    text = await response.text()
                readyz: dict[str, object] | None = None
                async with session.get(base + "/readyz") as response:
                    if response.content_type == "application/json":
                        answer = await response.json()
                        readyz = answer if isinstance(answer, dict) else None
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise TopError(f"{base} does not answer: {exc!r}") from None
            return parse_exposition(text, time.time(), readyz)

        return merge_readings(await asyncio.gather(*(one(url) for url in urls)))


async def run_top(
    urls: Sequence[str],
    *,
    once: bool,
    interval_seconds: float,
    as_json: bool,
    source: str,
    frames: int | None = None,
) -> int:
    """Show frames until interrupted (or ``frames`` of them); ``once``: print one and return."""
    from rich.console import Console
    from rich.live import Live

    console = Console()
    history: deque[Reading] = deque(maxlen=max(3, int(70 / max(interval_seconds, 0.1)) + 2))
    history.append(await scrape(urls))
    await asyncio.sleep(interval_seconds)
    history.append(await scrape(urls))
    if once:
        snapshot = frame(list(history))
        if as_json:
            print(json.dumps(frame_as_json(snapshot), indent=2))
        else:
            console.print(render(snapshot, source))
        return 0
    shown = 0
    with Live(render(frame(list(history)), source), console=console, auto_refresh=False) as live:  # type: ignore[arg-type]
        while frames is None or shown < frames:
            await asyncio.sleep(interval_seconds)
            try:
                history.append(await scrape(urls))
            except TopError as exc:
                console.print(f"[red]{exc}[/]")
                continue
            live.update(render(frame(list(history)), source), refresh=True)  # type: ignore[arg-type]
            shown += 1
    return 0


def describe_sources(urls: Iterable[str]) -> str:
    return ", ".join(_base(url) for url in urls)
