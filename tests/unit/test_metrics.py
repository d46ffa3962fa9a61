"""Every metric is documented, named by Prometheus conventions and labelled by stage; the
merged exposition of several stage processes is valid."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter
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
