"""`sgpipe up`: the whole pipeline on one machine, as a supervisor of separate processes.

    sgpipe up                       the supervisor: this module (stage "up")
    ├── weed mini                   embedded broker storage (durable only)   } EmbeddedKafka,
    ├── tansu broker                embedded Kafka-protocol broker           } supervised there
    ├── sgpipe serve-clickhouse     embedded ClickHouse (chdb) over HTTP
    ├── sgpipe sink      × M        \
    ├── sgpipe process   × N         } the same commands Kubernetes runs, each its own process
    └── sgpipe ingest               /  and event loop: processing never delays an acknowledgement

The ``sgpipe`` children are forked from a fork server made before anything starts, with the
stages' modules imported (``sgpipe.up.forkserver``); exec'd where there is none.

The children are declared in one table (``children_table``): per role its command, how many
(``up.processors``/``up.sinks``, ``--processors``/``--sinks``; by default one per two usable
cores, never more than the partitions of the role's input topic), the status message that
makes it ready, which roles must be ready before it starts, and its rank in the stop order.
Start, supervision, readiness, the state file and the stop are driven by that table; a child
reports its ports and readiness on its status pipe (``sgpipe.runtime.status``), never through
its log's wording. Extra replicas are named ``process-2``, ``sink-3``, ...; each has its own
health port, restarts and metrics label. The embedded broker and its storage are supervised by
``EmbeddedKafka`` (its processes are not sgpipe commands and report nothing; it checks that
they accept connections), started before the stages and stopped after them.

Start: preflight (ports, the data-dir lock, held for life), the supervisor's own health
endpoint, the broker and ClickHouse concurrently, the topics, then the stages. With a durable
broker (or a configured Kafka) the ingress starts as soon as the topics exist: its 2xx means
the batch is durable in Kafka, whatever the other stages do. With ``broker_storage: memory`` it
starts only once every processor and sink consumes, as an acknowledged batch lives only in
the broker's memory until they have written it.

Supervision: a child that dies is restarted with backoff (``RestartBackoff``, the embedded
broker's policy too: 0.5 s doubling to 30 s) and a log line; one that exits 2 (configuration)
or 3 (a fatal stage error) stops the whole `sgpipe up` with its message and exit code -- a
restart would only repeat the error.

Stop (SIGTERM, Ctrl-C): the ingress first, then the processors and the sinks (one after the
other, each draining its topic, with the in-memory broker; together otherwise), then ClickHouse
and the broker; every child has a deadline, then SIGKILL. The last line says what the stop
wrote and what is left unwritten where. A second signal stops at once: the stages get their
own "stop at once" (SIGQUIT), SIGKILL after ``AT_ONCE_GRACE_SECONDS``, and the last line
counts the acknowledged batches and events not yet written and says where they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import aiohttp
import structlog
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from ingest.app import build_verifiers
from sgpipe.embedded.child import RestartBackoff
from sgpipe.embedded.topics import embedded_topics
from sgpipe.preflight import (
    DataDirLock,
    PreflightFailed,
    check_data_dir,
    check_up,
    data_dir_holder,
    lock_data_dir,
    recorded_holder_pid,
    up_port_claims,
)
from sgpipe.runtime import metrics
from sgpipe.runtime.clickhouse import with_credentials
from sgpipe.runtime.health import Readiness, serve_health
from sgpipe.runtime.kafka import create_reader, ensure_topics
from sgpipe.runtime.logs import mirror_events, renders_json
from sgpipe.runtime.redact import redact_text, redact_url
from sgpipe.runtime.runner import CLOSE_TIMEOUT_SECONDS, bound_port
from sgpipe.runtime.settings import ConfigError, Settings
from sgpipe.runtime.startup import retry_kafka_at_start, start_deadline
from sgpipe.up import configs, demo
from sgpipe.up.backlog import Backlog, BacklogUnknown, count_backlog
from sgpipe.up.children import ReadyCondition, SupervisedChild
from sgpipe.up.layout import (
    CLICKHOUSE_DIR,
    LOG_DIR,
    RUN_DIR,
    private_directory,
    remove_state,
    write_state,
)
from sgpipe.up.leftovers import end_leftovers
from sgpipe.up.logstream import LogStream
from sgpipe.up.oauth_key import with_oauth_signing_key
from sgpipe.up.report import (
    BrokerLocation,
    Drained,
    at_once_report,
    backlog_at_start_report,
    backlog_drained_report,
    stop_report,
)

if TYPE_CHECKING:
    from sgpipe.embedded.broker import EmbeddedKafka
    from sgpipe.embedded.credentials import EmbeddedCredentials
    from sgpipe.up.forkserver import ForkServer

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Exit codes of a child that a restart cannot fix (sgpipe's own: configuration, fatal).
EXIT_CONFIG = 2
EXIT_FATAL = 3
EXIT_STOPPED_AT_ONCE = 1

# A second signal: how long the stages get to act on their own "stop at once" before SIGKILL.
AT_ONCE_GRACE_SECONDS = 2.0
# ClickHouse closes its engine on SIGTERM; more than this is a hang.
STORE_STOP_SECONDS = 15.0
# Counting what is left unwritten (reading the topics past the committed offsets).
BACKLOG_TIMEOUT_SECONDS = 5.0
# After a start with a backlog: recount it this soon, then at doubling intervals up to the max.
BACKLOG_WATCH_FIRST_SECONDS = 2.0
BACKLOG_WATCH_MAX_SECONDS = 30.0
# The supervisor fronts the consuming stages' health endpoints for the ingress, whose own wait
# for it is 2 s (health.PEER_TIMEOUT_SECONDS): it must answer first, even when a stage hangs.
STAGE_PEER_TIMEOUT_SECONDS = 1.0
STATE_REFRESH_SECONDS = 1.0
# Beyond a child's own deadlines (its stop timeout, its clients' close timeouts).
_STOP_MARGIN_SECONDS = 5.0
# After a kill -9 of `sgpipe up`, its children (dying by PR_SET_PDEATHSIG) may hold the data
# dir's lock a moment longer; a new `sgpipe up` waits this long for them.
_STALE_LOCK_WAIT_SECONDS = 10.0

STAGES = ("ingest", "process", "sink")

Role = Literal["clickhouse", "process", "sink", "ingest"]


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """One row of the children table: a role and how `sgpipe up` runs it.

    ``command`` is the sgpipe subcommand; ``count`` how many processes run it (the first named
    after the role, the others ``<role>-2``, ...); ``ready`` the status message that makes one
    ready; ``start_after`` the roles every child of which must be ready before this one
    starts; ``stop_rank`` its place in the stop order (lower first, equal ranks together);
    ``stop_grace`` seconds between its stop signal and SIGKILL.
    """

    role: Role
    command: str
    count: int
    ready: ReadyCondition
    start_after: tuple[Role, ...]
    stop_rank: int
    stop_grace: float
    # Arguments after the command's --config.
    extra_args: tuple[str, ...] = ()
    # The other replicas start once the first is ready (the first sink migrates the database;
    # migrations are applied by one process at a time).
    first_alone: bool = False

    @property
    def names(self) -> list[str]:
        return [
            self.role if number == 1 else f"{self.role}-{number}"
            for number in range(1, self.count + 1)
        ]

    @property
    def is_stage(self) -> bool:
        return self.role in STAGES


def children_table(
    settings: Settings, *, processors: int, sinks: int, drain: bool, data_dir: Path
) -> tuple[ChildSpec, ...]:
    """Every child `sgpipe up` runs, in start order (see ChildSpec).

    Stop order: the ingress first (nothing new comes in), then the processors and the sinks --
    with ``drain`` (the in-memory broker, which keeps nothing once stopped) the sinks only
    after every processor has drained, so they still read what the processors wrote while
    stopping; otherwise together -- then the embedded ClickHouse (then, outside the table, the
    broker). Start: a sink only once ClickHouse serves (it needs its URL); with ``drain`` the
    ingress only once every processor and sink consumes (an acknowledged batch lives only in
    the broker's memory until they have written it); otherwise at once (its 2xx means "in
    Kafka", whatever the others do).
    """
    embedded_store = settings.clickhouse.url is None
    drains = ("--drain",) if drain else ()
    table: list[ChildSpec] = []
    if embedded_store:
        table.append(
            ChildSpec(
                "clickhouse",
                "serve-clickhouse",
                1,
                ReadyCondition("listening", "clickhouse"),
                start_after=(),
                stop_rank=3,
                stop_grace=STORE_STOP_SECONDS,
                extra_args=("--data-dir", str(data_dir.resolve())),
            )
        )
    table += [
        ChildSpec(
            "process",
            "process",
            processors,
            ReadyCondition("consuming"),
            start_after=(),
            stop_rank=1,
            stop_grace=_stage_grace(settings.processor.stop_timeout_seconds),
            extra_args=drains,
        ),
        ChildSpec(
            "sink",
            "sink",
            sinks,
            ReadyCondition("consuming"),
            start_after=("clickhouse",) if embedded_store else (),
            stop_rank=2 if drain else 1,
            stop_grace=_stage_grace(settings.sink.stop_timeout_seconds),
            extra_args=drains,
            first_alone=True,
        ),
        ChildSpec(
            "ingest",
            "ingest",
            1,
            ReadyCondition("listening", "ingress"),
            start_after=("process", "sink") if drain else (),
            stop_rank=0,
            # Requests in flight finish their publish, then the producer closes.
            stop_grace=settings.ingest.publish_timeout_seconds
            + CLOSE_TIMEOUT_SECONDS
            + _STOP_MARGIN_SECONDS,
        ),
    ]
    return tuple(table)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def replica_count(setting: int | None, cores: int) -> int:
    """How many processes of a consuming stage to run before the partitions are known: the
    setting, else one per two cores (a processor and a sink share the machine with ClickHouse
    and the broker), at least one."""
    return setting if setting is not None else max(1, cores // 2)


def clamp_to_partitions(role: str, count: int, topic: str, partitions: int | None) -> int:
    """``count``, but never more than ``partitions`` of ``topic`` (None: unknown, kept): a
    consumer beyond the partition count would own nothing. Logs a warning when it cuts."""
    if partitions is None or count <= partitions:
        return count
    log.warning(
        "fewer processes than asked: a stage never runs more consumers than its input "
        "topic has partitions",
        role=role,
        asked=count,
        running=partitions,
        topic=topic,
        partitions=partitions,
    )
    return partitions


@dataclass(frozen=True)
class UpOptions:
    data_dir: Path
    demo: bool = False
    config_file: Path | None = None
    # The environment the children inherit (without SGPIPE_*: their config file is complete).
    environ: Mapping[str, str] = field(default_factory=dict)
    # How the user ran sgpipe, for the commands `sgpipe up` prints (the demo's query).
    program: str = "sgpipe"
    # Forks the Python children (sgpipe.up.forkserver); without one, each is a new process.
    fork_server: ForkServer | None = None


class StageFailed(RuntimeError):
    """A child stopped on an error a restart cannot fix; `sgpipe up` was stopped. ``code`` is
    the exit code `sgpipe up` ends with (the child's own, for 2 and 3)."""

    def __init__(self, stage: str, message: str, code: int) -> None:
        super().__init__(message)
        self.stage = stage
        self.code = code


class _Halted(Exception):
    """A stop was requested (or a child failed) while `sgpipe up` was still starting."""


def retention_groups(settings: Settings) -> dict[str, list[str]]:
    """Which sgpipe consumer groups must have committed a topic's batches before the embedded
    broker's retention may delete them. The dead-letter topic has none: it is kept."""
    return {
        settings.kafka.topics.raw: [settings.processor.group_id],
        settings.kafka.topics.events: [settings.sink.group_id],
    }


async def run_up(
    settings: Settings, options: UpOptions, stop: asyncio.Event, at_once: asyncio.Event
) -> int:
    """Run until ``stop`` is set (then stop in order; ``at_once`` as well: stop at once) or a
    child fails (then StageFailed, after a full stop). Returns the exit code: 0, or 1 after a
    stop at once.

    Raises ConfigError or PreflightFailed (a busy port, the data dir in use) before anything
    is started; holds the data dir's lock until it returns.
    """
    data_dir = options.data_dir
    problems = check_data_dir(data_dir)
    if problems:
        raise PreflightFailed(problems)
    # A crash a moment ago is not a configuration problem: its children, still dying, must
    # not make the port check below fail (exit 2).
    fork_server = options.fork_server
    await end_leftovers(data_dir, spared=[fork_server.pid] if fork_server is not None else [])
    settings = with_oauth_signing_key(settings, data_dir)  # tokens need a key; made once
    build_verifiers(settings)  # a bad key must stop us before anything starts
    await _wait_for_dead_holders_children(data_dir)
    problems = check_up(settings, data_dir)
    if problems:
        raise PreflightFailed(problems)
    lock = lock_data_dir(data_dir, "up")
    try:
        # Before anything starts too: an unsafe credentials file is a configuration error.
        credentials = _embedded_credentials(settings, data_dir)
        settings = _with_raw_auth_key(settings, data_dir)
        if options.demo:
            settings = demo.with_demo_webhook(settings, demo.demo_key(data_dir))
        structlog.contextvars.bind_contextvars(stage=metrics.STAGE_UP)
        supervisor = _Supervisor(settings, options, lock, credentials, stop, at_once)
        return await supervisor.run()
    finally:
        lock.release()


async def _wait_for_dead_holders_children(data_dir: Path) -> None:
    """If the data dir is locked by children of a `sgpipe up` that no longer exists (killed a
    moment ago; they are dying), wait for them to let go instead of refusing to start."""
    deadline = time.monotonic() + _STALE_LOCK_WAIT_SECONDS
    while data_dir_holder(data_dir) is not None and time.monotonic() < deadline:
        pid = recorded_holder_pid(data_dir)
        if pid is None or _alive(pid):
            return
        await asyncio.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _embedded_credentials(settings: Settings, data_dir: Path) -> EmbeddedCredentials | None:
    """The embedded store's credentials (created on first start), None with a configured
    ClickHouse. An unsafe credentials file is a configuration error."""
    if settings.clickhouse.url is not None:
        return None
    from sgpipe.embedded.credentials import CredentialsError, load_or_create_credentials

    try:
        return load_or_create_credentials(data_dir)
    except CredentialsError as exc:  # e.g. a file others can read: fix it, then start
        raise ConfigError(str(exc)) from exc


def _with_raw_auth_key(settings: Settings, data_dir: Path) -> Settings:
    """``raw_auth.keys`` as configured, else the data dir's key (created on first start),
    which the ingress signs raw records with and the processor checks (docs/security.md)."""
    from sgpipe.embedded.raw_auth_key import RawAuthKeyError, with_data_dir_raw_auth_key

    try:
        return with_data_dir_raw_auth_key(settings, data_dir)
    except RawAuthKeyError as exc:
        raise ConfigError(str(exc)) from exc


def embedded_kafka(settings: Settings, data_dir: Path) -> EmbeddedKafka:
    """The embedded broker `sgpipe up` starts for ``settings``. The ports `sgpipe up` claims
    (checked free at start, bound later, the ingress's last of all) are reserved: its storage
    must not take one of them meanwhile."""
    from sgpipe.embedded.broker import EmbeddedKafka

    return EmbeddedKafka(
        settings.embedded,
        data_dir,
        retention_groups=retention_groups(settings),
        reserved_ports={claim.port for claim in up_port_claims(settings) if claim.port},
    )


class _Supervisor:
    def __init__(
        self,
        settings: Settings,
        options: UpOptions,
        lock: DataDirLock,
        credentials: EmbeddedCredentials | None,
        stop: asyncio.Event,
        at_once: asyncio.Event,
    ) -> None:
        self.settings = settings
        self.options = options
        self.data_dir = options.data_dir
        self.lock = lock
        self.credentials = credentials
        self.stop = stop
        self.at_once = at_once
        self.embedded_broker = settings.kafka.bootstrap_servers is None
        # Only an in-memory broker needs the stages to drain before it stops.
        self.drain = self.embedded_broker and settings.embedded.broker_storage == "memory"
        self.run_dir = self.data_dir / RUN_DIR
        self.stream = LogStream(
            self.data_dir / LOG_DIR,
            sys.stderr,
            json_output=renders_json(settings.logging.format),
        )
        cores = usable_cores()
        # Counts as asked (or from the cores); cut to the partitions once the topics exist.
        self.table = children_table(
            settings,
            processors=replica_count(settings.up.processors, cores),
            sinks=replica_count(settings.up.sinks, cores),
            drain=self.drain,
            data_dir=self.data_dir,
        )
        # What each role's child runs with (its config file), from the shared stage settings.
        self.child_settings: dict[Role, Callable[[Settings], Settings]] = {
            "clickhouse": self._clickhouse_settings,
            "process": lambda base: configs.stage_settings(base, "process"),
            "sink": lambda base: configs.stage_settings(self._sink_settings(base), "sink"),
            "ingest": self._ingest_settings,
        }
        self.spec_of: dict[str, ChildSpec] = {}
        self.children: dict[str, SupervisedChild] = {}
        self.broker: EmbeddedKafka | None = None
        # The settings the stages share once the broker is known.
        self.stage_base: Settings | None = None
        self.clickhouse_url: str | None = settings.clickhouse.url
        self.clickhouse_port: int | None = None
        self.ingress_port: int | None = None
        self.health: web.AppRunner | None = None
        self.health_url: str | None = None
        self.failure: StageFailed | None = None
        self.halt = asyncio.Event()  # a stop was asked for, or a child failed
        self.stopping = False
        self.tasks: list[asyncio.Task[Any]] = []
        self.demo_stop = asyncio.Event()
        self.demo_task: asyncio.Task[None] | None = None
        self.readiness = Readiness(metrics.STAGE_UP)
        # What was acknowledged before this start is the backlog of an earlier run.
        self.started_ms = int(time.time() * 1000)

    # --- the whole run ---------------------------------------------------------------------

    async def run(self) -> int:
        self.tasks.append(asyncio.create_task(self._relay_stop(), name="relay-stop"))
        stopped_at_once = False
        # The supervisor's own lines go to <data-dir>/logs/up.log too, beside its children's.
        mirror_events(self.stream.record_own)
        try:
            try:
                await self._start()
                await self.halt.wait()
            except _Halted:
                pass
            finally:
                stopped_at_once = await self._shutdown()
        finally:
            for task in self.tasks:
                task.cancel()
            for task in self.tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            mirror_events(None)
            self.stream.close()
        if self.failure is not None:
            raise self.failure
        return EXIT_STOPPED_AT_ONCE if stopped_at_once else 0

    async def _relay_stop(self) -> None:
        await self.stop.wait()
        self.halt.set()

    async def _until_halted(self, awaitable: Awaitable[T]) -> T:
        """``awaitable``'s result, or _Halted if a stop or a failure comes first."""
        task = asyncio.ensure_future(awaitable)
        halted = asyncio.ensure_future(self.halt.wait())
        try:
            await asyncio.wait({task, halted}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            halted.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise _Halted

    # --- start -----------------------------------------------------------------------------

    async def _start(self) -> None:
        private_directory(self.run_dir)
        await self._serve_health()
        # ClickHouse needs no broker: it starts while the broker does.
        store_specs = [spec for spec in self.table if not spec.is_stage]
        self._create_children(store_specs)
        starting = [self._start_task(spec) for spec in store_specs]
        kafka = self.settings.kafka
        if self.embedded_broker:
            servers = await self._until_halted(self._start_broker())
            kafka = kafka.model_copy(
                update={
                    "bootstrap_servers": servers,
                    "enable_idempotence": False,
                    "topics": embedded_topics(kafka.topics),
                }
            )
        self.stage_base = self.settings.model_copy(update={"kafka": kafka})
        if kafka.create_topics:
            created = await self._until_halted(
                retry_kafka_at_start(
                    lambda: ensure_topics(kafka),
                    kafka,
                    action="create topics",
                    deadline=start_deadline(kafka),
                )
            )
            if created:
                log.info("created topics", topics=created)
        await self._until_halted(self._clamp_counts())
        if self.settings.clickhouse.url is not None:
            log.info("sink writes to clickhouse", url=redact_url(str(self.clickhouse_url)))
        self._write_state()
        stage_specs = [spec for spec in self.table if spec.is_stage]
        # All of them first: a role waiting for another's readiness waits for every replica.
        self._create_children(stage_specs)
        starting += [self._start_task(spec) for spec in stage_specs]
        await self._until_halted(asyncio.gather(*starting))
        ingress = self.children["ingest"]
        await self._until_halted(ingress.ever_ready.wait())
        self.ingress_port = ingress.port
        self._write_state()
        self._log_webhook_urls()
        self.tasks.append(asyncio.create_task(self._refresh_state(), name="state"))
        self.tasks.append(asyncio.create_task(self._watch_backlog(), name="backlog"))
        if self.options.demo:
            self._start_demo()

    def _start_task(self, spec: ChildSpec) -> asyncio.Task[None]:
        task = asyncio.create_task(self._start_role(spec), name=f"start-{spec.role}")
        self.tasks.append(task)  # cancelled if `sgpipe up` stops while it waits
        return task

    async def _start_role(self, spec: ChildSpec) -> None:
        """Start ``spec``'s children once every child of its ``start_after`` roles is ready
        (with ``first_alone``, the others once the first is)."""
        for role in spec.start_after:
            for ready in self._children_of(role):
                await ready.ever_ready.wait()
                if role == "clickhouse":
                    self._store_ready(ready)
        children = [self.children[name] for name in spec.names]
        if spec.first_alone and len(children) > 1:
            await self._launch(children[0])
            await children[0].ever_ready.wait()
            children = children[1:]
        await asyncio.gather(*(self._launch(child) for child in children))

    def _children_of(self, role: str) -> list[SupervisedChild]:
        return [
            child
            for spec in self.table
            if spec.role == role
            for name in spec.names
            if (child := self.children.get(name)) is not None
        ]

    def _store_ready(self, clickhouse: SupervisedChild) -> None:
        if self.clickhouse_port is not None:
            return  # said once
        self.clickhouse_url = clickhouse.url
        self.clickhouse_port = clickhouse.port
        # Its port is free-chosen unless embedded.clickhouse_http_port pins it: say it.
        from sgpipe.embedded.credentials import credentials_file

        log.info(
            "BI tools connect to",
            url=clickhouse.url,
            user=self.credentials.reader.name if self.credentials else None,
            database=self.settings.clickhouse.database,
            password_in=str(credentials_file(self.data_dir)),
        )

    async def _clamp_counts(self) -> None:
        """Cut the processors and sinks to their input topics' partition counts."""
        assert self.stage_base is not None
        topics = self.stage_base.kafka.topics
        inputs = {"process": topics.raw, "sink": topics.events}
        partitions = await self._partitions(list(inputs.values()))
        self.table = tuple(
            replace(
                spec,
                count=clamp_to_partitions(
                    spec.role, spec.count, inputs[spec.role], partitions.get(inputs[spec.role])
                ),
            )
            if spec.role in inputs
            else spec
            for spec in self.table
        )

    async def _partitions(self, topics: list[str]) -> dict[str, int]:
        """How many partitions each of ``topics`` has ({} for one the broker does not know:
        its count is then not cut)."""
        assert self.stage_base is not None
        reader = create_reader(self.stage_base.kafka)
        try:
            await reader.start()
            await reader.topics()  # metadata
            return {
                topic: len(found)
                for topic in topics
                if (found := reader.partitions_for_topic(topic))
            }
        except Exception as exc:  # noqa: BLE001 - unknown counts are kept, not fatal
            log.warning("cannot read the topics' partition counts", error=str(exc))
            return {}
        finally:
            await reader.stop()

    async def _serve_health(self) -> None:
        self.readiness.add_check("children", self._children_check)
        if self.embedded_broker:
            self.readiness.add_check("broker", self._broker_check)
        self.health = await serve_health(
            self.readiness,
            configs.CHILD_HEALTH_HOST,
            0,
            peers=self._stage_health_urls,
            peer_timeout_seconds=STAGE_PEER_TIMEOUT_SECONDS,
        )
        self.health_url = f"http://{configs.CHILD_HEALTH_HOST}:{bound_port(self.health)}"

    async def _start_broker(self) -> str:
        self.broker = embedded_kafka(self.settings, self.data_dir)
        for service in ("storage", "broker"):
            metrics.EMBEDDED_RESTARTS.labels(metrics.STAGE_UP, service).inc(0)
        servers = await self.broker.start()
        # Their PIDs on record at once: a crash from here on leaves them findable.
        self._write_state()
        return servers

    def _create_children(self, specs: list[ChildSpec]) -> None:
        """Every child of ``specs``, known (to readiness, to the roles waiting on them) before
        any of them starts."""
        for spec in specs:
            for name in spec.names:
                self._create_child(spec, name)

    def _create_child(self, spec: ChildSpec, name: str) -> SupervisedChild:
        stage = spec.role if spec.is_stage else metrics.STAGE_UP
        # The embedded ClickHouse checks that its data dir is `sgpipe up`'s (the lock's fd).
        pass_fds = (self.lock.fileno(),) if spec.role == "clickhouse" else ()
        child = SupervisedChild(
            name,
            stage,
            lambda: self._argv(spec, name),
            env=configs.child_environment(self.options.environ),
            stream=self.stream,
            ready=spec.ready,
            pass_fds=pass_fds,
            fork_server=self.options.fork_server,
        )
        self.children[name] = child
        self.spec_of[name] = spec
        metrics.UP_CHILD_RESTARTS.labels(metrics.STAGE_UP, name).inc(0)
        return child

    async def _launch(self, child: SupervisedChild) -> None:
        """Start ``child`` and supervise it (not once a stop began: its rank may be past)."""
        if self.halt.is_set():
            return
        await child.start()
        self.tasks.append(asyncio.create_task(self._watch(child), name=f"watch-{child.name}"))
        self._write_state()

    def _argv(self, spec: ChildSpec, name: str) -> list[str]:
        """The child's command line, its config file (re)written for this start."""
        assert self.stage_base is not None or not spec.is_stage
        child_settings = self.child_settings[spec.role](self.stage_base or self.settings)
        path = configs.write_config(self.run_dir, name, child_settings)
        # Absolute paths: a child left running by a crash is recognised by its command line
        # naming the data dir (sgpipe.up.leftovers), whatever directory `sgpipe up` ran in.
        return [
            sys.executable,
            "-m",
            "sgpipe",
            spec.command,
            "--config",
            str(path.resolve()),
            *spec.extra_args,
        ]

    def _clickhouse_settings(self, base: Settings) -> Settings:
        embedded = base.embedded
        if self.clickhouse_port is not None:  # a restart: keep the URL the sinks know
            embedded = embedded.model_copy(update={"clickhouse_http_port": self.clickhouse_port})
        return configs.stage_settings(base.model_copy(update={"embedded": embedded}), "clickhouse")

    def _ingest_settings(self, base: Settings) -> Settings:
        assert self.health_url is not None
        return configs.stage_settings(
            base, "ingest", health_peers=(self.health_url,), ingest_port=self.ingress_port
        )

    def _sink_settings(self, base: Settings) -> Settings:
        assert self.clickhouse_url is not None
        clickhouse = base.clickhouse.model_copy(update={"url": self.clickhouse_url})
        if self.credentials is not None:
            # The embedded store: the sink (and its migrations) write as the writer user.
            writer = self.credentials.writer
            clickhouse = with_credentials(clickhouse, writer.name, writer.password)
        return base.model_copy(update={"clickhouse": clickhouse})

    # --- supervision -------------------------------------------------------------------------

    async def _watch(self, child: SupervisedChild) -> None:
        """Restart ``child`` when it dies unasked; stop everything when it exits 2 or 3 (or
        ClickHouse exits before it ever served: nothing would fix that either)."""
        backoff = RestartBackoff()
        while True:
            code = await child.wait_exited()
            if child.stop_requested or self.stopping:
                return
            never_served = self.spec_of[child.name].role == "clickhouse" and child.url is None
            if code in (EXIT_CONFIG, EXIT_FATAL) or never_served:
                self._fail(child, code)
                return
            delay = backoff.next_delay(time.monotonic() - child.started_at)
            child.restarts += 1
            metrics.UP_CHILD_RESTARTS.labels(metrics.STAGE_UP, child.name).inc()
            log.warning(
                "child process exited; restarting it",
                child=child.name,
                exit_status=code,
                error=child.last_error,
                restart=child.restarts,
                delay_seconds=delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.halt.wait(), delay)
            if self.halt.is_set():
                return
            try:
                await child.start()
            except OSError as exc:
                child.last_error = f"cannot start: {exc}"
                self._fail(child, 1)
                return
            self._write_state()

    def _fail(self, child: SupervisedChild, code: int | None) -> None:
        message = child.last_error or f"exited with status {code}"
        exit_code = code if code in (EXIT_CONFIG, EXIT_FATAL) else 1
        self.failure = StageFailed(child.name, f"{child.name}: {message}", exit_code)
        log.error(
            "child process failed; a restart cannot fix it, stopping sgpipe up",
            child=child.name,
            exit_status=code,
            error=message,
        )
        self.halt.set()

    def _stage_health_urls(self) -> list[str]:
        """The consuming stages' health endpoints, where they listen now (the ingress reaches
        them through the supervisor, which knows where a restarted child moved)."""
        return [
            child.url
            for role in ("process", "sink")
            for child in self._children_of(role)
            if child.running and child.url is not None
        ]

    def _children_check(self) -> tuple[bool, str]:
        down = [
            name
            for spec in self.table
            for name in spec.names
            if (child := self.children.get(name)) is None
            or not child.running
            or not child.ready_now
        ]
        if down:
            return False, f"not running or not ready: {', '.join(down)}"
        return True, "every child running"

    def _broker_check(self) -> tuple[bool, str]:
        if self.broker is not None and self.broker.alive():
            return True, "embedded broker running"
        return False, "embedded broker not running (being restarted?)"

    # --- stop --------------------------------------------------------------------------------

    async def _shutdown(self) -> bool:
        """Stop everything; True if it was a stop at once."""
        self.stopping = True
        self.halt.set()
        in_order = asyncio.create_task(self._stop_in_order(), name="stop-in-order")
        now = asyncio.create_task(self.at_once.wait())
        try:
            await asyncio.wait({in_order, now}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            now.cancel()
        if in_order.done() and not self.at_once.is_set():
            in_order.result()
            return False
        in_order.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await in_order
        await self._stop_at_once()
        return True

    async def _stop_in_order(self) -> None:
        log.info("stopping: the ingress first, then the processors and the sinks")
        before = await self._stage_totals()
        await self._stop_demo()
        stages = [spec for spec in self.table if spec.is_stage]
        await self._stop_ranks(stages)
        stage_children = self._stage_children()
        if any(self.spec_of[name].role != "ingest" for name in stage_children):
            left, unknown = await self._count_left()
            drained = Drained.total(
                Drained.from_reports(
                    {child.stage: child.stop_report},
                    {child.stage: before[name]} if name in before else None,
                )
                for name, child in stage_children.items()
            )
            self._announce(
                "stopped in order",
                stop_report(drained, left, self._location(), unknown),
                drained=asdict(drained),
                left=asdict(left) if left is not None else None,
            )
        await self._stop_stores(STORE_STOP_SECONDS)
        log.info("stopped")

    async def _stop_ranks(self, specs: list[ChildSpec], grace: float | None = None) -> None:
        """Stop ``specs``' children rank by rank (ChildSpec.stop_rank): a rank together, the
        next once it has stopped. ``grace``: instead of each spec's own."""
        for rank in sorted({spec.stop_rank for spec in specs}):
            await asyncio.gather(
                *(
                    child.stop(spec.stop_grace if grace is None else grace)
                    for spec in specs
                    if spec.stop_rank == rank
                    for name in spec.names
                    if (child := self.children.get(name)) is not None
                )
            )

    def _stage_children(self) -> dict[str, SupervisedChild]:
        return {
            name: child
            for spec in self.table
            if spec.is_stage
            for name in spec.names
            if (child := self.children.get(name)) is not None
        }

    async def _stage_totals(self) -> dict[str, dict[str, float]]:
        """Each running stage's totals now (from its /metrics), the baseline of what the stop
        writes. A stage that does not answer in time counts from its own stop signal."""

        async def totals(session: aiohttp.ClientSession, name: str, child: SupervisedChild) -> None:
            async with session.get(f"{child.url}/metrics") as response:
                text = await response.text()
            found[name] = metrics.stop_counters(child.stage, text_string_to_metric_families(text))

        found: dict[str, dict[str, float]] = {}
        timeout = aiohttp.ClientTimeout(total=STAGE_PEER_TIMEOUT_SECONDS)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await asyncio.gather(
                *(
                    totals(session, name, child)
                    for name, child in self._stage_children().items()
                    if child.running and child.url is not None
                ),
                return_exceptions=True,
            )
        return found

    async def _stop_at_once(self) -> None:
        self.demo_stop.set()
        if self.demo_task is not None:
            self.demo_task.cancel()
        stages = list(self._stage_children().values())
        # SIGQUIT, each stage's "stop at once": one delivery, so that a busy machine cannot
        # split it into a first signal (a drain, which writes) and a late second one.
        await asyncio.gather(
            *(
                child.stop(AT_ONCE_GRACE_SECONDS, signals=(signal.SIGQUIT,))
                for child in stages
                if child.running
            )
        )
        if stages:
            left, unknown = await self._count_left()
            self._announce(
                "stopped at once",
                at_once_report(left, self._location(), unknown),
                left=asdict(left) if left is not None else None,
            )
        await self._stop_stores(AT_ONCE_GRACE_SECONDS)
        log.info("stopped")

    async def _stop_stores(self, grace: float) -> None:
        await self._stop_ranks([spec for spec in self.table if not spec.is_stage], grace)
        if self.broker is not None:
            await self.broker.stop()
        if self.health is not None:
            await self.health.cleanup()
            self.health = None
        remove_state(self.data_dir)
        # The children's config files hold credentials: not left behind.
        shutil.rmtree(self.run_dir, ignore_errors=True)

    async def _watch_backlog(self) -> None:
        """Say how big the backlog of a previous run is, and once when it is written. The
        count reads the topics past the groups' committed offsets, so it is repeated at a
        growing interval, not in a tight loop."""
        started = time.monotonic()
        backlog, _ = await self._count_left(before_ms=self.started_ms)
        if backlog is None or backlog.empty:
            return
        self._announce(
            "backlog at start", backlog_at_start_report(backlog), backlog=asdict(backlog)
        )
        interval = BACKLOG_WATCH_FIRST_SECONDS
        while True:
            await asyncio.sleep(interval)
            interval = min(interval * 2, BACKLOG_WATCH_MAX_SECONDS)
            left, _ = await self._count_left(before_ms=self.started_ms)
            if left is not None and left.empty:
                self._announce(
                    "backlog drained",
                    backlog_drained_report(backlog, time.monotonic() - started),
                    backlog=asdict(backlog),
                    seconds=round(time.monotonic() - started, 1),
                )
                return

    async def _count_left(
        self, *, before_ms: int | None = None
    ) -> tuple[Backlog | None, str | None]:
        if self.stage_base is None:
            return None, "the broker never started"
        try:
            backlog = await count_backlog(
                self.stage_base, BACKLOG_TIMEOUT_SECONDS, before_ms=before_ms
            )
            return backlog, None
        except BacklogUnknown as exc:
            return None, str(exc)

    def _location(self) -> BrokerLocation:
        if not self.embedded_broker:
            return BrokerLocation("external", str(self.settings.kafka.bootstrap_servers))
        if self.drain:
            return BrokerLocation("memory", "")
        return BrokerLocation("durable", str(self.data_dir / "broker"))

    def _announce(self, event: str, sentence: str, **fields: Any) -> None:
        """A line for people: the plain sentence on a console, an event with it in JSON."""
        if self.stream.json_output:
            log.info(event, report=sentence, **fields)
        else:
            print(f"sgpipe: {redact_text(sentence)}", file=sys.stderr, flush=True)
            self.stream.record_own(
                {"event": event, "level": "info", "report": redact_text(sentence), **fields}
            )

    # --- the demo ------------------------------------------------------------------------------

    def _start_demo(self) -> None:
        assert self.ingress_port is not None
        host = self.settings.ingest.host
        host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        url = f"http://{host}:{self.ingress_port}/webhooks/{demo.DEMO_WEBHOOK}"
        key = demo.demo_key(self.data_dir)
        self.demo_task = asyncio.create_task(demo.run_demo(url, key, self.demo_stop), name="demo")
        command = demo.query_command(self.options.program, self.data_dir, self.options.config_file)
        self._announce(
            "demo running",
            f"demo: simulated SendGrid traffic ({demo.DEMO_RATE:g} events/s) is posted to {url}; "
            f"watch the rows arrive with:  {command}",
            url=url,
            query_command=command,
        )

    async def _stop_demo(self) -> None:
        self.demo_stop.set()
        if self.demo_task is not None:
            # It finishes the posts in flight; a stop does not wait on a slow one for long.
            try:
                await asyncio.wait_for(asyncio.shield(self.demo_task), 5.0)
            except (TimeoutError, Exception):  # noqa: BLE001 - the demo must not block a stop
                self.demo_task.cancel()

    # --- what others read ------------------------------------------------------------------

    def _log_webhook_urls(self) -> None:
        port = self.ingress_port
        if not self.settings.webhooks:
            log.warning("no webhooks configured: add one under `webhooks:` in the config file")
        for webhook in self.settings.webhooks:
            log.info(
                "send SendGrid events to",
                webhook=webhook.name,
                url=f"http://<this-host>:{port}/webhooks/{webhook.name}",
                local_url=f"http://127.0.0.1:{port}/webhooks/{webhook.name}",
            )

    def _state(self) -> dict[str, Any]:
        """Where everything listens and every child's PID: no secret in it (URLs redacted;
        the embedded store's credentials have their own file)."""
        children: dict[str, Any] = {}
        for name, child in self.children.items():
            children[name] = {
                "role": self.spec_of[name].role,
                "pid": child.pid if child.running else None,
                "restarts": child.restarts,
                "port": child.port,
                "url": redact_url(child.url) if child.url else None,
            }
        broker: dict[str, Any] | None = None
        if self.broker is not None:
            broker = {
                "storage": self.settings.embedded.broker_storage,
                "pid": self.broker.broker.pid if self.broker.broker is not None else None,
                "storage_pid": self.broker.storage.pid if self.broker.storage else None,
                "data": str(self.data_dir / "broker"),
            }
        stage_kafka = self.stage_base.kafka if self.stage_base is not None else None
        return {
            "pid": os.getpid(),
            "health_url": self.health_url,
            "ingest_url": (
                f"http://127.0.0.1:{self.ingress_port}" if self.ingress_port is not None else None
            ),
            "clickhouse_url": redact_url(self.clickhouse_url) if self.clickhouse_url else None,
            "clickhouse_embedded": self.settings.clickhouse.url is None,
            "clickhouse_data": str(self.data_dir / CLICKHOUSE_DIR),
            "kafka_bootstrap_servers": stage_kafka.bootstrap_servers if stage_kafka else None,
            "database": self.settings.clickhouse.database,
            "broker": broker,
            "children": children,
        }

    def _write_state(self) -> None:
        write_state(self.data_dir, self._state())

    async def _refresh_state(self) -> None:
        # The embedded broker restarts its processes by itself; keep their PIDs current.
        last = self._state()
        while True:
            await asyncio.sleep(STATE_REFRESH_SECONDS)
            current = self._state()
            if current != last:
                write_state(self.data_dir, current)
                last = current


def _stage_grace(stop_timeout_seconds: float) -> float:
    """How long a consuming stage may take to stop: its stop timeout (writing what it holds,
    draining), its three clients' close timeouts, and a margin; then SIGKILL."""
    return stop_timeout_seconds + 3 * CLOSE_TIMEOUT_SECONDS + _STOP_MARGIN_SECONDS
