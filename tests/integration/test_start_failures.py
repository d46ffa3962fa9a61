"""Every way `sgpipe` can fail to start, as a user meets it: its exit code and the exact line it
prints. Conflicts exit 2 with one line naming the setting to change and leave nothing behind;
an unreachable Kafka is retried, then one error line and exit 1, never a traceback.

A refusal that comes before anything starts runs in-process through the CLI's entry point
(tests/cli_in_process.py: the same exit code and stderr, without a Python start per case); what
runs a stage -- retries, signals, the process's own exit -- runs as a real process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cli_in_process import CliResult, run_sgpipe_in_process
from tests.ports import free_port
from tests.raw_auth_support import RAW_AUTH_DOCUMENT
from tests.sendgrid_vector import BODY, PUBLIC_KEY, SIGNATURE, TIMESTAMP

SGPIPE = [sys.executable, "-m", "sgpipe"]


def environment(**variables: str) -> dict[str, str]:
    environ = {name: value for name, value in os.environ.items() if not name.startswith("SGPIPE_")}
    return {**environ, "PYTHONUNBUFFERED": "1", **variables}


def sgpipe(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SGPIPE, *args],
        env=env if env is not None else environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def sgpipe_in_process(monkeypatch: pytest.MonkeyPatch) -> Callable[..., CliResult]:
    """``sgpipe_in_process(*argv, env={SGPIPE_*: ...})``: a refusal to start, in-process."""

    def run(*argv: str, env: dict[str, str] | None = None) -> CliResult:
        return run_sgpipe_in_process(monkeypatch, *argv, env=env)

    return run


def write_config(tmp_path: Path, **sections: Any) -> Path:
    document: dict[str, Any] = {
        "webhooks": [{"name": "main", "public_keys": [PUBLIC_KEY]}],
        "ingest": {"port": free_port()},
        "embedded": {"kafka_port": free_port(), "clickhouse_http_port": free_port()},
        "raw_auth": RAW_AUTH_DOCUMENT,
    }
    for section, values in sections.items():
        document[section] = {**document.get(section, {}), **values}
    path = tmp_path / "sgpipe.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that contain ``text`` (a port only this test uses)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in command:
            found.append(command)
    return found


@pytest.fixture
def listening() -> Iterator[int]:
    """A port something else is already listening on."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


# --- sgpipe up: each conflict is one line, exit 2, nothing started --------------------------


@pytest.mark.parametrize(
    ("section", "key", "variable", "flag"),
    [
        ("ingest", "port", "SGPIPE_INGEST__PORT", " (or --port)"),
        ("embedded", "kafka_port", "SGPIPE_EMBEDDED__KAFKA_PORT", ""),
        ("embedded", "clickhouse_http_port", "SGPIPE_EMBEDDED__CLICKHOUSE_HTTP_PORT", ""),
    ],
)
def test_a_busy_port_is_one_line_naming_the_setting(
    tmp_path: Path,
    listening: int,
    section: str,
    key: str,
    variable: str,
    flag: str,
    sgpipe_in_process: Callable[..., CliResult],
) -> None:
    # The ingress listens on 0.0.0.0 by default; the held port is on 127.0.0.1, which clashes
    # with both, so the default host is kept.
    config = write_config(tmp_path, **{section: {key: listening}})
    ports = yaml.safe_load(config.read_text())
    data_dir = tmp_path / "data"

    result = sgpipe_in_process(
        "up", "--config", str(config), "--data-dir", str(data_dir), "--log-format", "console"
    )

    setting = f"{section}.{key}"
    assert result.returncode == 2
    assert result.stderr == (
        f"sgpipe: {setting} {listening} is in use; set {setting} or {variable}{flag}\n"
    )
    assert result.stdout == ""
    # Nothing started, nothing left behind: no data dir, no broker on the configured port.
    assert not data_dir.exists()
    assert processes_mentioning(f"127.0.0.1:{ports['embedded']['kafka_port']}") == []


def test_a_busy_port_in_json_mode_is_one_json_line(
    tmp_path: Path, listening: int, sgpipe_in_process: Callable[..., CliResult]
) -> None:
    config = write_config(tmp_path, embedded={"kafka_port": listening})

    result = sgpipe_in_process("up", "--config", str(config), "--data-dir", str(tmp_path / "data"))

    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["event"] == (
        f"embedded.kafka_port {listening} is in use; "
        "set embedded.kafka_port or SGPIPE_EMBEDDED__KAFKA_PORT"
    )
    assert event["level"] == "error"
    assert event["exit_code"] == 2


def test_two_settings_on_one_port(
    tmp_path: Path, sgpipe_in_process: Callable[..., CliResult]
) -> None:
    port = free_port()
    config = write_config(tmp_path, ingest={"port": port}, embedded={"kafka_port": port})

    result = sgpipe_in_process(
        "up", "--config", str(config), "--data-dir", str(tmp_path / "d"), "--log-format", "console"
    )

    assert result.returncode == 2
    assert result.stderr == (
        f"sgpipe: ingest.port and embedded.kafka_port are both {port}; "
        "set embedded.kafka_port or SGPIPE_EMBEDDED__KAFKA_PORT\n"
    )


def test_a_data_dir_in_use_is_one_line_naming_the_holder(
    tmp_path: Path, sgpipe_in_process: Callable[..., CliResult]
) -> None:
    data_dir = tmp_path / "data"
    # Another process holding the lock exactly as `sgpipe up` does.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from sgpipe.preflight import lock_data_dir; "
            "lock_data_dir(Path(sys.argv[1]), 'up'); print('locked', flush=True); time.sleep(120)",
            str(data_dir),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"
        config = write_config(tmp_path)
        files_before = sorted(data_dir.rglob("*"))

        result = sgpipe_in_process(
            "up", "--config", str(config), "--data-dir", str(data_dir), "--log-format", "console"
        )

        assert result.returncode == 2
        assert result.stderr == (
            f"sgpipe: data dir {data_dir} is in use by another sgpipe up (pid {holder.pid})\n"
        )
        assert sorted(data_dir.rglob("*")) == files_before
    finally:
        holder.kill()
        holder.communicate()


@pytest.mark.parametrize(
    ("args", "variables", "line"),
    [
        pytest.param(
            [],
            {"SGPIPE_INGEST__PORT": "abc"},
            "SGPIPE_INGEST__PORT: Input should be a valid integer, unable to parse string as an "
            "integer",
            id="bad-variable",
        ),
        pytest.param(
            ["--config", "{tmp}/missing.yaml"],
            {},
            "cannot read config file {tmp}/missing.yaml: No such file or directory",
            id="missing-config",
        ),
        pytest.param(
            [],
            {"SGPIPE_CONFIG": "{tmp}/missing.yaml"},
            "cannot read config file {tmp}/missing.yaml: No such file or directory",
            id="missing-config-from-variable",
        ),
        pytest.param(
            [],
            {"SGPIPE_WEBHOOKS__MARKETING__PUBLIC_KEYS": PUBLIC_KEY},
            "SGPIPE_WEBHOOKS__MARKETING__PUBLIC_KEYS: no webhook named 'marketing' is declared "
            "(declared: none); declare it under `webhooks:` in the config file, or declare all "
            "webhooks in SGPIPE_WEBHOOKS as JSON",
            id="undeclared-webhook",
        ),
        pytest.param(
            [],
            {"SGPIPE_WEBHOOKS": '[{"name": "main"}]'},
            "webhooks[main]: no public_keys; set them, set auth: token with OAuth clients, or "
            "set allow_unsigned: true to accept unauthenticated POSTs deliberately",
            id="webhook-without-keys",
        ),
    ],
)
def test_a_configuration_error_is_one_line(
    tmp_path: Path,
    args: list[str],
    variables: dict[str, str],
    line: str,
    sgpipe_in_process: Callable[..., CliResult],
) -> None:
    def fill(text: str) -> str:
        return text.replace("{tmp}", str(tmp_path))

    result = sgpipe_in_process(
        "up",
        "--data-dir",
        str(tmp_path / "data"),
        "--log-format",
        "console",
        *(fill(arg) for arg in args),
        env={name: fill(value) for name, value in variables.items()},
    )

    assert result.returncode == 2
    assert result.stderr == f"sgpipe: {fill(line)}\n"
    assert not (tmp_path / "data").exists()


def test_sgpipe_ingest_needs_a_broker_address(
    sgpipe_in_process: Callable[..., CliResult],
) -> None:
    result = sgpipe_in_process("ingest", "--log-format", "console")
    assert result.returncode == 2
    assert result.stderr == (
        "sgpipe: kafka.bootstrap_servers must be set (or SGPIPE_KAFKA__BOOTSTRAP_SERVERS); "
        "only `sgpipe up` embeds a broker\n"
    )


def test_sgpipe_ingest_with_its_port_busy(
    listening: int, sgpipe_in_process: Callable[..., CliResult]
) -> None:
    result = sgpipe_in_process(
        "ingest",
        "--port",
        str(listening),
        "--log-format",
        "console",
        env={"SGPIPE_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1", "SGPIPE_INGEST__HOST": "127.0.0.1"},
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"sgpipe: ingest.port {listening} is in use; "
        "set ingest.port or SGPIPE_INGEST__PORT (or --port)\n"
    )


# --- Kafka unreachable: retried, then one error line and exit 1 ------------------------------

KUBERNETES_SERVICE_LINKS = {
    "SGPIPE_PORT": "tcp://10.96.0.12:8080",
    "SGPIPE_SERVICE_HOST": "10.96.0.12",
    "SGPIPE_SERVICE_PORT": "8080",
    "SGPIPE_PORT_8080_TCP_ADDR": "10.96.0.12",
}


def unreachable_kafka(**more: str) -> dict[str, str]:
    variables = {
        "SGPIPE_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
        "SGPIPE_KAFKA__START_TIMEOUT_SECONDS": "2",
        "SGPIPE_CLICKHOUSE__URL": f"http://127.0.0.1:{free_port()}",
        "SGPIPE_INGEST__PORT": str(free_port()),
        "SGPIPE_RAW_AUTH__KEYS": json.dumps(RAW_AUTH_DOCUMENT["keys"]),
        **KUBERNETES_SERVICE_LINKS,
    }
    return environment(**{**variables, **more})


def test_ingest_with_kafka_unreachable_retries_then_exits_with_one_error_line() -> None:
    result = sgpipe("ingest", "--log-format", "json", env=unreachable_kafka())

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines()]
    # The service links did not stop it: one warning, then on to Kafka.
    assert events[0]["event"].startswith("ignored SGPIPE_* environment variables")
    assert events[0]["variables"] == sorted(KUBERNETES_SERVICE_LINKS)
    retries = [event for event in events if event["event"] == "kafka not reachable; retrying"]
    assert retries
    assert retries[0]["action"] == "create topics"
    assert retries[0]["error"].startswith("KafkaConnectionError: Unable to bootstrap")
    last = events[-1]
    assert last["event"] == "sgpipe stopped on an error"
    assert last["level"] == "error"
    assert last["error"].startswith("StartTimeout: kafka at 127.0.0.1:")
    assert "raise kafka.start_timeout_seconds" in last["error"]
    assert "exception" not in last  # no traceback below --log-level debug
    assert max(len(line) for line in result.stderr.splitlines()) < 2000


@pytest.mark.parametrize("command", ["process", "sink"])
def test_consuming_stages_with_kafka_unreachable_retry_until_stopped(command: str) -> None:
    # The stage runner's choice: keep retrying, serving /readyz 503, until stopped.
    process = subprocess.Popen(
        [*SGPIPE, command, "--log-format", "json"],
        env=unreachable_kafka(SGPIPE_PROCESSOR__HEALTH_PORT="0", SGPIPE_SINK__HEALTH_PORT="0"),
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    lines = []
    for line in process.stderr:
        lines.append(line)
        if "failed; retrying" in line:
            break
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=60)
    assert process.returncode == 0
    output = "".join(lines) + rest
    assert "Traceback" not in output
    events = [json.loads(line) for line in output.splitlines()]
    assert events[0]["variables"] == sorted(KUBERNETES_SERVICE_LINKS)
    retry = next(event for event in events if event["event"].endswith("failed; retrying"))
    assert retry["error"].startswith("KafkaConnectionError: Unable to bootstrap")


def test_the_traceback_is_there_at_debug_level() -> None:
    result = sgpipe(
        "ingest", "--log-level", "debug", "--log-format", "json", env=unreachable_kafka()
    )

    assert result.returncode == 1
    last = json.loads(result.stderr.splitlines()[-1])
    assert last["event"] == "sgpipe stopped on an error"
    frames = last["exception"][0]["frames"]
    assert frames
    assert all("locals" not in frame or not frame["locals"] for frame in frames)


def test_a_stop_while_waiting_for_kafka_exits_cleanly() -> None:
    process = subprocess.Popen(
        [*SGPIPE, "ingest", "--log-format", "json"],
        env=unreachable_kafka(SGPIPE_KAFKA__START_TIMEOUT_SECONDS="300"),
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    lines = []
    for line in process.stderr:
        lines.append(line)
        if "kafka not reachable; retrying" in line:
            break
    process.send_signal(signal.SIGTERM)
    _, remaining = process.communicate(timeout=30)
    assert process.returncode == 0
    assert "Traceback" not in "".join(lines) + remaining


# --- sgpipe ingest against a real broker -----------------------------------------------------


@pytest.mark.kafka
def test_sgpipe_ingest_serves_once_kafka_answers(
    kafka_bootstrap_servers: str, unique_name: str, tmp_path: Path
) -> None:
    port = free_port()
    config = write_config(
        tmp_path,
        ingest={"port": port, "host": "127.0.0.1"},
        kafka={
            "bootstrap_servers": kafka_bootstrap_servers,
            "topics": {
                "raw": f"raw-{unique_name}",
                "events": f"events-{unique_name}",
                "dead_letter": f"dlq-{unique_name}",
            },
        },
    )
    process = subprocess.Popen(
        [*SGPIPE, "ingest", "--config", str(config), "--log-format", "json"],
        env=environment(),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        lines = []
        for line in process.stderr:
            lines.append(line)
            if "ingress listening" in line:
                break
        listening = json.loads(lines[-1])
        assert listening["event"] == "ingress listening"
        assert listening["port"] == port
        assert listening["webhooks"] == ["main"]

        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/webhooks/main",
            data=BODY,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "X-Twilio-Email-Event-Webhook-Signature": SIGNATURE,
                "X-Twilio-Email-Event-Webhook-Timestamp": TIMESTAMP,
            },
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
            assert json.loads(response.read())["status"] == "accepted"
    finally:
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=60)
    assert process.returncode == 0
    all_lines = [*lines, *rest.splitlines()]
    events = [json.loads(line) for line in all_lines]
    names = [event["event"] for event in events]
    # "stopped", then the stop report a supervisor reads: nothing was in flight at SIGTERM.
    assert names[-2:] == ["stopped", "stop report"]
    assert events[-1]["stage"] == "ingest"
    assert events[-1]["acknowledged"] == 0
    assert not [event for event in events if "Running on" in event["event"]]


def test_python_dash_m_sgpipe_is_the_command() -> None:
    result = sgpipe("--version")
    assert result.returncode == 0
    from importlib import metadata

    assert result.stdout == f"sgpipe {metadata.version('sgpipe')}\n"


def test_an_unsigned_webhook_is_warned_about_at_every_start() -> None:
    result = sgpipe(
        "ingest",
        "--log-format",
        "json",
        env=unreachable_kafka(
            SGPIPE_WEBHOOKS='[{"name": "open", "allow_unsigned": true}]',
            SGPIPE_KAFKA__START_TIMEOUT_SECONDS="0.1",
        ),
    )
    warnings = [
        event
        for event in map(json.loads, result.stderr.splitlines())
        if event["event"].startswith("webhook accepts unsigned requests")
    ]
    assert [(event["level"], event["webhook"]) for event in warnings] == [("warning", "open")]


@pytest.mark.parametrize("command", ["ingest", "process"])
def test_a_stage_without_a_raw_record_key_refuses_to_start(
    command: str, sgpipe_in_process: Callable[..., CliResult]
) -> None:
    variables = {
        "SGPIPE_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
        "SGPIPE_INGEST__HOST": "127.0.0.1",
        "SGPIPE_INGEST__PORT": str(free_port()),
    }
    result = sgpipe_in_process(command, "--log-format", "console", env=variables)
    assert result.returncode == 2
    assert result.stderr.startswith("sgpipe: raw_auth.keys is empty: ")
    assert "raw_auth.allow_unauthenticated" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_running_without_raw_record_keys_is_warned_about_at_every_start() -> None:
    variables = unreachable_kafka(
        SGPIPE_RAW_AUTH__ALLOW_UNAUTHENTICATED="true", SGPIPE_KAFKA__START_TIMEOUT_SECONDS="0.1"
    )
    del variables["SGPIPE_RAW_AUTH__KEYS"]
    result = sgpipe("ingest", "--log-format", "json", env=variables)
    warnings = [
        event
        for event in map(json.loads, result.stderr.splitlines())
        if event.get("setting") == "raw_auth.allow_unauthenticated"
    ]
    assert [(event["level"], event["stage"]) for event in warnings] == [("warning", "ingest")]
    assert warnings[0]["event"].startswith("raw records are not authenticated")
