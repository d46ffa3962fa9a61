"""Every `sgpipe webhooks` command, in-process, against the SendGrid emulator: what a user sees
(tables, --json, one-line errors, exit codes), what SendGrid ends up holding, what `connect`
writes into the config file, what `check` reports -- and never the API key."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from ingest.oauth import verify_client_secret
from sgpipe.cli import main
from sgpipe.runtime.logs import configure_logging
from sgpipe.runtime.settings import load_settings
from sgpipe.webhooks.client import SERVERS, base_url_for
from sgpipe.webhooks.emulator import EmulatorConfig
from sgpipe.webhooks.fields import EVENT_FIELDS
from tests.webhooks_support import (
    API_KEY,
    RunningEmulator,
    ServerThread,
    running_emulator,
    webhook_receiver,
)

READ_ONLY_KEY = "SG.READONLY-must-never-be-printed.987"


@pytest.fixture
def emulator(monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningEmulator]:
    monkeypatch.setenv("SENDGRID_API_KEY", API_KEY)
    monkeypatch.delenv("SGPIPE_CONFIG", raising=False)
    config = EmulatorConfig(
        api_keys=frozenset({API_KEY, READ_ONLY_KEY}), read_only_keys=frozenset({READ_ONLY_KEY})
    )
    with running_emulator(config) as running:
        yield running


class Cli:
    """`sgpipe webhooks ...` against the emulator; every output checked for the key."""

    def __init__(self, emulator: RunningEmulator, capsys: pytest.CaptureFixture[str]) -> None:
        self.emulator = emulator
        self.capsys = capsys
        self.outputs: list[str] = []
        self.emulator_log = io.StringIO()
        configure_logging(stream=self.emulator_log)

    def __call__(self, *argv: str, api: bool = True) -> tuple[int, str, str]:
        extra = ["--api-base-url", self.emulator.url] if api else []
        try:
            code = main(["webhooks", *argv, *extra])
        finally:
            # main() logs to the captured stream, which pytest closes after the test; the
            # emulator's thread must not log into a closed file then.
            configure_logging(stream=self.emulator_log)
        captured = self.capsys.readouterr()
        self.outputs.append(captured.out + captured.err)
        for secret in (API_KEY, READ_ONLY_KEY):
            assert secret not in captured.out and secret not in captured.err, argv
        return code, captured.out, captured.err

    def json(self, *argv: str, exit_code: int = 0) -> Any:
        code, out, err = self(*argv, "--json")
        assert code == exit_code, err
        return json.loads(out)


@pytest.fixture
def cli(emulator: RunningEmulator, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(emulator, capsys)


def test_create_list_show_update_sign_public_key_delete(cli: Cli) -> None:
    created = cli.json(
        "create",
        "--url",
        "https://hooks.example/webhooks/main",
        "--enabled",
        "--events",
        "bounce,dropped",
        "--friendly-name",
        "Main",
        "--oauth-client-id",
        "client-1",
        "--oauth-client-secret",
        "secret-1",
        "--oauth-token-url",
        "https://auth.example/token",
    )
    webhook_id = created["id"]
    assert created["bounce"] and created["dropped"] and not created["open"]
    assert created["oauth_client_id"] == "client-1" and "oauth_client_secret" not in created

    code, table, _ = cli("list")
    assert code == 0
    assert table.splitlines()[0].split() == [
        "ID", "URL", "ENABLED", "SIGNED", "OAUTH", "EVENTS", "NAME",
    ]  # fmt: skip
    assert webhook_id in table and "bounce,dropped" in table and "(1 of at most 5)" in table

    shown = cli.json("show", webhook_id, "--include", "account_status_change")
    assert shown["account_status_change"] is False and "public_key" not in shown

    updated = cli.json("update", webhook_id, "--open", "--no-bounce", "--friendly-name", "New")
    assert updated["open"] and not updated["bounce"] and updated["dropped"]
    assert updated["url"] == "https://hooks.example/webhooks/main"  # kept: PATCH needs it

    code, out, _ = cli("sign", webhook_id, "--enable")
    assert code == 0 and "signature verification enabled" in out
    key = cli.json("public-key", webhook_id)["public_key"]
    assert key.startswith("MFkw")
    assert cli.json("list")["webhooks"][0]["public_key"] == key
    code, out, _ = cli("public-key", webhook_id)
    assert out.strip() == key

    code, out, _ = cli("sign", webhook_id, "--disable")
    assert code == 0
    code, _, err = cli("public-key", webhook_id)
    assert code == 1 and "is not signed" in err

    code, out, _ = cli("delete", webhook_id)
    assert code == 0 and out.strip() == f"deleted {webhook_id}"
    assert cli.json("list")["webhooks"] == []


def test_test_posts_a_batch_to_the_webhooks_url(cli: Cli) -> None:
    with webhook_receiver() as (receiver_url, received):
        webhook_id = cli.json("create", "--url", f"{receiver_url}/webhooks/main")["id"]
        cli("sign", webhook_id, "--enable")
        code, out, _ = cli("test", webhook_id)
        assert code == 0 and "accepted the test request" in out
        code, _, _ = cli("test", "--url", f"{receiver_url}/webhooks/other")
        assert code == 0
    assert len(received.bodies) == 2
    signed, unsigned = received.headers
    assert "X-Twilio-Email-Event-Webhook-Signature" in signed
    # A URL no webhook has gets an unsigned batch (there is no key to sign with).
    assert "X-Twilio-Email-Event-Webhook-Signature" not in unsigned


@pytest.mark.parametrize("log_level", ["info", "debug"])
def test_each_sendgrid_error_is_one_clear_line(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, log_level: str
) -> None:
    first = cli.json("create", "--url", "https://a.example/webhooks/main")["id"]

    def error(*argv: str) -> str:
        code, out, err = cli(*argv, "--log-level", log_level)
        assert code == 1, (argv, out, err)
        lines = [line for line in err.splitlines() if line.startswith("sgpipe webhooks:")]
        assert len(lines) == 1, err
        return lines[0]

    assert error("create", "--url", "https://a.example/webhooks/main").endswith(
        "Webhook at 'https://a.example/webhooks/main' already exists. Please provide a unique "
        f"URL. (existing webhook id {first})"
    )
    assert error("create", "--url", "not a url").endswith("'not a url' is not a valid url")
    for index in range(4):
        cli("create", "--url", f"https://{index}.example/webhooks/x")
    assert error("create", "--url", "https://6.example/webhooks/x").endswith(
        "You have reached the maximum number of webhooks per your current billing plan."
    )
    assert error("show", "nope") == (
        "sgpipe webhooks: no webhook with id 'nope' (404: Invalid id provided.)"
    )
    monkeypatch.setenv("SENDGRID_API_KEY", "SG.unknown-key-also-secret")
    refused = error("list")
    assert "401" in refused and "SENDGRID_API_KEY" in refused
    assert "SG.unknown-key-also-secret" not in "".join(cli.outputs)
    monkeypatch.setenv("SENDGRID_API_KEY", READ_ONLY_KEY)
    forbidden = error("delete", first)
    assert "403" in forbidden and "permission" in forbidden


def test_the_key_from_the_config_file_is_never_shown(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("SENDGRID_API_KEY")
    config = tmp_path / "sgpipe.yaml"
    config.write_text(
        yaml.safe_dump({"sendgrid": {"api_key": API_KEY, "api_base_url": cli.emulator.url}})
    )
    code, out, _ = cli("list", "--config", str(config), "--log-level", "debug", api=False)
    assert code == 0 and "no Event Webhooks" in out
    # An unreachable server: the error names the server, never the key.
    code, _, err = cli(
        "list", "--config", str(config), "--api-base-url", "http://127.0.0.1:9", api=False
    )
    assert code == 1 and "cannot reach http://127.0.0.1:9" in err
    code, _, err = cli("list", "--config", str(tmp_path / "missing.yaml"), api=False)
    assert code == 2


def test_without_a_key_it_says_where_to_put_one(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SENDGRID_API_KEY")
    code, out, err = cli("list")
    assert code == 2
    assert "no SendGrid API key: set SENDGRID_API_KEY or sendgrid.api_key" in out + err


def test_on_behalf_of_scopes_the_webhooks_to_the_subuser(cli: Cli) -> None:
    cli.json("create", "--url", "https://sub.example/webhooks/a", "--on-behalf-of", "sub1")
    assert len(cli.json("list", "--on-behalf-of", "sub1")["webhooks"]) == 1
    assert cli.json("list")["webhooks"] == []
    assert cli.emulator.exchanges[0].headers["on-behalf-of"] == "sub1"


def test_the_region_picks_the_documents_server() -> None:
    assert base_url_for("global", None) == SERVERS["global"] == "https://api.sendgrid.com"
    assert base_url_for("eu", None) == "https://api.eu.sendgrid.com"
    assert base_url_for("eu", "http://127.0.0.1:3030/") == "http://127.0.0.1:3030"


CONFIG_WITH_COMMENTS = """\
# sgpipe for example.com
webhooks:
  - name: other   # the marketing account
    public_keys: ["MFkwOTHER"]
  - name: main
    timestamp_tolerance: 0  # off, see the README
ingest:
  port: 8080
"""


def test_connect_sets_everything_up_once_and_a_second_run_changes_nothing(
    cli: Cli, tmp_path: Path
) -> None:
    config = tmp_path / "sgpipe.yaml"
    config.write_text(CONFIG_WITH_COMMENTS)
    url = "https://hooks.example/webhooks/main"
    argv = ("connect", "--name", "main", "--public-url", url, "--config", str(config))
    code, out, err = cli(*argv, "--skip-test")
    assert code == 0, err
    assert "created SendGrid webhook" in out and "enabled signature verification" in out
    assert f"wrote the public key to {config}" in out
    [webhook] = cli.json("list")["webhooks"]
    assert webhook["url"] == url and webhook["enabled"]
    assert all(webhook[name] for name in EVENT_FIELDS)
    text = config.read_text()
    # Comments, order and the other webhook kept; the key added to `main`.
    assert text.startswith("# sgpipe for example.com\n")
    assert "# the marketing account" in text and "# off, see the README" in text
    document = yaml.safe_load(text)
    assert document["webhooks"][0] == {"name": "other", "public_keys": ["MFkwOTHER"]}
    assert document["webhooks"][1]["public_keys"] == [webhook["public_key"]]

    changes_before = [e for e in cli.emulator.exchanges if e.method != "GET"]
    inode = config.stat().st_ino  # a rewrite (even of the same bytes) replaces the file
    code, out, err = cli(*argv, "--skip-test", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["changes"] == [] and report["sendgrid_id"] == webhook["id"]
    assert config.read_text() == text and config.stat().st_ino == inode
    assert [e for e in cli.emulator.exchanges if e.method != "GET"] == changes_before


def test_connect_repairs_a_disabled_webhook_with_missing_events(cli: Cli, tmp_path: Path) -> None:
    url = "https://hooks.example/webhooks/main"
    webhook_id = cli.json("create", "--url", url, "--no-enabled", "--events", "open")["id"]
    config = tmp_path / "sgpipe.yaml"  # a file without a `webhooks` section yet
    config.write_text("ingest:\n  port: 8080\n")
    code, out, err = cli(
        "connect", "--name", "main", "--public-url", url, "--config", str(config), "--skip-test"
    )
    assert code == 0, err
    assert f"enabled SendGrid webhook {webhook_id}" in out
    shown = cli.json("show", webhook_id)
    assert shown["enabled"] and all(shown[name] for name in EVENT_FIELDS)
    assert yaml.safe_load(config.read_text())["webhooks"][0]["public_keys"] == [shown["public_key"]]


def test_connect_prints_a_kubernetes_secret_instead(cli: Cli) -> None:
    code, out, err = cli(
        "connect",
        "--name",
        "main",
        "--public-url",
        "https://hooks.example/webhooks/main",
        "--kubernetes-secret",
        "sendgrid-webhooks",
        "--skip-test",
    )
    assert code == 0, err
    assert "created SendGrid webhook" in err  # the report; stdout is the Secret alone
    secret = yaml.safe_load(out)
    key = cli.json("list")["webhooks"][0]["public_key"]
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "sendgrid-webhooks"
    assert secret["stringData"] == {"main": key}


def test_connect_oauth_gives_sendgrid_a_client_of_the_ingress_once(
    cli: Cli, tmp_path: Path
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("webhooks:\n  - name: main  # the one SendGrid posts to\n")
    url = "https://hooks.example/webhooks/main"
    argv = ("connect", "--name", "main", "--public-url", url, "--config", str(config))
    code, out, err = cli(*argv, "--oauth", "--skip-test")
    assert code == 0, err
    assert "oauth: SendGrid now fetches tokens from https://hooks.example/oauth/token" in out

    # SendGrid holds the client's secret; sgpipe's config only its hash, which verifies it.
    [stored] = cli.emulator.state.webhooks("")
    assert stored.oauth_token_url == "https://hooks.example/oauth/token"
    assert stored.oauth_client_secret
    text = config.read_text()
    assert "# the one SendGrid posts to" in text and stored.oauth_client_secret not in text
    [client] = yaml.safe_load(text)["webhooks"][0]["oauth_clients"]
    assert client["client_id"] == stored.oauth_client_id
    assert verify_client_secret(stored.oauth_client_secret, client["secret_hash"])
    settings = load_settings(config, {})  # the ingress can load it
    assert [c.client_id for c in settings.webhooks[0].oauth_clients] == [client["client_id"]]

    # A second run, with the config that now names the client, changes nothing.
    changes_before = [e for e in cli.emulator.exchanges if e.method != "GET"]
    code, out, err = cli(*argv, "--oauth", "--skip-test", "--json")
    assert code == 0, err
    assert json.loads(out)["changes"] == []
    assert config.read_text() == text
    assert [e for e in cli.emulator.exchanges if e.method != "GET"] == changes_before


def test_connect_reports_a_test_batch_that_never_arrives(cli: Cli, tmp_path: Path) -> None:
    # An "ingress" whose /metrics never moves, and a public URL that goes nowhere.

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text="# nothing\n")

    (tmp_path / "c.yaml").write_text("webhooks: []\n")
    app = web.Application()
    app.router.add_get("/metrics", metrics)
    ingress = ServerThread(app)
    ingress.start()
    try:
        code, out, err = cli(
            "connect",
            "--name",
            "main",
            "--public-url",
            "http://127.0.0.1:9/webhooks/main",
            "--config",
            str(tmp_path / "c.yaml"),
            "--ingress-url",
            ingress.url,
            "--wait",
            "0.5",
        )
    finally:
        ingress.stop()
    assert code == 1
    assert "test batch: no test batch reached the ingress within 0.5 s" in out


def test_check_reports_what_differs(cli: Cli, tmp_path: Path) -> None:
    config = tmp_path / "sgpipe.yaml"
    config.write_text(yaml.safe_dump({"webhooks": [{"name": "main", "public_keys": ["x"]}]}))
    code, out, _ = cli("check", "--config", str(config))
    assert code == 1 and "SendGrid has no webhook posting to a URL ending in /webhooks/main" in out

    url = "https://hooks.example/webhooks/main"
    connect = ("connect", "--name", "main", "--public-url", url, "--config", str(config))
    assert cli(*connect, "--skip-test")[0] == 0
    code, out, _ = cli("check", "--config", str(config))
    assert code == 0 and out.splitlines()[1].split()[-1] == "ok"
    # Against the expected host too.
    assert (
        cli("check", "--config", str(config), "--public-base-url", "https://hooks.example")[0] == 0
    )

    webhook_id = cli.json("list")["webhooks"][0]["id"]
    cli("update", webhook_id, "--no-enabled", "--no-click")
    cli.json("create", "--url", "https://hooks.example/webhooks/stray")
    report = cli.json("check", "--config", str(config), exit_code=1)
    assert report["ok"] is False
    by_name = {entry["name"]: entry for entry in report["webhooks"]}
    assert by_name["main"]["differences"] == [
        "disabled on SendGrid's side: SendGrid posts nothing",
        "does not send events sgpipe stores: click",
    ]
    assert by_name["stray"]["differences"][0].endswith("sgpipe declares no webhook 'stray' (404)")
    code, out, _ = cli("check", "--config", str(config))
    assert code == 1 and "disabled on SendGrid's side" in out

    # A key sgpipe does not trust: signing turned off and on gives a new key pair.
    cli("update", webhook_id, "--enabled", "--click")
    cli("sign", webhook_id, "--disable")
    cli("sign", webhook_id, "--enable")
    report = cli.json("check", "--config", str(config), "--name", "main", exit_code=1)
    assert report["webhooks"][0]["differences"][0].startswith(
        "signed with a key sgpipe does not trust"
    )
    code, out, _ = cli(
        "check", "--config", str(config), "--public-base-url", "https://elsewhere.example"
    )
    assert code == 1 and f"posts to {url}, expected https://elsewhere.example/webhooks/main" in out


def test_a_sendgrid_key_or_bearer_token_in_any_log_line_is_blanked() -> None:
    """The net under the client, which never logs its key: the log stream's redaction."""
    from sgpipe.runtime.redact import redact_text

    line = f"request failed: headers={{'Authorization': 'Bearer {API_KEY}'}} key {API_KEY}"
    redacted = redact_text(line)
    assert API_KEY not in redacted and "TESTKEY" not in redacted
    assert redacted == "request failed: headers={'Authorization': 'Bearer ***'} key ***"


def test_a_server_echoing_the_key_does_not_put_it_in_the_error(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy or a misbehaving server may echo the Authorization header in its error body."""

    async def echo(request: web.Request) -> web.Response:
        header = request.headers.get("Authorization", "")
        return web.json_response({"errors": [{"message": f"bad header {header}"}]}, status=400)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    server = ServerThread(app)
    server.start()
    try:
        code, _, err = cli("list", "--api-base-url", server.url, api=False)
    finally:
        server.stop()
    assert code == 1 and "bad header Bearer [redacted]" in err


def test_every_action_and_flag_has_help() -> None:
    import argparse

    from sgpipe.cli import build_parser

    def actions(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        raise AssertionError("no subcommands")

    top = actions(build_parser())
    parsers = {**actions(top["webhooks"]), "sendgrid-emulator": top["sendgrid-emulator"]}
    assert set(parsers) == {
        "list", "show", "create", "update", "delete", "sign", "public-key", "test", "connect",
        "check", "sendgrid-emulator",
    }  # fmt: skip
    for name, parser in parsers.items():
        assert parser.description, name
        for action in parser._actions:
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)
