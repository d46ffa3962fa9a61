"""The one settings object of an sgpipe process.

Built once in the entrypoint from a YAML file overlaid with ``SGPIPE_*`` environment variables,
validated, frozen, and passed down as plain values; nothing below the CLI reads ``os.environ``.

Environment variables address any scalar by its path, ``__`` between levels::

    SGPIPE_KAFKA__BOOTSTRAP_SERVERS=kafka:9092
    SGPIPE_CLICKHOUSE__URL=http://clickhouse:8123
    SGPIPE_WEBHOOKS__MAIN__TIMESTAMP_TOLERANCE=0       # webhooks are addressed by name
    SGPIPE_WEBHOOKS__MAIN__PUBLIC_KEYS=KEY1,KEY2       # lists: comma-separated or JSON

Unknown keys, in YAML or in the environment, are errors: a typo must not silently fall back to
a default.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

ENV_PREFIX = "SGPIPE_"
ENV_PATH_SEPARATOR = "__"

# A webhook's name is its URL path segment (POST /webhooks/{name}) and a Kafka header value.
WEBHOOK_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class ConfigError(Exception):
    """The configuration is invalid; the message names every bad setting."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TopicSettings(_Section):
    """Kafka topic names and how `sgpipe` creates them when it owns them."""

    raw: str = "sgpipe.raw"
    events: str = "sgpipe.events"
    dead_letter: str = "sgpipe.dead-letter"
    partitions: Annotated[int, Field(ge=1)] = 6
    replication_factor: Annotated[int, Field(ge=1)] = 1


class KafkaSettings(_Section):
    # None: `sgpipe up` starts the embedded broker; the single-stage commands require it.
    bootstrap_servers: str | None = None
    client_id: str = "sgpipe"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    # Real Kafka should run with idempotence; tansu (the embedded broker) cannot.
    enable_idempotence: bool = False
    compression_type: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "gzip"
    linger_ms: Annotated[int, Field(ge=0)] = 5
    # Must exceed SendGrid's 768 KB batches plus headers; the broker's message.max.bytes too.
    max_request_size: Annotated[int, Field(ge=1_048_576)] = 4 * 1_048_576
    request_timeout_ms: Annotated[int, Field(ge=1000)] = 30_000
    session_timeout_ms: Annotated[int, Field(ge=100)] = 10_000
    heartbeat_interval_ms: Annotated[int, Field(ge=50)] = 3_000
    create_topics: bool = True
    topics: TopicSettings = TopicSettings()


class ClickHouseSettings(_Section):
    # None: embedded ClickHouse (chdb) under --data-dir, served over HTTP by `sgpipe up`.
    url: str | None = None
    database: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] = "sgpipe"
    username: str = "default"
    password: SecretStr = SecretStr("")
    connect_timeout: Annotated[float, Field(gt=0)] = 10.0
    send_receive_timeout: Annotated[float, Field(gt=0)] = 300.0


class WebhookSettings(_Section):
    """One SendGrid Event Webhook; each has its own URL, signing key pair and OAuth settings."""

    name: Annotated[str, Field(pattern=WEBHOOK_NAME_PATTERN)]
    # Base64 DER SubjectPublicKeyInfo, as SendGrid shows it; several during a key rotation.
    public_keys: tuple[str, ...] = ()
    # Seconds between the signed timestamp and now; 0 disables the check. Off by default
    # because SendGrid may retry for 24 h without re-signing: a tight window would turn an
    # outage into permanent loss (duplicates from replays are absorbed by dedup anyway).
    timestamp_tolerance: Annotated[int, Field(ge=0)] = 0
    # Accepting unauthenticated POSTs must be a deliberate choice.
    allow_unsigned: bool = False

    @field_validator("public_keys", mode="before")
    @classmethod
    def _split_key_list(cls, value: object) -> object:
        if isinstance(value, str):
            if value.strip().startswith("["):
                try:
                    return json.loads(value)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"not a JSON list of keys: {exc}") from exc
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value


class IngestSettings(_Section):
    host: str = "0.0.0.0"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    # SendGrid posts at most 768 KB; leave headroom, refuse anything absurd with 413.
    max_body_bytes: Annotated[int, Field(ge=1024)] = 4 * 1_048_576
    # How long a request may wait for Kafka's acknowledgement before answering 503.
    publish_timeout_seconds: Annotated[float, Field(gt=0)] = 10.0


class DeadLetterLimit(_Section):
    """A circuit breaker on dead letters (arroyo's DlqLimit): past it the stage stops with a
    fatal error instead of dead-lettering everything after a bad deploy.

    Counted over a sliding window of ``window_seconds``: the stage stops when the window holds
    more than ``max_count`` dead letters, or when, with at least ``min_records`` outcomes in
    it, more than ``max_ratio`` of them were dead letters. ``max_count: 0`` and
    ``max_ratio: 1.0`` switch the respective check off.
    """

    max_ratio: Annotated[float, Field(gt=0, le=1)] = 0.5
    min_records: Annotated[int, Field(ge=1)] = 100
    max_count: Annotated[int, Field(ge=0)] = 10_000
    window_seconds: Annotated[float, Field(gt=0)] = 60.0


class StageSettings(_Section):
    """What every consuming stage shares: batching, retries, stopping, health, dead letters."""

    group_id: str
    # A write happens at whichever comes first.
    batch_max_records: Annotated[int, Field(ge=1)]
    batch_max_seconds: Annotated[float, Field(ge=0)]
    # Retriable failures (Kafka or ClickHouse unavailable) are retried with capped exponential
    # backoff, holding the batch, for as long as the stage runs.
    retry_backoff_initial_seconds: Annotated[float, Field(gt=0)] = 0.2
    retry_backoff_max_seconds: Annotated[float, Field(gt=0)] = 30.0
    # /readyz answers 503 once the stage has made no progress for this long while it had work
    # (a write failing and retried, say): the alert that the pipeline is stalled.
    stall_timeout_seconds: Annotated[float, Field(gt=0)] = 120.0
    # On stop: how long to keep retrying what is buffered (and, draining, to empty the topic).
    stop_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    # GET /healthz, /readyz and /metrics of `sgpipe process` / `sgpipe sink`.
    health_host: str = "0.0.0.0"
    health_port: Annotated[int, Field(ge=0, le=65535)]
    dead_letters: DeadLetterLimit = DeadLetterLimit()


class ProcessorSettings(StageSettings):
    group_id: str = "sgpipe-processor"
    batch_max_records: Annotated[int, Field(ge=1)] = 500
    # Raw batches are processed as soon as a poll returns them.
    batch_max_seconds: Annotated[float, Field(ge=0)] = 0.0
    health_port: Annotated[int, Field(ge=0, le=65535)] = 8081
    # Best-effort in-process dedup window (sg_event_ids remembered); ClickHouse makes it exact.
    dedup_window: Annotated[int, Field(ge=0)] = 100_000


class SinkSettings(StageSettings):
    group_id: str = "sgpipe-sink"
    batch_max_records: Annotated[int, Field(ge=1)] = 20_000
    batch_max_seconds: Annotated[float, Field(ge=0)] = 2.0
    health_port: Annotated[int, Field(ge=0, le=65535)] = 8082


class EmbeddedSettings(_Section):
    """Ports of the single-machine stand-ins `sgpipe up` starts when nothing external is set."""

    kafka_port: Annotated[int, Field(ge=0, le=65535)] = 9092
    clickhouse_http_port: Annotated[int, Field(ge=0, le=65535)] = 8123
    # Embedded services listen here only; never expose them beyond the machine by default.
    host: str = "127.0.0.1"
    # Web origins (e.g. "https://grafana.example.com") whose browser requests the embedded
    # ClickHouse endpoint accepts. None by default: any request with an Origin header is
    # refused, so a web page cannot use a browser to reach it (docs/security.md).
    clickhouse_allowed_origins: tuple[str, ...] = ()

    @field_validator("clickhouse_allowed_origins", mode="before")
    @classmethod
    def _split_origin_list(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Settings(_Section):
    kafka: KafkaSettings = KafkaSettings()
    clickhouse: ClickHouseSettings = ClickHouseSettings()
    webhooks: tuple[WebhookSettings, ...] = ()
    ingest: IngestSettings = IngestSettings()
    processor: ProcessorSettings = ProcessorSettings()
    sink: SinkSettings = SinkSettings()
    embedded: EmbeddedSettings = EmbeddedSettings()
    logging: LoggingSettings = LoggingSettings()

    @field_validator("webhooks")
    @classmethod
    def _unique_webhook_names(
        cls, webhooks: tuple[WebhookSettings, ...]
    ) -> tuple[WebhookSettings, ...]:
        names = [webhook.name for webhook in webhooks]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"webhook names must be unique, repeated: {', '.join(duplicates)}")
        return webhooks

    def webhook(self, name: str) -> WebhookSettings | None:
        return next((webhook for webhook in self.webhooks if webhook.name == name), None)


def load_settings(
    config_file: Path | None,
    environ: Mapping[str, str],
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """YAML file, then ``SGPIPE_*`` variables, then explicit overrides (CLI flags), validated.

    Raises ConfigError naming each bad setting by its dotted path.
    """
    document = _read_yaml(config_file) if config_file is not None else {}
    _apply_environment(document, environ)
    for dotted, value in (overrides or {}).items():
        _set_path(document, dotted.split("."), value, source=f"override {dotted}")
    try:
        return Settings.model_validate(document)
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(exc, document)) from exc


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return document


def _apply_environment(document: dict[str, Any], environ: Mapping[str, str]) -> None:
    for variable in sorted(environ):
        if not variable.startswith(ENV_PREFIX):
            continue
        path = variable[len(ENV_PREFIX) :].lower().split(ENV_PATH_SEPARATOR)
        if not all(path):
            raise ConfigError(f"{variable}: empty path segment in environment variable name")
        _set_path(document, path, _env_value(variable, path, environ[variable]), source=variable)


def _env_value(variable: str, path: list[str], raw: str) -> Any:
    # A top-level variable sets a whole section (SGPIPE_WEBHOOKS='[{...}]') and is JSON. Below
    # that, values stay strings (a password may look like JSON): pydantic converts scalars and
    # list-valued fields parse their own forms.
    if len(path) > 1:
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{variable}: a whole section must be JSON: {exc}") from exc


def _set_path(document: dict[str, Any], path: list[str], value: Any, *, source: str) -> None:
    node, rest = document, path
    if path[0] == "webhooks" and len(path) >= 3:
        # Webhooks are a list in YAML; the environment addresses an entry by its name.
        node, rest = _webhook_entry(document, path[1], source), path[2:]
    for key in rest[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {key} is not a section")
        node = child
    node[rest[-1]] = value


def _webhook_entry(document: dict[str, Any], name: str, source: str) -> dict[str, Any]:
    webhooks = document.setdefault("webhooks", [])
    if not isinstance(webhooks, list):
        raise ConfigError(f"{source}: webhooks must be a list")
    # Shells do not allow "-" in variable names: SGPIPE_WEBHOOKS__EU_WEST__... also finds
    # a webhook named "eu-west".
    for existing in webhooks:
        if isinstance(existing, dict) and existing.get("name") in (name, name.replace("_", "-")):
            return existing
    created: dict[str, Any] = {"name": name}
    webhooks.append(created)
    return created


def _describe_validation_error(exc: ValidationError, document: Mapping[str, Any]) -> str:
    lines = ["invalid configuration:"]
    for error in exc.errors():
        lines.append(f"  {_dotted(error['loc'], document)}: {error['msg']}")
    return "\n".join(lines)


def _dotted(location: tuple[int | str, ...], document: Mapping[str, Any]) -> str:
    # Say `webhooks[main].public_keys`, not `webhooks.0.public_keys`: the user knows names.
    parts: list[str] = []
    node: Any = document
    for item in location:
        if isinstance(item, int) and isinstance(node, list) and item < len(node):
            entry = node[item]
            name = entry.get("name") if isinstance(entry, dict) else None
            parts[-1] = f"{parts[-1]}[{name if name else item}]"
            node = entry
            continue
        parts.append(str(item))
        node = node.get(item) if isinstance(node, dict) else None
    return ".".join(parts) or "(top level)"
