"""What `sgpipe up` checks before it starts anything: the data dir, ports and its lock.

A conflict found here is a configuration problem (exit 2) reported as one line that names the
setting to change, before any child process, file or socket exists. ``check_up`` has no side
effects; ``lock_data_dir`` then takes the lock that `sgpipe up` holds for its whole life (a
second `sgpipe up`, or a `sgpipe query` opening the store directly, on the same data dir gets
"in use" instead of fighting over the embedded ClickHouse files).

The checks cannot rule out a race (another program may take a port between the check and the
real bind); they turn the common case, a port already taken, into a clear message.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from sgpipe.runtime.settings import ENV_PATH_SEPARATOR, ENV_PREFIX, Settings

LOCK_FILE = ".lock"


@dataclass(frozen=True, slots=True)
class Problem:
    """One start-up conflict; ``message`` is the one line printed for it."""

    message: str


class PreflightFailed(Exception):
    """`sgpipe up` cannot start; nothing was started. Exit 2."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(problem.message for problem in problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class PortClaim:
    """A port a process is about to listen on, and the setting that chose it."""

    setting: str  # dotted: "embedded.kafka_port"
    host: str
    port: int
    flag: str | None = None  # a command-line flag that sets it too

    def how_to_change(self) -> str:
        variable = ENV_PREFIX + self.setting.upper().replace(".", ENV_PATH_SEPARATOR)
        also = f" (or {self.flag})" if self.flag else ""
        return f"set {self.setting} or {variable}{also}"


def up_port_claims(settings: Settings) -> list[PortClaim]:
    """The ports `sgpipe up` listens on: the ingress, and the embedded services it will start
    (only those: with kafka.bootstrap_servers or clickhouse.url set, none is started)."""
    claims = [PortClaim("ingest.port", settings.ingest.host, settings.ingest.port, "--port")]
    if settings.kafka.bootstrap_servers is None:
        claims.append(
            PortClaim(
                "embedded.kafka_port", settings.embedded.host, settings.embedded.kafka_port or 0
            )
        )
        if settings.embedded.broker_storage == "durable":
            # SeaweedFS's internal ports are chosen and checked by sgpipe.embedded.storage.
            claims.append(
                PortClaim(
                    "embedded.storage_port", settings.embedded.host, settings.embedded.storage_port
                )
            )
    if settings.clickhouse.url is None:
        claims.append(
            PortClaim(
                "embedded.clickhouse_http_port",
                settings.embedded.host,
                settings.embedded.clickhouse_http_port or 0,
            )
        )
    return claims


def check_data_dir(data_dir: Path) -> list[Problem]:
    """The data dir must be a directory of ours that no other user can enter: it holds the
    embedded store (every event, address and IP), the credentials and the keys. Missing is
    fine (`sgpipe up` creates it 0700). Like ssh with a private key, an existing one that
    others can read, write or enter is refused rather than silently narrowed: the operator
    decides (one ``chmod``), and learns that it was open until now."""
    try:
        status = data_dir.stat()
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        return [Problem(f"data dir {data_dir} is not a directory: a path on the way is a file")]
    except OSError as exc:
        return [Problem(f"cannot use data dir {data_dir}: {exc.strerror}")]
    if not stat.S_ISDIR(status.st_mode):
        return [Problem(f"data dir {data_dir} is not a directory; pass --data-dir a directory")]
    if status.st_uid != os.geteuid():
        return [Problem(f"data dir {data_dir} is owned by another user (uid {status.st_uid})")]
    if status.st_mode & 0o077:
        mode = stat.S_IMODE(status.st_mode)
        return [
            Problem(
                f"data dir {data_dir} is accessible by other users (mode {mode:o}); "
                f"run `chmod 700 {data_dir}`"
            )
        ]
    return []


def check_up(settings: Settings, data_dir: Path) -> list[Problem]:
    """Every conflict `sgpipe up` would run into, without side effects; empty when clear.

    A data dir held by another process is the only problem reported then: the ports it
    holds are most likely that process's too.
    """
    holder = data_dir_holder(data_dir)
    if holder is not None:
        return [Problem(f"data dir {data_dir} is in use by {holder}")]
    return check_ports(up_port_claims(settings))


def check_ports(claims: list[PortClaim]) -> list[Problem]:
    """A problem for each port that is taken, or that two settings both claim."""
    problems: list[Problem] = []
    claimed_twice: set[str] = set()
    for index, first in enumerate(claims):
        for second in claims[index + 1 :]:
            if first.port != 0 and first.port == second.port and _overlap(first.host, second.host):
                message = f"{first.setting} and {second.setting} are both {first.port}"
                problems.append(Problem(f"{message}; {second.how_to_change()}"))
                claimed_twice.update((first.setting, second.setting))
    for claim in claims:
        problem = None if claim.setting in claimed_twice else _bind_problem(claim)
        if problem is not None:
            problems.append(problem)
    return problems


def _overlap(first: str, second: str) -> bool:
    wildcard = ("0.0.0.0", "::", "")
    return first == second or first in wildcard or second in wildcard


def _bind_problem(claim: PortClaim) -> Problem | None:
    if claim.port == 0:  # a free port is picked when the service starts
        return None
    family = socket.AF_INET6 if ":" in claim.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As the servers bind: a port left in TIME_WAIT by a process that just stopped is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((claim.host, claim.port))
        except OSError as exc:
            return Problem(_bind_failure(claim, exc))
    return None


def _bind_failure(claim: PortClaim, exc: OSError) -> str:
    change = claim.how_to_change()
    if exc.errno == errno.EADDRINUSE:
        return f"{claim.setting} {claim.port} is in use; {change}"
    if exc.errno == errno.EACCES:
        return f"{claim.setting} {claim.port} needs privileges (ports below 1024); {change}"
    if exc.errno in (errno.EADDRNOTAVAIL, socket.EAI_NONAME):
        host_setting = claim.setting.rsplit(".", 1)[0] + ".host"
        return f"{host_setting} {claim.host} is not an address of this machine; set {host_setting}"
    return f"{claim.setting} {claim.port}: cannot listen on {claim.host} ({exc.strerror}); {change}"


# --- the data-dir lock -----------------------------------------------------------------------


class DataDirLock:
    """An exclusive ``flock`` on ``<data-dir>/.lock``, recording who holds it.

    The kernel drops the lock when the process dies, however it dies, so a crash never leaves
    a data dir locked; the file itself stays (removing it would race with the next holder).
    """

    def __init__(self, data_dir: Path, descriptor: int) -> None:
        self.data_dir = data_dir
        self._descriptor: int | None = descriptor

    def fileno(self) -> int:
        """The locked descriptor. A child given it (``pass_fds``) shares the lock: the data dir
        stays locked until the last process holding it has exited."""
        assert self._descriptor is not None, "released"
        return self._descriptor

    def release(self) -> None:
        descriptor, self._descriptor = self._descriptor, None
        if descriptor is not None:
            os.close(descriptor)  # closing the descriptor releases the flock


def lock_data_dir(data_dir: Path, command: str) -> DataDirLock:
    """Create ``data_dir`` if needed and lock it for ``command`` (held until ``release`` or
    process exit). Raises PreflightFailed naming the holder when another process has it."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        holder = data_dir_holder(data_dir) or "another process"
        raise PreflightFailed([Problem(f"data dir {data_dir} is in use by {holder}")]) from None
    except BaseException:
        os.close(descriptor)
        raise
    record = json.dumps({"pid": os.getpid(), "command": command}).encode()
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, record + b"\n", 0)
    return DataDirLock(data_dir, descriptor)


def recorded_holder_pid(data_dir: Path) -> int | None:
    """The PID the lock file names (its last holder, alive or not), if it names one."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        record = json.loads((data_dir / LOCK_FILE).read_text(encoding="utf-8"))
        return int(record["pid"])
    return None


def data_dir_holder(data_dir: Path) -> str | None:
    """Who holds ``data_dir``'s lock ("another sgpipe up (pid 1234)"), or None if nobody.
    Creates nothing."""
    try:
        descriptor = os.open(data_dir / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe_holder(data_dir / LOCK_FILE)
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        return None
    finally:
        os.close(descriptor)


def _describe_holder(lock_file: Path) -> str:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        record = json.loads(lock_file.read_text(encoding="utf-8"))
        return f"another sgpipe {record['command']} (pid {int(record['pid'])})"
    return "another process"
