"""``sgpipe dlq list`` and ``sgpipe dlq replay``: arguments in, report out.

Registered on the main parser by ``add_commands``; the CLI passes each handler a ``SqlRunner``
that reaches the store the way ``sgpipe query`` does. Heavy imports (the processor, aiokafka)
happen inside the handlers.

Replay order, per page of letters: produce the replay records and wait for Kafka's
acknowledgement, *then* mark the letters replayed. A failure in between leaves them pending,
and replaying them again is harmless (ClickHouse keeps one row per event and per letter); the
other order could mark letters replayed that never reached the raw topic.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from sgpipe.dlq import SqlRunner

if TYPE_CHECKING:
    from processors.authenticate import RawRecordAuthenticator
    from schemas.dead_letter import DeadLetterOrigin
    from sgpipe.dlq.letters import ElementForecast, Outcome, StoredLetter
    from sgpipe.dlq.report import ReplayLine
    from sgpipe.dlq.store import DeadLetterStore, LetterFilter
    from sgpipe.runtime.settings import Settings


def _log() -> Any:
    # structlog (and pydantic's settings) are imported when a dlq command runs, not when the
    # CLI builds its parser: `sgpipe --help` starts at once (sgpipe/cli.py).
    import structlog

    return structlog.get_logger("sgpipe")


# Letters read (and replayed) per round trip: bounds the memory a replay holds in payloads.
PAGE_LETTERS: Final = 200
SAMPLES_PER_REASON: Final = 3
# How often a replay looks for the outcomes while it waits.
_OBSERVE_INTERVAL_SECONDS: Final = 1.0
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

# (args, settings, run_sql) -> exit code
DlqHandler = Callable[[argparse.Namespace, "Settings", SqlRunner], int]


def add_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
    run: Callable[[DlqHandler], Callable[[argparse.Namespace, Settings], int]],
    add_data_dir: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Register ``dlq list`` and ``dlq replay``. ``run`` wraps a handler into a command (it
    resolves the store and reports its failures); ``add_data_dir`` adds ``--data-dir``."""
    dlq = commands.add_parser(
        "dlq",
        help="look at dead letters and replay them",
        description="Dead letters: what the processor or the sink could not process, kept in "
        "ClickHouse's dead_letters table by `sgpipe sink` (docs/dead-letters.md).",
    )
    actions = dlq.add_subparsers(title="actions", required=True, metavar="ACTION")
    listing = actions.add_parser(
        "list",
        parents=[common],
        help="count dead letters by reason, with samples",
        description="Count the dead letters by stage and reason (pending and replayed), with "
        "their time range and a few samples per reason: detail, origin, payload excerpt. "
        "Reads clickhouse.url, or the embedded store of --data-dir (over HTTP while `sgpipe "
        "up` serves it, directly otherwise). Readable text on a terminal, tab-separated "
        "counts in a pipe, everything as JSON with --json.",
    )
    replay = actions.add_parser(
        "replay",
        parents=[common],
        help="feed pending dead letters back through the processor",
        description="Send each pending processor dead letter back to the raw topic as the raw "
        "batch it came from (one element, or the whole body, with the original headers), mark "
        "it replayed, then wait for what became of it: landed in email_events, or "
        "dead-lettered again (with the new reason). Replaying twice adds nothing: ClickHouse "
        "keeps one row per event and per dead letter. Sink dead letters are not replayable. "
        "Needs Kafka (kafka.bootstrap_servers, or a running `sgpipe up`), except with "
        "--dry-run, which only says what the processor of this version would do.",
    )
    for parser in (listing, replay):
        add_data_dir(parser)
        parser.add_argument("--reason", metavar="R", help="only dead letters with this reason")
        parser.add_argument(
            "--since",
            type=_since_argument,
            metavar="T",
            help="only dead letters from T on: a UTC time (2024-05-01, 2024-05-01T10:00) or a "
            "duration back from now (90m, 12h, 7d)",
        )
        parser.add_argument("--json", action="store_true", help="print JSON")
    listing.add_argument(
        "--samples",
        type=int,
        default=SAMPLES_PER_REASON,
        metavar="N",
        help=f"samples per reason (default {SAMPLES_PER_REASON})",
    )
    listing.set_defaults(command=run(dlq_list), serves_webhooks=False)
    replay.add_argument(
        "--dry-run", action="store_true", help="send nothing; say what would become of each"
    )
    replay.add_argument(
        "--include-replayed",
        action="store_true",
        help="also replay dead letters already replayed (normally skipped)",
    )
    replay.add_argument(
        "--wait",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long to wait for the outcomes (default 60; 0: do not wait)",
    )
    replay.set_defaults(command=run(dlq_replay), serves_webhooks=False)


# --- dlq list --------------------------------------------------------------------------------


def dlq_list(args: argparse.Namespace, settings: Settings, run_sql: SqlRunner) -> int:
    from sgpipe.dlq import report
    from sgpipe.dlq.store import DeadLetterStore, LetterFilter

    store = DeadLetterStore(run_sql, settings.clickhouse.database)
    letters = LetterFilter(reason=args.reason, since=args.since)
    if store.exists():
        summaries = store.summary(letters)
        # Bytes enough for the excerpt's characters (UTF-8 takes up to 4 per character).
        samples = store.samples(letters, max(args.samples, 0), 4 * report.EXCERPT_CHARS)
    else:
        _no_table(store)
        summaries, samples = [], []
    if args.json:
        output = report.list_json(store.table, summaries, samples)
    elif sys.stdout.isatty():
        output = report.list_text(store.table, summaries, samples)
    else:
        output = report.list_tsv(summaries)
    sys.stdout.write(output)
    return 0


def _no_table(store: DeadLetterStore) -> None:
    _log().warning(
        "no dead_letters table yet: `sgpipe sink` (or `sgpipe up`) creates it", table=store.table
    )


# --- dlq replay ------------------------------------------------------------------------------


def dlq_replay(args: argparse.Namespace, settings: Settings, run_sql: SqlRunner) -> int:
    import asyncio

    from sgpipe.dlq import report
    from sgpipe.dlq.store import DeadLetterStore, LetterFilter

    store = DeadLetterStore(run_sql, settings.clickhouse.database)
    bootstrap_servers = None if args.dry_run else _kafka_for_replay(settings, args.data_dir)
    letters = LetterFilter(
        reason=args.reason, since=args.since, pending_only=not args.include_replayed
    )
    started = time.monotonic()
    if store.exists():
        lines = asyncio.run(
            _replay(
                store,
                letters,
                settings,
                bootstrap_servers,
                wait=max(args.wait, 0.0),
                authenticator=_replay_authenticator(settings, args.data_dir),
            )
        )
    else:
        _no_table(store)
        lines = []
    waited = time.monotonic() - started
    raw_topic = settings.kafka.topics.raw
    if args.json:
        output = report.replay_json(raw_topic, lines, dry_run=args.dry_run, waited_seconds=waited)
    elif sys.stdout.isatty():
        output = report.replay_text(raw_topic, lines, dry_run=args.dry_run, waited_seconds=waited)
    else:
        output = report.replay_tsv(lines)
    sys.stdout.write(output)
    return 0


def _kafka_for_replay(settings: Settings, data_dir: Path) -> str:
    """Where replays are sent: kafka.bootstrap_servers, else the broker of a running
    `sgpipe up` on ``data_dir`` (its embedded broker, found through its state file)."""
    if settings.kafka.bootstrap_servers:
        return settings.kafka.bootstrap_servers
    from sgpipe.runtime.settings import ConfigError
    from sgpipe.up import state_file

    try:
        state = json.loads(state_file(data_dir).read_text(encoding="utf-8"))
        return str(state["kafka_bootstrap_servers"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(
            "`sgpipe dlq replay` sends to Kafka: set kafka.bootstrap_servers, or run it while "
            f"`sgpipe up` runs on --data-dir {data_dir}; --dry-run needs no Kafka"
        ) from None


def _replay_authenticator(settings: Settings, data_dir: Path) -> RawRecordAuthenticator | None:
    """The processor's HMAC check, to forecast it: with ``raw_auth.keys``, else the key of
    `sgpipe up` in ``data_dir``; None when neither is known here (not forecast).

    A replay is never signed here: a whole record keeps the ingress's HMAC, an element the
    processor's (processors/authenticate.py), and the processor checks them as it checks any
    record. Signing at replay would make a forged record that was dead-lettered as
    ``unauthenticated_raw_record`` (or a forged dead letter, written by anyone who can write
    the dead-letter topic) into events the moment an operator replays everything pending."""
    from processors.authenticate import RawRecordAuthenticator
    from sgpipe.runtime.raw_auth import hmac_keys

    keys = settings.raw_auth.keys
    if not keys:
        from sgpipe.embedded.raw_auth_key import RawAuthKeyError, load_raw_auth_key

        try:
            keys = (load_raw_auth_key(data_dir),)
        except (OSError, RawAuthKeyError):
            return None
    return RawRecordAuthenticator(
        hmac_keys(keys),
        allow_unauthenticated=settings.raw_auth.allow_unauthenticated,
    )


async def _replay(
    store: DeadLetterStore,
    letters: LetterFilter,
    settings: Settings,
    bootstrap_servers: str | None,
    *,
    wait: float,
    authenticator: RawRecordAuthenticator | None = None,
) -> list[ReplayLine]:
    """Replay (or, without ``bootstrap_servers``, dry-run) every selected letter, page by
    page in key order; then wait up to ``wait`` seconds for the outcomes."""
    from sgpipe.dlq.letters import (
        NOT_SEEN,
        REPLAYED,
        SKIPPED,
        Outcome,
        Skip,
        expected_outcome,
        forecast,
        plan_replay,
    )
    from sgpipe.dlq.report import ReplayLine
    from sgpipe.runtime.kafka import OutgoingRecord, create_producer, max_record_bytes, send_all

    kafka = settings.kafka
    record_limit = max_record_bytes(kafka)
    outcomes: list[tuple[StoredLetter, Outcome | None]] = []
    sent: list[tuple[StoredLetter, list[ElementForecast]]] = []
    producer = None
    if bootstrap_servers is not None:
        producer = create_producer(
            kafka.model_copy(update={"bootstrap_servers": bootstrap_servers})
        )
        await producer.start()
    try:
        after = None
        while page := store.letters(letters, after, PAGE_LETTERS):
            after = page[-1].origin
            records = []
            for full in page:
                plan = plan_replay(full)
                # What the report keeps of it: not its bytes (a page at a time holds those).
                letter = dataclasses.replace(full, payload=b"", headers={})
                if isinstance(plan, Skip):
                    outcomes.append((letter, Outcome(SKIPPED, note=plan.why)))
                    continue
                forecasts = forecast(plan, authenticator)
                if producer is None:
                    outcomes.append((letter, expected_outcome(forecasts, record_limit)))
                    continue
                records.append(plan)
                sent.append((letter, forecasts))
                outcomes.append((letter, None))
            if producer is not None and records:
                # Acknowledged first, marked after: see the module docstring.
                await send_all(
                    producer,
                    [OutgoingRecord(kafka.topics.raw, r.value, headers=r.headers) for r in records],
                )
                store.mark_replayed([record.letter for record in records])
                _log().info("replayed dead letters", letters=len(records), topic=kafka.topics.raw)
    finally:
        if producer is not None:
            await producer.stop()

    observed = await _observe(store, sent, wait) if sent and wait > 0 else {}
    lines = []
    for letter, outcome in outcomes:
        if outcome is None:
            outcome = observed.get(letter.origin) or Outcome(NOT_SEEN if wait > 0 else REPLAYED)
        lines.append(ReplayLine(letter, outcome))
    return lines


async def _observe(
    store: DeadLetterStore,
    sent: list[tuple[StoredLetter, list[ElementForecast]]],
    wait: float,
) -> dict[DeadLetterOrigin, Outcome]:
    """Outcomes of the replayed letters, as ClickHouse shows them, for up to ``wait`` s."""
    import asyncio

    from sgpipe.dlq.letters import observed_outcome

    deadline = time.monotonic() + wait
    found: dict[DeadLetterOrigin, Outcome] = {}
    waiting = sent
    while waiting:
        later = store.later_letters([letter for letter, _ in waiting])
        ids = [item.event_id for _, items in waiting for item in items if item.event_id]
        landed = store.landed(ids) if ids else set()
        still = []
        for letter, forecasts in waiting:
            outcome = observed_outcome(letter, forecasts, later, landed)
            if outcome is None:
                still.append((letter, forecasts))
            else:
                found[letter.origin] = outcome
        waiting = still
        if not waiting or time.monotonic() >= deadline:
            break
        await asyncio.sleep(_OBSERVE_INTERVAL_SECONDS)
    return found


# --- arguments -------------------------------------------------------------------------------


def parse_since(text: str, now: datetime) -> datetime:
    """``--since``: a duration back from ``now`` (``90m``, ``12h``, ``7d``; s/m/h/d/w) or an
    ISO 8601 time (a date, or a date and time; UTC unless it names an offset)."""
    text = text.strip()
    duration = _DURATION.match(text)
    if duration:
        return now - timedelta(seconds=float(duration[1]) * _UNITS[duration[2]])
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"--since {text!r} is neither a duration (90m, 12h, 7d) nor a time (2024-05-01T10:00)"
        ) from None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _since_argument(text: str) -> datetime:
    try:
        return parse_since(text, datetime.now(UTC))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
