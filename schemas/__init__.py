"""The contracts between stages: Avro schemas, the raw-batch record and ClickHouse DDL.

Files are read through ``importlib.resources`` so an installed wheel finds them too.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any


def avro_schema_json(name: str) -> dict[str, Any]:
    """The parsed JSON of ``schemas/avro/{name}.avsc``."""
    text = resources.files(__package__).joinpath("avro", f"{name}.avsc").read_text("utf-8")
    document: dict[str, Any] = json.loads(text)
    return document


def clickhouse_migrations() -> list[tuple[str, str]]:
    """``(name, sql)`` of each ``schemas/clickhouse/NNNN_*.sql``, in order.

    SQL may use a ``{database}`` placeholder, filled in by the migrator.
    """
    folder = resources.files(__package__).joinpath("clickhouse")
    names = sorted(entry.name for entry in folder.iterdir() if entry.name.endswith(".sql"))
    return [(name.removesuffix(".sql"), folder.joinpath(name).read_text("utf-8")) for name in names]
