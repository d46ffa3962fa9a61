"""`sgpipe up` as a user runs it: a real process with the embedded broker and ClickHouse,
SendGrid's official signed test vector posted over HTTP, rows read back with `sgpipe query`."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from sgpipe.embedded.credentials import (
    credentials_file,
    load_credentials,
    load_or_create_credentials,
)
from tests import forked
from tests.integration.kafka_tools import FAST_GROUP_SETTINGS
from tests.integration.processes import http_get, metric
from tests.ports import free_port
from tests.sendgrid_vector import BODY, PUBLIC_KEY, SIGNATURE, TIMESTAMP
from tests.up_support import served_store_answer

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

SGPIPE = [sys.executable, "-m", "sgpipe"]
PRODUCED = "sgpipe_records_produced_total"
START_TIMEOUT = 90.0


@dataclass
class RunningPipeline:
    process: subprocess.Popen[bytes]
    base_url: str
    data_dir: Path
    config: Path
    log: Path

    # Whether `sgpipe query` itself answered on this pipeline yet: then the served store is
    # asked directly (each `sgpipe query` is an interpreter start, ~0.5 s of CPU).
    cli_confirmed: bool = False

    def query(self, sql: str) -> str:
        """``sql``'s answer as `sgpipe query` prints it (TabSeparated): asked over the served
        store's HTTP interface from this process, as `sgpipe query` asks it, and by `sgpipe
        query` itself the first time (and whenever no `sgpipe up` serves the data dir)."""
        if self.cli_confirmed:
            try:
                answer = served_store_answer(self.data_dir, sql)
            except urllib.error.HTTPError as error:
                raise AssertionError(f"{sql!r}: {error} {error.read().decode()}") from None
            if answer is not None:
                return answer
        printed = self.sgpipe_query(sql)
        self.cli_confirmed = True
        return printed

    def sgpipe_query(self, sql: str) -> str:
        result = self._sgpipe_query_process(sql)
        assert result.returncode == 0, result.stderr.decode()
        return result.stdout.decode()

    def _sgpipe_query_process(self, sql: str) -> subprocess.CompletedProcess[bytes]:
        return forked.run(
            [*SGPIPE, "query", "--config", str(self.config), "--data-dir", str(self.data_dir), sql],
            capture_output=True,
            timeout=60,
            check=False,
        )

    def wait_for(self, sql: str, expected: str, timeout: float = 60.0) -> None:
        """Until the answer to ``sql`` is ``expected``; a query that fails (the sink has not
        created the table yet: with a durable broker the ingress opens before it) counts as
        not yet. Polled over the served store's HTTP interface from this process (the answer
        `sgpipe query` would print); the first wait of a pipeline ends by `sgpipe query`
        itself printing ``expected``."""
        deadline = time.monotonic() + timeout
        last: str | None = ""
        while time.monotonic() < deadline:
            try:
                last = served_store_answer(self.data_dir, sql)
            except OSError as exc:  # served, not answering yet (a table not created yet)
                last = repr(exc)
            if last is None or (last == expected and not self.cli_confirmed):
                result = self._sgpipe_query_process(sql)
                last = (result.stdout if result.returncode == 0 else result.stderr).decode()
                if result.returncode == 0 and last == expected:
                    self.cli_confirmed = True
                    return
            elif last == expected:
                return
            time.sleep(0.3)
        raise AssertionError(
            f"{sql!r} gave {last!r}, expected {expected!r}\n{self.log.read_text()}"
        )


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def signed_headers() -> dict[str, str]:
    return {
        "Content-Type": "application/json;charset=utf-8",
        "User-Agent": "SendGrid Event API",
        "X-Twilio-Email-Event-Webhook-Signature": SIGNATURE,
        "X-Twilio-Email-Event-Webhook-Timestamp": TIMESTAMP,
    }


def start_pipeline(
    tmp_path: Path,
    env: dict[str, str] | None = None,
    before_start: Callable[[Path], None] | None = None,
    args: tuple[str, ...] = (),
    **overrides: Any,
) -> RunningPipeline:
    """`sgpipe up` as a child process, on free ports, with ``overrides`` merged into the
    config's top-level sections (a list, such as ``webhooks``, replaces the section),
    ``env`` added to its environment and ``args`` to its command line. ``before_start`` gets
    the config file once written (to edit it as a user would, e.g. with `sgpipe oauth client
    create --config`)."""
    document: dict[str, Any] = {
        "webhooks": [{"name": "main", "public_keys": [PUBLIC_KEY], "timestamp_tolerance": 0}],
        "embedded": {"kafka_port": 0, "clickhouse_http_port": 0},
        "kafka": dict(FAST_GROUP_SETTINGS),
        # Off, so that a retried batch reaches ClickHouse: exactness must come from there.
        "processor": {"dedup_window": 0},
        "sink": {"batch_max_seconds": 0.2},
        "logging": {"format": "json"},
    }
    for section, values in overrides.items():
        merged = values if isinstance(values, list) else {**document.get(section, {}), **values}
        document[section] = merged
    config = tmp_path / "sgpipe.yaml"
    config.write_text(yaml.safe_dump(document))
    if before_start is not None:
        before_start(config)
    port = free_port()
    log = tmp_path / "sgpipe-up.log"
    data_dir = tmp_path / "data"
    with log.open("wb") as output:
        process = forked.Popen(
            [
                *SGPIPE,
                "up",
                "--config",
                str(config),
                "--data-dir",
                str(data_dir),
                "--port",
                str(port),
                *args,
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    return RunningPipeline(process, f"http://127.0.0.1:{port}", data_dir, config, log)


def stop_pipeline(running: RunningPipeline) -> None:
    if running.process.poll() is None:
        running.process.send_signal(signal.SIGTERM)
        try:
            running.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            running.process.kill()
            running.process.wait()


@pytest.fixture
def pipeline(tmp_path: Path) -> Iterator[RunningPipeline]:
    running = start_pipeline(tmp_path)
    try:
        _wait_until_serving(running)
        yield running
    finally:
        stop_pipeline(running)


def _wait_until_serving(running: RunningPipeline) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if running.process.poll() is not None:
            raise AssertionError(f"sgpipe up exited early:\n{running.log.read_text()}")
        try:
            with urllib.request.urlopen(f"{running.base_url}/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(
        f"sgpipe up did not serve within {START_TIMEOUT}s:\n{running.log.read_text()}"
    )


def test_signed_vector_becomes_exactly_one_row(pipeline: RunningPipeline) -> None:
    url = f"{pipeline.base_url}/webhooks/main"

    status, headers, _ = post(url, BODY, signed_headers())
    assert status == 200
    pipeline.wait_for("SELECT count() FROM email_events FINAL", "1\n")
    row = pipeline.query(
        "SELECT webhook, event, email, sg_event_id, sg_message_id, smtp_id, event_time, "
        "category, custom_args, request_id FROM email_events FINAL"
    )
    assert row.rstrip("\n").split("\t") == [
        "main",
        "dropped",
        "hello@world.com",
        "ZHJvcC0xMDk5NDkxOS1MUnpYbF9OSFN0T0doUTRrb2ZTbV9BLTA",
        "LRzXl_NHStOGhQ4kofSm_A.filterdrecv-p3mdw1-756b745b58-kmzbl-18-5F5FC76C-9.0",
        "<LRzXl_NHStOGhQ4kofSm_A@ismtpd0039p1iad1.sendgrid.net>",
        "2020-09-14 19:41:32.000",
        "[]",
        "{}",
        headers["X-Request-Id"],
    ]
    raw = pipeline.query("SELECT raw FROM email_events FINAL")
    assert json.loads(raw.replace("\\\\", "\\"))["reason"] == "Bounced Address"

    # SendGrid retries: the same signed batch again. The newer copy replaces the older one.
    status, retry_headers, _ = post(url, BODY, signed_headers())
    assert status == 200
    retry_id = retry_headers["X-Request-Id"]
    pipeline.wait_for(
        f"SELECT count() FROM email_events FINAL WHERE request_id = '{retry_id}'", "1\n"
    )
    assert pipeline.query("SELECT count() FROM email_events FINAL") == "1\n"

    # A tampered body is refused before anything is stored.
    tampered = BODY.replace(b"dropped", b"delivered")
    status, tampered_headers, body = post(url, tampered, signed_headers())
    assert status == 401
    assert json.loads(body)["error"] == "invalid_signature"
    assert pipeline.query("SELECT count() FROM email_events FINAL") == "1\n"
    tampered_id = tampered_headers["X-Request-Id"]
    assert pipeline.query(
        f"SELECT count() FROM email_events WHERE request_id = '{tampered_id}'"
    ) == ("0\n")

    # An unknown webhook is a 404.
    status, _, _ = post(f"{pipeline.base_url}/webhooks/other", BODY, signed_headers())
    assert status == 404

    # The embedded store needs credentials: the reader can read, not write.
    state_path = pipeline.data_dir / "sgpipe-up.json"
    state = json.loads(state_path.read_text())
    credentials = load_credentials(pipeline.data_dir)
    reader = credentials.reader
    auth = {"Authorization": aiohttp.encode_basic_auth(reader.name, reader.password)}
    query_url = f"{state['clickhouse_url']}/?database=sgpipe"
    status, _, body = post(query_url, b"SELECT count() FROM email_events FINAL", auth)
    assert (status, body) == (200, b"1\n")
    status, _, body = post(query_url, b"DROP TABLE email_events", auth)
    assert status == 403, body
    status, _, _ = post(query_url, b"SELECT 1", {})
    assert status == 401
    # Its secrets stay in the credentials file, private like the state file.
    for path in (state_path, credentials_file(pipeline.data_dir)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    passwords = [user.password for user in credentials.users]
    assert not [secret for secret in passwords if secret in state_path.read_text()]

    # A second `sgpipe up` on the same data dir is refused in one line before it starts
    # anything (its ports are all free: only the data dir is in the way).
    second = forked.run(
        [
            *SGPIPE,
            "up",
            "--config",
            str(pipeline.config),
            "--data-dir",
            str(pipeline.data_dir),
            "--port",
            str(free_port()),
            "--log-format",
            "console",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert second.returncode == 2
    assert second.stderr == (
        f"sgpipe: data dir {pipeline.data_dir} is in use by another sgpipe up "
        f"(pid {pipeline.process.pid})\n"
    )

    # SIGTERM drains and stops everything, the broker child included; the store stays readable.
    broker_host, broker_port = state["kafka_bootstrap_servers"].split(":")
    pipeline.process.send_signal(signal.SIGTERM)
    assert pipeline.process.wait(timeout=60) == 0, pipeline.log.read_text()
    assert not (pipeline.data_dir / "sgpipe-up.json").exists()
    with pytest.raises(OSError):
        socket.create_connection((broker_host, int(broker_port)), timeout=2).close()
    assert pipeline.query("SELECT count() FROM email_events FINAL") == "1\n"
    log = pipeline.log.read_text()
    assert not [secret for secret in passwords if secret in log]
    # One log stream: every line it wrote (JSON mode) parses, library lines included.
    events = [json.loads(line) for line in pipeline.log.read_text().splitlines()]
    assert {"embedded broker started", "send SendGrid events to", "stopped"} <= {
        event["event"] for event in events
    }


def test_ingress_takes_no_batch_while_the_sink_cannot_reach_clickhouse(tmp_path: Path) -> None:
    # Found in review: the ingress used to answer 200 before the sink had started; when the
    # sink then failed, the in-memory broker was stopped with the accepted batch in it. The
    # rule holds for the in-memory broker, where an acknowledged batch lives only until the
    # stages have written it (the durable broker keeps it: see the next test).
    unreachable = f"http://127.0.0.1:{free_port()}"
    running = start_pipeline(
        tmp_path,
        clickhouse={"url": unreachable},
        embedded={"kafka_port": 0, "clickhouse_http_port": 0, "broker_storage": "memory"},
    )
    try:
        deadline = time.monotonic() + 30
        while b"connecting to ClickHouse failed; retrying" not in running.log.read_bytes():
            assert time.monotonic() < deadline, running.log.read_text()
            assert running.process.poll() is None, running.log.read_text()
            time.sleep(0.2)
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{running.base_url}/healthz", timeout=2)
        with pytest.raises(OSError):  # refused: SendGrid keeps the batch and retries
            post(f"{running.base_url}/webhooks/main", BODY, signed_headers())
    finally:
        running.process.send_signal(signal.SIGTERM)
        assert running.process.wait(timeout=60) == 0, running.log.read_text()


def test_with_the_durable_broker_the_ingress_acknowledges_while_clickhouse_is_down(
    tmp_path: Path,
) -> None:
    # The durable broker keeps what the ingress acknowledged, so the ingress opens as soon as
    # the broker is up; the pipeline's readiness (on the same port) names what is missing.
    unreachable = f"http://127.0.0.1:{free_port()}"
    running = start_pipeline(tmp_path, clickhouse={"url": unreachable})
    try:
        _wait_until_serving(running)
        status, _, _ = post(f"{running.base_url}/webhooks/main", BODY, signed_headers())
        assert status == 200
        deadline = time.monotonic() + 30
        while True:  # until the sink reports (its health endpoint comes up as it starts)
            with pytest.raises(urllib.error.HTTPError) as not_ready:
                urllib.request.urlopen(f"{running.base_url}/readyz", timeout=10)
            assert not_ready.value.code == 503
            checks = json.loads(not_ready.value.read())["checks"]
            if "sink.kafka" in checks or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert checks["ingest.kafka"]["ok"]
        assert not checks["up.children"]["ok"]
        assert checks["up.children"]["detail"].endswith("sink")
        assert not checks["sink.kafka"]["ok"]  # the sink has not started consuming
        # The processor carries the batch on to the events topic, where it waits for the sink.
        deadline = time.monotonic() + 60
        while metric(http_get(f"{running.base_url}/metrics")[1], PRODUCED, stage="process") < 1:
            assert time.monotonic() < deadline, running.log.read_text()
            time.sleep(0.3)
    finally:
        running.process.send_signal(signal.SIGTERM)
        assert running.process.wait(timeout=90) == 0, running.log.read_text()
    # The acknowledged batch waits in the broker; the stop report says so.
    report = [
        json.loads(line)
        for line in running.log.read_text().splitlines()
        if '"stopped in order"' in line
    ]
    assert report[0]["left"] == {"raw_batches": 0, "raw_events": 0, "events": 1, "exact": True}
    assert report[0]["report"].endswith(
        f"1 event not yet written to ClickHouse are in the embedded broker at "
        f"{running.data_dir / 'broker'} and will be processed at the next `sgpipe up`"
    )
    # The next start keeps that promise, and says so: how big the backlog is, then once that
    # it is drained; the sink says what it wrote.
    restarted = start_pipeline(
        tmp_path, sink={"batch_max_seconds": 0.2, "progress_log_seconds": 0.1}
    )
    try:
        _wait_until_serving(restarted)
        restarted.wait_for("SELECT count() FROM email_events FINAL", "1\n")
        deadline = time.monotonic() + 60
        while b'"backlog drained"' not in restarted.log.read_bytes():
            assert time.monotonic() < deadline, restarted.log.read_text()
            time.sleep(0.3)
    finally:
        stop_pipeline(restarted)
    events = [
        json.loads(line) for line in restarted.log.read_text().splitlines() if line.startswith("{")
    ]
    (at_start,) = [event for event in events if event["event"] == "backlog at start"]
    assert at_start["backlog"] == {"raw_batches": 0, "raw_events": 0, "events": 1, "exact": True}
    assert at_start["report"].startswith("backlog at start: 0 acknowledged raw batches")
    (drained,) = [event for event in events if event["event"] == "backlog drained"]
    assert drained["report"].startswith("backlog drained: the 0 raw batches (0 events) and 1 event")
    wrote = [event for event in events if event["event"] == "wrote" and event["stage"] == "sink"]
    assert sum(event["records"] for event in wrote) >= 1, "the sink never said what it wrote"
    # The supervisor's own lines are kept in the data dir too, beside its children's.
    kept = [
        json.loads(line)
        for line in (restarted.data_dir / "logs" / "up.log").read_text().splitlines()
    ]
    assert {"backlog at start", "backlog drained", "stopped"} <= {e["event"] for e in kept}
    assert all(entry["stage"] == "up" for entry in kept)


def test_no_password_in_any_log_line_or_the_state_file(tmp_path: Path) -> None:
    # A password in clickhouse.url (and one in the environment) while ClickHouse is down:
    # every retry warning names the URL, none may show the password.
    url_password, env_password = "Url-Pa55word-x9", "Env-Pa55word-y8"
    port = free_port()
    unreachable = f"http://sgpipe:{url_password}@127.0.0.1:{port}/?password={url_password}"
    running = start_pipeline(
        tmp_path, env={"SGPIPE_CLICKHOUSE__PASSWORD": env_password}, clickhouse={"url": unreachable}
    )
    try:
        deadline = time.monotonic() + 30
        while running.log.read_bytes().count(b"connecting to ClickHouse failed; retrying") < 3:
            assert time.monotonic() < deadline, running.log.read_text()
            assert running.process.poll() is None, running.log.read_text()
            time.sleep(0.2)
        state_path = running.data_dir / "sgpipe-up.json"
        assert stat.S_IMODE(state_path.stat().st_mode) == 0o600
        state = state_path.read_text()
        assert f"http://sgpipe:***@127.0.0.1:{port}/?password=***" in state
    finally:
        running.process.send_signal(signal.SIGTERM)
        assert running.process.wait(timeout=60) == 0, running.log.read_text()
    log = running.log.read_text()
    assert f"http://sgpipe:***@127.0.0.1:{port}" in log  # the URL is there, redacted
    # The raw-record HMAC key generated for the data dir is not logged either.
    raw_auth_secret = json.loads((running.data_dir / "raw-auth-key.json").read_text())["secret"]
    for secret in (url_password, env_password, raw_auth_secret):
        assert secret not in log
        assert secret not in state


def test_unsafe_credentials_file_stops_up_before_anything_starts(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    load_or_create_credentials(data_dir)  # what the first `sgpipe up` does
    credentials_file(data_dir).chmod(0o644)  # then, say, copied with the wrong umask
    config = tmp_path / "sgpipe.yaml"
    config.write_text(yaml.safe_dump({"embedded": {"kafka_port": 0, "clickhouse_http_port": 0}}))
    result = forked.run(
        [*SGPIPE, "up", "--config", str(config), "--data-dir", str(data_dir), "--port", "0"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr.decode()
    assert "chmod 600" in result.stderr.decode()
    assert b"embedded broker started" not in result.stderr
