"""Driving `sgpipe up` in tests and benchmarks: a webhook key, signed bodies of any size, the
state file, the log stream, the processes."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from sgpipe.simulator import generate_private_key, public_key_base64, sign

SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"


@dataclass(frozen=True)
class WebhookKey:
    """A generated key pair and the `webhooks` section that trusts it."""

    private_key: ec.EllipticCurvePrivateKey
    name: str = "main"

    @classmethod
    def generate(cls, name: str = "main") -> WebhookKey:
        return cls(generate_private_key(), name)

    @property
    def webhooks(self) -> list[dict[str, Any]]:
        return [{"name": self.name, "public_keys": [public_key_base64(self.private_key)]}]

    def headers(self, body: bytes) -> dict[str, str]:
        timestamp = str(int(time.time()))
        return {
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(self.private_key, timestamp, body),
        }


def events_body(prefix: str, count: int) -> bytes:
    """A SendGrid batch of ``count`` small events with unique ``sg_event_id``s."""
    events = [
        {
            "event": "processed",
            "email": f"user{index}@example.com",
            "sg_event_id": f"{prefix}-{index}",
            "sg_message_id": f"{prefix}-message-{index}",
            "timestamp": 1_700_000_000 + index,
        }
        for index in range(count)
    ]
    return b"\r\n".join([b"[", b",\r\n".join(json.dumps(e).encode() for e in events), b"]"])


def tiny_events_body(prefix: str, size: int) -> tuple[bytes, int]:
    """About ``size`` bytes of the smallest valid events (and how many there are)."""
    template = '{"event":"open","email":"a@b.c","sg_event_id":"%s-%08d","timestamp":1700000000}'
    one = len(template % (prefix, 0)) + 1
    count = max(1, (size - 2) // one)
    body = "[" + ",".join(template % (prefix, index) for index in range(count)) + "]"
    return body.encode(), count


def zeros_body(count: int = 2_000_000) -> bytes:
    """The hostile batch of the fault-injection issue: a JSON array of ``count`` zeros."""
    return b"[" + b",".join([b"0"] * count) + b"]"


def post(url: str, body: bytes, headers: dict[str, str], timeout: float = 30) -> int:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def get(url: str, timeout: float = 10) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), str(response.read().decode())
    except urllib.error.HTTPError as error:
        return int(error.code), str(error.read().decode())


def served_store_answer(data_dir: Path, sql: str) -> str | None:
    """What the store that `sgpipe up` serves for ``data_dir`` answers to ``sql`` (TabSeparated,
    as `sgpipe query` prints it), asked as `sgpipe query` asks it -- over HTTP at the state
    file's URL, as the data dir's writer -- but from this process. None when no `sgpipe up`
    has published a store there (no state file); OSError when the query fails (a table not
    created yet: urllib's HTTPError) or the store does not answer.

    For polling: a `sgpipe query` process per poll costs an interpreter start, seconds of CPU on
    a busy 2-core machine, taken from the pipeline under test."""
    from sgpipe.embedded.credentials import CredentialsError, load_credentials

    try:
        state = read_state(data_dir)
        writer = load_credentials(data_dir).writer
    except (OSError, ValueError, CredentialsError):
        return None
    if not state.get("clickhouse_embedded", True) or not state.get("clickhouse_url"):
        return None  # no embedded store (yet): a URL of null while it starts
    params = urllib.parse.urlencode({"database": "sgpipe", "default_format": "TabSeparated"})
    request = urllib.request.Request(
        f"{state['clickhouse_url']}/?{params}",
        data=sql.encode(),
        method="POST",
        headers={"X-ClickHouse-User": writer.name, "X-ClickHouse-Key": writer.password},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return str(response.read().decode())
    except urllib.error.HTTPError as error:
        error.close()  # its connection, which the caller discarding the error would leak
        raise


def read_state(data_dir: Path) -> dict[str, Any]:
    state: dict[str, Any] = json.loads((data_dir / "sgpipe-up.json").read_text())
    return state


def log_events(log: Path) -> list[dict[str, Any]]:
    """Every JSON line of a log (a stream in JSON mode has nothing else)."""
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def command_line(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) is not alive either.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
