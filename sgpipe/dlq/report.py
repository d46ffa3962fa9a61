"""What ``sgpipe dlq list`` and ``sgpipe dlq replay`` print: readable text on a terminal,
tab-separated values in a pipe (one header line, then one line per row), JSON with ``--json``.
Pure: each function returns the text."""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Final

from sgpipe.dlq.letters import Outcome, StoredLetter, letter_name
from sgpipe.dlq.store import ReasonSummary

# How much of a payload a sample shows, in characters.
EXCERPT_CHARS: Final = 120


# --- dlq list --------------------------------------------------------------------------------


def list_json(
    table: str, summaries: Sequence[ReasonSummary], samples: Sequence[StoredLetter]
) -> str:
    reasons = []
    for summary in summaries:
        reasons.append(
            {
                "stage": summary.stage,
                "reason": summary.reason,
                "pending": summary.pending,
                "replayed": summary.replayed,
                "first": summary.first,
                "last": summary.last,
                "samples": [
                    _sample_json(letter)
                    for letter in samples
                    if (letter.stage, letter.reason) == (summary.stage, summary.reason)
                ],
            }
        )
    document = {
        "table": table,
        "total": sum(summary.total for summary in summaries),
        "pending": sum(summary.pending for summary in summaries),
        "replayed": sum(summary.replayed for summary in summaries),
        "first": min((summary.first for summary in summaries), default=None),
        "last": max((summary.last for summary in summaries), default=None),
        "reasons": reasons,
    }
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def _sample_json(letter: StoredLetter) -> dict[str, Any]:
    origin = letter.origin
    return {
        "source_topic": origin.topic,
        "source_partition": origin.partition,
        "source_offset": origin.offset,
        "event_index": origin.event_index,
        "dead_lettered_at": letter.dead_lettered_at,
        "detail": letter.detail,
        "webhook": letter.webhook,
        "request_id": letter.request_id,
        "replay_generation": letter.replay_generation,
        "replayed_at": letter.replayed_at,
        "payload_bytes": letter.payload_bytes,
        "payload_excerpt": excerpt(letter.payload, letter.payload_bytes),
    }


def list_tsv(summaries: Sequence[ReasonSummary]) -> str:
    lines = ["stage\treason\tpending\treplayed\tfirst\tlast"]
    lines.extend(
        "\t".join(
            _cell(value) for value in (s.stage, s.reason, s.pending, s.replayed, s.first, s.last)
        )
        for s in summaries
    )
    return "\n".join(lines) + "\n"


def list_text(
    table: str, summaries: Sequence[ReasonSummary], samples: Sequence[StoredLetter]
) -> str:
    if not summaries:
        return f"no dead letters in {table} (for these filters)\n"
    total = sum(summary.total for summary in summaries)
    pending = sum(summary.pending for summary in summaries)
    first = min(summary.first for summary in summaries)
    last = max(summary.last for summary in summaries)
    lines = [
        f"{total} dead letter{'' if total == 1 else 's'} in {table}: {pending} pending, "
        f"{total - pending} replayed; dead-lettered {first} .. {last} UTC",
        "",
        *_table(
            ["STAGE", "REASON", "PENDING", "REPLAYED", "FIRST", "LAST"],
            [[s.stage, s.reason, s.pending, s.replayed, s.first, s.last] for s in summaries],
            numeric={2, 3},
        ),
    ]
    for summary in summaries:
        shown = [
            letter
            for letter in samples
            if (letter.stage, letter.reason) == (summary.stage, summary.reason)
        ]
        lines.extend(
            ["", f"{summary.reason} ({summary.stage}): showing {len(shown)} of {summary.total}"]
        )
        for letter in shown:
            state = "pending" if letter.pending else f"replayed {letter.replayed_at}"
            if letter.replay_generation:
                state += f", dead-lettered again after {_replays(letter.replay_generation)}"
            context = " ".join(
                f"{name} {value}"
                for name, value in (("webhook", letter.webhook), ("request", letter.request_id))
                if value
            )
            lines.append(
                f"  {letter_name(letter.origin)}  {letter.dead_lettered_at}  {state}"
                + (f"  {context}" if context else "")
            )
            lines.append(f"    {_one_line(letter.detail)}")
            lines.append(
                f"    payload ({letter.payload_bytes} bytes): "
                f"{excerpt(letter.payload, letter.payload_bytes)}"
            )
    return "\n".join(lines) + "\n"


def excerpt(payload: bytes, total_bytes: int, limit: int = EXCERPT_CHARS) -> str:
    """The start of a payload as one line of text: not-UTF-8 bytes as \\xNN, control
    characters escaped, cut at ``limit`` characters with "..." when there is more."""
    text = payload.decode("utf-8", "backslashreplace")
    shown = _one_line(text)
    if len(shown) > limit:
        return shown[:limit] + "..."
    # The excerpt was read up to some bytes: a longer payload continues past it.
    return shown + ("..." if total_bytes > len(payload) else "")


def _one_line(text: str) -> str:
    return "".join(
        char.encode("unicode_escape").decode("ascii")
        if unicodedata.category(char) in ("Cc", "Zl", "Zp")
        else char
        for char in text
    )


# --- dlq replay ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplayLine:
    """One dead letter's line in the replay report."""

    letter: StoredLetter
    outcome: Outcome


def replay_json(
    raw_topic: str, lines: Sequence[ReplayLine], *, dry_run: bool, waited_seconds: float
) -> str:
    document = {
        "dry_run": dry_run,
        "raw_topic": raw_topic,
        "waited_seconds": round(waited_seconds, 1),
        "counts": _counts(lines),
        "letters": [
            {
                "source_topic": line.letter.origin.topic,
                "source_partition": line.letter.origin.partition,
                "source_offset": line.letter.origin.offset,
                "event_index": line.letter.origin.event_index,
                "stage": line.letter.stage,
                "reason": line.letter.reason,
                "replay_generation": line.letter.replay_generation,
                "outcome": line.outcome.status,
                "landed": line.outcome.landed,
                "dead_lettered_again": list(line.outcome.again),
                "note": line.outcome.note,
            }
            for line in lines
        ],
    }
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def replay_tsv(lines: Sequence[ReplayLine]) -> str:
    rows = ["source\tstage\treason\toutcome\tlanded\tdead_lettered_again\tnote"]
    rows.extend(
        "\t".join(
            _cell(value)
            for value in (
                letter_name(line.letter.origin),
                line.letter.stage,
                line.letter.reason,
                line.outcome.status,
                line.outcome.landed,
                ",".join(line.outcome.again),
                line.outcome.note,
            )
        )
        for line in lines
    )
    return "\n".join(rows) + "\n"


def replay_text(
    raw_topic: str, lines: Sequence[ReplayLine], *, dry_run: bool, waited_seconds: float
) -> str:
    if not lines:
        return "no dead letters to replay (for these filters)\n"
    counts = ", ".join(f"{count} {status}" for status, count in _counts(lines).items())
    if dry_run:
        head = f"dry run: nothing sent to {raw_topic}; {counts}"
    else:
        head = f"replayed to {raw_topic}; after {waited_seconds:.0f} s: {counts}"
    return (
        "\n".join(
            [
                head,
                "",
                *_table(
                    ["DEAD LETTER", "STAGE", "REASON", "OUTCOME"],
                    [
                        [
                            letter_name(line.letter.origin),
                            line.letter.stage,
                            line.letter.reason,
                            line.outcome.describe(),
                        ]
                        for line in lines
                    ],
                ),
            ]
        )
        + "\n"
    )


def _counts(lines: Sequence[ReplayLine]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in lines:
        counts[line.outcome.status] = counts.get(line.outcome.status, 0) + 1
    return counts


# --- shared ----------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[Any]], numeric: Collection[int] = ()) -> list[str]:
    cells = [header, *[[str(value) for value in row] for row in rows]]
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
    return [
        "  ".join(
            cell.rjust(width) if column in numeric else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in cells
    ]


def _cell(value: object) -> str:
    # TSV as ClickHouse writes it: tab, newline and backslash escaped.
    return str(value).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def _replays(count: int) -> str:
    return f"{count} replay{'' if count == 1 else 's'}"
