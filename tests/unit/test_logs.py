"""One log stream: structlog events and the standard library's loggers (aiokafka, aiohttp)
come out of one handler, as JSON lines or console lines, short and without frame locals."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from sgpipe.runtime.logs import (
    MAX_FIELD_CHARS,
    configure_logging,
    report_fatal,
)


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """A stream to log into; the process's logging is restored afterwards (pytest's own
    capture handlers included)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    library_levels = {name: logging.getLogger(name).level for name in ("aiokafka", "aiohttp")}
    try:
        yield io.StringIO()
    finally:
        logging.captureWarnings(False)
        structlog.reset_defaults()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
        for name, library_level in library_levels.items():
            logging.getLogger(name).setLevel(library_level)


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_structlog_and_library_loggers_share_one_json_stream(stream: io.StringIO) -> None:
    configure_logging("info", "json", stream=stream)

    structlog.get_logger("sgpipe.test").info("accepted raw batch", webhook="main", bytes=12)
    logging.getLogger("aiokafka.conn").error('Unable connect to "kafka:9092"')
    try:
        raise ConnectionResetError("peer went away")
    except ConnectionResetError:
        logging.getLogger("aiohttp.server").error("Error handling request", exc_info=True)

    ours, kafka, server = json_lines(stream)
    assert ours["event"] == "accepted raw batch"
    assert (ours["level"], ours["logger"], ours["webhook"], ours["bytes"]) == (
        "info",
        "sgpipe.test",
        "main",
        12,
    )
    assert ours["timestamp"].endswith("Z")
    assert (kafka["event"], kafka["level"], kafka["logger"]) == (
        'Unable connect to "kafka:9092"',
        "error",
        "aiokafka.conn",
    )
    assert server["exception"][0]["exc_type"] == "ConnectionResetError"


def test_levels_filter_ours_and_keep_chatty_libraries_at_warning(stream: io.StringIO) -> None:
    configure_logging("info", "json", stream=stream)
    structlog.get_logger("sgpipe.test").debug("hidden")
    logging.getLogger("aiokafka.consumer").info("Joined group")  # chatty: hidden at info
    logging.getLogger("aiokafka.consumer").warning("Heartbeat failed")
    assert [line["event"] for line in json_lines(stream)] == ["Heartbeat failed"]


def test_debug_shows_everything(stream: io.StringIO) -> None:
    configure_logging("debug", "json", stream=stream)
    structlog.get_logger("sgpipe.test").debug("shown")
    logging.getLogger("aiokafka.consumer").info("Joined group")
    assert [line["event"] for line in json_lines(stream)] == ["shown", "Joined group"]


def test_long_fields_are_cut(stream: io.StringIO) -> None:
    configure_logging("info", "json", stream=stream)
    structlog.get_logger("sgpipe.test").warning("insert failed", error="x" * 5000)
    (line,) = stream.getvalue().splitlines()
    error = json.loads(line)["error"]
    assert error == "x" * MAX_FIELD_CHARS + "... (4000 more characters)"
    assert len(line) < MAX_FIELD_CHARS + 300


def test_tracebacks_carry_no_frame_locals(stream: io.StringIO) -> None:
    configure_logging("debug", "json", stream=stream)
    password = "hunter2-not-in-logs"
    try:
        raise ValueError("bad")
    except ValueError:
        structlog.get_logger("sgpipe.test").error("failed", exc_info=True)
    assert password not in stream.getvalue()
    (line,) = json_lines(stream)
    assert line["exception"][0]["frames"]


def test_console_lines_are_readable_and_plain(stream: io.StringIO) -> None:
    configure_logging("info", "console", stream=stream)
    structlog.get_logger("sgpipe.test").info("ingress listening", port=8080)
    logging.getLogger("aiohttp.server").warning("something odd")
    first, second = stream.getvalue().splitlines()
    assert "ingress listening" in first
    assert "port=8080" in first
    assert "\x1b[" not in first  # not a terminal: no colours
    assert "something odd" in second
    assert "[aiohttp.server]" in second


def test_a_fatal_start_failure_is_one_plain_line_on_a_console(stream: io.StringIO) -> None:
    configure_logging("info", "console", stream=stream)
    report_fatal("embedded.kafka_port 9092 is in use", exit_code=2)
    assert stream.getvalue() == "sgpipe: embedded.kafka_port 9092 is in use\n"


def test_a_fatal_start_failure_is_one_json_event_in_json_mode(stream: io.StringIO) -> None:
    configure_logging("info", "json", stream=stream)
    report_fatal("embedded.kafka_port 9092 is in use", exit_code=2)
    (line,) = json_lines(stream)
    assert (line["event"], line["level"], line["exit_code"]) == (
        "embedded.kafka_port 9092 is in use",
        "error",
        2,
    )


def test_auto_is_json_when_the_stream_is_not_a_terminal(stream: io.StringIO) -> None:
    configure_logging("info", "auto", stream=stream)
    structlog.get_logger("sgpipe.test").info("hello")
    assert json_lines(stream)[0]["event"] == "hello"
