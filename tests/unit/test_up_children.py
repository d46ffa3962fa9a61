"""What `sgpipe up` gives its children: their settings (secrets only where needed), their
environment, and how their output reaches the one log stream."""

from __future__ import annotations

import io
import json
import stat
from pathlib import Path

from pydantic import SecretStr

from sgpipe.runtime.settings import Settings, read_settings
from sgpipe.up.configs import child_environment, stage_settings, write_config
from sgpipe.up.demo import DEMO_QUERY, query_command, with_demo_webhook
from sgpipe.up.logstream import LogStream, RotatingLog

BASE = Settings.model_validate(
    {
        "kafka": {
            "bootstrap_servers": "127.0.0.1:9092",
            "sasl_mechanism": "PLAIN",
            "sasl_username": "u",
            "sasl_password": "kafka-secret",
        },
        "clickhouse": {"url": "http://sgpipe:ch-secret@127.0.0.1:8123", "password": "pw"},
        "webhooks": [{"name": "main", "public_keys": ["K1"]}],
        "logging": {"format": "console", "level": "debug"},
    }
)


def test_every_child_reads_back_exactly_what_it_was_given(tmp_path: Path) -> None:
    for stage in ("ingest", "process", "sink", "clickhouse"):
        settings = stage_settings(BASE, stage, health_peers=("http://127.0.0.1:1",))
        path = write_config(tmp_path, stage, settings)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert read_settings(path, {}).settings == settings


def test_only_the_sink_gets_clickhouse_credentials_every_child_kafka_ones() -> None:
    sink = stage_settings(BASE, "sink")
    assert sink.clickhouse.url == "http://sgpipe:ch-secret@127.0.0.1:8123"
    assert sink.clickhouse.password.get_secret_value() == "pw"
    for stage in ("ingest", "process", "clickhouse"):
        settings = stage_settings(BASE, stage)
        assert settings.clickhouse.url is None
        assert settings.clickhouse.password == SecretStr("")
        assert settings.kafka.sasl_password == SecretStr("kafka-secret")


def test_children_log_json_and_the_consuming_ones_serve_health_on_a_free_loopback_port() -> None:
    for stage in ("process", "sink"):
        settings = stage_settings(BASE, stage)
        section = settings.processor if stage == "process" else settings.sink
        assert (section.health_host, section.health_port) == ("127.0.0.1", 0)
        assert settings.logging.format == "json"
        assert settings.logging.level == "debug"
    ingest = stage_settings(BASE, "ingest", health_peers=("http://127.0.0.1:5",), ingest_port=81)
    assert ingest.ingest.health_peers == ("http://127.0.0.1:5",)
    assert ingest.ingest.port == 81


def test_the_childrens_environment_has_no_sgpipe_variables() -> None:
    environ = {"PATH": "/bin", "SGPIPE_INGEST__PORT": "1", "sgpipe_config": "x", "HOME": "/h"}
    assert child_environment(environ) == {"PATH": "/bin", "HOME": "/h", "PYTHONUNBUFFERED": "1"}


def test_json_lines_pass_through_keeping_or_gaining_their_stage(tmp_path: Path) -> None:
    out = io.StringIO()
    stream = LogStream(tmp_path, out, json_output=True)
    own = b'{"stage": "sink", "event": "consuming", "level": "info"}'
    assert stream.forward("sink", "sink", own)["event"] == "consuming"
    stream.forward("ingest", "ingest", b'{"event": "accepted raw batch", "bytes": 3}\n')
    stream.forward("clickhouse", "up", b"Cannot lock file /x/status")
    stream.forward("ingest", "ingest", b"{}")
    stream.close()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[0] == {"stage": "sink", "event": "consuming", "level": "info"}
    assert lines[1] == {"stage": "ingest", "event": "accepted raw batch", "bytes": 3}
    assert lines[2]["event"] == "Cannot lock file /x/status"
    assert (lines[2]["stage"], lines[2]["logger"]) == ("up", "clickhouse.output")
    assert lines[3] == {"stage": "ingest"}
    # Each child's lines are in its own file too.
    assert (tmp_path / "ingest.log").read_text().count("\n") == 2
    assert json.loads((tmp_path / "sink.log").read_text()) == lines[0]


def test_console_mode_renders_child_lines_readably(tmp_path: Path) -> None:
    out = io.StringIO()
    stream = LogStream(tmp_path, out, json_output=False)
    stream.forward("process", "process", b'{"event": "consuming", "level": "info", "topic": "t"}')
    stream.close()
    text = out.getvalue()
    assert "consuming" in text and "stage=process" in text and "topic=t" in text
    assert not text.startswith("{")


def test_a_child_log_is_rotated_once_past_its_limit(tmp_path: Path) -> None:
    log = RotatingLog(tmp_path / "sink.log", limit=100)
    for number in range(30):
        log.write(f"line {number:02d}\n".encode())
    log.close()
    current = (tmp_path / "sink.log").read_text().splitlines()
    previous = (tmp_path / "sink.log.1").read_text().splitlines()
    assert current[-1] == "line 29"
    assert len((tmp_path / "sink.log").read_bytes()) <= 100
    assert previous[-1] == f"line {int(current[0][5:]) - 1:02d}"


def test_the_demo_key_joins_the_demo_webhook_or_makes_one() -> None:
    from sgpipe.simulator import generate_private_key, public_key_base64

    key = generate_private_key()
    public = public_key_base64(key)
    added = with_demo_webhook(BASE, key)
    assert [(w.name, w.public_keys) for w in added.webhooks] == [
        ("main", ("K1",)),
        ("demo", (public,)),
    ]
    example = BASE.model_copy(
        update={"webhooks": (BASE.webhooks[0].model_copy(update={"name": "demo"}),)}
    )
    joined = with_demo_webhook(example, key)
    assert joined.webhooks[0].public_keys == ("K1", public)  # the README's test key still works
    assert with_demo_webhook(joined, key) == joined


def test_the_demo_query_is_printed_as_the_user_would_type_it() -> None:
    command = query_command(".venv/bin/sgpipe", Path("sgpipe-data"), Path("examples/sgpipe.yaml"))
    assert command == (
        ".venv/bin/sgpipe query --config examples/sgpipe.yaml --data-dir sgpipe-data "
        f"'{DEMO_QUERY}'"
    )
