"""What an SRE checks on the rendered objects, for the default values (ci/default-values.yaml:
the least a real install needs) and for every feature enabled (ci/everything-values.yaml)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from sgpipe.runtime import metrics
from sgpipe.runtime.settings import ConfigError, Settings, load_settings
from tests.chart.rendering import (
    NAMESPACE,
    RELEASE,
    STAGES,
    Rendered,
    containers,
    env_names,
    pod_spec,
    render,
    render_error,
    scenario,
    with_changes,
    workloads,
)
from tests.chart.summary import record

STAGE_COMMANDS = {"ingest": "ingest", "processor": "process", "sink": "sink"}
SETTINGS = Settings()
STAGE_PORTS = {
    "ingest": SETTINGS.ingest.port,
    "processor": SETTINGS.processor.health_port,
    "sink": SETTINGS.sink.health_port,
}
CONFIG_PATH = "/etc/sgpipe/sgpipe.yaml"


# One xdist worker runs this module (make test: --dist loadgroup): its module-scoped fixture
# (the rendered chart) is then set up once, not once per worker.
pytestmark = pytest.mark.xdist_group("chart-objects")


@pytest.fixture(scope="module")
def default() -> Rendered:
    return render(scenario("default-values.yaml"))


@pytest.fixture(scope="module")
def everything() -> Rendered:
    return render(scenario("everything-values.yaml"))


@pytest.fixture(scope="module", params=["default", "everything"])
def rendered(request: pytest.FixtureRequest) -> Rendered:
    result: Rendered = request.getfixturevalue(request.param)
    return result


# --- every workload ---------------------------------------------------------------------


def test_one_deployment_per_stage_running_its_command(rendered: Rendered) -> None:
    assert sorted(d["metadata"]["name"] for d in rendered.of_kind("Deployment")) == [
        f"{RELEASE}-{stage}" for stage in sorted(STAGES)
    ]
    for stage in STAGES:
        (container,) = containers(rendered.deployment(stage))
        assert container["args"] == [STAGE_COMMANDS[stage], "--config", CONFIG_PATH]
        assert "command" not in container, "the image's entrypoint (sgpipe) must be used"


def test_probes_hit_healthz_and_readyz_on_the_stage_port(rendered: Rendered) -> None:
    for stage in STAGES:
        (container,) = containers(rendered.deployment(stage))
        (port,) = container["ports"]
        assert port == {"name": "http", "containerPort": STAGE_PORTS[stage], "protocol": "TCP"}
        paths = {
            probe: container[probe]["httpGet"]
            for probe in ("startupProbe", "livenessProbe", "readinessProbe")
        }
        assert paths == {
            "startupProbe": {"path": "/healthz", "port": "http"},
            "livenessProbe": {"path": "/healthz", "port": "http"},
            "readinessProbe": {"path": "/readyz", "port": "http"},
        }


def test_every_pod_is_locked_down(rendered: Rendered) -> None:
    for workload in workloads(rendered):
        spec = pod_spec(workload)
        name = workload["metadata"]["name"]
        assert spec["enableServiceLinks"] is False, name
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] >= 10000, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in containers(workload):
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["privileged"] is False, name
            assert security["capabilities"] == {"drop": ["ALL"]}, name
            assert security["seccompProfile"] == {"type": "RuntimeDefault"}, name
            resources = container["resources"]
            assert set(resources["requests"]) == {"cpu", "memory"}, name
            assert set(resources["limits"]) == {"cpu", "memory"}, name
            # The one writable path is an emptyDir on /tmp, with a size limit.
            mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
            assert mounts["/tmp"] == "tmp"
            volumes = {volume["name"]: volume for volume in spec["volumes"]}
            assert volumes["tmp"]["emptyDir"]["sizeLimit"]


def test_selectors_never_carry_the_chart_version(rendered: Rendered) -> None:
    for deployment in rendered.of_kind("Deployment"):
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert not {"helm.sh/chart", "app.kubernetes.io/version"} & set(selector)
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= pod_labels.items()
    for service in rendered.of_kind("Service"):
        stage = service["metadata"]["labels"]["app.kubernetes.io/component"]
        pods = rendered.deployment(stage)["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pods.items()
        assert "helm.sh/chart" not in service["spec"]["selector"]


def test_every_object_is_in_the_release_namespace(rendered: Rendered) -> None:
    for manifest in rendered.manifests:
        assert manifest["metadata"]["namespace"] == NAMESPACE, manifest["metadata"]["name"]


def test_pods_spread_over_zones_and_nodes(default: Rendered) -> None:
    for stage in STAGES:
        deployment = default.deployment(stage)
        constraints = pod_spec(deployment)["topologySpreadConstraints"]
        assert {c["topologyKey"] for c in constraints} == {
            "topology.kubernetes.io/zone",
            "kubernetes.io/hostname",
        }
        for constraint in constraints:
            assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"
            assert (
                constraint["labelSelector"]["matchLabels"]
                == (deployment["spec"]["selector"]["matchLabels"])
            )


def test_every_stage_has_a_disruption_budget_that_never_blocks_a_drain(
    rendered: Rendered,
) -> None:
    budgets = {pdb["metadata"]["name"]: pdb for pdb in rendered.of_kind("PodDisruptionBudget")}
    for stage in STAGES:
        budget = budgets[f"{RELEASE}-{stage}"]
        assert budget["spec"]["maxUnavailable"] >= 1
        assert "minAvailable" not in budget["spec"]
        assert (
            budget["spec"]["selector"]["matchLabels"]
            == (rendered.deployment(stage)["spec"]["selector"]["matchLabels"])
        )


def test_consumers_get_a_grace_period_longer_than_their_drain(rendered: Rendered) -> None:
    config = _config_file(rendered)
    for stage in ("processor", "sink"):
        grace = pod_spec(rendered.deployment(stage))["terminationGracePeriodSeconds"]
        assert grace > getattr(config, stage).stop_timeout_seconds


# --- config and secrets ---------------------------------------------------------------------


def test_config_checksum_is_the_rendered_configmap_and_rolls_pods_on_change(
    default: Rendered,
) -> None:
    configmap_text = default.templates["sgpipe/templates/configmap.yaml"]
    expected = hashlib.sha256(configmap_text.encode()).hexdigest()
    for stage in STAGES:
        annotations = default.deployment(stage)["spec"]["template"]["metadata"]["annotations"]
        assert annotations["checksum/config"] == expected

    values = scenario("default-values.yaml")
    changed = render(with_changes(values, {"config": {"sink": {"batch_max_records": 5000}}}))
    unrelated = render(with_changes(values, {"ingest": {"replicas": 3}}))
    for stage in STAGES:
        assert _checksum(changed, stage) != _checksum(default, stage)
        assert _checksum(unrelated, stage) == _checksum(default, stage)


# What a Secret holds where a setting is not a plain string.
SECRET_EXAMPLES = {"SGPIPE_RAW_AUTH__KEYS": json.dumps([{"id": "k1", "secret": "s" * 43}])}


def test_sgpipe_accepts_the_config_and_environment_each_pod_gets(rendered: Rendered) -> None:
    """Load the rendered sgpipe.yaml with the pod's environment through sgpipe's own settings
    loader: what the chart writes is what sgpipe reads, key for key."""
    for workload in workloads(rendered):
        for container in containers(workload):
            environ = {
                variable["name"]: variable.get(
                    "value",
                    {**SECRET_EXAMPLES, **SECRET_SAMPLES}.get(
                        variable["name"], "secret-from-" + variable["name"]
                    ),
                )
                for variable in container.get("env", [])
                if variable["name"].startswith("SGPIPE_")
                and variable["name"] not in SETTINGS_NOT_YET_IN_SGPIPE
            }
            settings = _load(rendered, environ)
            assert settings.kafka.bootstrap_servers
            assert settings.clickhouse.url
    record(
        "sgpipe's settings loader",
        f"accepts every pod's ConfigMap + environment ({len(list(workloads(rendered)))} pods)",
    )


# Secrets the chart can pass that sgpipe's Settings does not define yet: none now. A name
# stays here only while Settings lacks it.
SETTINGS_NOT_YET_IN_SGPIPE: dict[str, tuple[str, str]] = {}
# Secret values with a format: what `sgpipe oauth client create` puts in the Secret.
SECRET_SAMPLES = {
    "SGPIPE_WEBHOOKS__MAIN__OAUTH_CLIENTS": (
        '[{"client_id": "sendgrid-main", "secret_hash": "scrypt$14$8$1$c2FsdHNhbHQ$aGFzaGhhc2g"}]'
    ),
}


def test_webhook_oauth_clients_reach_the_ingress_as_sgpipe_reads_them(everything: Rendered) -> None:
    (container,) = containers(everything.deployment("ingest"))
    (variable,) = [
        v for v in container["env"] if v["name"] == "SGPIPE_WEBHOOKS__MAIN__OAUTH_CLIENTS"
    ]
    assert variable["valueFrom"]["secretKeyRef"] == {"name": "sgpipe-oauth", "key": "oauth-clients"}
    from sgpipe.runtime.settings import WebhookSettings

    assert "oauth_clients" in WebhookSettings.model_fields


def test_the_pii_hash_key_reaches_the_processor_as_sgpipe_reads_it(everything: Rendered) -> None:
    (container,) = containers(everything.deployment("processor"))
    (variable,) = [v for v in container["env"] if v["name"] == "SGPIPE_PII__HASH_KEY"]
    assert set(variable["valueFrom"]) == {"secretKeyRef"}
    from sgpipe.runtime.settings import PiiSettings

    assert Settings.model_fields["pii"].annotation is PiiSettings
    assert "hash_key" in PiiSettings.model_fields


def test_the_raw_auth_keys_reach_the_ingress_and_the_processor_by_reference(
    default: Rendered,
) -> None:
    for stage in ("ingest", "processor"):
        (container,) = containers(default.deployment(stage))
        (variable,) = [v for v in container["env"] if v["name"] == "SGPIPE_RAW_AUTH__KEYS"]
        assert variable["valueFrom"] == {
            "secretKeyRef": {"name": "sgpipe-raw-auth", "key": "raw-auth-keys"}
        }


def test_without_raw_auth_keys_the_chart_refuses_unless_explicitly_unauthenticated() -> None:
    values = scenario("default-values.yaml")
    without = with_changes(values, {"secrets": {"rawAuthKeys": {"name": ""}}})
    assert "secrets.rawAuthKeys is required" in render_error(without)
    opted_out = render(
        with_changes(without, {"config": {"raw_auth": {"allow_unauthenticated": True}}})
    )
    (container,) = containers(opted_out.deployment("processor"))
    assert "SGPIPE_RAW_AUTH__KEYS" not in env_names(container)


def test_each_stage_gets_only_the_secrets_it_uses(everything: Rendered) -> None:
    kafka = {"SGPIPE_KAFKA__SASL_USERNAME", "SGPIPE_KAFKA__SASL_PASSWORD"}
    webhooks = {
        "SGPIPE_WEBHOOKS__MAIN__PUBLIC_KEYS",
        "SGPIPE_WEBHOOKS__MAIN__OAUTH_CLIENTS",
        # A webhook named eu-west: sgpipe maps "_" back to "-" when it looks the name up.
        "SGPIPE_WEBHOOKS__EU_WEST__PUBLIC_KEYS",
    }
    clickhouse = {"SGPIPE_CLICKHOUSE__PASSWORD"}
    pii = {"SGPIPE_PII__HASH_KEY"}
    raw_auth = {"SGPIPE_RAW_AUTH__KEYS"}  # the ingress signs raw records, the processor checks
    expected = {
        "ingest": kafka | webhooks | raw_auth,
        "processor": kafka | pii | raw_auth,  # the processor alone applies pii.* (docs/privacy.md)
        "sink": kafka | clickhouse,
    }
    for stage, names in expected.items():
        (container,) = containers(everything.deployment(stage))
        assert env_names(container) - {"HTTPS_PROXY"} == names, stage
        for variable in container["env"]:
            if variable["name"].startswith("SGPIPE_"):
                assert set(variable) == {"name", "valueFrom"}, "secrets only by reference"
                assert set(variable["valueFrom"]) == {"secretKeyRef"}
    (migrate,) = containers(everything.migrate_job())
    assert env_names(migrate) - {"HTTPS_PROXY"} == kafka | clickhouse


def test_no_secret_value_in_any_configmap(everything: Rendered) -> None:
    configs = [c for c in everything.of_kind("ConfigMap") if "sgpipe.yaml" in c["data"]]
    assert configs
    for configmap in configs:
        document = yaml.safe_load(configmap["data"]["sgpipe.yaml"])
        assert "password" not in document["kafka"] and "sasl_password" not in document["kafka"]
        assert "password" not in document["clickhouse"]
        for webhook in document["webhooks"]:
            assert "public_keys" not in webhook


def test_kafka_ca_is_mounted_where_the_config_points(everything: Rendered) -> None:
    config = _config_file(everything)
    assert config.kafka.ssl_cafile is not None
    for workload in workloads(everything):
        spec = pod_spec(workload)
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        assert volumes["kafka-ca"]["secret"]["secretName"] == "events-cluster-ca-cert"
        (container,) = containers(workload)
        mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
        mounted = (
            Path(mounts["kafka-ca"]["mountPath"])
            / volumes["kafka-ca"]["secret"]["items"][0]["path"]
        )
        assert mounted == config.kafka.ssl_cafile


def test_oauth_signing_keys_are_mounted_in_the_ingress_only_where_the_config_points(
    everything: Rendered,
) -> None:
    config = _config_file(everything)
    assert [str(path) for path in config.ingest.oauth_signing_key_files] == [
        "/etc/sgpipe/oauth/current.pem",
        "/etc/sgpipe/oauth/previous.pem",
    ]
    for workload in workloads(everything):
        spec = pod_spec(workload)
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        (container,) = containers(workload)
        mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
        if workload["metadata"]["name"].endswith("-ingest"):
            sources = volumes["oauth-signing-keys"]["projected"]["sources"]
            mounted = {
                Path(mounts["oauth-signing-keys"]["mountPath"]) / item["path"]: source["secret"]
                for source in sources
                for item in source["secret"]["items"]
            }
            assert mounted == {
                Path("/etc/sgpipe/oauth/current.pem"): {
                    "name": "sgpipe-oauth",
                    "items": [{"key": "signing-key.pem", "path": "current.pem"}],
                },
                Path("/etc/sgpipe/oauth/previous.pem"): {
                    "name": "sgpipe-oauth-old",
                    "items": [{"key": "signing-key.pem", "path": "previous.pem"}],
                },
            }
        else:
            assert "oauth-signing-keys" not in volumes
            assert "oauth-signing-keys" not in mounts


# --- the migration hook ---------------------------------------------------------------------


def test_migration_job_runs_before_install_and_upgrade_with_its_own_config(
    rendered: Rendered,
) -> None:
    job = rendered.migrate_job()
    hooks = job["metadata"]["annotations"]
    assert hooks["helm.sh/hook"] == "pre-install,pre-upgrade"
    (container,) = containers(job)
    assert container["args"] == ["migrate", "--config", CONFIG_PATH]
    assert pod_spec(job)["restartPolicy"] == "Never"
    # The release's own ConfigMap and ServiceAccount do not exist yet when a pre-install hook
    # runs: the Job's come as hooks of lower weight, with the same content.
    hook_configmap = rendered.get("ConfigMap", f"{RELEASE}-migrate")
    assert hook_configmap["data"] == rendered.get("ConfigMap", RELEASE)["data"]
    hook_account = rendered.get("ServiceAccount", f"{RELEASE}-migrate")
    assert pod_spec(job)["serviceAccountName"] == hook_account["metadata"]["name"]
    for earlier in (hook_configmap, hook_account):
        annotations = earlier["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == hooks["helm.sh/hook"]
        assert int(annotations["helm.sh/hook-weight"]) < int(hooks["helm.sh/hook-weight"])
    volumes = {volume["name"]: volume for volume in pod_spec(job)["volumes"]}
    assert volumes["config"]["configMap"]["name"] == f"{RELEASE}-migrate"


# --- the way in ---------------------------------------------------------------------------


def test_ingress_publishes_only_the_webhook_path_over_tls(everything: Rendered) -> None:
    (ingress,) = everything.of_kind("Ingress")
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "sendgrid-events.example.com"
    # The token endpoint too: webhook main has OAuth clients (SendGrid fetches tokens there).
    path, token_path = rule["http"]["paths"]
    assert path["path"] == "/webhooks" and path["pathType"] == "Prefix"
    assert token_path["path"] == "/oauth/token" and token_path["pathType"] == "Exact"
    assert token_path["backend"] == path["backend"]
    service = everything.get("Service", path["backend"]["service"]["name"])
    port_names = {port["name"] for port in service["spec"]["ports"]}
    assert path["backend"]["service"]["port"]["name"] in port_names
    assert ingress["spec"]["tls"] == [
        {"hosts": ["sendgrid-events.example.com"], "secretName": f"{RELEASE}-ingest-tls"}
    ]
    assert "https://sendgrid-events.example.com/webhooks/main" in everything.notes
    assert "https://sendgrid-events.example.com/webhooks/eu-west" in everything.notes


def test_notes_name_each_webhook_url_without_an_ingress(default: Rendered) -> None:
    assert default.of_kind("Ingress") == []
    assert "https://<your public host>/webhooks/main" in default.notes
    assert f"port-forward svc/{RELEASE}-ingest" in default.notes


# --- scaling ----------------------------------------------------------------------------------


def test_autoscaled_stages_leave_replicas_to_the_autoscaler(everything: Rendered) -> None:
    (hpa,) = everything.of_kind("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == f"{RELEASE}-ingest"
    for stage in STAGES:
        assert "replicas" not in everything.deployment(stage)["spec"], stage


def test_keda_scales_each_consumer_on_its_own_group_and_topic(everything: Rendered) -> None:
    config = _config_file(everything)
    sources = {"processor": config.kafka.topics.raw, "sink": config.kafka.topics.events}
    objects = {so["metadata"]["name"]: so for so in everything.of_kind("ScaledObject")}
    assert set(objects) == {f"{RELEASE}-processor", f"{RELEASE}-sink"}
    (auth,) = everything.of_kind("TriggerAuthentication")
    for stage in ("processor", "sink"):
        scaled = objects[f"{RELEASE}-{stage}"]["spec"]
        assert scaled["scaleTargetRef"]["name"] == f"{RELEASE}-{stage}"
        assert scaled["maxReplicaCount"] <= config.kafka.topics.partitions
        (trigger,) = scaled["triggers"]
        assert trigger["metadata"]["consumerGroup"] == getattr(config, stage).group_id
        assert trigger["metadata"]["topic"] == sources[stage]
        assert trigger["metadata"]["bootstrapServers"] == config.kafka.bootstrap_servers
        assert trigger["metadata"]["allowIdleConsumers"] == "false"
        assert trigger["metadata"]["sasl"] == "scram_sha512"
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]} == {
        "username",
        "password",
        "ca",
    }


# --- observability --------------------------------------------------------------------------


def test_service_monitor_scrapes_every_stage(everything: Rendered) -> None:
    (monitor,) = everything.of_kind("ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    selector = monitor["spec"]["selector"]
    scraped = [
        service
        for service in everything.of_kind("Service")
        if selector["matchLabels"].items() <= service["metadata"]["labels"].items()
        and service["metadata"]["labels"]["app.kubernetes.io/component"]
        in selector["matchExpressions"][0]["values"]
    ]
    assert sorted(s["metadata"]["labels"]["app.kubernetes.io/component"] for s in scraped) == (
        sorted(STAGES)
    )
    for service in scraped:
        (port,) = service["spec"]["ports"]
        assert port["name"] == endpoint["port"] and endpoint["path"] == "/metrics"
        stage = service["metadata"]["labels"]["app.kubernetes.io/component"]
        if stage != "ingest":
            assert port["port"] == STAGE_PORTS[stage]


def test_alerts_use_metrics_and_labels_sgpipe_exports(everything: Rendered) -> None:
    (rule,) = everything.of_kind("PrometheusRule")
    alerts = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}
    assert set(alerts) == {
        "SgpipeConsumerLagHigh",
        "SgpipeDeadLetters",
        "SgpipeWebhookVerificationFailures",
        "SgpipeNoEventsAccepted",
        "SgpipeIngestRefusingBatches",
        "SgpipeStageNotReady",
        "SgpipeSendGridRetriesNearLimit",
        "SgpipeSendGridRetryResigned",
    }
    exported = _exported_metrics()
    # Labels Prometheus adds to every scraped series.
    target_labels = {"namespace", "job", "pod", "instance", "service"}
    for name, alert in alerts.items():
        expr = alert["expr"]
        assert expr.count("(") == expr.count(")"), name
        used = set(re.findall(r"\b(sgpipe_[a-z_]+)\s*\{", expr))
        assert used, f"{name} queries no sgpipe metric"
        for metric in used:
            assert metric in exported, f"{name}: {metric} is not defined in metrics.py"
            labels = exported[metric] | target_labels
            if any(used_metric.endswith("_bucket") for used_metric in used):
                labels = labels | {"le"}  # a histogram's bucket bound
            for group in re.findall(r"by \(([^)]*)\)", expr):
                for label in group.split(","):
                    assert label.strip() in labels, f"{name}: {metric} has no label {label}"
            for matcher in re.findall(r"(\w+)=~?\"", expr):
                assert matcher in labels, f"{name}: {metric} has no label {matcher}"
        assert alert["labels"]["severity"] in {"warning", "critical", "info"}
        assert alert["annotations"]["runbook_url"].startswith("https://")
    # The retry-clock alert compares with a bucket the histogram has (12 h by default).
    retries = alerts["SgpipeSendGridRetriesNearLimit"]["expr"]
    (bound,) = re.findall(r'le="([0-9.]+)"', retries)
    assert float(bound) == 12 * 3600
    assert float(bound) in metrics.INGEST_DELIVERY_DELAY_SECONDS._upper_bounds
    no_events = alerts["SgpipeNoEventsAccepted"]["expr"]
    assert 'outcome="accepted"' in no_events and "[60m]" in no_events


# --- network ------------------------------------------------------------------------------


def test_network_policies_cover_every_pod_and_limit_clickhouse_to_its_writers(
    everything: Rendered,
) -> None:
    policies = {
        p["metadata"]["labels"]["app.kubernetes.io/component"]: p
        for p in everything.of_kind("NetworkPolicy")
    }
    assert set(policies) == {*STAGES, "migrate"}
    for component, policy in policies.items():
        workload = (
            everything.migrate_job() if component == "migrate" else everything.deployment(component)
        )
        pod_labels = workload["spec"]["template"]["metadata"]["labels"]
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
        egress_ports = {
            port["port"] for rule in policy["spec"]["egress"] for port in rule.get("ports", [])
        }
        assert 9093 in egress_ports and 53 in egress_ports
        assert (8443 in egress_ports) == (component in {"sink", "migrate"}), component
    assert policies["migrate"]["spec"]["ingress"] == []


def test_default_network_policies_restrict_ingress_only(default: Rendered) -> None:
    for policy in default.of_kind("NetworkPolicy"):
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        assert "egress" not in policy["spec"]


# --- helpers ------------------------------------------------------------------------------


def _checksum(rendered: Rendered, stage: str) -> str:
    annotations = rendered.deployment(stage)["spec"]["template"]["metadata"]["annotations"]
    checksum: str = annotations["checksum/config"]
    return checksum


def _load(rendered: Rendered, environ: dict[str, str]) -> Settings:
    import tempfile

    text = rendered.get("ConfigMap", RELEASE)["data"]["sgpipe.yaml"]
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "sgpipe.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            return load_settings(path, environ)
        except ConfigError as exc:
            raise AssertionError(f"sgpipe refuses the chart's config: {exc}") from exc


def _config_file(rendered: Rendered) -> Settings:
    return _load(rendered, {})


def _exported_metrics() -> dict[str, set[str]]:
    exported: dict[str, set[str]] = {}
    for collector in list(metrics.REGISTRY._collector_to_names):
        labels: Any = getattr(collector, "_labelnames", ())
        for name in metrics.REGISTRY._collector_to_names[collector]:
            exported[name] = set(labels)
    return exported


def test_grafana_dashboards_ship_as_a_configmap_for_the_sidecar_when_enabled(
    default: Rendered, everything: Rendered
) -> None:
    names = [manifest["metadata"]["name"] for manifest in default.of_kind("ConfigMap")]
    assert not [name for name in names if name.endswith("-dashboards")]
    (configmap,) = [
        manifest
        for manifest in everything.of_kind("ConfigMap")
        if manifest["metadata"]["name"].endswith("-dashboards")
    ]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "sgpipe"}
    dashboards = Path(__file__).resolve().parents[2] / "dashboards" / "grafana"
    assert sorted(configmap["data"]) == ["sgpipe-email.json", "sgpipe-pipeline.json"]
    for name, text in configmap["data"].items():
        assert json.loads(text) == json.loads((dashboards / name).read_text())
