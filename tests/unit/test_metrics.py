"""Every metric is documented, named by Prometheus conventions and labelled by stage; the
merged exposition of several stage processes is valid."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sgpipe.runtime import metrics
from sgpipe.runtime.health import merge_exposition

DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def defined_metrics() -> dict[str, tuple[str, list[str]]]:
    """name -> (type, label names) of every metric in the registry."""
    found: dict[str, tuple[str, list[str]]] = {}
    for name in dir(metrics):
        value = getattr(metrics, name)
        describe = getattr(value, "describe", None)
        labels = getattr(value, "_labelnames", None)
        if describe is None or labels is None:
            continue
        (family,) = describe()
        exposed = family.name + ("_total" if family.type == "counter" else "")
        found[exposed] = (family.type, list(labels))
    return found


def test_every_metric_is_documented_and_every_documented_metric_exists() -> None:
    documented = set(re.findall(r"^\| `(sgpipe_[a-z_]+)`", DOCS.read_text(), re.MULTILINE))
    assert documented == set(defined_metrics())


def test_metric_names_follow_prometheus_conventions() -> None:
    for name, (kind, labels) in defined_metrics().items():
        assert name.startswith("sgpipe_"), name
        assert labels[0] == "stage", name
        if kind == "counter":
            assert name.endswith("_total"), name
        if "duration" in name:
            assert name.endswith("_seconds"), name


def test_merging_expositions_keeps_one_family_per_name() -> None:
    texts = []
    for stage in ("process", "sink"):
        registry = CollectorRegistry()
        counter = Counter("sgpipe_demo_total", "demo", ["stage"], registry=registry)
        counter.labels(stage).inc(2 if stage == "sink" else 1)
        texts.append(generate_latest(registry).decode())

    merged = merge_exposition(texts).decode()

    assert merged.count("# TYPE sgpipe_demo_total counter") == 1
    (family,) = [f for f in text_string_to_metric_families(merged) if f.name == "sgpipe_demo"]
    values = {s.labels["stage"]: s.value for s in family.samples if s.name.endswith("_total")}
    assert values == {"process": 1.0, "sink": 2.0}


def test_merging_expositions_adds_up_the_counters_of_replicas_of_one_stage() -> None:
    """`sgpipe up --processors 2`: two processes with the stage label `process`; what the
    stage did is their sum, a gauge (a state) is kept from the first."""
    texts = []
    for produced in (3, 4):
        registry = CollectorRegistry()
        counter = Counter("sgpipe_demo_total", "demo", ["stage"], registry=registry)
        counter.labels("process").inc(produced)
        gauge = Gauge("sgpipe_demo_state", "demo", ["stage"], registry=registry)
        gauge.labels("process").set(produced)
        texts.append(generate_latest(registry).decode())

    merged = {
        sample.name: sample.value
        for family in text_string_to_metric_families(merge_exposition(texts).decode())
        for sample in family.samples
        if not sample.name.endswith("_created")
    }

    assert merged == {"sgpipe_demo_total": 7.0, "sgpipe_demo_state": 3.0}
