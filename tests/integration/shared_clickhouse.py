"""One embedded ClickHouse per test process (one per xdist worker), shared by the tests that
need *a* ClickHouse rather than an engine of their own (issue 21: a fresh engine plus all the
migrations in each of ~60 tests cost 8.5 s a test).

Why a child process (``python -m tests.integration.shared_clickhouse DIR``): chdb allows one data
path per process ("EmbeddedServer already initialized with path ..."), so an engine held by the
test process would keep the tests whose subject is an engine of their own
(tests/integration/test_embedded_clickhouse.py, test_clickhouse_lockdown.py, `sgpipe query`
on a data dir) from opening theirs. The child serves ClickHouse's HTTP interface (the real
endpoint, `sgpipe.embedded.clickhouse`) on a free port, prints its URL, and exits when its stdin
closes: when the test process ends, however it ends, nothing is left running.

A test takes it through ``clean_engine()``: every database but the system ones and the migrated
template is dropped first, so the test meets an engine as empty as a new one (tests of one
process run one at a time, so nobody else is using it meanwhile). ``create_migrated(name)``
creates a database as all the shipped migrations leave it, by copying a template database that
was migrated once per process: the engine's own ``SHOW CREATE`` statements replayed under the
new name, and the migration records copied, which is what applying the migrations would have
produced (tests/integration/test_migrations.py still applies them for real, from nothing).
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from sgpipe.embedded.credentials import (
    EmbeddedCredentials,
    credentials_file,
    load_credentials,
    load_or_create_credentials,
)

REPOSITORY = Path(__file__).resolve().parents[2]
START_TIMEOUT = 120.0  # the child's engine start on a busy machine
QUERY_TIMEOUT = 60.0
TEMPLATE = "sgpipe_migrated_template"
# Databases the engine has of its own; clean_engine() never drops them.
ENGINE_DATABASES = frozenset({"system", "default", "information_schema", "INFORMATION_SCHEMA"})
_TABLE_NAME = re.compile(r"^[A-Za-z0-9_]+$")


class SharedEngineError(AssertionError):
    """The shared engine did not start or refused a statement (a test failure, with the text)."""


@dataclass
class SharedClickHouse:
    """The shared engine: its base URL (no credentials in it) and the users of its data dir."""

    base_url: str
    credentials: EmbeddedCredentials
    data_dir: Path
    process: subprocess.Popen[str]

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    @property
    def writer_url(self) -> str:
        """The writer's URL, credentials included, as a `clickhouse.url` setting carries them."""
        writer = self.credentials.writer
        return self.base_url.replace("://", f"://{writer.name}:{writer.password}@", 1)

    def command(self, sql: str, database: str | None = None) -> str:
        """Run ``sql`` as the writer; its TabSeparated output."""
        query = urllib.parse.urlencode({"database": database} if database else {})
        writer = self.credentials.writer
        request = urllib.request.Request(
            f"{self.base_url}/?{query}",
            data=sql.encode(),
            method="POST",
            headers={"X-ClickHouse-User": writer.name, "X-ClickHouse-Key": writer.password},
        )
        try:
            with urllib.request.urlopen(request, timeout=QUERY_TIMEOUT) as response:
                return str(response.read().decode())
        except urllib.error.HTTPError as error:
            raise SharedEngineError(f"{sql!r}: {error.read().decode()}") from error

    def databases(self) -> list[str]:
        return self.command("SHOW DATABASES").split()

    def clean_engine(self) -> SharedClickHouse:
        """Drop every database a test made, so the next one meets an empty engine."""
        for name in self.databases():
            if name not in ENGINE_DATABASES and name != TEMPLATE:
                self.command(f"DROP DATABASE `{name}` SYNC")
        return self

    def copy_credentials_to(self, directory: Path) -> None:
        """Put the engine's credentials file in ``directory``, where tests that started an
        engine of their own loaded its users from (``load_credentials(directory)``)."""
        directory.mkdir(parents=True, exist_ok=True)
        target = credentials_file(directory)
        shutil.copyfile(credentials_file(self.data_dir), target)
        target.chmod(0o600)

    def create_migrated(self, database: str) -> None:
        """``database`` as every shipped migration leaves it (see the module docstring)."""
        statements = self._template_statements()
        self.command(f"CREATE DATABASE `{database}`")
        for statement in statements:
            # Every name in the schema is database-qualified (the migrations' {database}).
            self.command(statement.replace(f"{TEMPLATE}.", f"`{database}`."))
        self.command(
            f"INSERT INTO `{database}`.sgpipe_schema_migrations "
            f"SELECT * FROM {TEMPLATE}.sgpipe_schema_migrations"
        )

    _template: list[str] | None = None

    def _template_statements(self) -> list[str]:
        """The CREATE statements of the template, migrated on first use, in an order that
        creates what a view reads or feeds before the view."""
        if self._template is not None:
            return self._template
        import asyncio

        from sgpipe.runtime.clickhouse import connect
        from sgpipe.runtime.migrations import apply_migrations
        from sgpipe.runtime.settings import ClickHouseSettings

        async def migrate() -> None:
            client = await connect(ClickHouseSettings(url=self.writer_url))
            try:
                await apply_migrations(client, TEMPLATE)
            finally:
                await client.close()

        # On a thread of its own: the caller may be inside an event loop (an async test).
        errors: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(migrate())
            except BaseException as exc:  # handed to the caller's thread
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        if errors:
            raise errors[0]
        # Tables first (they hold data; views do not), then the views, which read tables and
        # other views or feed tables, each group in the order the migrations created them.
        # (Ordered by `has_own_data`: the server refuses a statement naming the engine column.)
        names = self.command(
            f"SELECT name FROM system.tables WHERE database = '{TEMPLATE}' "
            "ORDER BY has_own_data DESC, metadata_modification_time, name FORMAT TSVRaw"
        ).split()
        assert all(_TABLE_NAME.match(name) for name in names), names
        self._template = [
            self.command(
                "SELECT create_table_query FROM system.tables "
                f"WHERE database = '{TEMPLATE}' AND name = '{name}' FORMAT TSVRaw"
            )
            for name in names
        ]
        return self._template


_shared: SharedClickHouse | None = None
_lock = threading.Lock()


def shared_clickhouse() -> SharedClickHouse:
    """This process's shared engine, started on first use, stopped when the process exits."""
    global _shared
    with _lock:
        if _shared is None or _shared.process.poll() is not None:
            _shared = _start()
        return _shared


def stop_shared_clickhouse() -> None:
    """Stop this process's shared engine if it was started (the end of a test session; an
    exit without it still stops the child, whose stdin then closes)."""
    global _shared
    with _lock:
        if _shared is not None:
            _stop(_shared.process, _shared.data_dir)
            _shared = None


def _start() -> SharedClickHouse:
    data_dir = Path(tempfile.mkdtemp(prefix="sgpipe-shared-clickhouse-"))
    credentials = load_or_create_credentials(data_dir)
    with (data_dir / "engine.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.shared_clickhouse", str(data_dir)],
            cwd=REPOSITORY,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**os.environ, "SGPIPE_LOGGING__FORMAT": "json"},
        )
    atexit.register(_stop, process, data_dir)
    found: list[str] = []

    def read_url() -> None:
        # The engine's own log lines may come first; the URL is the line of its own.
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("http://"):
                found.append(line.strip())
                return

    reader = threading.Thread(target=read_url, daemon=True)
    reader.start()
    reader.join(START_TIMEOUT)
    url = found[0] if found else ""
    if not url:
        process.kill()
        output = (data_dir / "engine.log").read_text(errors="replace")
        raise SharedEngineError(
            f"the shared ClickHouse did not print its URL within {START_TIMEOUT} s:\n{output}"
        )
    return SharedClickHouse(url, credentials, data_dir, process)


def _stop(process: subprocess.Popen[str], data_dir: Path) -> None:
    if process.poll() is None:
        assert process.stdin is not None
        process.stdin.close()  # the child's signal to stop
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    shutil.rmtree(data_dir, ignore_errors=True)


def _serve(data_dir: Path) -> None:
    """The child: serve the engine of ``data_dir`` until stdin closes."""
    import asyncio

    from sgpipe.embedded.clickhouse import EmbeddedClickHouse

    async def serve() -> None:
        store = EmbeddedClickHouse(data_dir / "store", load_credentials(data_dir))
        url = await store.start(port=0)
        print(url, flush=True)
        try:
            # stdin closes when the test process ends, whichever way it ends.
            await asyncio.to_thread(sys.stdin.read)
        finally:
            await store.stop()

    asyncio.run(serve())


if __name__ == "__main__":
    _serve(Path(sys.argv[1]))
