"""The chart's values: the schema refuses what would break a deployment, with a message that
names the value; the templates refuse what the schema cannot express; the schema and the
README's table are generated and current; the template defaults are sgpipe's defaults."""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from sgpipe.runtime.settings import Settings
from tests.chart.rendering import (
    CHART_DIR,
    RELEASE,
    containers,
    render,
    render_error,
    scenario,
    with_changes,
)
from tests.chart.summary import record
from tools import chart_schema

DEFAULT = scenario("default-values.yaml")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"replicaCount": 3}, "additional properties 'replicaCount' not allowed"),
        (
            {"config": {"kafka": {"bootstrap_server": "kafka:9092"}}},
            "at '/config/kafka': additional properties 'bootstrap_server' not allowed",
        ),
        (
            {"config": {"kafka": {"sasl_password": "hunter2"}}},
            "additional properties 'sasl_password' not allowed",
        ),
        (
            {"config": {"kafka": {"security_protocol": "TLS"}}},
            "at '/config/kafka/security_protocol'",
        ),
        ({"ingest": {"replicas": "two"}}, "at '/ingest/replicas': got string, want integer"),
        (
            {"webhooks": [{"name": "Main Hook", "publicKeysSecret": {"name": "k", "key": "k"}}]},
            "at '/webhooks/0/name': 'Main Hook' does not match pattern",
        ),
        (
            {"webhooks": [{"name": "main", "publicKeysSecret": {"name": "keys"}}]},
            "at '/webhooks/0/publicKeysSecret': missing property 'key'",
        ),
        (
            {"webhooks": [{"name": "main", "settings": {"public_keys": ["MFkw..."]}}]},
            "additional properties 'public_keys' not allowed",
        ),
        (
            {"processor": {"affinity": {"nodeAfinity": {}}}},
            "additional properties 'nodeAfinity' not allowed",
        ),
        (
            {"securityContext": {"runAsNonRot": True}},
            "additional properties 'runAsNonRot' not allowed",
        ),
        (
            {"metrics": {"prometheusRule": {"alerts": {"noEvents": {"windowMinutes": 1500}}}}},
            "at '/metrics/prometheusRule/alerts/noEvents/windowMinutes'",
        ),
        (
            {"metrics": {"serviceMonitor": {"interval": "30 seconds"}}},
            "at '/metrics/serviceMonitor/interval': '30 seconds' does not match pattern",
        ),
        ({"image": {"digest": "latest"}}, "at '/image/digest'"),
        ({"ingest": {"ingress": {"host": "https://x.example.com"}}}, "at '/ingest/ingress/host'"),
    ],
)
def test_schema_refuses_bad_values_naming_them(changes: dict[str, Any], message: str) -> None:
    error = render_error(with_changes(DEFAULT, changes))
    assert "values don't meet the specifications of the schema" in error
    assert message in error
    record("invalid values refused by values.schema.json", _first_path(changes))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"config": {"kafka": {"bootstrap_servers": ""}}},
            "config.kafka.bootstrap_servers is required",
        ),
        ({"config": {"clickhouse": {"url": ""}}}, "config.clickhouse.url is required"),
        ({"webhooks": []}, "webhooks: declare at least one SendGrid webhook"),
        ({"webhooks": [{"name": "main"}]}, "webhooks[main]: set publicKeysSecret"),
        (
            {
                "webhooks": [
                    {"name": "main", "publicKeysSecret": {"name": "a", "key": "main"}},
                    {"name": "main", "publicKeysSecret": {"name": "a", "key": "other"}},
                ]
            },
            "webhooks: the name main is used twice",
        ),
        (
            {"processor": {"replicas": 7}},
            "processor.replicas (7) exceeds config.kafka.topics.partitions (6)",
        ),
        (
            {"sink": {"autoscaling": {"enabled": True, "maxReplicas": 8}}},
            "sink.autoscaling.maxReplicas (8) exceeds config.kafka.topics.partitions (6)",
        ),
        (
            {"processor": {"keda": {"enabled": True, "maxReplicas": 12}}},
            "processor.keda.maxReplicas (12) exceeds config.kafka.topics.partitions (6)",
        ),
        (
            {
                "config": {"kafka": {"topics": {"partitions": 3}}},
                "sink": {"replicas": 2, "keda": {"enabled": True, "maxReplicas": 4}},
            },
            "sink.keda.maxReplicas (4) exceeds config.kafka.topics.partitions (3)",
        ),
        (
            {
                "sink": {
                    "autoscaling": {"enabled": True, "maxReplicas": 3},
                    "keda": {"enabled": True, "maxReplicas": 3},
                }
            },
            "sink: autoscaling.enabled and keda.enabled are exclusive",
        ),
        (
            {"config": {"sink": {"stop_timeout_seconds": 120}}},
            "sink.terminationGracePeriodSeconds (90) must exceed config.sink.stop_timeout_seconds",
        ),
        (
            {"ingest": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 3}}},
            "ingest.autoscaling.minReplicas exceeds ingest.autoscaling.maxReplicas",
        ),
        (
            {
                "config": {"kafka": {"security_protocol": "SASL_SSL"}},
                "secrets": {"kafkaSaslPassword": {"name": "kafka-user", "key": "password"}},
                "processor": {"keda": {"enabled": True}},
            },
            "set secrets.kafkaSaslUsername as well",
        ),
        ({"ingest": {"ingress": {"enabled": True}}}, "ingest.ingress.host is required"),
    ],
)
def test_templates_refuse_what_the_schema_cannot_express(
    changes: dict[str, Any], message: str
) -> None:
    assert message in render_error(with_changes(DEFAULT, changes))
    record("invalid values refused by template checks", _first_path(changes))


def test_consumers_may_scale_up_to_the_partition_count() -> None:
    values = with_changes(
        DEFAULT,
        {
            "config": {"kafka": {"topics": {"partitions": 12}}},
            "processor": {"replicas": 12},
            "sink": {"keda": {"enabled": True, "maxReplicas": 12}},
        },
    )
    rendered = render(values)
    assert rendered.deployment("processor")["spec"]["replicas"] == 12
    (scaled,) = rendered.of_kind("ScaledObject")
    assert scaled["spec"]["maxReplicaCount"] == 12


def test_template_defaults_are_sgpipes_defaults() -> None:
    """The templates fall back to sgpipe's defaults when config leaves a setting out."""
    settings = Settings()
    rendered = render(DEFAULT)
    ports = {
        stage: containers(rendered.deployment(stage))[0]["ports"][0]["containerPort"]
        for stage in ("ingest", "processor", "sink")
    }
    assert ports == {
        "ingest": settings.ingest.port,
        "processor": settings.processor.health_port,
        "sink": settings.sink.health_port,
    }
    keda = render(
        with_changes(
            {**DEFAULT, "config": {k: v for k, v in DEFAULT["config"].items() if k != "kafka"}},
            {
                "config": {"kafka": {"bootstrap_servers": "kafka:9092"}},
                "processor": {"replicas": 1, "keda": {"enabled": True, "maxReplicas": 6}},
                "sink": {"replicas": 1, "keda": {"enabled": True, "maxReplicas": 6}},
            },
        )
    )
    triggers = {
        so["metadata"]["name"]: so["spec"]["triggers"][0]["metadata"]
        for so in keda.of_kind("ScaledObject")
    }
    assert triggers[f"{RELEASE}-processor"]["consumerGroup"] == settings.processor.group_id
    assert triggers[f"{RELEASE}-processor"]["topic"] == settings.kafka.topics.raw
    assert triggers[f"{RELEASE}-sink"]["consumerGroup"] == settings.sink.group_id
    assert triggers[f"{RELEASE}-sink"]["topic"] == settings.kafka.topics.events
    # With partitions left to sgpipe's default, the cap is that default.
    too_many = settings.kafka.topics.partitions + 1
    error = render_error(
        with_changes(
            {**DEFAULT, "config": {"kafka": {"bootstrap_servers": "k:9092"}, "clickhouse": {}}},
            {"config": {"clickhouse": {"url": "http://ch:8123"}}, "sink": {"replicas": too_many}},
        )
    )
    assert f"exceeds config.kafka.topics.partitions ({settings.kafka.topics.partitions})" in error
    stop = settings.sink.stop_timeout_seconds
    assert f"config.sink.stop_timeout_seconds ({stop:g})" in render_error(
        with_changes(DEFAULT, {"sink": {"terminationGracePeriodSeconds": int(stop)}})
    )


# --- generated files ------------------------------------------------------------------------


def test_schema_and_readme_table_are_generated_and_current() -> None:
    schema = chart_schema.values_schema()
    for path, expected in (
        (chart_schema.SCHEMA_FILE, chart_schema.render_schema(schema)),
        (chart_schema.README_FILE, chart_schema.render_readme(schema)),
    ):
        current = path.read_text(encoding="utf-8")
        diff = "".join(
            difflib.unified_diff(
                current.splitlines(keepends=True), expected.splitlines(keepends=True), n=1
            )
        )
        assert not diff, f"{path.name} is stale; run `python -m tools.chart_schema`:\n{diff}"
    record("generated files", "values.schema.json and the README values table are current")


def test_every_object_in_the_schema_forbids_unknown_keys() -> None:
    schema = json.loads(chart_schema.SCHEMA_FILE.read_text(encoding="utf-8"))
    open_objects = [
        path
        for path, node in _schema_nodes(schema, "")
        if _is_object(node) and node.get("additionalProperties", True) is True
    ]
    assert open_objects == []
    record("values.schema.json", "every object closed (additionalProperties: false)")


def test_config_schema_leaves_out_every_secret_setting() -> None:
    schema = json.loads(chart_schema.SCHEMA_FILE.read_text(encoding="utf-8"))
    secret_fields = {"sasl_password", "password", "hash_key", "client_secret", "public_keys"}
    for name, definition in schema["definitions"].items():
        if name.startswith("sgpipe."):
            assert not secret_fields & set(definition.get("properties", {})), name


def test_readme_lists_every_value_in_values_yaml() -> None:
    readme = (CHART_DIR / "README.md").read_text(encoding="utf-8")
    listed = [line.split("`")[1] for line in readme.splitlines() if line.startswith("| `")]
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text(encoding="utf-8"))
    missing = [path for path in _value_paths(values, "") if not _listed(path, listed)]
    assert missing == []
    groups: dict[str, int] = {}
    for path in listed:
        group = path.split(".")[0].split("[")[0]
        groups[group] = groups.get(group, 0) + 1
    record(
        "values (helm/sgpipe/README.md)",
        f"{len(listed)}: " + ", ".join(f"{group} ({count})" for group, count in groups.items()),
    )


def _first_path(changes: Any) -> str:
    path = []
    while isinstance(changes, dict) and changes:
        key = next(iter(changes))
        path.append(key)
        changes = changes[key]
    return ".".join(path)


def _listed(path: str, listed: list[str]) -> bool:
    # A value is listed itself, or as a whole under a listed parent (a Kubernetes type such
    # as resources or securityContext, or a Secret reference).
    parts = path.split(".")
    return any(".".join(parts[:end]) in listed for end in range(len(parts), 0, -1))


def _value_paths(values: Any, prefix: str) -> Iterator[str]:
    if isinstance(values, dict) and values:
        for key, value in values.items():
            yield from _value_paths(value, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix


def _schema_nodes(node: Any, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _schema_nodes(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _schema_nodes(item, f"{path}/{index}")


def _is_object(node: dict[str, Any]) -> bool:
    kind = node.get("type")
    is_object = kind == "object" or (isinstance(kind, list) and "object" in kind)
    return is_object or "properties" in node
