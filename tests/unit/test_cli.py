"""The command line a user meets: help for every command and flag, --version, flags that
become settings."""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata

import pytest

from sgpipe.cli import LOG_LEVELS, build_parser, main
from sgpipe.runtime.logs import LEVELS

COMMANDS = ["up", "ingest", "process", "sink", "query"]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_the_planned_command_names_exist() -> None:
    assert set(COMMANDS) <= set(subcommands(build_parser()))


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_and_flag_has_help_for_users(name: str) -> None:
    command = subcommands(build_parser())[name]
    assert command.description and len(command.description) > 40
    for action in command._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.dest
        assert "``" not in action.help  # a docstring leaking into --help


@pytest.mark.parametrize("name", COMMANDS)
def test_help_prints(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([name, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: sgpipe {name}" in text
    assert "--log-format {json,console}" in text


def test_top_level_help_lists_commands_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for name in COMMANDS:
        assert f"    {name} " in text
    assert "2  configuration or usage error" in text


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"sgpipe {metadata.version('sgpipe')}\n"


def test_flags_parse_into_the_names_the_settings_use() -> None:
    args = build_parser().parse_args(
        ["up", "--port", "9000", "--log-level", "debug", "--log-format", "json", "--data-dir", "d"]
    )
    assert (args.port, args.log_level, args.log_format, str(args.data_dir)) == (
        9000,
        "debug",
        "json",
        "d",
    )
    query = build_parser().parse_args(["query", "--format", "JSONEachRow", "SELECT 1"])
    assert (query.format, query.sql) == ("JSONEachRow", "SELECT 1")


# --- a CLI that starts at once (issue 21; bench/cli_start.py measures it) -------------------

# What a command imports when it runs, never when the parser is built: each costs tenths of a
# second to import (pydantic for the settings, structlog, aiokafka, chdb, the HTTP stacks).
HEAVY_MODULES = (
    "aiohttp",
    "aiokafka",
    "asyncio",
    "chdb",
    "clickhouse_connect",
    "fastavro",
    "pydantic",
    "pydantic_settings",
    "structlog",
)


def modules_loaded_by(code: str) -> list[str]:
    """Which of HEAVY_MODULES a fresh interpreter has loaded after running ``code``."""
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY_MODULES!r} if m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    return done.stdout.split()


def test_importing_the_cli_and_building_its_parser_imports_no_heavy_module() -> None:
    assert modules_loaded_by("from sgpipe.cli import build_parser\nbuild_parser()") == []


def test_printing_the_version_imports_no_heavy_module() -> None:
    code = (
        "import contextlib, io\nfrom sgpipe.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "    main(['--version'])\n"
        "assert out.getvalue().startswith('sgpipe '), out.getvalue()"
    )
    assert modules_loaded_by(code) == []


def test_the_parser_offers_exactly_the_log_levels_logging_knows() -> None:
    assert list(LOG_LEVELS) == list(LEVELS)
