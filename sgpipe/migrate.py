"""`sgpipe migrate [--dry-run]`: bring ClickHouse (and, with ``kafka.create_topics``, Kafka) to
what this version needs, before any stage of it starts (the Helm chart's pre-install Job).

ClickHouse: the migrations of ``schemas/clickhouse`` not applied yet, in order, then the TTLs of
``clickhouse.retention_days`` (``sgpipe.runtime.migrations``). Kafka: the pipeline's topics that
are missing (only with ``kafka.bootstrap_servers``: the embedded broker is `sgpipe up`'s own).
``--dry-run`` prints the SQL it would run and the topics it would create, and changes nothing.
"""

from __future__ import annotations

from pathlib import Path

from sgpipe.runtime.clickhouse import connect
from sgpipe.runtime.kafka import ensure_topics
from sgpipe.runtime.migrations import Target, plan_migrations, run_migrations
from sgpipe.runtime.settings import Settings
from sgpipe.store import open_store


async def run_migrate(settings: Settings, data_dir: Path, *, dry_run: bool) -> list[str]:
    """What was done (or, dry, would be done), as lines for stdout. Raises MigrationError
    (an edited migration, a failing statement), StoreUnavailable, or the clients' errors."""
    lines: list[str] = []
    kafka = settings.kafka
    if kafka.create_topics and kafka.bootstrap_servers is not None:
        topics = await ensure_topics(kafka, create=not dry_run)
        verb = "would create topic" if dry_run else "created topic"
        lines.extend(f"{verb} {topic}" for topic in topics)

    async with open_store(settings, data_dir, "migrate", create=True) as store:
        client = await connect(store.settings, store.url)
        try:
            target = Target.from_settings(settings.clickhouse)
            retention = settings.clickhouse.retention_days
            if dry_run:
                plan = await plan_migrations(client, target, retention)
                lines.extend(plan.describe())
                if plan.up_to_date:
                    lines.append(f"{target.database} is up to date")
                return lines
            result = await run_migrations(client, target, retention)
        finally:
            await client.close()
    lines.extend(f"applied {name}" for name in result.applied)
    lines.extend(f"retention: {statement}" for statement in result.retention)
    if not result.applied and not result.retention:
        lines.append(f"{target.database} is up to date")
    return lines
