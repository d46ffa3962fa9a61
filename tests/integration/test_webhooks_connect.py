"""`sgpipe webhooks connect` end to end, as a user runs it: the SendGrid emulator, a real
`sgpipe up`, the CLI as a process. connect sets SendGrid up and writes the key; `sgpipe up`
starts with it; a second connect changes nothing, and the emulator's signed test batch is
accepted, verified and stored in email_events; `check` then sees a webhook disabled on
SendGrid's side. One `sgpipe up` for all of it: they are expensive."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from sgpipe.webhooks.emulator import TEST_BATCH_EVENTS
from tests import forked
from tests.integration.kafka_tools import FAST_GROUP_SETTINGS
from tests.ports import free_port
from tests.up_support import served_store_answer, wait_until
from tests.webhooks_support import API_KEY, running_emulator

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

SGPIPE = [sys.executable, "-m", "sgpipe"]
START_TIMEOUT = 90.0


def run_cli(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = forked.run(
        [*SGPIPE, *argv], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert API_KEY not in result.stdout + result.stderr, argv
    return result


def wait_until_serving(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"sgpipe up exited early:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"sgpipe up did not serve within {START_TIMEOUT}s:\n{log.read_text()}")


def count_rows(config: Path, data_dir: Path, env: dict[str, str]) -> str:
    result = forked.run(
        [*SGPIPE, "query", "--config", str(config), "--data-dir", str(data_dir)]
        + ["SELECT count() FROM email_events FINAL"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    return result.stdout.strip() if result.returncode == 0 else f"error: {result.stderr}"


def stored_rows(data_dir: Path) -> str | None:
    try:
        return served_store_answer(data_dir, "SELECT count() FROM email_events FINAL")
    except OSError:  # the sink has not created the table yet
        return None


def test_connect_end_to_end_with_sgpipe_up(tmp_path: Path) -> None:
    port = free_port()
    public_url = f"http://127.0.0.1:{port}/webhooks/main"
    config = tmp_path / "sgpipe.yaml"
    config.write_text(
        "# the webhook section is written by `sgpipe webhooks connect`\n"
        + yaml.safe_dump(
            {
                "embedded": {"kafka_port": 0, "clickhouse_http_port": 0},
                "kafka": dict(FAST_GROUP_SETTINGS),
                "sink": {"batch_max_seconds": 0.2},
                "logging": {"format": "json"},
            }
        )
    )
    data_dir = tmp_path / "data"
    log = tmp_path / "sgpipe-up.log"
    with running_emulator() as emulator:
        env = {
            **os.environ,
            "SENDGRID_API_KEY": API_KEY,
            "SGPIPE_SENDGRID__API_BASE_URL": emulator.url,
            "PYTHONUNBUFFERED": "1",
        }
        connect = ["webhooks", "connect", "--name", "main", "--public-url", public_url]
        connect += ["--config", str(config), "--ingress-url", f"http://127.0.0.1:{port}"]

        # 1. Before the pipeline runs: SendGrid set up, the key written (no test yet).
        first = run_cli(*connect, "--skip-test", env=env)
        assert first.returncode == 0, first.stderr
        assert "created SendGrid webhook" in first.stdout
        assert "enabled signature verification" in first.stdout
        written = config.read_text()
        assert written.startswith("# the webhook section is written by")
        [webhook] = emulator.state.webhooks("")
        assert yaml.safe_load(written)["webhooks"] == [
            {"name": "main", "public_keys": [webhook.public_key()]}
        ]

        with log.open("wb") as output:
            process = forked.Popen(
                [*SGPIPE, "up", "--config", str(config), "--data-dir", str(data_dir)]
                + ["--port", str(port)],
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env,
            )
        try:
            wait_until_serving(process, f"http://127.0.0.1:{port}", log)
            changes_before = [e for e in emulator.exchanges if e.method != "GET"]

            # 2. Again, with the pipeline up: nothing changes, the test batch is accepted.
            second = run_cli(*connect, "--json", env=env)
            assert second.returncode == 0, second.stdout + second.stderr
            report = json.loads(second.stdout)
            assert report["changes"] == [], report
            assert report["test"]["accepted"] is True, report
            assert config.read_text() == written
            changed = [e for e in emulator.exchanges if e.method != "GET"][len(changes_before) :]
            assert [(e.method, e.path) for e in changed] == [
                ("POST", "/v3/user/webhooks/event/test")
            ]
            [delivery] = emulator.state.deliveries
            assert delivery.signed and delivery.accepted and delivery.events == TEST_BATCH_EVENTS

            # 3. Verified and stored: every event of the test batch is a row.
            # Polled from this process (no `sgpipe query` process per poll), then read as a
            # user reads it.
            expected = f"{TEST_BATCH_EVENTS}\n"
            wait_until(
                lambda: stored_rows(data_dir) == expected, 60, "the test batch's rows stored"
            )
            rows = count_rows(config, data_dir, env)
            assert rows == str(TEST_BATCH_EVENTS), f"email_events has {rows}\n{log.read_text()}"

            # 4. check: in agreement, then a webhook disabled on SendGrid's side.
            check = run_cli("webhooks", "check", "--config", str(config), env=env)
            assert check.returncode == 0, check.stdout + check.stderr
            disable = run_cli(
                "webhooks", "update", webhook.id, "--no-enabled", "--config", str(config), env=env
            )
            assert disable.returncode == 0, disable.stderr
            check = run_cli("webhooks", "check", "--config", str(config), env=env)
            assert check.returncode == 1
            assert "disabled on SendGrid's side" in check.stdout
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    assert API_KEY not in log.read_text()
