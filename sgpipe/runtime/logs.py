"""One log stream per process: structlog, configured once in the entrypoint.

Everything goes through one handler on stderr: sgpipe's own structlog events and the standard
library loggers of aiokafka, aiohttp, asyncio, clickhouse-connect and Python's warnings, routed
in through ``structlog.stdlib.ProcessorFormatter``. Output is JSON lines when stderr is not a
terminal (or ``logging.format: json``) and readable console lines when it is.

Lines stay short: string fields are capped at ``MAX_FIELD_CHARS``, tracebacks never carry frame
locals, and expected failures are logged as one event with a short ``error`` field (a traceback
only at ``debug``). Context such as ``request_id`` or ``topic``/``partition`` is bound with
``structlog.contextvars`` by the component that knows it.

No secret reaches the stream: every event, the standard library's included, passes
``sgpipe.runtime.redact`` after its exception is rendered and before fields are capped, so a
URL with a password in a message, a field or a traceback is written with ``***`` instead.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Callable
from typing import Any, Literal, TextIO, cast


def _import_structlog_without_rich() -> None:
    """Import structlog with ``rich`` hidden from it. structlog.dev imports rich whenever it
    is installed (sgpipe installs it, for `sgpipe top`), with pygments, for tracebacks this
    module never uses (``plain_traceback`` below): ~0.06 s of CPU in every sgpipe process --
    each stage child of `sgpipe up`, at every start. Hidden only during that import: `sgpipe
    top` imports rich afterwards as usual."""
    if "structlog" in sys.modules or "rich" in sys.modules:
        return
    sys.modules["rich"] = None  # type: ignore[assignment]  # `import rich` raises ImportError
    try:
        import structlog  # noqa: F401
    finally:
        del sys.modules["rich"]


_import_structlog_without_rich()

import structlog  # noqa: E402
from structlog.typing import EventDict, Processor, WrappedLogger  # noqa: E402

from sgpipe.runtime.redact import redact_log_event, redact_text  # noqa: E402

Level = Literal["debug", "info", "warning", "error"]
Format = Literal["auto", "json", "console"]

LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# A field longer than this is cut: a ClickHouse error quoting a whole INSERT, or a repr of a
# large batch, must not turn into a multi-KB log line.
MAX_FIELD_CHARS = 1000
# Chatty at info (every group join, every connection); their warnings and errors still show.
_LIBRARY_LOGGERS = ("aiokafka", "aiohttp", "asyncio", "urllib3")

_json_output = False
_stream: TextIO = sys.stderr


def configure_logging(
    level: Level = "info", output: Format = "auto", *, stream: TextIO | None = None
) -> None:
    """Route every logger of the process to ``stream`` (default stderr) at ``level``.

    sgpipe's own events are rendered by structlog and written straight to the stream (the
    cheap path: the ingress logs a line per request); the standard library's records are
    rendered by the same processors through one handler on the root logger. May be called
    again (the CLI configures logging before it has read the settings, then with them).
    """
    global _json_output, _stream
    _stream = stream if stream is not None else cast(TextIO, _CurrentStderr())
    _json_output = renders_json(output, _stream)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Exceptions are rendered to data first, so that their text is redacted too; the console
    # renderer then prints the redacted traceback text as it is.
    renderer: list[Processor]
    if _json_output:
        renderer = [
            _only_with_exc_info(
                structlog.processors.ExceptionRenderer(
                    structlog.tracebacks.ExceptionDictTransformer(show_locals=False, max_frames=20)
                )
            ),
            redact_log_event,
            cap_field_lengths,
            _mirror,
            structlog.processors.JSONRenderer(),
        ]
    else:
        renderer = [
            _only_with_exc_info(structlog.processors.format_exc_info),
            redact_log_event,
            cap_field_lengths,
            _mirror,
            structlog.dev.ConsoleRenderer(
                colors=_stream.isatty(), exception_formatter=structlog.dev.plain_traceback
            ),
        ]
    handler = logging.StreamHandler(_stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS[level])
    library_level = LEVELS[level] if level == "debug" else max(LEVELS[level], logging.WARNING)
    for name in _LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(library_level)
    # clickhouse-connect logs a traceback for an insert it cannot serialize, then raises; the
    # stage classifies and reports that error itself, in one line.
    logging.getLogger("clickhouse_connect").setLevel(logging.CRITICAL)
    logging.captureWarnings(True)

    structlog.configure(
        processors=[*shared, *renderer],
        logger_factory=_NamedWriteLoggerFactory(_stream),
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        # Everything but the level filter is looked up at each call, so a logger cached before
        # the final configuration only keeps an outdated level: nothing logs before it.
        cache_logger_on_first_use=True,
    )


# Where a copy of every event goes besides the stream (`sgpipe up`: <data-dir>/logs/up.log).
_mirror_to: Callable[[dict[str, Any]], None] | None = None


def mirror_events(target: Callable[[dict[str, Any]], None] | None) -> None:
    """Also hand every event of this process, redacted and ready to render, to ``target``
    (None: stop). `sgpipe up` keeps its own lines in its data dir this way, as its children's."""
    global _mirror_to
    _mirror_to = target


def _mirror(logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    if _mirror_to is not None:
        # A copy that fails (a full disk) must not cost the log line itself.
        with contextlib.suppress(Exception):
            _mirror_to(dict(event_dict))
    return event_dict


class _NamedWriteLogger(structlog.WriteLogger):
    """structlog's WriteLogger (one write per line) that knows the name it was asked for, so
    that events carry ``logger`` like the standard library's records do."""

    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name


class _NamedWriteLoggerFactory:
    def __init__(self, file: TextIO) -> None:
        self._file = file

    def __call__(self, *args: Any) -> _NamedWriteLogger:
        return _NamedWriteLogger(self._file, str(args[0]) if args else "sgpipe")


def _only_with_exc_info(render: Processor) -> Processor:
    """Skip the exception renderer's bookkeeping on the (nearly all) lines without one."""

    def processor(logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
        if "exc_info" in event_dict:
            rendered: EventDict = render(logger, method, event_dict)  # type: ignore[assignment]
            return rendered
        return event_dict

    return processor


class _CurrentStderr(io.TextIOBase):
    """Whatever ``sys.stderr`` is at each write. structlog caches a logger with the stream it
    was configured with; a fixed ``sys.stderr`` object would outlive a replacement of it (a
    test's captured stream, closed afterwards: every later line then fails to write)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()

    def fileno(self) -> int:
        return sys.stderr.fileno()


def renders_json(output: Format, stream: TextIO | None = None) -> bool:
    if output != "auto":
        return output == "json"
    return not (stream if stream is not None else sys.stderr).isatty()


def cap_field_lengths(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    for key, value in event_dict.items():
        if key != "exception" and isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
            cut = len(value) - MAX_FIELD_CHARS
            event_dict[key] = f"{value[:MAX_FIELD_CHARS]}... ({cut} more characters)"
    return event_dict


def report_fatal(message: str, **fields: Any) -> None:
    """The one line a process prints when it cannot start (exit 2): ``sgpipe: <message>`` on a
    console, one JSON event in JSON mode (so that every line of the stream parses)."""
    if _json_output:
        structlog.get_logger("sgpipe").error(message, **fields)
    else:
        print(f"sgpipe: {redact_text(message)}", file=_stream, flush=True)
