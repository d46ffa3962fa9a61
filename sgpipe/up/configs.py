"""The settings each child of `sgpipe up` runs with, written as its config file.

The supervisor validated one Settings object (file, environment, flags); each child gets that
object -- adjusted to the embedded services and to its role -- as a complete YAML file, so a
child restarted an hour later runs with exactly what was validated at start, whatever happened
to the user's file or environment since. The children's environment carries no ``SGPIPE_*``
variable (``child_environment``): the file is the whole truth.

Files are mode 0600 in a 0700 directory and removed at stop: the sink's carries the embedded
ClickHouse writer's password, and any may carry Kafka or registry credentials. Only the sink
gets ClickHouse credentials.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import SecretStr

from sgpipe.runtime.settings import ENV_PREFIX, Settings
from sgpipe.up.layout import write_private_file

# The children listen for health checks on loopback only: the ingress port answers for them.
CHILD_HEALTH_HOST = "127.0.0.1"


def settings_document(settings: Settings) -> dict[str, Any]:
    """``settings`` as a plain document that reads back into equal Settings, secrets
    included (they must reach the child)."""
    converted = _plain(settings.model_dump())
    assert isinstance(converted, dict)
    return converted


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _without_clickhouse_credentials(settings: Settings) -> Settings:
    clickhouse = settings.clickhouse.model_copy(update={"url": None, "password": SecretStr("")})
    return settings.model_copy(update={"clickhouse": clickhouse})


def stage_settings(
    settings: Settings,
    stage: str,
    *,
    health_peers: tuple[str, ...] = (),
    ingest_port: int | None = None,
) -> Settings:
    """What the child running ``stage`` (``ingest``, ``process``, ``sink``, ``clickhouse``)
    runs with: JSON logs (the supervisor reads them), health endpoints on a free loopback port
    (it reads which from the log), the ingress fronting ``health_peers`` on ``ingest_port``."""
    logging = settings.logging.model_copy(update={"format": "json"})
    adjusted = settings.model_copy(update={"logging": logging})
    if stage != "sink":
        adjusted = _without_clickhouse_credentials(adjusted)
    if stage == "ingest":
        ingest = adjusted.ingest.model_copy(
            update={
                "health_peers": health_peers,
                "port": settings.ingest.port if ingest_port is None else ingest_port,
            }
        )
        adjusted = adjusted.model_copy(update={"ingest": ingest})
    elif stage == "process":
        processor = adjusted.processor.model_copy(
            update={"health_host": CHILD_HEALTH_HOST, "health_port": 0}
        )
        adjusted = adjusted.model_copy(update={"processor": processor})
    elif stage == "sink":
        sink = adjusted.sink.model_copy(update={"health_host": CHILD_HEALTH_HOST, "health_port": 0})
        adjusted = adjusted.model_copy(update={"sink": sink})
    # Re-validated: a child must never start from settings that would not load.
    return Settings.model_validate(settings_document(adjusted))


def write_config(run_dir: Path, name: str, settings: Settings) -> Path:
    path = run_dir / f"{name}.yaml"
    text = "# Written by `sgpipe up` for its child; removed when it stops.\n" + yaml.safe_dump(
        settings_document(settings), sort_keys=False
    )
    write_private_file(path, text)
    return path


def child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The children's environment: ours without SGPIPE_* (their config file is complete)."""
    kept = {
        name: value for name, value in environ.items() if not name.upper().startswith(ENV_PREFIX)
    }
    return {**kept, "PYTHONUNBUFFERED": "1"}
