"""SendGrid's OAuth dance through `sgpipe simulate` against a real `sgpipe up`, with the
ingress's built-in token endpoint and a client made by `sgpipe oauth client create --config`.

The token SendGrid caches must stop being valid mid-stream. A correct client never sends an
expired token (the simulator renews 30 s before `expires_in`, and tokens live at least 60 s),
so the honest way to get there under a real supervisor is what an operator does after a signing
key leaked: replace the key (`sgpipe oauth key create --force`) and restart the ingress. Every
token issued before is then refused with 401 `invalid_token` (reason `unknown_kid`), and the
simulator, like SendGrid, fetches a new token and retries. The simulator is paused (SIGSTOP)
while the key is replaced, so that it is certainly mid-stream with the old token cached when the
new ingress answers. (A token that really expired is played by
tests/integration/test_ingest_oauth_dance.py, which can move the issuing clock in-process.)

Asserted from outside only: the simulator's JSON report, the restarted ingress's /metrics, the
exact 401 a pre-revocation token gets, and ClickHouse: every event stored exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from sgpipe.up.oauth_key import OAUTH_SIGNING_KEY_FILE
from tests import forked
from tests.integration.processes import http_get, metric
from tests.integration.test_up import (
    SGPIPE,
    RunningPipeline,
    _wait_until_serving,
    post,
    start_pipeline,
    stop_pipeline,
)
from tests.up_support import read_state, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

EVENTS = 1200
RATE = 150  # events per second: 8 s of stream, POSTs of 75 events every 0.5 s
POSTS = EVENTS // (RATE // 2)


def create_client(config: Path, into: dict[str, str]) -> None:
    """`sgpipe oauth client create --config` on the file `sgpipe up` will read."""
    result = forked.run(
        [*SGPIPE, "oauth", "client", "create", "--webhook", "main", "--config", str(config)]
        + ["--json"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    printed = json.loads(result.stdout)
    assert set(printed) == {"client_id", "client_secret", "token_url"}
    text = config.read_text()
    # The id and the secret's hash went into the file, never the secret.
    assert printed["client_id"] in text and "scrypt$" in text
    assert printed["client_secret"] not in text
    into.update(printed)


def fetch_token(base_url: str, client: dict[str, str]) -> str:
    form = urlencode(
        {
            "grant_type": "client_credentials",
            "client_id": client["client_id"],
            "client_secret": client["client_secret"],
        }
    )
    status, _, body = post(
        f"{base_url}/oauth/token",
        form.encode(),
        {"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert status == 200, body
    token: str = json.loads(body)["access_token"]
    return token


def ingress_metrics(running: RunningPipeline) -> str:
    status, text = http_get(f"{running.base_url}/metrics")
    assert status == 200, text
    return text


def accepted_posts(running: RunningPipeline) -> float:
    return metric(
        ingress_metrics(running),
        "sgpipe_ingest_requests_total",
        webhook="main",
        outcome="accepted",
    )


def ingress_pid(running: RunningPipeline) -> int | None:
    pid: Any = read_state(running.data_dir)["children"]["ingest"]["pid"]
    return int(pid) if pid is not None else None


def serving(running: RunningPipeline) -> bool:
    try:
        return http_get(f"{running.base_url}/readyz")[0] == 200
    except OSError:
        return False


def test_sendgrid_oauth_dance_through_sgpipe_up_with_a_revoked_signing_key(
    tmp_path: Path,
) -> None:
    client: dict[str, str] = {}
    running = start_pipeline(
        tmp_path,
        before_start=lambda config: create_client(config, client),
        webhooks=[{"name": "main", "auth": "token"}],
    )
    simulator: subprocess.Popen[bytes] | None = None
    report = tmp_path / "simulate.json"
    simulator_log = tmp_path / "simulate.log"
    try:
        _wait_until_serving(running)
        wait_until(lambda: serving(running), 60, "the ingress ready for batches")
        base = running.base_url
        with report.open("wb") as stdout, simulator_log.open("wb") as stderr:
            simulator = forked.Popen(
                [
                    *SGPIPE,
                    "simulate",
                    "--url",
                    f"{base}/webhooks/main",
                    "--oauth-token-url",
                    f"{base}/oauth/token",
                    f"--client-id={client['client_id']}",
                    # "=": a secret may begin with "-" (URL-safe base64).
                    f"--client-secret={client['client_secret']}",
                    "--events",
                    str(EVENTS),
                    "--rate",
                    str(RATE),
                    "--flush-interval",
                    "0.5",
                    "--concurrency",
                    "2",
                    "--seed",
                    "18",
                    "--timeout",
                    "60",
                    "--retry-for",
                    "120",
                    "--json",
                ],
                stdout=stdout,
                stderr=stderr,
            )

        # 1. A token is fetched and batches are accepted with it.
        def first_accepted() -> bool:
            assert simulator is not None and simulator.poll() is None, (
                report.read_text() + simulator_log.read_text()
            )
            return accepted_posts(running) >= 1

        wait_until(first_accepted, 60, "a batch accepted with a token")
        simulator.send_signal(signal.SIGSTOP)
        assert simulator.poll() is None, "the stream ended before the key was revoked"
        assert accepted_posts(running) < POSTS, "every POST was accepted before the revocation"
        old_token = fetch_token(base, client)  # issued with the key about to be revoked

        # 2. The signing key is revoked: a new one in its place, the ingress restarted.
        old_pid = ingress_pid(running)
        assert old_pid is not None
        key_file = running.data_dir / OAUTH_SIGNING_KEY_FILE
        revoked_key = key_file.read_text()
        forked.run(
            [*SGPIPE, "oauth", "key", "create", "--out", str(key_file), "--force"],
            capture_output=True,
            timeout=60,
            check=True,
        )
        assert key_file.read_text() != revoked_key
        os.kill(old_pid, signal.SIGTERM)
        wait_until(
            lambda: ingress_pid(running) not in (None, old_pid) and serving(running),
            90,
            "the ingress restarted by sgpipe up with the new key, ready",
        )
        # A token of the revoked key: 401 with RFC 6750's invalid_token challenge and body.
        status, headers, body = post(
            f"{base}/webhooks/main",
            b"[]",
            {"Content-Type": "application/json", "Authorization": f"Bearer {old_token}"},
        )
        assert status == 401
        assert headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
        assert json.loads(body)["error"] == "invalid_token"
        refused_before = metric(
            ingress_metrics(running),
            "sgpipe_ingest_auth_failures_total",
            webhook="main",
            method="token",
            reason="unknown_kid",
        )
        assert refused_before == 1  # our own POST, counted by the new ingress

        # 3. The simulator resumes with its cached token: refused, refreshed, accepted.
        simulator.send_signal(signal.SIGCONT)
        simulator.wait(timeout=240)
        assert simulator.returncode == 0, report.read_text() + simulator_log.read_text()
        summary = json.loads(report.read_text())
        assert summary["events"] == summary["events_accepted"] == EVENTS
        assert summary["responses"].get("401", 0) >= 1, summary["responses"]
        assert summary["token_requests"] >= 2
        after = ingress_metrics(running)
        assert (
            metric(
                after,
                "sgpipe_ingest_auth_failures_total",
                webhook="main",
                method="token",
                reason="unknown_kid",
            )
            > refused_before
        ), "the simulator's cached token was never refused by the new ingress"
        assert metric(after, "sgpipe_oauth_token_requests_total", outcome="issued") >= 1
        accepted_by_new_ingress = metric(
            after, "sgpipe_ingest_requests_total", webhook="main", outcome="accepted"
        )
        assert accepted_by_new_ingress >= 1

        # 4. Every event stored exactly once (a batch published twice across the restart is
        # absorbed by ClickHouse), and none dead-lettered.
        running.wait_for(
            "SELECT count(), uniqExact(sg_event_id) FROM email_events FINAL",
            f"{EVENTS}\t{EVENTS}\n",
            timeout=120,
        )
        assert (
            running.query("SELECT count(), uniqExact(sg_event_id) FROM email_events_dedup")
            == f"{EVENTS}\t{EVENTS}\n"
        )
        assert running.query("SELECT count() FROM dead_letters") == "0\n"
    finally:
        if simulator is not None and simulator.poll() is None:
            simulator.send_signal(signal.SIGCONT)
            simulator.kill()
            simulator.wait()
        stop_pipeline(running)
    assert running.process.returncode == 0, running.log.read_text()
