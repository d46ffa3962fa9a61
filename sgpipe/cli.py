"""The ``sgpipe`` command: the one place that reads the environment and builds Settings.

Every command reports a failure to start as one line and exits 2 (configuration, a busy port,
a data dir in use); anything else that escapes a command is one ``error=...`` log line and
exit 1 (its traceback only at ``--log-level debug``). Exit codes are listed in ``--help``.

It starts at once: this module imports only the standard library and the parsers of the
command groups; a command imports what it needs (pydantic for the settings, structlog,
aiokafka, chdb) when it runs, so ``--version``, ``--help`` and a usage error never pay for
them (bench/cli_start.py measures it; tests/unit/test_cli.py checks the imports).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sgpipe.dlq.command import add_commands as add_dlq_commands
from sgpipe.simulator.command import add_commands as add_simulator_commands
from sgpipe.up import layout

if TYPE_CHECKING:
    import asyncio

    from sgpipe.dlq.command import DlqHandler
    from sgpipe.runtime.logs import Format, Level
    from sgpipe.runtime.settings import Settings

# The names of sgpipe.runtime.logs.LEVELS (a unit test keeps them equal), spelled here so
# that building the parser does not import the logging stack.
LOG_LEVELS = ("debug", "info", "warning", "error")

DEFAULT_DATA_DIR = layout.DEFAULT_DATA_DIR

EXIT_FAILURE = 1
EXIT_CONFIG = 2
# A stage stopped itself (wrong credentials, schema mismatch, a broken deploy): a person
# must act; Kubernetes restarts it and the restarts surface the message.
EXIT_FATAL = 3
EXIT_INTERRUPTED = 130

# Names ClickHouse output formats have (TabSeparated, JSONEachRow, CSVWithNames, ...); checked
# because the name is put into the request, never the SQL.
_FORMAT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")

Command = Callable[[argparse.Namespace, "Settings"], int]


def _log() -> Any:
    import structlog

    return structlog.get_logger("sgpipe")


# Set by the entry points (the `sgpipe` script, `python -m sgpipe`): only a process that *is*
# the command may fork itself for `sgpipe up`'s children (sgpipe.up.forkserver), never a
# program that calls ``main`` in-process (a test runner: a fork of it would run its code on).
_as_program = False


def program(argv: Sequence[str] | None = None) -> int:
    """The ``sgpipe`` command as a process's entry point (``argv``: the arguments after
    ``sgpipe``, where they are not the process's own, as in a forked process)."""
    global _as_program
    _as_program = True
    return main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Only now, with a command to run: the settings, logging and error types.
    from sgpipe.runtime.logs import configure_logging
    from sgpipe.runtime.settings import ConfigError, read_settings, settings_warnings

    environ = os.environ
    # Until the settings are read, log as the flags (or their variables) say: a configuration
    # error is then reported in the format the operator asked for.
    configure_logging(*_early_logging(args, environ))
    try:
        loaded = read_settings(args.config, environ, _overrides(args))
    except ConfigError as exc:
        return _report_start_failure(exc.problems)
    settings = loaded.settings
    configure_logging(settings.logging.level, settings.logging.format)
    for warning in loaded.warnings:
        _log().warning(warning.event, **warning.fields)
    if args.serves_webhooks:
        for warning in settings_warnings(settings):
            _log().warning(warning.event, **warning.fields)
    command: Command = args.command
    try:
        return command(args, settings)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:
        return _report_escaped(exc, settings)


def _report_start_failure(problems: Sequence[str]) -> int:
    from sgpipe.runtime.logs import report_fatal

    for problem in problems:
        report_fatal(problem, exit_code=EXIT_CONFIG)
    return EXIT_CONFIG


def _report_escaped(exc: Exception, settings: Settings) -> int:
    from sgpipe.preflight import PreflightFailed
    from sgpipe.runtime.errors import FatalStageError, describe
    from sgpipe.runtime.settings import ConfigError

    log = _log()
    if isinstance(exc, ConfigError):
        return _report_start_failure(exc.problems)
    if isinstance(exc, PreflightFailed):
        return _report_start_failure([problem.message for problem in exc.problems])
    from sgpipe.up import StageFailed

    if isinstance(exc, StageFailed):
        # `sgpipe up` stopped because a child stopped on an error restarting cannot fix: its
        # exit code and its own message, once more as the last line.
        log.error(
            "sgpipe up stopped: a stage failed", stage=exc.stage, error=str(exc), exit_code=exc.code
        )
        return exc.code
    debug = settings.logging.level == "debug"
    if isinstance(exc, FatalStageError):
        log.error("stage stopped on a fatal error", error=str(exc), exc_info=exc if debug else None)
        return EXIT_FATAL
    # The top-level guard: one line an operator can act on, never an uncaught traceback.
    log.error("sgpipe stopped on an error", error=describe(exc), exc_info=exc if debug else None)
    return EXIT_FAILURE


def _early_logging(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[Level, Format]:
    level = args.log_level or environ.get("SGPIPE_LOGGING__LEVEL", "").lower()
    output = args.log_format or environ.get("SGPIPE_LOGGING__FORMAT", "").lower()
    levels: dict[str, Level] = {"debug": "debug", "warning": "warning", "error": "error"}
    formats: dict[str, Format] = {"json": "json", "console": "console"}
    return levels.get(level, "info"), formats.get(output, "auto")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if getattr(args, "port", None) is not None:
        overrides["ingest.port"] = args.port
    if getattr(args, "processors", None) is not None:
        overrides["up.processors"] = args.processors
    if getattr(args, "sinks", None) is not None:
        overrides["up.sinks"] = args.sinks
    if args.log_level is not None:
        overrides["logging.level"] = args.log_level
    if args.log_format is not None:
        overrides["logging.format"] = args.log_format
    return overrides


# --- the parser ------------------------------------------------------------------------------

_DESCRIPTION = """\
Keep every Twilio SendGrid Event Webhook event: a verified ingress publishes each batch to
Kafka, a processor turns it into Avro events, a sink writes them to ClickHouse.

Settings come from a YAML file (--config, or $SGPIPE_CONFIG), overridden by SGPIPE_*
environment variables (SGPIPE_KAFKA__BOOTSTRAP_SERVERS=...) and then by flags.
See docs/configuration.md."""

_EPILOG = """\
exit codes:
  0  stopped cleanly
  1  runtime failure (logged as one line with error=...)
  2  configuration or usage error, or a start-up conflict such as a busy port
  3  a stage stopped itself on a fatal error (bad credentials, schema mismatch)

examples:
  sgpipe up                                   whole pipeline, embedded Kafka and ClickHouse
  sgpipe up --demo                            ... with simulated SendGrid traffic
  sgpipe ingest --config /etc/sgpipe.yaml     the ingress alone, against your Kafka
  sgpipe query "SELECT event, count() FROM email_events_dedup GROUP BY event"
  sgpipe migrate --dry-run                    print the ClickHouse migrations still to apply
  sgpipe forget --email alice@example.com     delete one person's events"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sgpipe",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version",
        action=_PrintVersion,
        nargs=0,
        default=argparse.SUPPRESS,
        help="print the version",
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    options = common.add_argument_group("common options")
    options.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="YAML settings file (default: $SGPIPE_CONFIG, else built-in defaults)",
    )
    options.add_argument(
        "--log-level",
        choices=list(LOG_LEVELS),
        help="log this level and above (default: logging.level, info)",
    )
    options.add_argument(
        "--log-format",
        choices=["json", "console"],
        help="json lines, or readable console lines "
        "(default: logging.format; auto: console on a terminal, json otherwise)",
    )

    def command(
        name: str, handler: Command, summary: str, description: str, *, serves_webhooks: bool
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=summary,
            description=description,
            parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(command=handler, serves_webhooks=serves_webhooks)
        return sub

    up = command(
        "up",
        _up,
        "run the whole pipeline on one machine",
        "Run the ingress, N processors and M sinks as supervised child processes (`sgpipe\n"
        "ingest`, `sgpipe process`, `sgpipe sink`; one that dies is restarted). Without\n"
        "kafka.bootstrap_servers an embedded Kafka-protocol broker is started, without\n"
        "clickhouse.url an embedded ClickHouse under --data-dir. Ctrl-C stops the ingress, then\n"
        "the processor and the sink, and says what the stop wrote; a second Ctrl-C stops at once\n"
        "and says what is left unwritten and where. Checks ports and the data dir before\n"
        "starting anything. See docs/up.md.",
        serves_webhooks=True,
    )
    _add_data_dir(up)
    up.add_argument(
        "--port", type=int, metavar="PORT", help="ingress port (default: ingest.port, 8080)"
    )
    up.add_argument(
        "--processors",
        type=int,
        metavar="N",
        help="processor processes (default: up.processors, else one per two CPU cores; never "
        "more than the raw topic's partitions)",
    )
    up.add_argument(
        "--sinks",
        type=int,
        metavar="M",
        help="sink processes (default: up.sinks, else one per two CPU cores; never more than "
        "the events topic's partitions)",
    )
    up.add_argument(
        "--demo",
        action="store_true",
        help="also run the SendGrid simulator against a `demo` webhook (a key generated into "
        "--data-dir) at a gentle rate, and print a query that shows the rows arriving",
    )

    ingest = command(
        "ingest",
        _ingest,
        "run the webhook ingress against your Kafka",
        "Serve POST /webhooks/<name>: verify SendGrid's signature, publish the batch to the raw\n"
        "topic, answer 200 once Kafka acknowledged it. Needs kafka.bootstrap_servers. Waits up\n"
        "to kafka.start_timeout_seconds for Kafka at start, then exits 1.",
        serves_webhooks=True,
    )
    ingest.add_argument(
        "--port", type=int, metavar="PORT", help="listen on this port (default: ingest.port, 8080)"
    )
    _add_status_fd(ingest)

    process = command(
        "process",
        _process,
        "run the processor: raw batches -> Avro events",
        "Consume raw batches, split and normalize them into Avro events on the events topic;\n"
        "what cannot be processed goes to the dead-letter topic. Needs kafka.bootstrap_servers.",
        serves_webhooks=False,
    )
    _add_drain(process)
    _add_status_fd(process)
    sink = command(
        "sink",
        _sink,
        "run the sink: Avro events -> ClickHouse",
        "Consume Avro events and insert them into ClickHouse's email_events table, committing\n"
        "offsets only after the insert. Needs kafka.bootstrap_servers and clickhouse.url.",
        serves_webhooks=False,
    )
    _add_drain(sink)
    _add_status_fd(sink)

    query = command(
        "query",
        _query,
        "run SQL against the store and print the result",
        "Run one SQL statement against clickhouse.url, or the embedded store of --data-dir (over\n"
        "HTTP while `sgpipe up` serves it, directly otherwise). Like clickhouse-client: a table\n"
        "(PrettyCompact) on a terminal, tab-separated values without a header in a pipe.",
        serves_webhooks=False,
    )
    _add_data_dir(query)
    query.add_argument(
        "--format",
        metavar="FMT",
        help="any ClickHouse output format, e.g. TSVWithNames, JSONEachRow, CSVWithNames "
        "(default: PrettyCompact on a terminal, TabSeparated otherwise; a FORMAT clause in the "
        "SQL wins)",
    )
    query.add_argument(
        "sql", metavar="SQL", help='the statement, e.g. "SELECT count() FROM email_events FINAL"'
    )
    migrate = command(
        "migrate",
        _migrate,
        "apply ClickHouse migrations (and create missing Kafka topics)",
        "Apply the ClickHouse migrations this version has and the store has not, in order, then\n"
        "set the TTLs of clickhouse.retention_days; with kafka.create_topics and\n"
        "kafka.bootstrap_servers, create the missing topics. Against clickhouse.url, or the\n"
        "embedded store of --data-dir (through `sgpipe up` while it runs). An applied migration\n"
        "whose file changed stops it with exit 3, naming the file.",
        serves_webhooks=False,
    )
    _add_data_dir(migrate)
    migrate.add_argument(
        "--dry-run", action="store_true", help="print the SQL and topics, change nothing"
    )

    forget = command(
        "forget",
        _forget,
        "delete one person's events from every table",
        "Delete every row of one recipient address from the tables that hold per-person data\n"
        "(email_events, the message lifecycle, dead letters) and report how many went; the\n"
        "daily aggregates store no address. Letter case does not matter; with pii.email: hash\n"
        "the pseudonym is found from the address (pii.hash_key). Against clickhouse.url, or the\n"
        "embedded store of --data-dir (through `sgpipe up` while it runs). On a terminal it asks\n"
        "first. See docs/privacy.md.",
        serves_webhooks=False,
    )
    _add_data_dir(forget)
    forget.add_argument("--email", required=True, metavar="ADDRESS", help="the address to forget")
    forget.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    top = command(
        "top",
        _top,
        "watch a running pipeline: one row per stage, live",
        "A live view of a running pipeline, like `vector top`: per stage ready or not, events/s\n"
        "in and out, consumer lag, dead letters, retries, errors by class, last commit age; a\n"
        "header with 2xx -> row latency, events stored in the last minute and the oldest\n"
        "unwritten record's age. Reads `sgpipe up`'s ingress port (found in --data-dir), or\n"
        "each --metrics-url (e.g. a Kubernetes port-forward to every stage's health port).",
        serves_webhooks=False,
    )
    _add_data_dir(top)
    top.add_argument(
        "--metrics-url",
        action="append",
        metavar="URL",
        help="a stage's base URL or its /metrics URL; repeat for several (instead of --data-dir)",
    )
    top.add_argument("--once", action="store_true", help="print one snapshot and exit")
    top.add_argument("--json", action="store_true", help="with --once: the snapshot as JSON")
    top.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="seconds between readings; rates are over this window (default 1)",
    )
    report = command(
        "report",
        _report,
        "write a self-contained HTML deliverability report",
        "Write one HTML file (charts and data inlined: it opens without a network) from the BI\n"
        "tables: delivered, bounced (by type and classification), blocked, deferred, dropped,\n"
        "opened, clicked and spam-report rates per day; top bouncing domains; per campaign and\n"
        "template; processed -> delivered p50/p95; the data's time span and event count.\n"
        "Against --clickhouse-url (or clickhouse.url), or the embedded store of --data-dir.",
        serves_webhooks=False,
    )
    _add_data_dir(report)
    report.add_argument(
        "--clickhouse-url",
        metavar="URL",
        help="a ClickHouse server's HTTP URL (default: clickhouse.url, else the embedded store)",
    )
    report.add_argument(
        "--since", default="30d", metavar="AGE", help="events of the last AGE: 30d, 12h, 2w (30d)"
    )
    report.add_argument(
        "--out", type=Path, default=Path("report.html"), metavar="FILE", help="(report.html)"
    )
    add_simulator_commands(commands, common)  # keys generate, simulate
    add_dlq_commands(commands, common, _with_store, _add_data_dir)  # dlq list, dlq replay
    from sgpipe.webhooks.command import add_commands as add_webhooks_commands

    add_webhooks_commands(commands, common)  # webhooks ..., sendgrid-emulator
    from sgpipe.oauth_command import add_commands as add_oauth_commands

    add_oauth_commands(commands, common)  # oauth client create, oauth key create

    # Internal, not listed: the process that holds `sgpipe up`'s embedded ClickHouse.
    serve_clickhouse = commands.add_parser(
        "serve-clickhouse",
        parents=[common],
        description="Serve the embedded ClickHouse of --data-dir over ClickHouse's HTTP\n"
        "interface on embedded.clickhouse_http_port (started by `sgpipe up`, which created the\n"
        "store's credentials).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve_clickhouse.set_defaults(command=_serve_clickhouse, serves_webhooks=False)
    _add_data_dir(serve_clickhouse)
    _add_status_fd(serve_clickhouse)
    return parser


def _top(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from sgpipe.runtime.logs import report_fatal
    from sgpipe.top import TopError, describe_sources, metrics_urls_from_data_dir, run_top

    try:
        urls = args.metrics_url or metrics_urls_from_data_dir(args.data_dir)
        if args.interval <= 0:
            raise TopError("--interval must be above 0")
        return asyncio.run(
            run_top(
                urls,
                once=args.once,
                interval_seconds=args.interval,
                as_json=args.json,
                source=describe_sources(urls),
            )
        )
    except TopError as exc:
        report_fatal(str(exc), exit_code=EXIT_FAILURE)
        return EXIT_FAILURE


def _report(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from sgpipe.report import ReportError, fetch_report_data, parse_since, render_html
    from sgpipe.runtime.clickhouse import connect
    from sgpipe.runtime.logs import report_fatal
    from sgpipe.runtime.settings import ConfigError
    from sgpipe.store import StoreUnavailable, open_store

    try:
        since = parse_since(args.since)
    except ReportError as exc:
        raise ConfigError(str(exc)) from exc
    if args.clickhouse_url:
        clickhouse = settings.clickhouse.model_copy(update={"url": args.clickhouse_url})
        settings = settings.model_copy(update={"clickhouse": clickhouse})

    async def run() -> int:
        async with open_store(settings, args.data_dir, "report") as store:
            client = await connect(store.settings, store.url)
            try:
                data = await fetch_report_data(client, settings.clickhouse.database, since)
            finally:
                await client.close()
        args.out.write_text(render_html(data), encoding="utf-8")
        print(f"wrote {args.out}: {data.events:,} events from {store.how}")
        return 0

    try:
        return asyncio.run(run())
    except (StoreUnavailable, ReportError) as exc:
        report_fatal(str(exc))
        return EXIT_FAILURE


def _add_drain(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--drain",
        action="store_true",
        help="on stop, keep consuming until the topic is empty before exiting (what `sgpipe up` "
        "asks with an in-memory broker, which keeps nothing once stopped)",
    )


def _add_status_fd(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--status-fd",
        type=int,
        default=None,
        metavar="FD",
        help="what `sgpipe up` passes its children: report the ports bound and readiness as JSON "
        "lines on this inherited file descriptor (see docs/up.md); not needed otherwise",
    )


def _open_status(args: argparse.Namespace) -> None:
    from sgpipe.runtime.status import open_status_channel

    open_status_channel(args.status_fd)


async def _report_consuming(ready: asyncio.Event) -> None:
    from sgpipe.runtime import status

    await ready.wait()
    status.report("consuming")


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        metavar="DIR",
        help=f"embedded ClickHouse data and `sgpipe up`'s lock (default: {DEFAULT_DATA_DIR})",
    )


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("sgpipe")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


class _PrintVersion(argparse.Action):
    """argparse's ``version`` action, with the version looked up only when asked for."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        # On stdout, as argparse's own version action prints it.
        sys.stdout.write(f"{parser.prog} {_version()}\n")
        parser.exit()


# --- commands --------------------------------------------------------------------------------


def _run_until_signal(
    body: Callable[[asyncio.Event], Awaitable[None]], *, stage: str | None = None
) -> int:
    """Run ``body`` until it returns; the first SIGINT/SIGTERM sets its ``stop``, a second one
    (or a SIGQUIT, `sgpipe up`'s "stop at once") cancels it. With ``stage``, a stop ends with
    one ``stop report`` line: what the stop committed and wrote (`sgpipe up` reads it from its
    children)."""
    import asyncio
    import signal
    import time

    from sgpipe.runtime.metrics import stop_counters

    log = _log()

    async def runner() -> None:
        stop = asyncio.Event()
        main_task = asyncio.current_task()
        assert main_task is not None
        before: dict[str, float] = {}
        stopping_since = 0.0

        def on_signal() -> None:
            nonlocal before, stopping_since
            # The first signal drains; a second one means "now", without draining.
            if stop.is_set():
                log.warning("second signal: stopping at once, without draining")
                main_task.cancel()
            elif stage is not None:
                before, stopping_since = stop_counters(stage), time.monotonic()
            stop.set()

        def on_stop_at_once() -> None:
            # SIGQUIT is "now" in one delivery: what `sgpipe up` sends on its own second signal.
            # Two signals sent back to back could be handled apart on a busy machine, the first
            # starting a drain that writes what a stop at once must leave unwritten.
            log.warning("stop at once (SIGQUIT): stopping without draining")
            stop.set()
            main_task.cancel()

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal)
        loop.add_signal_handler(signal.SIGQUIT, on_stop_at_once)
        await body(stop)
        if stage is not None and stop.is_set():
            _log_stop_report(stage, before, stop_counters(stage), stopping_since)

    try:
        asyncio.run(runner())
    except asyncio.CancelledError:
        return EXIT_FAILURE
    return 0


def _log_stop_report(
    stage: str, before: Mapping[str, float], after: Mapping[str, float], since: float
) -> None:
    """What happened between the stop signal and the end: records committed, records written
    per output, dead letters, batches acknowledged (the ingress's requests in flight); and the
    process's totals, for a supervisor that counts from an earlier moment."""
    import time

    done = {key: int(after[key] - before.get(key, 0.0)) for key in after}
    written = {
        key.split(":", 1)[1]: count for key, count in done.items() if key.startswith("written:")
    }
    _log().info(
        "stop report",
        stage=stage,
        committed=done["committed"],
        written=written,
        dead_letters=done["dead_letters"],
        acknowledged=done["acknowledged"],
        totals={key: int(value) for key, value in after.items()},
        seconds=round(time.monotonic() - since, 3),
    )


def _require_kafka(settings: Settings) -> None:
    from sgpipe.runtime.settings import ConfigError

    if settings.kafka.bootstrap_servers is None:
        raise ConfigError(
            "kafka.bootstrap_servers must be set (or SGPIPE_KAFKA__BOOTSTRAP_SERVERS); "
            "only `sgpipe up` embeds a broker"
        )


def _up(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio
    import signal

    from sgpipe.up import UpOptions, forkserver, run_up

    log = _log()
    # Before anything is created: every file `sgpipe up` and its children (inheriting it)
    # write holds events, addresses or secrets -- owner only (docs/security.md).
    os.umask(0o077)
    # Before the event loop and any thread: the children are forked from this copy of us.
    fork_server = forkserver.start() if _as_program else None
    if isinstance(fork_server, forkserver.ForkedChild):
        return main(fork_server.argv)  # in a child the server forked: run its command

    async def runner() -> int:
        stop, at_once = asyncio.Event(), asyncio.Event()

        def on_signal() -> None:
            # First: stop in order, writing what is buffered. Second: stop at once (the stages
            # are stopped without writing) and report what is left unwritten. Third: leave.
            if at_once.is_set():
                # The children die with us (PR_SET_PDEATHSIG); the lock goes with the process.
                log.warning("third signal: exiting without waiting for the children")
                os._exit(EXIT_INTERRUPTED)
            elif stop.is_set():
                log.warning("second signal: stopping at once")
                at_once.set()
            stop.set()

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal)
        options = UpOptions(
            data_dir=args.data_dir,
            demo=args.demo,
            config_file=args.config,
            environ=dict(os.environ),
            program=_program(),
            fork_server=fork_server,
        )
        return await run_up(settings, options, stop, at_once)

    try:
        return asyncio.run(runner())
    finally:
        if fork_server is not None:
            fork_server.close()  # the server exits at the channel's end


def _program() -> str:
    """How the user ran sgpipe, for commands we print: `.venv/bin/sgpipe`, else `sgpipe`."""
    invoked = sys.argv[0] if sys.argv else ""
    return invoked if Path(invoked).name == "sgpipe" else "sgpipe"


def _ingest(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.server import run_ingress
    from sgpipe.preflight import PortClaim, PreflightFailed, check_ports
    from sgpipe.runtime.metrics import STAGE_INGEST
    from sgpipe.runtime.raw_auth import require_raw_auth

    _require_kafka(settings)
    claim = PortClaim("ingest.port", settings.ingest.host, settings.ingest.port, "--port")
    problems = check_ports([claim])
    if problems:
        raise PreflightFailed(problems)
    require_raw_auth(settings.raw_auth, stage=STAGE_INGEST)
    _open_status(args)
    return _run_until_signal(lambda stop: run_ingress(settings, stop), stage=STAGE_INGEST)


def _process(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from processors.stage import run_processor
    from sgpipe.runtime.metrics import STAGE_PROCESS
    from sgpipe.runtime.raw_auth import require_raw_auth

    _require_kafka(settings)
    require_raw_auth(settings.raw_auth, stage=STAGE_PROCESS)

    _open_status(args)

    async def body(stop: asyncio.Event) -> None:
        ready = asyncio.Event()
        reporter = asyncio.create_task(_report_consuming(ready))
        try:
            await run_processor(settings, stop, drain=args.drain, ready=ready)
        finally:
            reporter.cancel()

    return _run_until_signal(body, stage=STAGE_PROCESS)


def _sink(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from sgpipe.runtime.metrics import STAGE_SINK
    from sgpipe.runtime.settings import ConfigError
    from sinks.stage import run_sink

    _require_kafka(settings)
    if settings.clickhouse.url is None:
        raise ConfigError(
            "clickhouse.url must be set (or SGPIPE_CLICKHOUSE__URL); "
            "only `sgpipe up` embeds ClickHouse"
        )

    _open_status(args)

    async def body(stop: asyncio.Event) -> None:
        ready = asyncio.Event()
        reporter = asyncio.create_task(_report_consuming(ready))
        try:
            await run_sink(settings, stop, drain=args.drain, ready=ready)
        finally:
            reporter.cancel()

    return _run_until_signal(body, stage=STAGE_SINK)


def _serve_clickhouse(args: argparse.Namespace, settings: Settings) -> int:
    from sgpipe.up.store import serve_embedded_clickhouse

    _open_status(args)
    return _run_until_signal(lambda stop: serve_embedded_clickhouse(settings, args.data_dir, stop))


def _query(args: argparse.Namespace, settings: Settings) -> int:
    """Through ClickHouse's HTTP interface when a server is configured or `sgpipe up` serves
    the data dir (as the data dir's writer user); otherwise straight from the embedded data
    path, holding its lock."""
    from sgpipe.runtime.logs import report_fatal
    from sgpipe.runtime.settings import ConfigError

    fmt = args.format or ("PrettyCompact" if sys.stdout.isatty() else "TabSeparated")
    if not _FORMAT_NAME.match(fmt):
        raise ConfigError(f"--format {fmt!r} is not a format name (e.g. TSVWithNames)")
    try:
        output = _store_runner(args.data_dir, settings)(args.sql, fmt)
    except QueryFailed as exc:
        report_fatal(str(exc))
        return EXIT_FAILURE
    sys.stdout.buffer.write(output)
    sys.stdout.flush()
    return 0


def _store_runner(data_dir: Path, settings: Settings) -> Callable[[str, str], bytes]:
    """How `sgpipe query` (and `sgpipe dlq`) reach the store: ``(sql, format) -> output``
    over HTTP at clickhouse.url or a running `sgpipe up`'s, else straight from the embedded
    data path of ``data_dir``. Raises QueryFailed."""
    url = settings.clickhouse.url
    if url is None:
        url = _running_store_url(data_dir)
        if url is not None:
            settings = _as_embedded_writer(settings, data_dir)
    if url is not None:
        served_url, served_settings = url, settings
        return lambda sql, fmt: _query_http(served_url, served_settings, sql, fmt)
    return lambda sql, fmt: _query_directly(data_dir, settings, sql, fmt)


def _with_store(handler: DlqHandler) -> Command:
    """A `sgpipe dlq` action as a command: given the store's runner; a store that fails or
    cannot be reached is reported as one line and exit 1, as `sgpipe query` does."""

    def command(args: argparse.Namespace, settings: Settings) -> int:
        from sgpipe.runtime.logs import report_fatal

        try:
            return handler(args, settings, _store_runner(args.data_dir, settings))
        except QueryFailed as exc:
            report_fatal(str(exc))
            return EXIT_FAILURE

    return command


def _as_embedded_writer(settings: Settings, data_dir: Path) -> Settings:
    """``settings`` with the data dir's writer credentials: `sgpipe up`'s embedded store
    requires them, and `sgpipe query` finds them itself."""
    from sgpipe.store import StoreUnavailable, as_embedded_writer

    try:
        clickhouse = as_embedded_writer(settings.clickhouse, data_dir)
    except StoreUnavailable as exc:
        raise QueryFailed(str(exc)) from exc
    return settings.model_copy(update={"clickhouse": clickhouse})


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from sgpipe.migrate import run_migrate
    from sgpipe.runtime.logs import report_fatal
    from sgpipe.runtime.migrations import MigrationError
    from sgpipe.store import StoreUnavailable

    try:
        lines = asyncio.run(run_migrate(settings, args.data_dir, dry_run=args.dry_run))
    except MigrationError as exc:
        report_fatal(str(exc))
        return EXIT_FATAL
    except StoreUnavailable as exc:
        report_fatal(str(exc))
        return EXIT_FAILURE
    for line in lines:
        print(line)
    return 0


def _forget(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from sgpipe.forget import Forgetter, person
    from sgpipe.runtime.clickhouse import connect
    from sgpipe.runtime.logs import report_fatal
    from sgpipe.runtime.settings import ConfigError
    from sgpipe.store import StoreUnavailable, open_store

    address = args.email.strip()
    if "@" not in address:
        raise ConfigError(f"--email {args.email!r} is not an address")
    ask = not args.yes and sys.stdin.isatty()

    async def run() -> int:
        async with open_store(settings, args.data_dir, "forget") as store:
            client = await connect(store.settings, store.url)
            try:
                forgetter = Forgetter(client, settings)
                who, counts = await forgetter.find(person(settings, address))
                total = sum(counts.values())
                if not total:
                    print(f"no rows of {address} in {settings.clickhouse.database}")
                    return 0
                if ask and not _confirm(address, counts):
                    print("nothing deleted")
                    return EXIT_FAILURE
                deleted = await forgetter.delete(who, counts)
            finally:
                await client.close()
        for table, rows in deleted.items():
            print(f"{table}\t{rows}")
        print(f"deleted {sum(deleted.values())} rows of {address}")
        return 0

    try:
        return asyncio.run(run())
    except StoreUnavailable as exc:
        report_fatal(str(exc))
        return EXIT_FAILURE


def _confirm(address: str, counts: dict[str, int]) -> bool:
    for table, rows in counts.items():
        print(f"{table}\t{rows}")
    # On stdout, like the counts (input() would put the prompt on stderr under readline).
    print(f"Delete these {sum(counts.values())} rows of {address}? [y/N] ", end="", flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def _query_directly(data_dir: Path, settings: Settings, sql: str, fmt: str) -> bytes:
    from sgpipe.embedded.clickhouse import EmbeddedQueryError, query_store
    from sgpipe.preflight import lock_data_dir
    from sgpipe.up import CLICKHOUSE_DIR

    data_path = data_dir / CLICKHOUSE_DIR
    if not data_path.is_dir():
        raise QueryFailed(f"no ClickHouse store at {data_path} (has `sgpipe up` run here?)")
    lock = lock_data_dir(data_dir, "query")  # PreflightFailed: `sgpipe up` is starting
    try:
        return query_store(data_path, sql, database=settings.clickhouse.database, fmt=fmt)
    except EmbeddedQueryError as exc:
        raise QueryFailed(" ".join(str(exc).split())) from exc
    finally:
        lock.release()


def _running_store_url(data_dir: Path) -> str | None:
    """The embedded store's URL if `sgpipe up` serves this data dir and answers."""
    from sgpipe.store import running_store_url

    return running_store_url(data_dir)


def _query_http(url: str, settings: Settings, sql: str, fmt: str) -> bytes:
    """POST the SQL to ClickHouse's HTTP interface; ``default_format`` applies unless the SQL
    has its own FORMAT, as with clickhouse-client. The output is passed through untouched."""
    import urllib.error
    import urllib.request
    from urllib.parse import unquote, urlencode, urlsplit

    parts = urlsplit(url)
    secure = parts.scheme == "https"
    port = parts.port or (8443 if secure else 8123)
    host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname
    endpoint = f"{parts.scheme}://{host}:{port}{parts.path or '/'}"
    username = unquote(parts.username) if parts.username else settings.clickhouse.username
    password = (
        unquote(parts.password)
        if parts.password
        else settings.clickhouse.password.get_secret_value()
    )
    params = urlencode({"database": settings.clickhouse.database, "default_format": fmt})
    request = urllib.request.Request(
        f"{endpoint}?{params}",
        data=sql.encode(),
        method="POST",
        headers={"X-ClickHouse-User": username, "X-ClickHouse-Key": password},
    )
    try:
        with urllib.request.urlopen(
            request, timeout=settings.clickhouse.send_receive_timeout
        ) as response:
            body: bytes = response.read()
            return body
    except urllib.error.HTTPError as error:
        text = error.read().decode("utf-8", "replace")
        raise QueryFailed(" ".join(text.split()) or f"HTTP {error.code}") from error
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise QueryFailed(f"cannot reach ClickHouse at {endpoint}: {reason}") from error


class QueryFailed(Exception):
    """The store answered the query with an error, or could not be reached."""


if __name__ == "__main__":
    sys.exit(program())
