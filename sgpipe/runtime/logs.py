"""One log stream per process: structlog, configured once in the entrypoint.

Everything goes through one handler on stderr: sgpipe's own structlog events and the standard
library loggers of aiokafka, aiohttp, asyncio, clickhouse-connect and Python's warnings, routed
in through ``structlog.stdlib.ProcessorFormatter``. Output is JSON lines when stderr is not a
terminal (or ``logging.format: json``) and readable console lines when it is.

Lines stay short: string fields are capped at ``MAX_FIELD_CHARS``, tracebacks never carry frame
locals, and expected failures are logged as one event with a short ``error`` field (a traceback
only at ``debug``). Context such as ``request_id`` or ``topic``/``partition`` is bound with
``structlog.contextvars`` by the component that knows it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

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
_LIBRARY_LOGGERS = ("aiokafka", "aiohttp", "asyncio", "clickhouse_connect", "urllib3")

_json_output = False
_stream: TextIO = sys.stderr


def configure_logging(
    level: Level = "info", output: Format = "auto", *, stream: TextIO | None = None
) -> None:
    """Route every logger of the process to ``stream`` (default stderr) at ``level``.

    May be called again (the CLI configures logging before it has read the settings, then
    again with them); each call replaces the previous configuration.
    """
    global _json_output, _stream
    _stream = stream if stream is not None else sys.stderr
    _json_output = renders_json(output, _stream)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: list[Processor]
    if _json_output:
        renderer = [
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False, max_frames=20)
            ),
            cap_field_lengths,
            structlog.processors.JSONRenderer(),
        ]
    else:
        renderer = [
            cap_field_lengths,
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
    logging.captureWarnings(True)

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        # Rendering happens in the handler, replaced by every call; a cached logger keeps only
        # its level, so nothing may log through a module's logger before the final call.
        cache_logger_on_first_use=True,
    )


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


def short_error(exc: BaseException) -> str:
    """``Type: message`` on one line, for an ``error`` field: what an operator needs to know
    about an expected failure, without a traceback."""
    text = " ".join(str(exc).split())
    name = type(exc).__name__
    if not text or text == name:
        return name
    # Some libraries (aiokafka) already start their messages with the class name.
    return text if text.startswith(f"{name}:") else f"{name}: {text}"


def report_fatal(message: str, **fields: Any) -> None:
    """The one line a process prints when it cannot start (exit 2): ``sgpipe: <message>`` on a
    console, one JSON event in JSON mode (so that every line of the stream parses)."""
    if _json_output:
        structlog.get_logger("sgpipe").error(message, **fields)
    else:
        print(f"sgpipe: {message}", file=_stream, flush=True)
