"""`sgpipe report` on a seeded simulator run: every number matches SQL computed apart from the
report's own queries (from the events themselves, not the aggregates), and the page opens in
headless Chromium with no console error and data in every chart."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import sys
import time
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sgpipe.report import RATE_EVENTS, fetch_report_data, rates_per_day, render_html, totals
from sgpipe.simulator.dataset import simulated_posts, sink_records
from tests.integration.bi_support import Store, batch_info, store

pytestmark = [pytest.mark.clickhouse]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
EVENTS = 4000
DAY = 86_400


@pytest.fixture
async def seeded(tmp_path: Path) -> AsyncIterator[Store]:
    """Three days of a seeded simulated stream (with SendGrid's duplicates) in a served store."""
    offset = 0
    async with store(tmp_path) as s:
        for days_ago in (3, 2, 1):  # a stream per day (one covers ~25 simulated minutes)
            start = int(time.time()) - days_ago * DAY
            posts = simulated_posts(EVENTS // 3, seed=days_ago, duplicates=0.1, start_time=start)
            for batch in sink_records(posts, start_time=start):
                await s.insert(batch, batch=batch_info("sgpipe.events", 0, offset, offset))
                offset += 1
        yield s


async def independent_daily(s: Store, since: int) -> dict[str, dict[str, int]]:
    """Messages per day and event, counted from email_events FINAL directly."""
    rows = await s.rows(
        """
        SELECT toString(toDate(event_time)) AS day, event, type,
               uniqExact(sg_message_id) AS messages
        FROM sgpipe.email_events FINAL
        WHERE toDate(event_time) >= toDate(now() - toIntervalSecond({since:UInt64}))
          AND sg_message_id IS NOT NULL
        GROUP BY day, event, type
        """,
        since=since,
    )
    daily: dict[str, dict[str, int]] = {}
    for row in rows:
        counts = daily.setdefault(row["day"], {})
        event = row["event"]
        if event == "bounce":
            key = "blocked" if row["type"] == "blocked" else "bounce"
            counts[key] = counts.get(key, 0) + int(row["messages"])
            event = "bounce_all"
        counts[event] = counts.get(event, 0) + int(row["messages"])
    return daily


async def test_the_reports_rates_match_sql_computed_apart(seeded: Store) -> None:
    since = 30 * DAY
    data = await fetch_report_data(seeded.client, "sgpipe", since)
    truth = await independent_daily(seeded, since)

    assert data.events == await seeded.value(
        "SELECT count() FROM sgpipe.email_events FINAL WHERE event_time >= now() - INTERVAL 30 DAY"
    )
    assert [row["day"] for row in data.daily] == sorted(truth)
    assert len(data.daily) >= 3
    rates = rates_per_day(data.daily)
    for index, day in enumerate(rates["day"]):
        counts = truth[day]
        processed = counts.get("processed", 0)
        for event, label in RATE_EVENTS:
            expected = round(counts.get(event, 0) / processed, 4) if processed else 0.0
            assert rates[label][index] == expected, (day, label)
    # The stream has every kind the report shows.
    overall = totals(data.daily)
    for _, label in RATE_EVENTS:
        if label not in ("blocked", "spam reports"):
            assert overall[label] > 0, label
    assert data.bounce_classes and data.bounce_domains
    assert data.campaigns and data.templates
    delivery = await seeded.rows(
        """
        SELECT quantileExact(0.5)(dateDiff('second', p, d)) AS p50,
               quantileExact(0.95)(dateDiff('second', p, d)) AS p95, count() AS messages
        FROM (
            SELECT sg_message_id, minIf(event_time, event = 'processed') AS p,
                   minIf(event_time, event = 'delivered') AS d,
                   countIf(event = 'processed') > 0 AND countIf(event = 'delivered') > 0 AS both
            FROM sgpipe.email_events FINAL
            WHERE sg_message_id IS NOT NULL
            GROUP BY sg_message_id
        )
        WHERE both
        """
    )
    assert data.delivery_seconds["messages"] == delivery[0]["messages"] > 0
    assert data.delivery_seconds["p50_seconds"] == delivery[0]["p50"]
    assert data.delivery_seconds["p95_seconds"] == delivery[0]["p95"]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make test installs it)")
async def test_the_report_renders_in_chromium_with_data_in_every_chart(
    seeded: Store, tmp_path: Path
) -> None:
    from playwright.async_api import async_playwright

    page_file = tmp_path / "report.html"
    page_file.write_text(render_html(await fetch_report_data(seeded.client, "sgpipe", 30 * DAY)))
    problems: list[str] = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = await browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda error: problems.append(str(error)))
            # Nothing may be fetched: the report must open without a network.
            requested: list[str] = []
            page.on("request", lambda r: requested.append(r.url))
            await page.goto(page_file.as_uri())
            await page.wait_for_function(
                "document.querySelectorAll('.js-plotly-plot').length === 5"
            )
            charts: list[dict[str, Any]] = await page.evaluate(
                """() => [...document.querySelectorAll('.js-plotly-plot')].map(div => ({
                    id: div.id,
                    points: div.data.reduce((n, trace) => n + (trace.x || []).length, 0),
                    drawn: div.querySelectorAll('.main-svg').length,
                }))"""
            )
            await page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            await browser.close()
    assert problems == []
    assert [url for url in requested if not url.startswith("file://")] == []
    assert {chart["id"] for chart in charts} == {
        "chart-rates",
        "chart-bounce-classes",
        "chart-bounce-domains",
        "chart-campaigns",
        "chart-templates",
    }
    for chart in charts:
        assert chart["points"] > 0 and chart["drawn"] > 0, chart


async def sgpipe(*args: str) -> tuple[int, bytes, bytes]:
    """The CLI as a process, awaited: the served store runs on this test's event loop, which a
    blocking subprocess.run would stall."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sgpipe", *args, stdout=PIPE, stderr=PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, stdout, stderr


async def test_sgpipe_report_writes_the_file_against_a_clickhouse_url(
    seeded: Store, tmp_path: Path
) -> None:
    out = tmp_path / "out.html"
    code, stdout, stderr = await sgpipe(
        "report", "--clickhouse-url", seeded.url, "--since", "7d", "--out", str(out),
        "--data-dir", str(tmp_path / "none"),
    )  # fmt: skip
    assert code == 0, stderr.decode()
    assert re.search(rb"wrote .*out\.html: [\d,]+ events", stdout)
    text = out.read_text()
    embedded = re.search(r'id="sgpipe-report-data">(.*?)</script>', text, re.S)
    assert embedded is not None
    data = json.loads(embedded.group(1))
    assert data["since_seconds"] == 7 * DAY and data["events"] > 0
    assert "<script src=" not in text and "<link " not in text  # self-contained

    code, _, stderr = await sgpipe(
        "report", "--clickhouse-url", seeded.url, "--since", "lots", "--out", str(out)
    )
    assert code == 2
    assert "--since 'lots': expected a positive number and a unit" in stderr.decode()
