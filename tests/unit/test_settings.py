"""load_settings: YAML, then the SGPIPE_* environment variables that name a setting, then
overrides; other SGPIPE_* variables are ignored with a warning; errors name the setting (by its
variable when a variable set it); the result is frozen."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from sgpipe.runtime.settings import (
    ConfigError,
    Settings,
    SettingsWarning,
    WebhookSettings,
    load_settings,
    read_settings,
    settings_warnings,
)
from tests.sendgrid_vector import PUBLIC_KEY

YAML = f"""\
kafka:
  bootstrap_servers: "kafka-1:9092,kafka-2:9092"
  topics:
    raw: sendgrid.raw
clickhouse:
  url: "http://clickhouse:8123"
  database: mail
webhooks:
  - name: main
    public_keys:
      - "{PUBLIC_KEY}"
    timestamp_tolerance: 86400
  - name: eu-west
    public_keys: ["KEY-EU-1"]
ingest:
  port: 8081
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "sgpipe.yaml"
    path.write_text(YAML, encoding="utf-8")
    return path


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def webhook(settings: Settings, name: str) -> WebhookSettings:
    found = settings.webhook(name)
    assert found is not None, f"no webhook {name!r} in {settings.webhooks}"
    return found


def config_error(
    config_file: Path | None, environ: dict[str, str], overrides: dict[str, Any] | None = None
) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(config_file, environ, overrides)
    return str(caught.value)


# --- loading ---------------------------------------------------------------------------------


def test_yaml_file_loads(config_file: Path) -> None:
    settings = load_settings(config_file, {})

    assert settings.kafka.bootstrap_servers == "kafka-1:9092,kafka-2:9092"
    assert settings.kafka.topics.raw == "sendgrid.raw"
    assert settings.kafka.topics.events == "sgpipe.events"
    assert settings.clickhouse.url == "http://clickhouse:8123"
    assert settings.clickhouse.database == "mail"
    assert [w.name for w in settings.webhooks] == ["main", "eu-west"]
    assert webhook(settings, "main").public_keys == (PUBLIC_KEY,)
    assert webhook(settings, "main").timestamp_tolerance == 86400
    assert webhook(settings, "main").allow_unsigned is False
    assert webhook(settings, "eu-west").public_keys == ("KEY-EU-1",)
    assert webhook(settings, "eu-west").timestamp_tolerance == 0
    assert settings.ingest.port == 8081
    assert settings.webhook("absent") is None


def test_no_file_and_no_environment_gives_the_defaults() -> None:
    settings = load_settings(None, {})
    assert settings == Settings()
    assert settings.kafka.bootstrap_servers is None
    assert settings.webhooks == ()
    assert settings.ingest.max_body_bytes == 4 * 1_048_576


def test_empty_yaml_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "# nothing yet\n"), {}) == Settings()


def test_variables_without_the_prefix_are_ignored(config_file: Path) -> None:
    settings = load_settings(config_file, {"PATH": "/usr/bin", "KAFKA__BOOTSTRAP_SERVERS": "x"})
    assert settings.kafka.bootstrap_servers == "kafka-1:9092,kafka-2:9092"


# --- environment overlay ---------------------------------------------------------------------


def test_env_sets_a_nested_scalar() -> None:
    settings = load_settings(None, {"SGPIPE_KAFKA__BOOTSTRAP_SERVERS": "kafka:9092"})
    assert settings.kafka.bootstrap_servers == "kafka:9092"


def test_env_beats_yaml_and_leaves_siblings_alone(config_file: Path) -> None:
    settings = load_settings(
        config_file,
        {
            "SGPIPE_KAFKA__BOOTSTRAP_SERVERS": "other:9092",
            "SGPIPE_KAFKA__TOPICS__EVENTS": "sendgrid.events",
            "SGPIPE_CLICKHOUSE__DATABASE": "mail_eu",
        },
    )
    assert settings.kafka.bootstrap_servers == "other:9092"
    assert settings.kafka.topics.raw == "sendgrid.raw"
    assert settings.kafka.topics.events == "sendgrid.events"
    assert settings.clickhouse.database == "mail_eu"
    assert settings.clickhouse.url == "http://clickhouse:8123"


def test_env_addresses_a_webhook_by_name(config_file: Path) -> None:
    settings = load_settings(config_file, {"SGPIPE_WEBHOOKS__MAIN__TIMESTAMP_TOLERANCE": "0"})
    main = webhook(settings, "main")
    assert main.timestamp_tolerance == 0
    assert main.public_keys == (PUBLIC_KEY,)
    assert webhook(settings, "eu-west").public_keys == ("KEY-EU-1",)
    assert len(settings.webhooks) == 2


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("a,b", ("a", "b"), id="comma-separated"),
        pytest.param(" a , b ,", ("a", "b"), id="comma-separated-with-spaces"),
        pytest.param("a", ("a",), id="single"),
        pytest.param('["a", "b"]', ("a", "b"), id="json-list"),
        pytest.param(f"{PUBLIC_KEY},KEY2", (PUBLIC_KEY, "KEY2"), id="real-base64-key"),
    ],
)
def test_env_sets_public_keys(config_file: Path, value: str, expected: tuple[str, ...]) -> None:
    settings = load_settings(config_file, {"SGPIPE_WEBHOOKS__MAIN__PUBLIC_KEYS": value})
    assert webhook(settings, "main").public_keys == expected


def test_env_for_a_webhook_the_file_does_not_declare_is_an_error(config_file: Path) -> None:
    # It would otherwise create a webhook (an open URL) that nobody declared.
    message = config_error(
        config_file,
        {
            "SGPIPE_WEBHOOKS__MARKETING__PUBLIC_KEYS": "K1,K2",
            "SGPIPE_WEBHOOKS__MAIN__TIMESTAMP_TOLERANCE": "0",
        },
    )
    assert message.startswith("SGPIPE_WEBHOOKS__MARKETING__PUBLIC_KEYS: ")
    assert "'marketing'" in message
    assert "declared: main, eu-west" in message
    assert "SGPIPE_WEBHOOKS__MAIN" not in message


def test_env_cannot_create_a_webhook_without_any_yaml() -> None:
    message = config_error(None, {"SGPIPE_WEBHOOKS__MAIN__ALLOW_UNSIGNED": "true"})
    assert message.startswith("SGPIPE_WEBHOOKS__MAIN__ALLOW_UNSIGNED: no webhook named 'main'")
    assert "declared: none" in message


def test_env_declares_webhooks_only_as_a_whole_section_and_sets_their_fields() -> None:
    settings = load_settings(
        None,
        {
            "SGPIPE_WEBHOOKS": '[{"name": "main"}, {"name": "eu-west", "public_keys": ["E"]}]',
            "SGPIPE_WEBHOOKS__MAIN__PUBLIC_KEYS": "K1,K2",
            "SGPIPE_WEBHOOKS__EU_WEST__TIMESTAMP_TOLERANCE": "90000",
        },
    )
    assert settings.webhooks == (
        WebhookSettings(name="main", public_keys=("K1", "K2")),
        WebhookSettings(name="eu-west", public_keys=("E",), timestamp_tolerance=90000),
    )


def test_a_whole_webhooks_section_replaces_the_files(config_file: Path) -> None:
    settings = load_settings(config_file, {"SGPIPE_WEBHOOKS": '[{"name": "only"}]'})
    assert [w.name for w in settings.webhooks] == ["only"]


def test_env_underscores_find_a_hyphenated_webhook(config_file: Path) -> None:
    settings = load_settings(
        config_file,
        {
            "SGPIPE_WEBHOOKS__EU_WEST__TIMESTAMP_TOLERANCE": "3600",
            "SGPIPE_WEBHOOKS__EU_WEST__PUBLIC_KEYS": "KEY-EU-2,KEY-EU-3",
        },
    )
    assert [w.name for w in settings.webhooks] == ["main", "eu-west"]
    eu_west = webhook(settings, "eu-west")
    assert eu_west.timestamp_tolerance == 3600
    assert eu_west.public_keys == ("KEY-EU-2", "KEY-EU-3")


def test_a_field_variable_overrides_its_sections_json(config_file: Path) -> None:
    settings = load_settings(
        config_file,
        {
            "SGPIPE_KAFKA__TOPICS": '{"events": "json.events", "dead_letter": "json.dlq"}',
            "SGPIPE_KAFKA__TOPICS__EVENTS": "field.events",
        },
    )
    assert settings.kafka.topics.raw == "sendgrid.raw"  # from the file: sections merge
    assert settings.kafka.topics.events == "field.events"
    assert settings.kafka.topics.dead_letter == "json.dlq"


def test_variable_names_are_case_insensitive() -> None:
    settings = load_settings(None, {"sgpipe_ingest__port": "9000"})
    assert settings.ingest.port == 9000


def test_env_sets_a_whole_section_as_json() -> None:
    settings = load_settings(
        None, {"SGPIPE_WEBHOOKS": '[{"name": "main", "public_keys": ["K"]}, {"name": "b2b"}]'}
    )
    assert [(w.name, w.public_keys) for w in settings.webhooks] == [("main", ("K",)), ("b2b", ())]


def test_env_values_are_coerced_to_the_setting_type() -> None:
    settings = load_settings(
        None,
        {
            "SGPIPE_INGEST__PORT": "9000",
            "SGPIPE_INGEST__PUBLISH_TIMEOUT_SECONDS": "2.5",
            "SGPIPE_KAFKA__ENABLE_IDEMPOTENCE": "true",
            "SGPIPE_CLICKHOUSE__PASSWORD": "s3cret",
        },
    )
    assert settings.ingest.port == 9000
    assert settings.ingest.publish_timeout_seconds == 2.5
    assert settings.kafka.enable_idempotence is True
    assert settings.clickhouse.password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)


def test_overrides_beat_env_and_yaml(config_file: Path) -> None:
    settings = load_settings(
        config_file,
        {"SGPIPE_INGEST__PORT": "9000", "SGPIPE_WEBHOOKS__MAIN__TIMESTAMP_TOLERANCE": "0"},
        {"ingest.port": 7000, "webhooks.main.timestamp_tolerance": 600},
    )
    assert settings.ingest.port == 7000
    assert webhook(settings, "main").timestamp_tolerance == 600


def test_override_without_env_beats_yaml(config_file: Path) -> None:
    settings = load_settings(config_file, {}, {"kafka.bootstrap_servers": "cli:9092"})
    assert settings.kafka.bootstrap_servers == "cli:9092"


# --- errors name the setting -----------------------------------------------------------------


def test_unknown_top_level_key(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "kafak:\n  bootstrap_servers: x\n"), {})
    assert "kafak" in message
    assert "Extra inputs are not permitted" in message


def test_unknown_nested_key(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "kafka:\n  topics:\n    rwa: x\n"), {})
    assert "kafka.topics.rwa" in message


def test_unknown_webhook_key(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "webhooks:\n  - name: main\n    public_key: K\n"), {})
    assert "webhooks[main].public_key" in message


# --- SGPIPE_* variables that name no setting: ignored, with a warning --------------------------

KUBERNETES_SERVICE_LINKS = {
    # What Kubernetes injects into every pod of the namespace for a Service named `sgpipe`.
    "SGPIPE_PORT": "tcp://10.96.0.12:8080",
    "SGPIPE_SERVICE_HOST": "10.96.0.12",
    "SGPIPE_SERVICE_PORT": "8080",
    "SGPIPE_SERVICE_PORT_HTTP": "8080",
    "SGPIPE_PORT_8080_TCP": "tcp://10.96.0.12:8080",
    "SGPIPE_PORT_8080_TCP_ADDR": "10.96.0.12",
    "SGPIPE_PORT_8080_TCP_PORT": "8080",
    "SGPIPE_PORT_8080_TCP_PROTO": "tcp",
    # ... and for a Service named `sgpipe-ingest`: `SGPIPE_INGEST_PORT` looks like a typo of
    # SGPIPE_INGEST__PORT, but its value says what it is.
    "SGPIPE_INGEST_PORT": "tcp://10.96.0.13:8080",
    "SGPIPE_INGEST_SERVICE_HOST": "10.96.0.13",
}


def test_kubernetes_service_links_are_ignored_with_one_warning(config_file: Path) -> None:
    loaded = read_settings(config_file, KUBERNETES_SERVICE_LINKS)

    assert loaded.settings == load_settings(config_file, {})
    assert loaded.warnings == (
        SettingsWarning(
            "ignored SGPIPE_* environment variables that name no setting "
            "(Kubernetes service links look like this)",
            {"variables": sorted(KUBERNETES_SERVICE_LINKS)},
        ),
    )


@pytest.mark.parametrize(
    ("variable", "suggestion"),
    [
        pytest.param(
            "SGPIPE_KAFKA__BOOTSTRAPSERVERS", "SGPIPE_KAFKA__BOOTSTRAP_SERVERS", id="missing-_"
        ),
        pytest.param(
            "SGPIPE_KAFKA_BOOTSTRAP_SERVERS", "SGPIPE_KAFKA__BOOTSTRAP_SERVERS", id="single-_"
        ),
        pytest.param(
            "SGPIPE_KAFKAA__BOOTSTRAP_SERVERS", "SGPIPE_KAFKA__BOOTSTRAP_SERVERS", id="section"
        ),
        pytest.param("SGPIPE_INGEST_PORT", "SGPIPE_INGEST__PORT", id="not-a-service-link"),
        pytest.param(
            "SGPIPE_WEBHOOKS__MAIN__PUBLICKEYS", "SGPIPE_WEBHOOKS__MAIN__PUBLIC_KEYS", id="webhook"
        ),
        pytest.param(
            "SGPIPE_WEBHOOKS__EU_WEST__TOLERANCE",
            "SGPIPE_WEBHOOKS__EU_WEST__TIMESTAMP_TOLERANCE",
            id="webhook-field",
        ),
    ],
)
def test_a_misspelled_variable_is_named_with_the_setting_it_resembles(
    config_file: Path, variable: str, suggestion: str
) -> None:
    loaded = read_settings(config_file, {variable: "9000", "SGPIPE_PORT": "tcp://10.0.0.1:80"})

    assert loaded.settings == load_settings(config_file, {})
    assert loaded.warnings[0] == SettingsWarning(
        "ignored environment variable: it names no setting",
        {"variable": variable, "did_you_mean": suggestion},
    )
    # The misspelling is named on its own, not lost among the service links.
    assert loaded.warnings[1].fields == {"variables": ["SGPIPE_PORT"]}


@pytest.mark.parametrize(
    ("variable", "expected"),
    [
        ("SGPIPE_KAFKA__NO_SUCH_THING", {}),
        ("SGPIPE_KAFKA____CLIENT_ID", {"did_you_mean": "SGPIPE_KAFKA__CLIENT_ID"}),
        ("SGPIPE_INGEST__", {"did_you_mean": "SGPIPE_INGEST"}),
    ],
)
def test_an_unknown_variable_under_a_known_section_is_named(
    variable: str, expected: dict[str, str]
) -> None:
    loaded = read_settings(None, {variable: "x"})
    assert loaded.settings == Settings()
    assert loaded.warnings == (
        SettingsWarning(
            "ignored environment variable: it names no setting", {"variable": variable, **expected}
        ),
    )


def test_no_warning_when_every_variable_is_a_setting(config_file: Path) -> None:
    environ = {"SGPIPE_INGEST__PORT": "1", "SGPIPE_WEBHOOKS__MAIN__PUBLIC_KEYS": "K", "HOME": "/"}
    assert read_settings(config_file, environ).warnings == ()


# --- the config file from SGPIPE_CONFIG ------------------------------------------------------


def test_sgpipe_config_names_the_config_file(config_file: Path) -> None:
    loaded = read_settings(None, {"SGPIPE_CONFIG": str(config_file)})
    assert loaded.config_file == config_file
    assert loaded.settings == load_settings(config_file, {})


def test_the_config_argument_beats_sgpipe_config(config_file: Path, tmp_path: Path) -> None:
    other = write(tmp_path, "ingest:\n  port: 1234\n")
    loaded = read_settings(other, {"SGPIPE_CONFIG": str(config_file)})
    assert loaded.config_file == other
    assert loaded.settings.ingest.port == 1234


def test_a_missing_sgpipe_config_file_is_named(tmp_path: Path) -> None:
    message = config_error(None, {"SGPIPE_CONFIG": str(tmp_path / "nope.yaml")})
    assert message == f"cannot read config file {tmp_path / 'nope.yaml'}: No such file or directory"


# --- settings built in code ------------------------------------------------------------------


def test_settings_built_in_code_never_read_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SGPIPE_INGEST__PORT", "1")
    monkeypatch.setenv("SGPIPE_WEBHOOKS", "not json")
    assert Settings().ingest.port == 8080
    assert Settings(ingest={"port": 9}).ingest.port == 9  # type: ignore[arg-type]


def test_an_unsigned_webhook_is_warned_about() -> None:
    settings = Settings(
        webhooks=(
            WebhookSettings(name="signed", public_keys=("K",)),
            WebhookSettings(name="open", allow_unsigned=True),
            # Not open: each still requires a signature or a bearer token.
            WebhookSettings(name="keyed", public_keys=("K",), allow_unsigned=True),
            WebhookSettings(name="token", auth="token", allow_unsigned=True),
        )
    )
    assert settings_warnings(settings) == [
        SettingsWarning(
            "webhook accepts unsigned requests: anyone who can reach it can inject events",
            {"webhook": "open", "setting": "webhooks[open].allow_unsigned"},
        )
    ]
    assert settings_warnings(Settings()) == []


def test_environment_variable_into_a_scalar_is_an_error(tmp_path: Path) -> None:
    message = config_error(
        write(tmp_path, "kafka:\n  topics: sgpipe\n"), {"SGPIPE_KAFKA__TOPICS__RAW": "raw"}
    )
    assert "SGPIPE_KAFKA__TOPICS__RAW" in message
    assert "topics" in message


def test_bad_type_from_the_environment_names_the_variable() -> None:
    message = config_error(None, {"SGPIPE_INGEST__PORT": "abc"})
    assert message.startswith("SGPIPE_INGEST__PORT: Input should be a valid integer")


def test_bad_value_from_the_file_names_the_dotted_path(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "ingest:\n  port: abc\n"), {})
    assert message.startswith("ingest.port: Input should be a valid integer")


def test_bad_value_inside_a_json_section_names_the_variable_and_the_field() -> None:
    message = config_error(None, {"SGPIPE_KAFKA": '{"linger_ms": -1, "lingerms": 1}'})
    assert message.splitlines() == [
        "SGPIPE_KAFKA (kafka.linger_ms): Input should be greater than or equal to 0",
        "SGPIPE_KAFKA (kafka.lingerms): Extra inputs are not permitted",
    ]


def test_bad_value_from_the_command_line_says_so() -> None:
    message = config_error(None, {"SGPIPE_INGEST__PORT": "1"}, {"ingest.port": 70000})
    assert message == "ingest.port (command line): Input should be less than or equal to 65535"


def test_every_bad_setting_is_named_one_per_line() -> None:
    message = config_error(
        None, {"SGPIPE_INGEST__PORT": "abc", "SGPIPE_KAFKA__LINGER_MS": "-1", "SGPIPE_NOPE": "1"}
    )
    lines = message.splitlines()
    assert len(lines) == 2
    assert lines[0] == "SGPIPE_KAFKA__LINGER_MS: Input should be greater than or equal to 0"
    assert lines[1].startswith("SGPIPE_INGEST__PORT: Input should be a valid integer")


@pytest.mark.parametrize("name", ["Main", "has space", "-leading-hyphen", "x" * 64, ""])
def test_bad_webhook_name(tmp_path: Path, name: str) -> None:
    message = config_error(write(tmp_path, f'webhooks:\n  - name: "{name}"\n'), {})
    assert ".name" in message
    assert "webhooks[" in message


def test_duplicate_webhook_names(tmp_path: Path) -> None:
    text = "webhooks:\n  - name: main\n  - name: other\n  - name: main\n"
    message = config_error(write(tmp_path, text), {})
    assert "webhooks" in message
    assert "unique" in message
    assert "main" in message


def test_negative_timestamp_tolerance_from_yaml(tmp_path: Path) -> None:
    text = "webhooks:\n  - name: main\n    timestamp_tolerance: -1\n"
    message = config_error(write(tmp_path, text), {})
    assert "webhooks[main].timestamp_tolerance" in message
    assert "greater than or equal to 0" in message


def test_negative_timestamp_tolerance_from_env(config_file: Path) -> None:
    message = config_error(config_file, {"SGPIPE_WEBHOOKS__MAIN__TIMESTAMP_TOLERANCE": "-5"})
    assert message == (
        "SGPIPE_WEBHOOKS__MAIN__TIMESTAMP_TOLERANCE: Input should be greater than or equal to 0"
    )


def test_bad_value_in_second_webhook_names_its_variable(config_file: Path) -> None:
    message = config_error(config_file, {"SGPIPE_WEBHOOKS__EU_WEST__ALLOW_UNSIGNED": "perhaps"})
    assert message.startswith("SGPIPE_WEBHOOKS__EU_WEST__ALLOW_UNSIGNED: Input should be a valid")


def test_bad_value_in_a_json_webhooks_section_names_the_webhook() -> None:
    message = config_error(
        None, {"SGPIPE_WEBHOOKS": '[{"name": "main", "timestamp_tolerance": -1}]'}
    )
    assert message == (
        "SGPIPE_WEBHOOKS (webhooks[main].timestamp_tolerance): "
        "Input should be greater than or equal to 0"
    )


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    message = config_error(missing, {})
    assert str(missing) in message
    assert "cannot read" in message


def test_directory_instead_of_file(tmp_path: Path) -> None:
    message = config_error(tmp_path, {})
    assert str(tmp_path) in message


def test_invalid_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "kafka: [unclosed\n")
    message = config_error(path, {})
    assert str(path) in message
    assert "not valid YAML" in message


@pytest.mark.parametrize("text", ["- kafka\n- clickhouse\n", "just a string\n", "42\n"])
def test_yaml_that_is_not_a_mapping(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    message = config_error(path, {})
    assert str(path) in message
    assert "mapping" in message


# --- frozen ----------------------------------------------------------------------------------


def test_settings_are_frozen(config_file: Path) -> None:
    settings = load_settings(config_file, {})
    with pytest.raises(ValidationError, match="frozen"):
        settings.ingest = settings.ingest
    with pytest.raises(ValidationError, match="frozen"):
        settings.kafka.bootstrap_servers = "elsewhere:9092"
    main = webhook(settings, "main")
    with pytest.raises(ValidationError, match="frozen"):
        main.timestamp_tolerance = 5
    assert isinstance(settings.webhooks, tuple)
    assert isinstance(main.public_keys, tuple)
    assert settings.kafka.bootstrap_servers == "kafka-1:9092,kafka-2:9092"


def test_a_json_looking_password_stays_a_string() -> None:
    settings = load_settings(None, {"SGPIPE_CLICKHOUSE__PASSWORD": "[1,2]"})
    assert settings.clickhouse.password.get_secret_value() == "[1,2]"


@pytest.mark.parametrize("variable", ["SGPIPE_WEBHOOKS", "SGPIPE_KAFKA", "SGPIPE_KAFKA__TOPICS"])
def test_a_whole_section_that_is_not_json_names_the_variable(variable: str) -> None:
    message = config_error(None, {variable: "main"})
    assert message.startswith(f"{variable}: a section is set as JSON; this is not JSON (")


def test_confluent_events_format_takes_the_registry_from_the_environment() -> None:
    settings = load_settings(
        None,
        {
            "SGPIPE_KAFKA__EVENTS_FORMAT": "confluent",
            "SGPIPE_SCHEMA_REGISTRY__URL": "https://registry.example.com",
            "SGPIPE_SCHEMA_REGISTRY__USERNAME": "key",
            "SGPIPE_SCHEMA_REGISTRY__PASSWORD": "secret",
        },
    )
    assert settings.kafka.events_format == "confluent"
    assert settings.schema_registry.url == "https://registry.example.com"
    assert settings.schema_registry.password is not None
    assert settings.schema_registry.password.get_secret_value() == "secret"
    assert load_settings(None, {}).kafka.events_format == "single_object"


def test_confluent_events_format_without_a_registry_is_refused() -> None:
    with pytest.raises(ConfigError, match="needs schema_registry.url"):
        load_settings(None, {"SGPIPE_KAFKA__EVENTS_FORMAT": "confluent"})


def test_embedded_clickhouse_allows_no_browser_origin_unless_told() -> None:
    assert load_settings(None, {}).embedded.clickhouse_allowed_origins == ()
    environ = {
        "SGPIPE_EMBEDDED__CLICKHOUSE_ALLOWED_ORIGINS": '["https://grafana.example", "https://bi.example"]'
    }
    settings = load_settings(None, environ)
    assert settings.embedded.clickhouse_allowed_origins == (
        "https://grafana.example",
        "https://bi.example",
    )
