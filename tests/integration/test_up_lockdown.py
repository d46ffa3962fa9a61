"""What another local user can do to a running `sgpipe up` (embedded defaults: the durable
broker on SeaweedFS, the embedded ClickHouse): nothing with its files or its storage. Run as
``nobody`` through ``runuser`` (these tests run as root here; skipped when they cannot switch
users). And what a crash leaves: a restart right after kill -9 serves, never exit 2.

The embedded broker itself stays reachable by any local user: tansu 0.6 cannot keep a SCRAM
user (tests/integration/test_embedded_broker_auth.py, docs/security.md).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from sgpipe.embedded.storage import BUCKET, StorageLayout, weed_binary
from tests import forked
from tests.integration.kafka_tools import FAST_GROUP_SETTINGS
from tests.ports import free_port
from tests.up_support import WebhookKey, events_body, get, post, read_state, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

SGPIPE = [sys.executable, "-m", "sgpipe"]
START_TIMEOUT = 90.0
# A system interpreter another user may run (the test's own lives under /root).
OTHER_USERS_PYTHON = "/usr/bin/python3"


def _can_switch_to_nobody() -> bool:
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        return False
    return subprocess.run(["runuser", "-u", "nobody", "--", "true"], check=False).returncode == 0


as_another_user = pytest.mark.skipif(
    not _can_switch_to_nobody(), reason="needs root and runuser to act as user nobody"
)


def as_nobody(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as user ``nobody`` from /tmp, with a HOME of its own."""
    return subprocess.run(
        ["runuser", "-u", "nobody", "--", "env", "HOME=/tmp", *argv],
        cwd="/tmp",
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass
class Up:
    """`sgpipe up` on a fixed ingress port, kafka port and data dir, restartable."""

    config: Path
    data_dir: Path
    port: int
    log: Path
    key: WebhookKey
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as output:
            self.process = forked.Popen(
                [*SGPIPE, "up", "--config", str(self.config), "--data-dir", str(self.data_dir)]
                + ["--port", str(self.port)],
                stdout=output,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def wait_serving(self, timeout: float = START_TIMEOUT) -> None:
        """Until the ingress takes a signed batch (200); fails at once if `sgpipe up` exits."""
        process = self.process
        assert process is not None

        def accepted() -> bool:
            code = process.poll()
            assert code is None, f"sgpipe up exited {code}:\n{self.log.read_text()[-3000:]}"
            body = events_body(f"probe-{time.monotonic_ns()}", 2)
            try:
                return post(self.url, body, self.key.headers(body), timeout=5) == 200
            except OSError:
                return False

        wait_until(accepted, timeout, "the ingress to accept a signed batch")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/webhooks/main"

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                return self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise
        return self.process.returncode


def new_up(tmp_path: Path) -> Up:
    key = WebhookKey.generate()
    document = {
        "webhooks": key.webhooks,
        # A fixed broker port, as a default install has: the one a dying tansu holds.
        "embedded": {"kafka_port": free_port(), "clickhouse_http_port": 0},
        "kafka": dict(FAST_GROUP_SETTINGS),
        "logging": {"format": "json"},
    }
    config = tmp_path / "sgpipe.yaml"
    config.write_text(yaml.safe_dump(document))
    return Up(config, tmp_path / "data", free_port(), tmp_path / "sgpipe-up.log", key)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    up = new_up(tmp_path_factory.mktemp("lockdown"))
    up.start()
    try:
        up.wait_serving()
        yield up
    finally:
        assert up.stop() == 0, up.log.read_text()[-3000:]


def test_the_data_dir_and_everything_in_it_is_private(running: Up) -> None:
    assert stat.S_IMODE(running.data_dir.stat().st_mode) == 0o700
    exposed = []
    for directory, directories, files in os.walk(running.data_dir):
        for name in [*directories, *files]:
            path = Path(directory) / name
            try:
                status = path.lstat()
            except FileNotFoundError:
                # Gone since it was listed: the running engine's temporary files (a table's
                # `_tmp_replace_*.sql.tmp`) are renamed away at once. What stays is checked.
                continue
            if stat.S_ISLNK(status.st_mode):
                continue  # a link's own mode means nothing; its target is walked
            if path.suffix == ".vif" and stat.S_IMODE(status.st_mode) == 0o644:
                # SeaweedFS chmods its volume-info files 0644 itself, whatever the umask: a
                # few JSON fields (version, size), no data, behind 0700 directories.
                assert b"email" not in path.read_bytes()
                continue
            if status.st_mode & 0o077:
                exposed.append(f"{stat.S_IMODE(status.st_mode):o} {path}")
    assert exposed == []
    # It looked at the real thing: the store, the broker's storage, the logs.
    assert (running.data_dir / "clickhouse").is_dir()
    assert (running.data_dir / "broker" / "seaweedfs" / "security.toml").is_file()


@as_another_user
def test_another_user_cannot_read_the_data_dir(running: Up) -> None:
    listing = as_nobody("ls", str(running.data_dir))
    copy = as_nobody("cat", str(running.data_dir / "clickhouse-credentials.json"))

    assert listing.returncode != 0 and "Permission denied" in listing.stderr
    assert copy.returncode != 0 and "Permission denied" in copy.stderr


def _weed_shell(running: Up, command: str, *, user: str | None) -> subprocess.CompletedProcess[str]:
    """``weed shell`` against the master and filer of the running storage, as ``user`` (None:
    as us, from the storage's config dir, i.e. with its certificates)."""
    layout = StorageLayout(running.data_dir / "broker")
    ports = yaml.safe_load(layout.ports.read_text())
    argv = [
        str(weed_binary()),
        "shell",
        f"-master=127.0.0.1:{ports['master']}",
        f"-filer=127.0.0.1:{ports['filer']}",
    ]
    prefix = [] if user is None else ["runuser", "-u", user, "--", "env", "HOME=/tmp"]
    # Its own process group: without a certificate weed retries the TLS handshake forever,
    # and the timeout must end weed itself, not only runuser.
    process = subprocess.Popen(
        [*prefix, *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=layout.seaweedfs if user is None else "/tmp",
        start_new_session=True,
    )
    try:
        output, errors = process.communicate(f"{command}\nexit\n", timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, errors = process.communicate()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(process.args, process.returncode, output, errors)


@as_another_user
def test_another_user_cannot_list_read_or_delete_the_brokers_objects(running: Up) -> None:
    topics = f"/buckets/{BUCKET}/clusters/sgpipe/topics"
    # The control: with the data dir's certificates the same command lists the topics.
    ours = _weed_shell(running, f"fs.ls {topics}", user=None)
    assert "sgpipe.raw" in ours.stdout, ours

    # Both tries at once: without the certificates each runs until its timeout.
    with ThreadPoolExecutor(2) as pool:
        tries = [
            pool.submit(_weed_shell, running, command, user="nobody")
            for command in (f"fs.ls {topics}", f"fs.rm -r {topics}/sgpipe.raw")
        ]
        listing, removal = (attempt.result() for attempt in tries)

    assert "sgpipe.raw" not in listing.stdout
    assert "sgpipe.raw" in _weed_shell(running, f"fs.ls {topics}", user=None).stdout
    assert removal.returncode != 0 or "sgpipe.raw" not in removal.stdout


@as_another_user
def test_another_user_gets_403_from_the_storages_s3_endpoint(running: Up) -> None:
    port = yaml.safe_load(StorageLayout(running.data_dir / "broker").ports.read_text())["s3"]
    script = (
        "import urllib.request, urllib.error, sys\n"
        f"url = 'http://127.0.0.1:{port}/{BUCKET}?list-type=2'\n"
        "try:\n"
        "    urllib.request.urlopen(url, timeout=10); print(200)\n"
        "except urllib.error.HTTPError as error:\n"
        "    print(error.code)\n"
    )
    result = as_nobody(OTHER_USERS_PYTHON, "-c", script)

    assert result.stdout.strip() == "403", result


def test_kill_9_then_an_immediate_restart_serves_and_never_exits_2(tmp_path: Path) -> None:
    up = new_up(tmp_path)
    up.start()
    try:
        up.wait_serving()
        broker_pid = read_state(up.data_dir)["broker"]["pid"]
        assert up.process is not None
        up.process.kill()
        up.process.wait(timeout=30)
        # No wait: the old broker, sent SIGTERM by PR_SET_PDEATHSIG, still holds its port.
        up.start()
        up.wait_serving(timeout=60)

        status, _ = get(f"http://127.0.0.1:{up.port}/healthz")
        assert status == 200
        restarted = read_state(up.data_dir)["broker"]["pid"]
        assert restarted != broker_pid
    finally:
        code = up.stop()
    assert code == 0, up.log.read_text()[-3000:]
