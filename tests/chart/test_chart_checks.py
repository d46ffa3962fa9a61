"""Every ci/ scenario through Helm's linter, Kubernetes' own schemas and a policy scanner.

- ``helm lint --strict`` (Helm's Go SDK) at the oldest and newest Kubernetes the chart supports;
- every rendered manifest against the strict (unknown fields are errors) OpenAPI schemas of
  those Kubernetes versions (kubernetes-validate);
- checkov's Kubernetes policies: no failed check. checkov without a vendor API key reports no
  severities, so every finding counts as high; the few the chart accepts carry their reason
  in the chart (``sgpipe.checkovSkips`` in templates/_helpers.tpl) and are listed here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from tests.chart.rendering import (
    CHART_DIR,
    KUBERNETES_VERSIONS,
    NAMESPACE,
    SCENARIOS,
    Rendered,
    render,
    scenario,
)
from tests.chart.summary import record

# Custom resources: kubernetes-validate knows only Kubernetes' own kinds. Their structure is
# asserted in test_chart_objects.py; anything else without a schema fails below.
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
}
ACCEPTED_CHECKOV_FINDINGS = {"CKV_K8S_35", "CKV_K8S_43", "CKV_K8S_15"}


# One xdist worker runs this module (make test: --dist loadgroup): its module-scoped fixture
# (the rendered scenarios) is then set up once, not once per worker.
pytestmark = pytest.mark.xdist_group("chart-checks")


@pytest.fixture(scope="module")
def rendered_scenarios() -> dict[str, Rendered]:
    return {name: render(scenario(name)) for name in SCENARIOS}


def test_the_scenarios_exist() -> None:
    assert {
        "default-values.yaml",
        "everything-values.yaml",
        "strimzi-sasl-tls-values.yaml",
        "managed-services-values.yaml",
    } <= set(SCENARIOS)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", SCENARIOS)
def test_helm_lint_strict_is_clean(name: str, version: str) -> None:
    report = helm.lint(
        CHART_DIR, scenario(name), strict=True, namespace=NAMESPACE, kube_version=f"v{version}"
    )
    assert report["errors"] == []
    # Severity 1 is INFO (Helm recommends an icon, which this chart does not ship).
    findings = [m for m in report["messages"] if m["severity"] > 1]
    assert findings == []
    infos = sorted({m["error"] for m in report["messages"]})
    topic = f"helm lint --strict clean (info only: {', '.join(infos) or 'none'})"
    record(topic, f"{name}@{version}")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_kubernetes(
    rendered_scenarios: dict[str, Rendered], version: str
) -> None:
    validated = 0
    for name, rendered in rendered_scenarios.items():
        for manifest in rendered.manifests:
            where = f"{name}: {manifest['kind']} {manifest['metadata']['name']}"
            if (manifest["apiVersion"], manifest["kind"]) in CUSTOM_KINDS:
                continue
            try:
                kubernetes_validate.validate(manifest, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(f"{where}: {exc.message} at {list(exc.path)}") from exc
            validated += 1
    assert validated >= 60
    custom = ", ".join(sorted(kind for _, kind in CUSTOM_KINDS))
    record(
        "kubernetes-validate (strict)",
        f"{validated} manifests of {len(rendered_scenarios)} scenarios valid at {version}"
        f" (custom resources checked by structure: {custom})",
    )


def test_custom_resources_are_only_the_expected_kinds(
    rendered_scenarios: dict[str, Rendered],
) -> None:
    custom = {
        (manifest["apiVersion"], manifest["kind"])
        for rendered in rendered_scenarios.values()
        for manifest in rendered.manifests
        if not manifest["apiVersion"].startswith(("v1", "apps/", "batch/", "policy/"))
        and not manifest["apiVersion"].startswith(("autoscaling/", "networking.k8s.io/"))
    }
    assert custom == CUSTOM_KINDS


def test_checkov_finds_nothing_but_the_documented_exceptions(
    rendered_scenarios: dict[str, Rendered], tmp_path: Path
) -> None:
    for name, rendered in rendered_scenarios.items():
        (tmp_path / name).write_text(yaml.safe_dump_all(rendered.manifests), encoding="utf-8")
    report = _checkov(tmp_path)
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["resource_count"] >= 60
    failed = [
        f"{check['check_id']} {check['check_name']}: {check['resource']} ({check['file_path']})"
        for check in report["results"]["failed_checks"]
    ]
    assert failed == []
    assert report["summary"]["passed"] > 1000
    skipped = report["results"]["skipped_checks"]
    assert {check["check_id"] for check in skipped} == ACCEPTED_CHECKOV_FINDINGS
    for check in skipped:
        assert check["check_id"] in ACCEPTED_CHECKOV_FINDINGS, check["check_id"]
        reason = check["check_result"]["suppress_comment"]
        assert len(reason) > 40, "every accepted finding says why"
    summary = report["summary"]
    record(
        f"checkov {summary['checkov_version']} (kubernetes)",
        f"{summary['resource_count']} resources of {len(rendered_scenarios)} scenarios:"
        f" passed {summary['passed']}, failed {summary['failed']}, skipped {summary['skipped']}"
        f" (accepted in the chart with reasons: {', '.join(sorted(ACCEPTED_CHECKOV_FINDINGS))})",
    )


def test_checkov_still_catches_what_the_chart_prevents(
    rendered_scenarios: dict[str, Rendered], tmp_path: Path
) -> None:
    """The scan is live: the same manifests with privilege escalation allowed fail it."""
    manifests = rendered_scenarios["default-values.yaml"].manifests
    deployment = next(m for m in manifests if m["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"]["allowPrivilegeEscalation"] = True
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(deployment), encoding="utf-8")
    report = _checkov(tmp_path)
    failed = {check["check_id"] for check in report["results"]["failed_checks"]}
    assert "CKV_K8S_20" in failed  # "Containers should not run with allowPrivilegeEscalation"


def _checkov(directory: Path) -> dict[str, Any]:
    checkov = Path(sys.executable).parent / "checkov"
    completed = subprocess.run(
        [
            str(checkov),
            "--directory",
            str(directory),
            "--framework",
            "kubernetes",
            # Offline: no guideline or policy download from the vendor's platform.
            "--skip-download",
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    # 0: nothing failed, 1: something failed; anything else is checkov itself failing.
    assert completed.returncode in (0, 1), completed.stderr
    report: Any = json.loads(completed.stdout)
    assert isinstance(report, dict), report
    return report
