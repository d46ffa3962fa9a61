"""The README's first five minutes, on a clean copy of the repository: `make up`, the README's
signed sample, the README's query.

The copy holds only the files git tracks (what a fresh clone has), so a file the README or the
Makefile names but nobody committed fails this test. `sgpipe up` runs with exactly the
arguments `make up` uses (read from `make print-up-args`); only ports (free ones, the defaults
may be taken) and the log format come from SGPIPE_* variables.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.ports import free_port
from tests.sendgrid_vector import BODY, PUBLIC_KEY, SIGNATURE, TIMESTAMP

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

REPOSITORY = Path(__file__).resolve().parents[2]
START_TIMEOUT = 90.0


@dataclass(frozen=True)
class ReadmeExample:
    """The README's set-up walkthrough, parsed from its shell block."""

    body: bytes
    url: str
    headers: dict[str, str]
    query_command: list[str]


@dataclass
class FrontDoor:
    checkout: Path
    up_args: list[str]
    ports: dict[str, int]
    process: subprocess.Popen[bytes]
    stderr: Path

    def sgpipe(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "sgpipe", *args],
            cwd=self.checkout,
            env=clean_environment(),
            capture_output=True,
            timeout=60,
            check=False,
        )


def clean_environment(**variables: str) -> dict[str, str]:
    """The test's environment without anything SGPIPE_* a developer may have set."""
    environ = {name: value for name, value in os.environ.items() if not name.startswith("SGPIPE_")}
    return {**environ, "PYTHONUNBUFFERED": "1", **variables}


def clean_checkout(destination: Path) -> Path:
    """The files git tracks (staged included), as a fresh clone would have them."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPOSITORY, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: cannot tell which files a fresh clone has")
    for name in listed.decode().split("\0"):
        source = REPOSITORY / name
        if name and source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def readme_example(readme: str) -> ReadmeExample:
    blocks = re.findall(r"```sh\n(.*?)```", readme, flags=re.S)
    walkthrough = [block for block in blocks if "curl" in block and "sgpipe query" in block]
    assert len(walkthrough) == 1, "the README's set-up walkthrough (curl + sgpipe query) is gone"
    commands = [
        shlex.split(line) for line in walkthrough[0].replace("\\\n", " ").splitlines() if line
    ]
    assert len(commands) == 2, commands
    post, query = commands
    # Nothing in the walkthrough may write into the repository (no `> sample.json`).
    assert not {">", ">>", "tee"} & {token for command in commands for token in command}
    pipe = post.index("|")
    printf, curl = post[:pipe], post[pipe + 1 :]
    assert printf[0] == "printf" and len(printf) == 3
    body = printf[1].replace("%s", printf[2]).replace("\\r", "\r").replace("\\n", "\n")
    assert curl[0] == "curl" and "--data-binary" in curl
    assert curl[curl.index("--data-binary") + 1] == "@-"
    headers = dict(
        curl[index + 1].split(": ", 1) for index, token in enumerate(curl) if token == "-H"
    )
    url = next(token for token in curl if token.startswith("http"))
    return ReadmeExample(body.encode(), url, headers, query)


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.fixture
def front_door(tmp_path: Path) -> Iterator[FrontDoor]:
    checkout = clean_checkout(tmp_path / "clone")
    up_args = shlex.split(
        subprocess.run(
            ["make", "--no-print-directory", "-s", "print-up-args"],
            cwd=checkout,
            env=clean_environment(),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert up_args[0] == "up", up_args
    ports = {
        "SGPIPE_INGEST__PORT": free_port(),
        "SGPIPE_EMBEDDED__KAFKA_PORT": free_port(),
        "SGPIPE_EMBEDDED__CLICKHOUSE_HTTP_PORT": free_port(),
    }
    environ = clean_environment(
        SGPIPE_LOGGING__FORMAT="json", **{name: str(port) for name, port in ports.items()}
    )
    stderr = tmp_path / "sgpipe-up.stderr"
    with stderr.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "sgpipe", *up_args],
            cwd=checkout,
            env=environ,
            stdout=output,
            stderr=output,
        )
    running = FrontDoor(checkout, up_args, ports, process, stderr)
    try:
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_until_serving(front_door: FrontDoor, port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if front_door.process.poll() is not None:
            raise AssertionError(f"make up's sgpipe up exited:\n{front_door.stderr.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"not serving after {START_TIMEOUT} s:\n{front_door.stderr.read_text()}")


def test_make_up_serves_the_readme_example_on_a_clean_clone(front_door: FrontDoor) -> None:
    readme = (front_door.checkout / "README.md").read_text(encoding="utf-8")
    example = readme_example(readme)
    config_file = front_door.checkout / front_door.up_args[front_door.up_args.index("--config") + 1]
    assert config_file.is_file(), (
        f"`make up` runs with {config_file.name}, which a fresh clone does not have: "
        "is it committed, or ignored by .gitignore?"
    )
    config = yaml.safe_load(config_file.read_text(encoding="utf-8"))

    # The README's sample is SendGrid's signed test vector, and the README shows the key that
    # the example config trusts for the webhook its URL names.
    assert example.body == BODY
    assert example.headers["X-Twilio-Email-Event-Webhook-Signature"] == SIGNATURE
    assert example.headers["X-Twilio-Email-Event-Webhook-Timestamp"] == TIMESTAMP
    assert PUBLIC_KEY in readme
    webhook_name = example.url.rsplit("/", 1)[1]
    webhooks = {webhook["name"]: webhook for webhook in config["webhooks"]}
    assert webhooks[webhook_name]["public_keys"] == [PUBLIC_KEY]
    assert example.url == f"http://127.0.0.1:{config['ingest']['port']}/webhooks/{webhook_name}"

    ingress_port = front_door.ports["SGPIPE_INGEST__PORT"]
    wait_until_serving(front_door, ingress_port)
    files_before = sorted(front_door.checkout.rglob("*"))

    status, answer = post(
        f"http://127.0.0.1:{ingress_port}/webhooks/{webhook_name}", example.body, example.headers
    )
    assert status == 200, answer
    # The README's own query command, run as `sgpipe query` from the clone.
    assert example.query_command[:2] == [".venv/bin/sgpipe", "query"]
    query_args = example.query_command[1:]
    deadline = time.monotonic() + 60
    while True:
        result = front_door.sgpipe(*query_args)
        assert result.returncode == 0, result.stderr.decode()
        if result.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert result.stdout == b"dropped\thello@world.com\t2020-09-14 19:41:32.000\n"

    front_door.process.send_signal(signal.SIGTERM)
    assert front_door.process.wait(timeout=60) == 0, front_door.stderr.read_text()
    # Nothing new in the clone but `make up`'s own data dir (git-ignored).
    data_dir = front_door.checkout / front_door.up_args[front_door.up_args.index("--data-dir") + 1]
    files_after = sorted(front_door.checkout.rglob("*"))
    assert [path for path in files_after if data_dir not in (path, *path.parents)] == [
        path for path in files_before if data_dir not in (path, *path.parents)
    ]
    # One log stream: every line `sgpipe up` wrote parses as JSON.
    lines = front_door.stderr.read_text().splitlines()
    assert lines
    events = [json.loads(line) for line in lines]
    assert "send SendGrid events to" in {event["event"] for event in events}
    assert not [event for event in events if "Running on" in event["event"]]


def test_every_file_the_readme_links_is_in_a_clean_clone(tmp_path: Path) -> None:
    checkout = clean_checkout(tmp_path / "clone")
    readme = (checkout / "README.md").read_text(encoding="utf-8")
    targets = {
        target.split("#", 1)[0]
        for target in re.findall(r"\]\(([^)\s]+)\)", readme)
        if not re.match(r"[a-z]+:", target) and not target.startswith("#")
    }
    assert targets, "no relative links found: did the README change format?"
    missing = sorted(target for target in targets if not (checkout / target).exists())
    assert missing == []
    assert (checkout / "LICENSE").is_file()
