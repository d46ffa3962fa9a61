"""The one settings object of an sgpipe process.

Built once in the entrypoint from a YAML file overlaid with ``SGPIPE_*`` environment variables
and command-line flags, validated, frozen, and passed down as plain values; nothing below the
CLI reads ``os.environ``. ``Settings`` is a pydantic-settings class; its environment parsing
(prefix, ``__`` between levels, JSON for whole sections) is pydantic-settings' own, fed only the
variables that name a setting. How the environment is read, and why, is in
``docs/configuration.md``:

    SGPIPE_CONFIG=/etc/sgpipe/sgpipe.yaml              # the config file (--config wins)
    SGPIPE_KAFKA__BOOTSTRAP_SERVERS=kafka:9092         # any setting by its path
    SGPIPE_KAFKA__TOPICS='{"raw": "sendgrid.raw"}'     # a whole section, as JSON
    SGPIPE_WEBHOOKS__MAIN__PUBLIC_KEYS=KEY1,KEY2       # a field of a webhook the file declares
    SGPIPE_WEBHOOKS='[{"name": "main", ...}]'          # declares the webhooks themselves

Unknown keys in the file are errors. ``SGPIPE_*`` variables that name no setting are ignored
with a warning: Kubernetes injects ``SGPIPE_PORT=tcp://...`` and friends for a Service named
``sgpipe``, and such variables must never stop the process. A variable that addresses a webhook
the configuration does not declare is an error: it would otherwise create a webhook silently.
"""

from __future__ import annotations

import difflib
import json
import re
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

ENV_PREFIX = "SGPIPE_"
ENV_PATH_SEPARATOR = "__"

# A webhook's name is its URL path segment (POST /webhooks/{name}) and a Kafka header value.
WEBHOOK_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class ConfigError(Exception):
    """The configuration is invalid. One line per problem, each naming the setting (by its
    environment variable when it came from one, else by its dotted path)."""

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems: tuple[str, ...] = problems


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
    # The producer compresses on the event loop, at aiokafka's fixed levels: per 768 KB batch
    # here gzip (level 9) ~25-65 ms, lz4 (level 9, LZ4 HC) ~9 ms, zstd (3) ~3.6 ms, snappy
    # ~0.5 ms with 12% more bytes than lz4 (bench/ingest.py). lz4, zstd and snappy need cramjam
    # (a dependency); zstd needs Kafka >= 2.1 on every client.
    compression_type: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "snappy"
    linger_ms: Annotated[int, Field(ge=0)] = 5
    # Must exceed SendGrid's 768 KB batches plus headers; the broker's message.max.bytes too.
    max_request_size: Annotated[int, Field(ge=1_048_576)] = 4 * 1_048_576
    request_timeout_ms: Annotated[int, Field(ge=1000)] = 30_000
    # How old the clients' view of the topics may get before it is asked again (aiokafka's
    # default: 5 min). A topic that changed under them -- partitions added, or re-created by a
    # broker that came back empty with its own partition count -- is seen within this: until
    # then a consumer reads only the partitions it knew, and the rest waits unread.
    metadata_max_age_ms: Annotated[int, Field(ge=1000)] = 30_000
    session_timeout_ms: Annotated[int, Field(ge=100)] = 10_000
    heartbeat_interval_ms: Annotated[int, Field(ge=50)] = 3_000
    # How long `sgpipe ingest` keeps retrying to reach Kafka at start (topics, producer) before
    # it exits 1. It listens only once Kafka answered, so nothing can probe it meanwhile: long
    # enough to ride out a broker restart, short enough that Kubernetes shows the pod failing
    # (CrashLoopBackOff). The consuming stages retry without a deadline, serving /readyz.
    start_timeout_seconds: Annotated[float, Field(gt=0)] = 120.0
    create_topics: bool = True
    topics: TopicSettings = TopicSettings()
    # How events-topic records are framed (docs/consuming.md): Avro single-object encoding
    # needs no registry; "confluent" (magic byte 0 + 4-byte schema id) registers the schema
    # under "<events topic>-value" in `schema_registry.url` at start, for Confluent
    # deserializers and ClickHouse's AvroConfluent format. Readers accept both.
    events_format: Literal["single_object", "confluent"] = "single_object"


class SchemaRegistrySettings(_Section):
    """A Confluent-compatible Schema Registry, used when `kafka.events_format: confluent`."""

    url: str | None = None
    # HTTP Basic credentials (Confluent Cloud: the API key and secret).
    username: str | None = None
    password: SecretStr | None = None
    timeout_seconds: Annotated[float, Field(gt=0)] = 10.0


class ClickHouseSettings(_Section):
    # None: embedded ClickHouse (chdb) under --data-dir, served over HTTP by `sgpipe up`.
    url: str | None = None
    database: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] = "sgpipe"
    username: str = "default"
    password: SecretStr = SecretStr("")
    connect_timeout: Annotated[float, Field(gt=0)] = 10.0
    send_receive_timeout: Annotated[float, Field(gt=0)] = 300.0
    # Days to keep what is stored per event and per message (email_events, the message
    # lifecycle, dead letters), counted from each event's time; 0 keeps everything forever.
    # Month partitions are dropped whole once every row in them expired, so data goes up to a
    # month after it expired. Daily aggregates hold no personal data and are kept. The TTL is
    # set by the migrations (`sgpipe migrate`, or at start) whenever this changes.
    # (Capped so that the expiry date stays inside ClickHouse's DateTime range.)
    retention_days: Annotated[int, Field(ge=0, le=25_000)] = 0
    # The ClickHouse cluster (a name from the server's remote_servers) to create the tables
    # on: DDL runs ON CLUSTER, tables are Replicated*MergeTree (default replica path and the
    # {shard}/{replica} macros) behind Distributed tables. Unset for one server and for
    # ClickHouse Cloud (which replicates by itself). docs/clickhouse.md.
    cluster: Annotated[str | None, Field(pattern=r"^[A-Za-z0-9_{}.-]+$")] = None
    # The sink (and `sgpipe up`) apply pending migrations at start. Off: they only check that
    # none is pending (else they stop, exit 3) and `sgpipe migrate` applies them, e.g. the
    # Helm chart's pre-install Job, so that many sink replicas never migrate at once.
    migrate_on_start: bool = True


PiiMode = Literal["keep", "hash", "drop"]


class PiiSettings(_Section):
    """Personal data in what the processor publishes (events topic) and hence in what
    ClickHouse stores: per field, keep it, replace it by a keyed hash (HMAC-SHA256 with
    ``hash_key``: the same value always gives the same hash, so joins and counts of distinct
    recipients still work), or drop it. Applied to the typed field, to ``raw`` and to
    ``custom_args`` alike. Off by default; docs/privacy.md."""

    email: PiiMode = "keep"
    # Only where it is the recipient's: engagement events (open, click, unsubscribes, spam
    # reports, unknown types). On deliverability events it is SendGrid's sending IP.
    ip: PiiMode = "keep"
    useragent: PiiMode = "keep"
    # The HMAC key for `hash`: a secret (SGPIPE_PII__HASH_KEY); changing it changes every
    # hash, so the same person then has two. At least 16 characters.
    hash_key: SecretStr | None = None

    @model_validator(mode="after")
    def _key_for_hashing(self) -> PiiSettings:
        hashed = [name for name in ("email", "ip", "useragent") if getattr(self, name) == "hash"]
        if hashed and (self.hash_key is None or len(self.hash_key.get_secret_value()) < 16):
            raise ValueError(
                f"pii.hash_key (at least 16 characters) is required to hash {', '.join(hashed)}"
            )
        return self


class RawAuthKeySettings(_Section):
    """One key of ``raw_auth.keys``: ``id`` travels in each record's ``sgpipe-raw-hmac``
    header, ``secret`` never leaves the process (a secret: never logged, never in a repr)."""

    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
    # At least 32 characters: `python -c 'import secrets; print(secrets.token_urlsafe(32))'`.
    secret: SecretStr

    @field_validator("secret")
    @classmethod
    def _long_enough(cls, secret: SecretStr) -> SecretStr:
        if len(secret.get_secret_value()) < 32:
            raise ValueError("a raw_auth key secret needs at least 32 characters")
        return secret


class RawAuthSettings(_Section):
    """The HMAC that authenticates raw-topic records from the ingress to the processor
    (docs/security.md#raw-records). The ingress signs with the first key; the processor
    accepts a record signed by any key in the list (two during a rotation) and dead-letters
    every other one as ``unauthenticated_raw_record``.

    With no key, ``sgpipe ingest`` and ``sgpipe process`` refuse to start, unless
    ``allow_unauthenticated`` says so deliberately: the ingress then publishes unsigned
    records, and the processor takes whatever is on the raw topic, as before this check
    existed (logged as a warning at every start). ``sgpipe up`` generates a key per data dir.
    """

    # The first signs, all verify. A secret: SGPIPE_RAW_AUTH__KEYS='[{"id": ..., "secret": ...}]'.
    keys: tuple[RawAuthKeySettings, ...] = ()
    # Run without a key: the ingress signs nothing and the processor takes any raw record, so
    # whoever can write the raw topic can inject events. Warned about at every start.
    allow_unauthenticated: bool = False

    @field_validator("keys")
    @classmethod
    def _unique_ids(cls, keys: tuple[RawAuthKeySettings, ...]) -> tuple[RawAuthKeySettings, ...]:
        ids = [key.id for key in keys]
        repeated = sorted({key_id for key_id in ids if ids.count(key_id) > 1})
        if repeated:
            raise ValueError(f"raw_auth key ids must be unique, repeated: {', '.join(repeated)}")
        return keys


# JWS algorithms a bearer token may be signed with: asymmetric only, so that a public key can
# never serve as an HMAC secret ("none" and HS* are refused whatever a token's header says).
JwtAlgorithm = Literal[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"
]
ASYMMETRIC_JWT_ALGORITHMS: tuple[str, ...] = typing.get_args(JwtAlgorithm)


class OAuthClientSettings(_Section):
    """A client of the built-in token endpoint: its id and the hash of its secret."""

    client_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9._~-]{1,128}$")]
    # "scrypt$<log2 n>$<r>$<p>$<salt b64>$<hash b64>", from `sgpipe oauth client create`.
    secret_hash: Annotated[str, Field(pattern=r"^(scrypt|pbkdf2-sha256)\$")]


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
    # What a POST must carry: the ECDSA signature, an OAuth 2.0 bearer token, or both
    # (docs/ingress.md, "Authentication"). Neither only with public_keys empty and
    # allow_unsigned: true.
    auth: Literal["signature", "token", "both"] = "signature"
    # Clients of the built-in token endpoint (POST /oauth/token) that get tokens for this
    # webhook: id and a slow hash of the secret (`sgpipe oauth client create`), never the
    # secret. A JSON list in SGPIPE_WEBHOOKS__<NAME>__OAUTH_CLIENTS (from a Kubernetes Secret).
    oauth_clients: tuple[OAuthClientSettings, ...] = ()
    # The team's own identity provider: bearer JWTs whose `iss` is oauth_issuer and whose `aud`
    # holds oauth_audience, signed by a key from oauth_jwks_url with an algorithm of
    # oauth_algorithms (asymmetric only).
    oauth_issuer: str | None = None
    oauth_audience: str | None = None
    oauth_jwks_url: str | None = None
    oauth_algorithms: tuple[JwtAlgorithm, ...] = ("RS256", "ES256")

    @field_validator("oauth_clients", mode="before")
    @classmethod
    def _parse_client_list(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                return json.loads(value) if value.strip() else ()
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a JSON list of clients: {exc}") from exc
        return value

    @model_validator(mode="after")
    def _idp_settings_together(self) -> WebhookSettings:
        idp = {
            "oauth_issuer": self.oauth_issuer,
            "oauth_audience": self.oauth_audience,
            "oauth_jwks_url": self.oauth_jwks_url,
        }
        given = [name for name, value in idp.items() if value]
        if given and len(given) != len(idp):
            missing = ", ".join(name for name in idp if name not in given)
            raise ValueError(f"an identity provider needs {', '.join(idp)}; missing {missing}")
        return self

    @property
    def accepts_tokens(self) -> bool:
        return self.auth in ("token", "both")

    @property
    def requires_signature(self) -> bool:
        return self.auth in ("signature", "both") and not (
            self.auth == "signature" and not self.public_keys and self.allow_unsigned
        )

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
    """The ingress's limits. Every one bounds what a single client can cost; docs/ingress.md
    says what each answer means for SendGrid's retries."""

    host: str = "0.0.0.0"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    # SendGrid posts at most 768 KB; leave headroom, refuse anything absurd with 413. Applies to
    # the body as received and again to the body after Content-Encoding is undone.
    max_body_bytes: Annotated[int, Field(ge=1024)] = 4 * 1_048_576
    # A compressed body may expand to at most this many times its size (and never past
    # max_body_bytes): a 4 KB gzip bomb costs 400 KB of work, not 4 MB. JSON rarely exceeds 20x.
    max_decompression_ratio: Annotated[float, Field(ge=1)] = 100.0
    # How long a request may wait for Kafka's acknowledgement before answering 503.
    publish_timeout_seconds: Annotated[float, Field(gt=0)] = 10.0
    # From a connection's first byte (or its opening) to the end of the request head; then 408
    # and close. Slowloris clients hold a connection at most this long.
    header_timeout_seconds: Annotated[float, Field(gt=0)] = 10.0
    # From the end of the head to the end of the body; then 408 and close. 768 KB at 1 Mbit/s
    # takes 6 s.
    body_timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    # An idle keep-alive connection is closed after this long. Above the 60 s idle timeout of
    # common load balancers, so that they, not we, close first (no race on a reused connection).
    idle_timeout_seconds: Annotated[float, Field(gt=0)] = 75.0
    # Open connections (probes and scrapes included); beyond it a connection is answered 503
    # with Retry-After and closed at once. Keep it below the process's file-descriptor limit.
    max_connections: Annotated[int, Field(ge=1)] = 1000
    # The request line plus all header lines; beyond it 431. SendGrid's heads are < 1 KB; an
    # OAuth bearer token adds a few KB.
    max_header_bytes: Annotated[int, Field(ge=1024, le=1_048_576)] = 32_768
    # How often /readyz's Kafka check asks the broker for the raw topic's metadata.
    readiness_probe_interval_seconds: Annotated[float, Field(gt=0)] = 5.0
    # Base URLs (http://host:port) of other processes' health endpoints whose readiness and
    # metrics this ingress's /readyz and /metrics include. `sgpipe up` sets it, so that one
    # scrape of the ingress port covers every stage; separate deployments leave it empty.
    health_peers: tuple[str, ...] = ()
    # Bytes of requests between the start of their body and Kafka's answer, summed over all
    # requests. A request that would pass it is answered 503 with Retry-After at once (its
    # body unread), so a slow or absent broker bounds memory instead of queueing batches.
    max_in_flight_bytes: Annotated[int, Field(ge=1024)] = 64 * 1_048_576
    # The built-in token endpoint (POST /oauth/token). Its ES256 signing keys, PEM: the first
    # signs, all verify (rotation: add the new key second, then move it first, then drop the
    # old one). Shared by every replica through config or a Secret; `sgpipe up` writes one per
    # data dir. Files (a mounted Secret) and inline keys are both read, files first.
    oauth_signing_key_files: tuple[Path, ...] = ()
    oauth_signing_keys: tuple[SecretStr, ...] = ()
    # The `iss` of the tokens the endpoint signs; the `aud` is "<issuer>/webhooks/<name>".
    oauth_issuer: str = "sgpipe"
    oauth_token_ttl_seconds: Annotated[int, Field(ge=60, le=86_400)] = 900
    # Clock skew tolerated on exp/nbf/iat of every bearer token.
    oauth_leeway_seconds: Annotated[int, Field(ge=0, le=300)] = 30
    # An identity provider's JWKS is fetched at start and again on a token with an unknown
    # `kid`, at most once per this many seconds (never once per request).
    oauth_jwks_refresh_seconds: Annotated[float, Field(ge=1)] = 60.0


class DeadLetterLimit(_Section):
    """A circuit breaker on dead letters (arroyo's DlqLimit): past it the stage *pauses* instead
    of dead-lettering everything after a bad deploy -- it stops consuming, holds the batch that
    crossed the limit (neither written nor committed) and reports not ready; it does not exit.
    Restarting the stage (after fixing the deploy) resumes it (docs/dead-letters.md).

    Counted over *source records*, not dead letters: a raw batch with any number of
    dead-lettered elements counts once. The window is the last ``window_records`` distinct
    source records before a batch, plus the batch: the limit is crossed when more than
    ``max_count`` of them had dead letters, or when there are at least ``min_records`` of them
    and more than ``max_ratio`` had dead letters. ``max_count: 0`` and ``max_ratio: 1.0``
    switch the respective check off.
    """

    max_ratio: Annotated[float, Field(gt=0, le=1)] = 0.5
    min_records: Annotated[int, Field(ge=1)] = 20
    max_count: Annotated[int, Field(ge=0)] = 0
    window_records: Annotated[int, Field(ge=1)] = 100

    @model_validator(mode="after")
    def _window_holds_the_limits(self) -> DeadLetterLimit:
        if self.min_records > self.window_records:
            raise ValueError(
                f"dead_letters.min_records ({self.min_records}) is larger than "
                f"dead_letters.window_records ({self.window_records})"
            )
        if self.max_count >= self.window_records:
            raise ValueError(
                f"dead_letters.max_count ({self.max_count}) must be below "
                f"dead_letters.window_records ({self.window_records}), or 0 (off)"
            )
        return self


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
    # At most one "wrote" line per this many seconds (records, rate, lag); 0: none.
    progress_log_seconds: Annotated[float, Field(ge=0)] = 30.0
    # Write what is buffered as soon as a poll finds the input idle, instead of waiting out
    # batch_max_seconds (low rates are not delayed). false: batch strictly by size and time.
    flush_when_idle: bool = True


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
    # `sgpipe sink` also copies the dead-letter topic into ClickHouse's dead_letters table,
    # with this consumer group and otherwise the settings above (docs/dead-letters.md).
    dead_letter_group_id: str = "sgpipe-dead-letters"


class EmbeddedSettings(_Section):
    """The single-machine stand-ins `sgpipe up` starts when nothing external is set.

    See docs/embedded.md for what is stored where under ``--data-dir``.
    """

    # Unset: a free loopback port chosen at every start (never 9092/8123, the ports of a local
    # Kafka or ClickHouse); `sgpipe up` records where they listen in <data-dir>/sgpipe-up.json,
    # where `sgpipe query`, `forget`, `dlq` and `migrate` find them, and logs where BI tools
    # connect. A port set here is pinned (0 is a free port too).
    kafka_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    clickhouse_http_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    # Embedded services listen here only; never expose them beyond the machine by default.
    host: str = "127.0.0.1"
    # durable: the broker's log lives in SeaweedFS (`weed mini`) under <data-dir>/broker and
    # survives kill -9 of anything. memory: nothing survives the broker process (tests, demos).
    broker_storage: Literal["durable", "memory"] = "durable"
    # SeaweedFS's S3 port (loopback, credentials required). 0: the port recorded in the data dir
    # by an earlier start, else a free one. Its internal ports are always chosen that way.
    storage_port: Annotated[int, Field(ge=0, le=65535)] = 0
    # Go's soft memory limit for SeaweedFS, in MiB (GOMEMLIMIT); 0 leaves it unlimited. A cap
    # against runaway growth, not a diet: measured (bench/broker.py) weed at ~320-380 MiB RSS
    # with 512 or none at the same throughput; 256 held it at ~125 MiB but cut produce
    # throughput 2-4x (the collector runs constantly).
    storage_memory_limit_mib: Annotated[int, Field(ge=0)] = 512
    # Record batches older than this are deleted once every sgpipe consumer group reading
    # their topic committed past them. Topics without an sgpipe group (dead letters) are kept.
    retention_hours: Annotated[float, Field(gt=0)] = 168.0
    retention_check_seconds: Annotated[float, Field(gt=0)] = 300.0
    # Web origins (e.g. "https://grafana.example.com") whose browser requests the embedded
    # ClickHouse endpoint accepts. None by default: any request with an Origin header is
    # refused, so a web page cannot use a browser to reach it (docs/security.md).
    # In the environment, a JSON list: SGPIPE_EMBEDDED__CLICKHOUSE_ALLOWED_ORIGINS='["https://..."]'.
    clickhouse_allowed_origins: tuple[str, ...] = ()
    # The longest statement text the embedded ClickHouse takes (413 beyond it). Rows sent as
    # `INSERT ... FORMAT` data are streamed and not limited by this.
    clickhouse_max_query_bytes: Annotated[int, Field(ge=1024)] = 1024 * 1024


class UpSettings(_Section):
    """`sgpipe up`'s own: how many processor and sink processes it runs (docs/up.md).

    Unset: one of each per two usable CPU cores (a processor and a sink share the machine with
    ClickHouse and the broker). Never more than the partitions of the stage's input topic: an
    extra consumer would own nothing; `sgpipe up` then runs fewer and says so."""

    processors: Annotated[int, Field(ge=1)] | None = None
    sinks: Annotated[int, Field(ge=1)] | None = None


class SendGridSettings(_Section):
    """SendGrid's Webhooks API, for `sgpipe webhooks ...` (docs/webhooks-api.md). The key may
    also come from ``SENDGRID_API_KEY``; it is a secret: never printed or logged."""

    api_key: SecretStr | None = None
    # Another server than SendGrid's for `region`, such as `sgpipe sendgrid-emulator`.
    api_base_url: Annotated[str | None, Field(pattern=r"^https?://")] = None
    # The two servers of SendGrid's OpenAPI: api.sendgrid.com, api.eu.sendgrid.com (EU subusers).
    region: Literal["global", "eu"] = "global"
    # Subuser (or "account-id ...") to act for, SendGrid's `on-behalf-of` header.
    on_behalf_of: str | None = None
    # https://HOST where SendGrid reaches the ingress: `webhooks check` expects each declared
    # webhook at {public_base_url}/webhooks/{name}. Absent: any host, matched by the path.
    public_base_url: Annotated[str | None, Field(pattern=r"^https?://")] = None


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_PATH_SEPARATOR,
        case_sensitive=False,
    )

    kafka: KafkaSettings = KafkaSettings()
    clickhouse: ClickHouseSettings = ClickHouseSettings()
    webhooks: tuple[WebhookSettings, ...] = ()
    ingest: IngestSettings = IngestSettings()
    processor: ProcessorSettings = ProcessorSettings()
    sink: SinkSettings = SinkSettings()
    embedded: EmbeddedSettings = EmbeddedSettings()
    up: UpSettings = UpSettings()
    logging: LoggingSettings = LoggingSettings()
    schema_registry: SchemaRegistrySettings = SchemaRegistrySettings()
    pii: PiiSettings = PiiSettings()
    sendgrid: SendGridSettings = SendGridSettings()
    raw_auth: RawAuthSettings = RawAuthSettings()

    @model_validator(mode="after")
    def _registry_for_confluent_format(self) -> Settings:
        if self.kafka.events_format == "confluent" and self.schema_registry.url is None:
            raise ValueError("kafka.events_format confluent needs schema_registry.url")
        return self

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

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Settings(...) built in code holds exactly what it was given: the environment is read
        # once, by load_settings, from the mapping the entrypoint passes (never os.environ here).
        return (init_settings,)


# --- loading ---------------------------------------------------------------------------------

CONFIG_FILE_VARIABLE = "SGPIPE_CONFIG"
COMMAND_LINE = "command line"

# Variables Kubernetes injects for a Service named `sgpipe` (or `sgpipe-...`): SGPIPE_PORT,
# SGPIPE_SERVICE_HOST, SGPIPE_SERVICE_PORT_HTTP, SGPIPE_PORT_8080_TCP_ADDR, ...
_SERVICE_LINK_NAME = re.compile(
    r"_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)$"
)
_SERVICE_LINK_VALUE = re.compile(r"^(tcp|udp|sctp)://")
# How close an unknown name must be to a setting's variable to be called a misspelling of it.
_SUGGESTION_CUTOFF = 0.85


@dataclass(frozen=True, slots=True)
class SettingsWarning:
    """Something about the configuration the operator should see at start; not an error."""

    event: str
    fields: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LoadedSettings:
    settings: Settings
    config_file: Path | None
    warnings: tuple[SettingsWarning, ...]


def load_settings(
    config_file: Path | None,
    environ: Mapping[str, str],
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """``read_settings(...).settings``: for callers that do not log the warnings."""
    return read_settings(config_file, environ, overrides).settings


def read_settings(
    config_file: Path | None,
    environ: Mapping[str, str],
    overrides: Mapping[str, Any] | None = None,
) -> LoadedSettings:
    """The YAML file (``config_file``, else ``SGPIPE_CONFIG``), then the ``SGPIPE_*`` variables
    that name a setting, then ``overrides`` (dotted paths, from command-line flags), validated.

    Returns the settings with warnings about variables that were ignored. Raises ConfigError
    naming each bad setting: by its variable when a variable set it, else by its dotted path
    (``webhooks[main].timestamp_tolerance``).
    """
    if config_file is None and environ.get(CONFIG_FILE_VARIABLE):
        config_file = Path(environ[CONFIG_FILE_VARIABLE])
    document = _read_yaml(config_file) if config_file is not None else {}
    environment = _classify_environment(environ, _declared_webhook_names(document))
    origins: dict[tuple[str, ...], _Origin] = {}
    problems: list[str] = []
    for variable in environment.settings:
        fragment = _parse_variable(variable, environ[variable.name], problems)
        if fragment is not None:
            _merge(document, fragment, (), _Origin(variable.name, variable.path), origins, problems)
    for webhook_variable in environment.webhook_fields:
        _set_webhook_field(document, webhook_variable, environ[webhook_variable.name], origins)
    for dotted, value in (overrides or {}).items():
        _set_override(document, dotted, value, origins)
    problems.extend(environment.undeclared_webhook_problems(document))
    if problems:
        raise ConfigError(*problems)
    try:
        settings = Settings.model_validate(document)
    except ValidationError as exc:
        raise ConfigError(
            *(_describe_error(error, document, origins) for error in exc.errors())
        ) from exc
    return LoadedSettings(settings, config_file, environment.warnings())


def settings_warnings(settings: Settings) -> list[SettingsWarning]:
    """Deliberate but risky choices, logged at every start of a process that serves them."""
    return [
        SettingsWarning(
            "webhook accepts unsigned requests: anyone who can reach it can inject events",
            {"webhook": webhook.name, "setting": f"webhooks[{webhook.name}].allow_unsigned"},
        )
        for webhook in settings.webhooks
        # Only a webhook that asks for neither a signature nor a token accepts anything.
        if webhook.allow_unsigned and not webhook.requires_signature and not webhook.accepts_tokens
    ]


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        # No excerpt of the bytes: a file passed by mistake may hold anything (a key, say).
        raise ConfigError(
            f"config file {path} is not UTF-8 text (invalid byte at offset {exc.start}); "
            "save it as UTF-8"
        ) from exc
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = " ".join(str(exc).split())
        raise ConfigError(f"config file {path} is not valid YAML: {problem}") from exc
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return document


# --- which variables are settings ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _SettingVariable:
    """A variable naming a section or a field: SGPIPE_KAFKA__TOPICS, SGPIPE_INGEST__PORT."""

    name: str
    path: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _WebhookVariable:
    """SGPIPE_WEBHOOKS__<NAME>__<FIELD>: a field of a declared webhook."""

    name: str
    webhook: str  # lower case, as written: "_" also finds a "-" (shells allow no "-")
    field: str


@dataclass
class _Environment:
    settings: list[_SettingVariable] = field(default_factory=list)
    webhook_fields: list[_WebhookVariable] = field(default_factory=list)
    # Not settings: the misspelled ones (with the variable they are closest to) are named one
    # by one; the rest (service links, other tools' variables) together.
    misspelled: list[tuple[str, str | None]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def undeclared_webhook_problems(self, document: Mapping[str, Any]) -> list[str]:
        declared = _declared_webhook_names(document)
        return [
            f"{variable.name}: no webhook named {variable.webhook!r} is declared "
            f"(declared: {', '.join(declared) or 'none'}); declare it under `webhooks:` in the "
            f"config file, or declare all webhooks in SGPIPE_WEBHOOKS as JSON"
            for variable in self.webhook_fields
            if _find_webhook(document, variable.webhook) is None
        ]

    def warnings(self) -> tuple[SettingsWarning, ...]:
        found = [
            SettingsWarning(
                "ignored environment variable: it names no setting",
                {"variable": name, "did_you_mean": suggestion}
                if suggestion
                else {"variable": name},
            )
            for name, suggestion in self.misspelled
        ]
        if self.ignored:
            found.append(
                SettingsWarning(
                    "ignored SGPIPE_* environment variables that name no setting "
                    "(Kubernetes service links look like this)",
                    {"variables": sorted(self.ignored)},
                )
            )
        return tuple(found)


def _classify_environment(environ: Mapping[str, str], declared_webhooks: list[str]) -> _Environment:
    environment = _Environment()
    candidates: list[str] | None = None
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper == CONFIG_FILE_VARIABLE:
            continue
        segments = tuple(upper[len(ENV_PREFIX) :].lower().split(ENV_PATH_SEPARATOR))
        resolved = _resolve(name, segments)
        if isinstance(resolved, _SettingVariable):
            environment.settings.append(resolved)
        elif isinstance(resolved, _WebhookVariable):
            environment.webhook_fields.append(resolved)
        elif _is_service_link(upper, environ[name]):
            environment.ignored.append(name)
        else:
            if candidates is None:
                candidates = list(_setting_variables(Settings, (), declared_webhooks))
            close = difflib.get_close_matches(upper, candidates, 1, _SUGGESTION_CUTOFF)
            known_section = len(segments) > 1 and segments[0] in Settings.model_fields
            if close or known_section:
                environment.misspelled.append((name, close[0] if close else None))
            else:
                environment.ignored.append(name)
    # Whole sections first, so that a variable for one of their fields overrides their JSON.
    environment.settings.sort(key=lambda variable: (len(variable.path), variable.name))
    return environment


def _resolve(name: str, segments: tuple[str, ...]) -> _SettingVariable | _WebhookVariable | None:
    model: type[BaseModel] = Settings
    for depth, segment in enumerate(segments):
        info = model.model_fields.get(segment)
        if info is None:
            return None
        last = depth == len(segments) - 1
        section = _section_model(info.annotation)
        item = _named_item_model(info.annotation)
        if last:
            return _SettingVariable(name, segments)
        if section is not None:
            model = section
            continue
        if item is not None and len(segments) == depth + 3:
            webhook, item_field = segments[depth + 1], segments[depth + 2]
            if webhook and item_field in item.model_fields and item_field != "name":
                return _WebhookVariable(name, webhook, item_field)
        return None
    return None


def _setting_variables(
    model: type[BaseModel], path: tuple[str, ...], webhooks: list[str]
) -> Iterator[str]:
    """Every variable that names a setting (webhook fields for the declared webhooks)."""
    for name, info in model.model_fields.items():
        here = (*path, name)
        yield ENV_PREFIX + ENV_PATH_SEPARATOR.join(here).upper()
        section = _section_model(info.annotation)
        item = _named_item_model(info.annotation)
        if section is not None:
            yield from _setting_variables(section, here, webhooks)
        elif item is not None:
            for webhook in webhooks:
                for item_field in item.model_fields:
                    if item_field != "name":
                        parts = (*here, webhook.replace("-", "_"), item_field)
                        yield ENV_PREFIX + ENV_PATH_SEPARATOR.join(parts).upper()


def _section_model(annotation: Any) -> type[BaseModel] | None:
    for candidate in _union_members(annotation):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _named_item_model(annotation: Any) -> type[BaseModel] | None:
    """The item model of a list of named entries (``webhooks``), addressed by name."""
    for candidate in _union_members(annotation):
        if typing.get_origin(candidate) in (tuple, list):
            args = [arg for arg in typing.get_args(candidate) if arg is not Ellipsis]
            item = _section_model(args[0]) if len(args) == 1 else None
            if item is not None and "name" in item.model_fields:
                return item
    return None


def _union_members(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _is_service_link(name: str, value: str) -> bool:
    if _SERVICE_LINK_NAME.search(name):
        return True
    return name.endswith("_PORT") and bool(_SERVICE_LINK_VALUE.match(value))


def _declared_webhook_names(document: Mapping[str, Any]) -> list[str]:
    webhooks = document.get("webhooks")
    if not isinstance(webhooks, list):
        return []
    return [str(entry["name"]) for entry in webhooks if isinstance(entry, dict) and "name" in entry]


# --- reading the values ----------------------------------------------------------------------


class _GivenEnvironment(EnvSettingsSource):
    """pydantic-settings' environment parsing over a given mapping instead of os.environ."""

    def __init__(self, variables: Mapping[str, str]) -> None:
        self._given = {name.lower(): value for name, value in variables.items()}
        super().__init__(Settings)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return self._given


def _parse_variable(
    variable: _SettingVariable, value: str, problems: list[str]
) -> dict[str, Any] | None:
    # One variable at a time, so that a value that does not parse is blamed on its variable.
    try:
        return _GivenEnvironment({variable.name: value})()
    except SettingsError as exc:
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        problems.append(f"{variable.name}: a section is set as JSON; this is not JSON ({cause})")
        return None


@dataclass(frozen=True, slots=True)
class _Origin:
    """Where a value came from: a variable (and the path it names) or the command line."""

    source: str
    path: tuple[str, ...]


def _merge(
    base: dict[str, Any],
    overlay: Mapping[str, Any],
    path: tuple[str, ...],
    origin: _Origin,
    origins: dict[tuple[str, ...], _Origin],
    problems: list[str],
) -> None:
    for key, value in overlay.items():
        here = (*path, key)
        if isinstance(value, Mapping):
            existing = base.setdefault(key, {})
            if not isinstance(existing, dict):
                dotted = ".".join(here)
                problems.append(f"{origin.source}: {dotted} in the config file is not a section")
                continue
            _merge(existing, value, here, origin, origins, problems)
        else:
            base[key] = value
            origins[here] = origin


def _find_webhook(document: Mapping[str, Any], written: str) -> dict[str, Any] | None:
    webhooks = document.get("webhooks")
    if not isinstance(webhooks, list):
        return None
    for entry in webhooks:
        if isinstance(entry, dict) and entry.get("name") in (written, written.replace("_", "-")):
            return entry
    return None


def _set_webhook_field(
    document: dict[str, Any],
    variable: _WebhookVariable,
    value: str,
    origins: dict[tuple[str, ...], _Origin],
) -> None:
    entry = _find_webhook(document, variable.webhook)
    if entry is None:
        return  # reported by undeclared_webhook_problems
    # A string: pydantic converts scalars, and public_keys parses "K1,K2" or a JSON list.
    entry[variable.field] = value
    path = ("webhooks", str(entry["name"]), variable.field)
    origins[path] = _Origin(variable.name, path)


def _set_override(
    document: dict[str, Any], dotted: str, value: Any, origins: dict[tuple[str, ...], _Origin]
) -> None:
    path = dotted.split(".")
    if path[0] == "webhooks" and len(path) == 3:
        entry = _find_webhook(document, path[1])
        if entry is None:
            raise ConfigError(f"{dotted} ({COMMAND_LINE}): no webhook named {path[1]!r}")
        entry[path[2]] = value
        named = ("webhooks", str(entry["name"]), path[2])
        origins[named] = _Origin(COMMAND_LINE, named)
        return
    node = document
    for key in path[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted} ({COMMAND_LINE}): {key} is not a section")
        node = child
    node[path[-1]] = value
    origins[tuple(path)] = _Origin(COMMAND_LINE, tuple(path))


# --- errors that name the setting ------------------------------------------------------------


def _describe_error(
    error: Mapping[str, Any],
    document: Mapping[str, Any],
    origins: Mapping[tuple[str, ...], _Origin],
) -> str:
    named, display = _named_location(error["loc"], document)
    message = str(error["msg"])
    for length in range(len(named), 0, -1):
        origin = origins.get(named[:length])
        if origin is None:
            continue
        if origin.source == COMMAND_LINE:
            return f"{display} ({COMMAND_LINE}): {message}"
        if origin.path == named:
            return f"{origin.source}: {message}"
        return f"{origin.source} ({display}): {message}"
    return f"{display}: {message}"


def _named_location(
    location: tuple[int | str, ...], document: Mapping[str, Any]
) -> tuple[tuple[str, ...], str]:
    """(path with list entries named, display text): ``webhooks.0.public_keys`` becomes
    (("webhooks", "main", "public_keys"), "webhooks[main].public_keys"): users know names."""
    named: list[str] = []
    parts: list[str] = []
    node: Any = document
    for item in location:
        if isinstance(item, int) and isinstance(node, list) and item < len(node):
            entry = node[item]
            name = entry.get("name") if isinstance(entry, dict) else None
            label = str(name) if name else str(item)
            named.append(label)
            if parts:
                parts[-1] = f"{parts[-1]}[{label}]"
            else:
                parts.append(f"[{label}]")
            node = entry
            continue
        named.append(str(item))
        parts.append(str(item))
        node = node.get(item) if isinstance(node, dict) else None
    return tuple(named), ".".join(parts) or "(top level)"
