"""structlog, configured once in the entrypoint.

JSON lines (with structured tracebacks) when stderr is not a terminal, coloured console output
when it is. Context such as ``request_id`` or ``topic``/``partition`` is bound with
``structlog.contextvars`` by the component that knows it.

Every event and every standard-library record passes ``sgpipe.runtime.redact`` last, after
exceptions are rendered, so a URL with a password never reaches the output.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

from sgpipe.runtime.redact import RedactingFilter, redact_log_event

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS["error"] = logging.ERROR


def configure_logging(
    level: Literal["debug", "info", "warning", "error"] = "info",
    output: Literal["auto", "json", "console"] = "auto",
) -> None:
    as_json = output == "json" or (output == "auto" and not sys.stderr.isatty())
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Exceptions are rendered to data before the redaction, so their text is redacted too.
    renderer: list[structlog.typing.Processor] = (
        [
            structlog.processors.dict_tracebacks,
            redact_log_event,
            structlog.processors.JSONRenderer(),
        ]
        if as_json
        else [
            structlog.processors.format_exc_info,
            redact_log_event,
            structlog.dev.ConsoleRenderer(),
        ]
    )
    structlog.configure(
        processors=[*shared, *renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries (aiokafka, aiohttp) log through the standard library: keep their warnings.
    logging.basicConfig(stream=sys.stderr, level=max(_LEVELS[level], logging.WARNING))
    for handler in logging.getLogger().handlers:
        if not any(isinstance(existing, RedactingFilter) for existing in handler.filters):
            handler.addFilter(RedactingFilter())
    # clickhouse-connect logs a traceback for an insert it cannot serialize, then raises; the
    # stage classifies and reports that error itself, in one line.
    logging.getLogger("clickhouse_connect").setLevel(logging.CRITICAL)
