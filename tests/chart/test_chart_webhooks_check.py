"""The chart's `webhooksCheck` option: a CronJob running `sgpipe webhooks check` with the
SendGrid API key and the webhooks' trusted keys only, on the config every pod reads."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from sgpipe.runtime.settings import load_settings
from tests.chart.rendering import (
    RELEASE,
    Rendered,
    env_names,
    render,
    render_error,
    scenario,
    with_changes,
)
from tests.chart.summary import record

NAME = f"{RELEASE}-webhooks-check"


def _job_container(rendered: Rendered) -> dict[str, Any]:
    cronjob = rendered.get("CronJob", NAME)
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    container_dict: dict[str, Any] = container
    return container_dict


def test_the_cronjob_runs_check_with_the_api_key_and_the_trusted_keys_only() -> None:
    rendered = render(scenario("everything-values.yaml"))
    container = _job_container(rendered)
    assert container["args"] == ["webhooks", "check", "--config", "/etc/sgpipe/sgpipe.yaml"]
    assert env_names(container) - {"HTTPS_PROXY"} == {
        "SENDGRID_API_KEY",
        "SGPIPE_WEBHOOKS__MAIN__PUBLIC_KEYS",
        "SGPIPE_WEBHOOKS__EU_WEST__PUBLIC_KEYS",
    }
    api_key = next(v for v in container["env"] if v["name"] == "SENDGRID_API_KEY")
    assert api_key["valueFrom"] == {"secretKeyRef": {"name": "sendgrid-api", "key": "api-key"}}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # sgpipe reads the pod's config and environment as they are rendered.
    text = rendered.get("ConfigMap", RELEASE)["data"]["sgpipe.yaml"]
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "sgpipe.yaml"
        path.write_text(text, encoding="utf-8")
        environ = {name: "MFkwKEY" for name in env_names(container) if name.startswith("SGPIPE_")}
        settings = load_settings(path, environ)
    assert {w.name: w.public_keys for w in settings.webhooks} == {
        "main": ("MFkwKEY",),
        "eu-west": ("MFkwKEY",),
    }
    record("webhooks check CronJob", "API key and trusted keys only; config accepted by sgpipe")


def test_the_cronjob_is_off_by_default_and_needs_an_api_key_secret() -> None:
    default = scenario("default-values.yaml")
    assert render(default).of_kind("CronJob") == []
    message = render_error(with_changes(default, {"webhooksCheck": {"enabled": True}}))
    assert "webhooksCheck.apiKeySecret.name" in message
