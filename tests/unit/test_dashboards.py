"""The Grafana dashboards that read Prometheus: every panel's expression parses as PromQL (with
Prometheus's own grammar, through promql-parser) and names only series sgpipe exports, read from
a real ``/metrics`` scrape of the health app. The Helm chart ships byte-identical copies."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from sgpipe.runtime.health import Readiness, create_health_app

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = ROOT / "dashboards" / "grafana" / "sgpipe-pipeline.json"
CHART_DASHBOARDS = ROOT / "helm" / "sgpipe" / "dashboards"

# Grafana replaces these before Prometheus sees the query.
_GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}

# Series names each metric type exposes, by the family's name.
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "unknown": ("",),
}


async def scraped_series_names() -> set[str]:
    """Every series name in a real scrape of sgpipe's /metrics (families with no sample yet
    still announce their type, so their series names are derived from it)."""
    client = TestClient(TestServer(create_health_app(Readiness("ingest"))))
    await client.start_server()
    try:
        response = await client.get("/metrics")
        assert response.status == 200
        text = await response.text()
    finally:
        await client.close()
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
        names.update(sample.name for sample in family.samples)
    return names


def panel_expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def metric_names(expression: str) -> set[str]:
    """The series names a PromQL expression selects, from its syntax tree."""
    for variable, value in _GRAFANA_VARIABLES.items():
        expression = expression.replace(variable, value)
    assert "$" not in expression, f"an unknown Grafana variable in {expression!r}"
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            name = node.name
            if name is None:
                for matcher in node.matchers.matchers:
                    if matcher.name == "__name__":
                        name = matcher.value
            assert name, f"a selector without a metric name in {expression!r}"
            names.add(name)
            return
        for attribute in ("lhs", "rhs", "expr", "param", "vector_selector"):
            child = getattr(node, attribute, None)
            if child is not None:
                walk(child)
        for argument in getattr(node, "args", None) or ():
            walk(argument)

    walk(promql_parser.parse(expression))
    return names


def unknown_metrics(dashboard: dict[str, Any], exported: set[str]) -> list[str]:
    return [
        f"{title}: {name}"
        for title, expression in panel_expressions(dashboard)
        for name in sorted(metric_names(expression))
        if name not in exported
    ]


def load(path: Path) -> dict[str, Any]:
    document = json.loads(path.read_text())
    assert isinstance(document, dict)
    return document


async def test_every_panel_parses_as_promql_and_names_only_exported_metrics() -> None:
    dashboard = load(PIPELINE)
    exported = await scraped_series_names()
    expressions = list(panel_expressions(dashboard))
    assert len(expressions) >= 15
    assert unknown_metrics(dashboard, exported) == []


async def test_a_panel_naming_a_metric_sgpipe_does_not_export_is_caught() -> None:
    dashboard = load(PIPELINE)
    dashboard["panels"][0]["targets"][0]["expr"] = (
        "sum(rate(sgpipe_ingest_requests_totals[5m]))"  # one letter off
    )
    exported = await scraped_series_names()
    assert unknown_metrics(dashboard, exported) == [
        f"{dashboard['panels'][0]['title']}: sgpipe_ingest_requests_totals"
    ]


def test_a_panel_that_is_not_promql_is_caught() -> None:
    with pytest.raises(ValueError):
        metric_names("sum(rate(sgpipe_ingest_requests_total[5m])")


def test_the_dashboard_covers_what_the_issue_asks_for() -> None:
    names = set()
    for _, expression in panel_expressions(load(PIPELINE)):
        names |= metric_names(expression)
    for wanted in (
        "sgpipe_ingest_requests_total",  # request rate and outcomes
        "sgpipe_ingest_verification_failures_total",
        "sgpipe_ingest_publish_duration_seconds_bucket",
        "sgpipe_consumer_lag",
        "sgpipe_records_consumed_total",  # in per stage
        "sgpipe_records_produced_total",  # out per stage
        "sgpipe_clickhouse_inserted_rows_total",
        "sgpipe_dead_letters_total",
        "sgpipe_retries_total",
        "sgpipe_received_to_stored_seconds_bucket",  # 2xx -> row latency
        "sgpipe_ready",
        "sgpipe_up_child_restarts_total",
    ):
        assert wanted in names, wanted


def test_panels_have_unique_ids_and_the_prometheus_datasource_variable() -> None:
    dashboard = load(PIPELINE)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert re.fullmatch(r"[\w .>()\-]+", panel["title"].replace("2xx", "x"))


@pytest.mark.parametrize("name", ["sgpipe-pipeline.json", "sgpipe-email.json"])
def test_the_chart_ships_the_same_dashboards(name: str) -> None:
    assert (CHART_DASHBOARDS / name).read_bytes() == (
        ROOT / "dashboards" / "grafana" / name
    ).read_bytes(), f"helm/sgpipe/dashboards/{name} is stale: copy dashboards/grafana/{name}"
