"""`sgpipe up` refusing a data dir or a config file it must not use: one line naming the
problem (and the fix), exit 2 (configuration: fix me, don't restart me), nothing started.
In-process through the CLI entry point: the refusals come before any child exists."""

from __future__ import annotations

import contextlib
import io
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from sgpipe.cli import main
from sgpipe.runtime.logs import configure_logging

EXIT_CONFIG = 2


@pytest.fixture(autouse=True)
def _keep_umask() -> Iterator[None]:
    """`sgpipe up` sets the process's umask to 077 first thing; restore the test runner's."""
    before = os.umask(0o022)
    os.umask(before)
    yield
    os.umask(before)


def sgpipe(argv: list[str]) -> tuple[int, str]:
    """Run the CLI in-process; its exit code and what it wrote to stderr. Not capsys: the CLI
    points logging at the stderr it finds, and capsys closes its stream after the test, which
    would break every later log line in this process; logging goes back to the real stderr."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            code = main(argv)
    finally:
        configure_logging()
    return code, captured.getvalue()


@pytest.fixture
def busy_port() -> Iterator[int]:
    """The ingress port, taken: should a refusal ever go missing, `sgpipe up` stops at the
    port check (a different line, the test fails at once) instead of starting in-process."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


def up(tmp_path: Path, data_dir: Path, port: int, config: Path | None = None) -> list[str]:
    if config is None:
        config = tmp_path / "sgpipe.yaml"
        config.write_text(
            yaml.safe_dump({"embedded": {"kafka_port": 0, "clickhouse_http_port": 0}})
        )
    argv = ["up", "--config", str(config), "--data-dir", str(data_dir), "--port", str(port)]
    return [*argv, "--log-format", "console"]


def test_a_data_dir_others_can_enter_is_refused_with_the_chmod_hint(
    tmp_path: Path, busy_port: int
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)

    code, err = sgpipe(up(tmp_path, data_dir, busy_port))

    assert code == EXIT_CONFIG
    assert err == (
        f"sgpipe: data dir {data_dir} is accessible by other users (mode 755); "
        f"run `chmod 700 {data_dir}`\n"
    )
    assert sorted(data_dir.iterdir()) == []  # nothing created, nothing started


@pytest.mark.parametrize("mode", [0o750, 0o701, 0o710])
def test_any_group_or_other_bit_on_the_data_dir_is_refused(
    tmp_path: Path, mode: int, busy_port: int
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data_dir.chmod(mode)

    code, err = sgpipe(up(tmp_path, data_dir, busy_port))
    assert code == EXIT_CONFIG
    assert f"run `chmod 700 {data_dir}`" in err


def test_a_data_dir_that_is_a_file_is_one_line(tmp_path: Path, busy_port: int) -> None:
    data_dir = tmp_path / "data"
    data_dir.write_text("not a directory\n")

    code, err = sgpipe(up(tmp_path, data_dir, busy_port))

    assert code == EXIT_CONFIG
    assert err == (f"sgpipe: data dir {data_dir} is not a directory; pass --data-dir a directory\n")
    assert data_dir.read_text() == "not a directory\n"


def test_a_data_dir_under_a_file_is_one_line(tmp_path: Path, busy_port: int) -> None:
    (tmp_path / "file").write_text("x")
    data_dir = tmp_path / "file" / "data"

    code, err = sgpipe(up(tmp_path, data_dir, busy_port))
    assert code == EXIT_CONFIG
    assert err == (f"sgpipe: data dir {data_dir} is not a directory: a path on the way is a file\n")


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path: Path, busy_port: int) -> None:
    config = tmp_path / "sgpipe.yaml"
    # Latin-1 "café" in a comment: what an editor with the wrong encoding saves.
    config.write_bytes(b"# caf\xe9\nembedded: {kafka_port: 0}\n")

    code, err = sgpipe(up(tmp_path, tmp_path / "data", busy_port, config))

    assert code == EXIT_CONFIG
    assert err == (
        f"sgpipe: config file {config} is not UTF-8 text (invalid byte at offset 5); "
        "save it as UTF-8\n"
    )
    assert not (tmp_path / "data").exists()
