"""Running sgpipe commands as real processes in tests, and a ClickHouse server for them.

The ClickHouse server is the embedded engine served over ClickHouse's HTTP interface by the
test process's shared engine process (tests/integration/shared_clickhouse.py), so a stage
process reaches it like any server.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests import forked

SGPIPE = [sys.executable, "-m", "sgpipe.cli"]
TIMEOUT = 30.0


@dataclass
class ServedClickHouse:
    base_url: str
    loop: asyncio.AbstractEventLoop | None  # the engine's loop, None for the shared engine
    user: str
    password: str

    @property
    def url(self) -> str:
        """The writer's URL, credentials included, as a `clickhouse.url` setting."""
        return self.base_url.replace("://", f"://{self.user}:{self.password}@", 1)

    def query(self, sql: str) -> str:
        request = urllib.request.Request(
            self.base_url,
            data=sql.encode(),
            method="POST",
            headers={"X-ClickHouse-User": self.user, "X-ClickHouse-Key": self.password},
        )
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return str(response.read().decode())


@contextmanager
def served_clickhouse(data_path: Path) -> Iterator[ServedClickHouse]:
    """A ClickHouse server for this test's stage processes: the test process's shared engine
    (tests/integration/shared_clickhouse.py) with no database left from earlier tests. Its
    users' credentials file is also put where an engine of ``data_path`` would have kept it
    (``<data_path>-credentials``)."""
    from tests.integration.shared_clickhouse import shared_clickhouse

    shared = shared_clickhouse().clean_engine()
    shared.copy_credentials_to(data_path.parent / f"{data_path.name}-credentials")
    writer = shared.credentials.writer
    try:
        yield ServedClickHouse(shared.base_url, None, writer.name, writer.password)
    finally:
        shared.clean_engine()


@dataclass
class StageProcess:
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"did not stop within {timeout} s:\n{self.output()}") from None
        return int(self.process.returncode)


def write_config(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(document))
    return path


def start_sgpipe(command: list[str], config: Path, log: Path) -> StageProcess:
    with log.open("wb") as output:
        process = forked.Popen(
            [*SGPIPE, *command, "--config", str(config)],
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    return StageProcess(process, log)


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), str(response.read().decode())
    except urllib.error.HTTPError as error:
        return int(error.code), str(error.read().decode())


def wait_for_status(
    url: str, status: int, stage: StageProcess, timeout: float = 60.0
) -> dict[str, Any]:
    """Poll ``url`` until it answers ``status``; returns the JSON body."""
    deadline = time.monotonic() + timeout
    last: tuple[int, str] | str = ""
    while time.monotonic() < deadline:
        if stage.process.poll() is not None:
            raise AssertionError(f"the process exited early:\n{stage.output()}")
        try:
            last = http_get(url)
            if last[0] == status:
                body: dict[str, Any] = json.loads(last[1])
                return body
        except OSError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise AssertionError(f"{url} never answered {status} (last: {last}):\n{stage.output()}")


def wait_for_log_event(stage: StageProcess, event: str, timeout: float = 60.0) -> dict[str, Any]:
    """The first JSON log line of ``stage`` whose event is ``event``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in stage.output().splitlines():
            if line.startswith("{"):
                entry: dict[str, Any] = json.loads(line)
                if entry.get("event") == event:
                    return entry
        if stage.process.poll() is not None:
            raise AssertionError(f"the process exited early:\n{stage.output()}")
        time.sleep(0.1)
    raise AssertionError(f"no {event!r} log line within {timeout} s:\n{stage.output()}")


def metric(text: str, name: str, **labels: str) -> float:
    """A sample's value from a Prometheus text exposition (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0
