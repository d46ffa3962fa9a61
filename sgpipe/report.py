"""``sgpipe report``: a self-contained HTML deliverability report from the BI tables.

Three steps, only the first does I/O:

1. ``fetch_report_data(client, database, since_seconds)`` runs a handful of queries against the
   tables docs/bi.md describes (the daily aggregates, ``message_lifecycle``, ``email_events_dedup``)
   and returns plain rows -- the same numbers whatever server they came from (the embedded
   store or a ClickHouse server);
2. ``rates_per_day`` and friends turn rows into rates (pure, tested against SQL computed apart);
3. ``render_html`` draws the charts with plotly and writes one HTML file with plotly.js and the
   data inlined: it opens without a network, and the numbers are also embedded as JSON
   (``<script id="sgpipe-report-data">``) for scripts and tests.

Rates are of *messages* (``sg_message_id``), per day: a message deferred three times counts
once as deferred. Bounces are split by SendGrid's ``type`` (``bounce`` vs ``blocked``) and by
``bounce_classification``.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clickhouse_connect.driver.asyncclient import AsyncClient

# The events whose per-day message counts the report shows, with their labels.
RATE_EVENTS: tuple[tuple[str, str], ...] = (
    ("delivered", "delivered"),
    ("bounce", "bounced"),
    ("blocked", "blocked"),
    ("deferred", "deferred"),
    ("dropped", "dropped"),
    ("open", "opened"),
    ("click", "clicked"),
    ("spamreport", "spam reports"),
)

_SINCE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}


class ReportError(Exception):
    """The report cannot be made (bad --since, unreachable store); the message says why."""


def parse_since(text: str) -> int:
    """``30d``, ``12h``, ``2w``, ``90m``, ``3600s`` as seconds."""
    match = _SINCE.match(text)
    if match is None or int(match.group(1)) == 0:
        raise ReportError(f"--since {text!r}: expected a positive number and a unit, e.g. 30d")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


@dataclass
class ReportData:
    """What the queries returned, as plain values (JSON-ready)."""

    since_seconds: int
    generated_at: str
    first_event: str | None
    last_event: str | None
    events: int
    daily: list[dict[str, Any]] = field(default_factory=list)
    bounce_classes: list[dict[str, Any]] = field(default_factory=list)
    bounce_domains: list[dict[str, Any]] = field(default_factory=list)
    campaigns: list[dict[str, Any]] = field(default_factory=list)
    templates: list[dict[str, Any]] = field(default_factory=list)
    delivery_seconds: dict[str, Any] = field(default_factory=dict)


_DAILY = """
SELECT
    day,
    uniqExactMergeIf(messages, event = 'processed') AS processed,
    uniqExactMergeIf(messages, event = 'delivered') AS delivered,
    uniqExactMergeIf(messages, event = 'bounce') AS bounce_all,
    uniqExactMergeIf(messages, event = 'deferred') AS deferred,
    uniqExactMergeIf(messages, event = 'dropped') AS dropped,
    uniqExactMergeIf(messages, event = 'open') AS open,
    uniqExactMergeIf(messages, event = 'click') AS click,
    uniqExactMergeIf(messages, event = 'spamreport') AS spamreport
FROM {database}.daily_event_counts_state
WHERE day >= toDate(now() - toIntervalSecond({since:UInt64}))
GROUP BY day
ORDER BY day
"""

# Bounce messages by SendGrid's type (bounce: the address; blocked: the receiving server
# refused the sender), per day, from the events themselves (the aggregate counts events).
_BOUNCE_TYPES = """
SELECT
    toDate(event_time) AS day,
    uniqExactIf(sg_message_id, type = 'blocked') AS blocked,
    uniqExactIf(sg_message_id, type != 'blocked') AS bounce
FROM {database}.email_events_dedup
WHERE event = 'bounce' AND event_time >= now() - toIntervalSecond({since:UInt64})
GROUP BY day
ORDER BY day
"""

_BOUNCE_CLASSES = """
SELECT type, bounce_classification, sum(events) AS bounces
FROM {database}.daily_bounce_counts
WHERE day >= toDate(now() - toIntervalSecond({since:UInt64}))
GROUP BY type, bounce_classification
ORDER BY bounces DESC, type, bounce_classification
"""

_BOUNCE_DOMAINS = """
SELECT
    recipient_domain,
    sumIf(events, event = 'processed') AS sent,
    sumIf(events, event = 'bounce') AS bounces,
    if(sent > 0, round(bounces / sent, 4), 0) AS bounce_rate
FROM {database}.daily_domain_counts
WHERE day >= toDate(now() - toIntervalSecond({since:UInt64})) AND recipient_domain != ''
GROUP BY recipient_domain
HAVING bounces > 0
ORDER BY bounces DESC, sent DESC, recipient_domain
LIMIT 10
"""

_CAMPAIGNS = """
SELECT
    if(singlesend_name != '', 'Single Send', 'Campaign') AS kind,
    if(singlesend_name != '', singlesend_name, marketing_campaign_name) AS name,
    uniqExactMergeIf(messages, event = 'delivered') AS delivered,
    uniqExactMergeIf(messages, event = 'open') AS opened,
    uniqExactMergeIf(messages, event = 'click') AS clicked
FROM {database}.daily_campaign_counts_state
WHERE day >= toDate(now() - toIntervalSecond({since:UInt64}))
GROUP BY kind, name
HAVING name != ''
ORDER BY delivered DESC, name
LIMIT 20
"""

_TEMPLATES = """
SELECT
    sg_template_name AS name,
    uniqExactMergeIf(messages, event = 'delivered') AS delivered,
    uniqExactMergeIf(messages, event = 'open') AS opened,
    uniqExactMergeIf(messages, event = 'click') AS clicked
FROM {database}.daily_template_counts_state
WHERE day >= toDate(now() - toIntervalSecond({since:UInt64}))
GROUP BY name
HAVING name != ''
ORDER BY delivered DESC, name
LIMIT 20
"""

_DELIVERY = """
SELECT
    count() AS messages,
    quantileExact(0.5)(dateDiff('second', processed_at, delivered_at)) AS p50_seconds,
    quantileExact(0.95)(dateDiff('second', processed_at, delivered_at)) AS p95_seconds
FROM {database}.message_lifecycle
WHERE sg_message_id IN (
    SELECT sg_message_id FROM {database}.message_lifecycle_state
    WHERE last_event_at >= now() - toIntervalSecond({since:UInt64})
)
    AND processed_at IS NOT NULL AND delivered_at IS NOT NULL
"""

_SPAN = """
SELECT min(event_time) AS first, max(event_time) AS last, count() AS events
FROM {database}.email_events_dedup
WHERE event_time >= now() - toIntervalSecond({since:UInt64})
"""


async def _rows(client: AsyncClient, sql: str, database: str, since: int) -> list[dict[str, Any]]:
    # The database is a checked identifier (settings), never data; the window is a parameter.
    result = await client.query(sql.replace("{database}", database), parameters={"since": since})
    return [
        {name: _plain(value) for name, value in zip(result.column_names, row, strict=True)}
        for row in result.result_rows
    ]


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat() if value.tzinfo else value.isoformat() + "Z"
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, float) and value != value:  # NaN: an empty quantile
        return None
    return value


async def fetch_report_data(client: AsyncClient, database: str, since_seconds: int) -> ReportData:
    """Every number the report shows, for events of the last ``since_seconds``."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", database):
        raise ReportError(f"clickhouse.database {database!r} is not a plain identifier")

    async def rows(sql: str) -> list[dict[str, Any]]:
        return await _rows(client, sql, database, since_seconds)

    (span,) = await rows(_SPAN)
    daily = await rows(_DAILY)
    bounce_types = {row["day"]: row for row in await rows(_BOUNCE_TYPES)}
    for day in daily:
        types = bounce_types.get(day["day"], {})
        day["blocked"] = int(types.get("blocked", 0))
        day["bounce"] = int(types.get("bounce", 0))
    (delivery,) = await rows(_DELIVERY)
    events = int(span["events"])
    return ReportData(
        since_seconds=since_seconds,
        generated_at=datetime.now(UTC).isoformat(timespec="seconds"),
        first_event=span["first"] if events else None,
        last_event=span["last"] if events else None,
        events=events,
        daily=daily,
        bounce_classes=await rows(_BOUNCE_CLASSES),
        bounce_domains=await rows(_BOUNCE_DOMAINS),
        campaigns=await rows(_CAMPAIGNS),
        templates=await rows(_TEMPLATES),
        delivery_seconds=delivery if int(delivery["messages"]) else {"messages": 0},
    )


# --- pure arithmetic ---------------------------------------------------------------------------


def rate(part: float, whole: float) -> float:
    return round(part / whole, 4) if whole else 0.0


def rates_per_day(daily: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """``{"day": [...], "delivered": [rate, ...], ...}``: each event's messages over the day's
    processed messages."""
    series: dict[str, list[Any]] = {"day": [row["day"] for row in daily]}
    for event, label in RATE_EVENTS:
        series[label] = [rate(float(row[event]), float(row["processed"])) for row in daily]
    return series


def engagement(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Open and click rates over delivered messages, per campaign or template."""
    return [
        {
            **row,
            "open_rate": rate(float(row["opened"]), float(row["delivered"])),
            "click_rate": rate(float(row["clicked"]), float(row["delivered"])),
        }
        for row in rows
    ]


def totals(daily: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Rates over the whole window (messages summed over days)."""
    processed = sum(float(row["processed"]) for row in daily)
    return {
        label: rate(sum(float(row[event]) for row in daily), processed)
        for event, label in RATE_EVENTS
    }


# --- rendering --------------------------------------------------------------------------------


def _since_text(seconds: int) -> str:
    for unit, size in (("weeks", 604_800), ("days", 86_400), ("hours", 3600), ("minutes", 60)):
        if seconds % size == 0 and seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} seconds"


def render_html(data: ReportData) -> str:
    """The report as one HTML document: plotly.js, the charts and the data inlined."""
    import plotly.graph_objects as go
    from plotly.offline import get_plotlyjs

    figures: list[tuple[str, str, Any]] = []
    rates = rates_per_day(data.daily)
    daily = go.Figure()
    for _, label in RATE_EVENTS:
        daily.add_trace(
            go.Scatter(x=rates["day"], y=rates[label], name=label, mode="lines+markers")
        )
    daily.update_layout(yaxis_tickformat=".0%", yaxis_title="of processed messages")
    figures.append(("rates", "Rates per day", daily))

    classes = go.Figure(
        go.Bar(
            x=[row["bounces"] for row in data.bounce_classes],
            y=[
                f"{row['type']}: {row['bounce_classification'] or '-'}"
                for row in data.bounce_classes
            ],
            orientation="h",
        )
    )
    classes.update_layout(xaxis_title="bounce events", yaxis_autorange="reversed")
    figures.append(("bounce-classes", "Bounces by type and classification", classes))

    domains = go.Figure(
        go.Bar(
            x=[row["recipient_domain"] for row in data.bounce_domains],
            y=[row["bounces"] for row in data.bounce_domains],
            text=[f"{row['bounce_rate']:.1%}" for row in data.bounce_domains],
        )
    )
    domains.update_layout(yaxis_title="bounces (label: bounce rate)")
    figures.append(("bounce-domains", "Top bouncing domains", domains))

    for key, title, rows in (
        ("campaigns", "Open and click rate per campaign / Single Send", data.campaigns),
        ("templates", "Open and click rate per template", data.templates),
    ):
        rated = engagement(rows)
        names = [
            f"{row['kind']}: {row['name']}" if "kind" in row else str(row["name"]) for row in rated
        ]
        chart = go.Figure(
            [
                go.Bar(x=names, y=[row["open_rate"] for row in rated], name="open rate"),
                go.Bar(x=names, y=[row["click_rate"] for row in rated], name="click rate"),
            ]
        )
        chart.update_layout(barmode="group", yaxis_tickformat=".0%")
        figures.append((key, title, chart))

    sections = []
    for key, title, figure in figures:
        figure.update_layout(
            margin={"l": 60, "r": 20, "t": 30, "b": 60}, height=380, template="plotly_white"
        )
        div = figure.to_html(
            full_html=False,
            include_plotlyjs=False,
            div_id=f"chart-{key}",
            config={"responsive": True},
        )
        sections.append(f"<section><h2>{html.escape(title)}</h2>{div}</section>")

    overall = totals(data.daily)
    delivery = data.delivery_seconds
    summary_rows = "".join(
        f"<tr><th>{html.escape(label)}</th><td>{value:.2%}</td></tr>"
        for label, value in overall.items()
    )
    if delivery.get("messages"):
        delivery_text = (
            f"{int(delivery['messages']):,} messages: p50 {_duration(delivery['p50_seconds'])}, "
            f"p95 {_duration(delivery['p95_seconds'])}"
        )
    else:
        delivery_text = "no message both processed and delivered in the window"
    span = (
        f"{html.escape(str(data.first_event))} to {html.escape(str(data.last_event))}"
        if data.events
        else "no events"
    )
    payload = json.dumps(asdict(data), sort_keys=True).replace("</", "<\\/")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>sgpipe deliverability report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5rem 0 1.5rem; }}
th, td {{ text-align: left; padding: 0.2rem 1rem 0.2rem 0; }}
td {{ font-variant-numeric: tabular-nums; }}
section {{ margin-top: 2rem; }}
.meta {{ color: #555; }}
</style>
<script>{get_plotlyjs()}</script>
</head>
<body>
<h1>Deliverability report</h1>
<p class="meta">The last {_since_text(data.since_seconds)}: {data.events:,} events, {span}
(UTC). Generated {html.escape(data.generated_at)} by sgpipe from the BI tables (docs/bi.md);
rates are of distinct messages over processed messages, per day.</p>
<h2>Over the whole window</h2>
<table>{summary_rows}
<tr><th>processed to delivered</th><td>{html.escape(delivery_text)}</td></tr></table>
{"".join(sections)}
<script type="application/json" id="sgpipe-report-data">{payload}</script>
</body>
</html>
"""


def _duration(seconds: Any) -> str:
    if seconds is None:
        return "-"
    value = float(seconds)
    if value < 120:
        return f"{value:.0f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"
