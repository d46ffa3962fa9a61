"""Render helm/sgpipe with Helm's own engine (helm-python-sdk: Helm 4's Go SDK through ctypes),
offline, and hand the manifests to tests as parsed objects."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "helm" / "sgpipe"
CI_DIR = CHART_DIR / "ci"
SCENARIOS = sorted(path.name for path in CI_DIR.glob("*-values.yaml"))
RELEASE = "sgpipe"
NAMESPACE = "email"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest that
# kubernetes-validate knows: both are checked.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
STAGES = ("ingest", "processor", "sink")

Manifest = dict[str, Any]

# Helm's Go library logs every `fail` it evaluates at INFO on stderr; tests read the errors.
helm.disable_logging()


@dataclass(frozen=True)
class Rendered:
    """One render: parsed manifests, the raw text per template, and NOTES.txt."""

    manifests: list[Manifest]
    templates: dict[str, str]
    notes: str

    def of_kind(self, kind: str) -> list[Manifest]:
        return [manifest for manifest in self.manifests if manifest["kind"] == kind]

    def get(self, kind: str, name: str) -> Manifest:
        found = [m for m in self.of_kind(kind) if m["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
        return found[0]

    def deployment(self, stage: str) -> Manifest:
        return self.get("Deployment", f"{RELEASE}-{stage}")

    def migrate_job(self) -> Manifest:
        return self.get("Job", f"{RELEASE}-migrate")


def scenario(name: str) -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CI_DIR / name).read_text(encoding="utf-8"))
    return values


def with_changes(values: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``values`` with ``changes`` merged in (dicts merge, the rest replaces)."""
    merged = copy.deepcopy(dict(values))
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = with_changes(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def render(values: Mapping[str, Any], *, is_upgrade: bool = False) -> Rendered:
    """Render as ``helm install`` (or ``upgrade``) would; raises HelmError on a schema
    violation or a template ``fail``."""
    with helm.Chart.load(CHART_DIR) as chart:
        templates = chart.render(
            dict(values),
            name=RELEASE,
            namespace=NAMESPACE,
            is_install=not is_upgrade,
            is_upgrade=is_upgrade,
        )
    manifests = [
        document
        for path, text in sorted(templates.items())
        if path.endswith(".yaml")
        for document in yaml.safe_load_all(text)
        if document
    ]
    notes = templates.get(f"{CHART_DIR.name}/templates/NOTES.txt", "")
    return Rendered(manifests, templates, notes)


def render_error(values: Mapping[str, Any]) -> str:
    """The message Helm gives for values it refuses (schema or template ``fail``)."""
    try:
        render(values)
    except helm.HelmError as exc:
        return str(exc)
    raise AssertionError("the chart rendered values it should have refused")


def pod_spec(workload: Manifest) -> Manifest:
    spec: Manifest = workload["spec"]["template"]["spec"]
    return spec


def containers(workload: Manifest) -> list[Manifest]:
    found: list[Manifest] = pod_spec(workload)["containers"]
    return found


def workloads(rendered: Rendered) -> Iterator[Manifest]:
    """Every object that runs sgpipe: the three Deployments and the migration Job."""
    yield from rendered.of_kind("Deployment")
    yield from rendered.of_kind("Job")


def env_names(container: Manifest) -> set[str]:
    return {variable["name"] for variable in container.get("env", [])}
