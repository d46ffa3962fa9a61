"""`sgpipe up` as a supervisor of separate processes, as a user runs it: real processes, the
embedded broker and ClickHouse, signed batches over HTTP.

What is proved here: the stages are separate processes (their PIDs, their parent); one scrape
of the ingress port covers every stage; a huge signed batch does not stall the ingress while
another process works on it; signed bodies of zeros are dead-lettered and stop nothing (issue
15); a killed child is restarted and nothing acknowledged is lost; a
child that exits 3 stops `sgpipe up` with its message; both stop reports with their numbers;
the stop deadline with the broker dead; ``--demo`` lands rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import http.server
import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from sgpipe.embedded.broker import EmbeddedBroker
from sgpipe.preflight import LOCK_FILE
from sgpipe.simulator import SimulationOptions, simulate
from sgpipe.up import forkserver
from tests import forked
from tests.integration.kafka_tools import FAST_GROUP_SETTINGS
from tests.integration.processes import metric
from tests.integration.test_up import (
    RunningPipeline,
    _wait_until_serving,
    start_pipeline,
    stop_pipeline,
)
from tests.ports import free_port
from tests.up_support import (
    WebhookKey,
    alive,
    command_line,
    events_body,
    get,
    log_events,
    parent_pid,
    post,
    read_state,
    tiny_events_body,
    wait_until,
    zeros_body,
)

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

REPOSITORY = Path(__file__).resolve().parents[2]
MEMORY = {"kafka_port": 0, "clickhouse_http_port": 0, "broker_storage": "memory"}
# The processor holds raw batches until the stop (60 s or 1000 records), so that a stop has
# something to write, or to leave behind, that the test knows exactly.
HOLD_RAW_BATCHES = {
    "batch_max_seconds": 60.0,
    "batch_max_records": 1000,
    "flush_when_idle": False,
    "dedup_window": 0,
}
# Three batches of 2, 3 and 5 events.
BATCH_SIZES = (2, 3, 5)


def up(tmp_path: Path, key: WebhookKey, **sections: Any) -> RunningPipeline:
    running = start_pipeline(tmp_path, webhooks=key.webhooks, **sections)
    try:
        _wait_until_serving(running)
    except BaseException:
        # Not serving in time (a loaded machine): the caller's `finally` never gets it, so
        # stop it here rather than leave a whole `sgpipe up` running after the test.
        stop_pipeline(running)
        raise
    return running


def scrape(running: RunningPipeline) -> str:
    status, text = get(f"{running.base_url}/metrics")
    assert status == 200
    return text


def post_batches(running: RunningPipeline, key: WebhookKey, prefix: str) -> None:
    for number, size in enumerate(BATCH_SIZES):
        body = events_body(f"{prefix}{number}", size)
        assert post(f"{running.base_url}/webhooks/main", body, key.headers(body)) == 200


def wait_for_metric(running: RunningPipeline, name: str, value: float, **labels: str) -> None:
    wait_until(
        lambda: metric(scrape(running), name, **labels) >= value,
        60,
        f"{name}{labels} to reach {value}",
    )


def reports(running: RunningPipeline, event: str) -> list[dict[str, Any]]:
    return [entry for entry in log_events(running.log) if entry.get("event") == event]


def process_name(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def open_files(pid: int) -> set[str]:
    """What the process's descriptors point to (paths, ``pipe:[...]``, ``socket:[...]``)."""
    found = set()
    for descriptor in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            found.add(os.readlink(descriptor))
    return found


def count_rows(running: RunningPipeline) -> int:
    return int(running.query("SELECT count() FROM email_events FINAL"))


# --- the process tree and the health of every stage -----------------------------------------


def test_stages_run_as_separate_processes_and_the_ingress_port_answers_for_all(
    tmp_path: Path,
) -> None:
    key = WebhookKey.generate()
    running = up(tmp_path, key, embedded=MEMORY, processor=HOLD_RAW_BATCHES)
    try:
        state = read_state(running.data_dir)
        supervisor = running.process.pid
        pids = {name: child["pid"] for name, child in state["children"].items()}
        assert set(pids) == {"ingest", "process", "sink", "clickhouse"}
        assert len({supervisor, state["broker"]["pid"], *pids.values()}) == 6
        # Each a fork of the fork server, a fork of the supervisor (sgpipe.up.forkserver),
        # named as `sgpipe up` names it, with only the descriptors it was given: stdin, its
        # output, its status pipe (and the data dir's lock for the embedded ClickHouse).
        (fork_server,) = {parent_pid(pid) for pid in pids.values()}
        assert parent_pid(fork_server) == supervisor
        assert process_name(fork_server) == forkserver.SERVER_NAME
        assert command_line(fork_server) == command_line(supervisor)
        lock = str((running.data_dir / LOCK_FILE).resolve())
        for name, pid in pids.items():
            assert process_name(pid) == name
            # The command line it would have had exec'd, for ps, pkill -f and leftovers.
            (shown, *_) = command_line(pid)
            run_dir = running.data_dir.resolve() / "run"
            assert f" -m sgpipe {COMMANDS[name]} --config {run_dir}/{name}.yaml" in shown, shown
            opened = open_files(pid)
            assert str(running.log.resolve()) not in opened, (name, opened)  # not our output
            assert (lock in opened) == (name == "clickhouse"), (name, opened)
        assert state["ingest_url"] == running.base_url
        assert stat.S_IMODE((running.data_dir / "run").stat().st_mode) == 0o700
        for config in (running.data_dir / "run").iterdir():
            assert stat.S_IMODE(config.stat().st_mode) == 0o600

        # One port answers for the whole pipeline: every stage's checks, every stage's series.
        status, body = get(f"{running.base_url}/readyz")
        assert status == 200, body
        checks = json.loads(body)["checks"]
        assert {name.split(".")[0] for name in checks} == {
            "ingest",
            "process",
            "sink",
            "dead_letters",
            "up",
        }
        text = scrape(running)
        stages = set(re.findall(r'stage="([a-z_]+)"', text))
        assert {"ingest", "process", "sink", "dead_letters", "up"} <= stages
        assert metric(text, "sgpipe_up_child_restarts_total", stage="up", child="process") == 0

        # The stop writes what the processor holds; its report counts it.
        post_batches(running, key, "tree")
        wait_for_metric(running, "sgpipe_records_consumed_total", 3, stage="process")
        assert count_rows(running) == 0
        running.process.send_signal(signal.SIGTERM)
        assert running.process.wait(timeout=120) == 0, running.log.read_text()
    finally:
        stop_pipeline(running)
    assert not [name for name, pid in pids.items() if alive(pid)]
    assert not alive(fork_server)
    (report,) = reports(running, "stopped in order")
    assert report["drained"] == {
        "ingest_batches": 0,
        "processor_batches": 3,
        "processor_events": 10,
        "sink_events": 10,
    }
    assert report["left"] == {"raw_batches": 0, "raw_events": 0, "events": 0, "exact": True}
    assert report["report"] == (
        "stopped: during the stop the processor wrote 3 raw batches as 10 events and the sink "
        "wrote 10 events to ClickHouse; nothing acknowledged is left unwritten"
    )
    assert count_rows(running) == 10
    assert not (running.data_dir / "run").exists()  # the children's configs held credentials
    # In order: the ingress, then the processor drains, and only then the sink is told to stop
    # (in-memory broker: the sink must see everything the processor writes while it drains).
    order = [
        (entry["event"], entry.get("child") or entry.get("stage"))
        for entry in log_events(running.log)
        if entry["event"] in ("stopping child", "stop report")
    ]
    assert order == [
        ("stopping child", "ingest"),
        ("stop report", "ingest"),
        ("stopping child", "process"),
        ("stop report", "process"),
        ("stopping child", "sink"),
        ("stop report", "sink"),
        ("stopping child", "clickhouse"),
    ]


# --- a second signal -------------------------------------------------------------------------


@pytest.mark.parametrize("storage", ["durable", "memory"])
def test_a_second_signal_stops_at_once_and_says_what_is_left_where(
    tmp_path: Path, storage: str
) -> None:
    key = WebhookKey.generate()
    embedded = {**MEMORY, "broker_storage": storage}
    running = up(tmp_path, key, embedded=embedded, processor=HOLD_RAW_BATCHES)
    try:
        post_batches(running, key, "now")
        wait_for_metric(running, "sgpipe_records_consumed_total", 3, stage="process")
        # Two distinct signals at once: the second means "now" (two SIGTERMs could merge).
        running.process.send_signal(signal.SIGTERM)
        running.process.send_signal(signal.SIGINT)
        assert running.process.wait(timeout=60) == 1, running.log.read_text()
    finally:
        stop_pipeline(running)
    (report,) = reports(running, "stopped at once")
    assert report["left"] == {"raw_batches": 3, "raw_events": 10, "events": 0, "exact": True}
    left = "3 acknowledged raw batches (10 events) not yet processed and 0 events not yet written"
    if storage == "memory":
        assert report["report"] == (
            f"stopped at once: {left} to ClickHouse were in the in-memory broker and are lost"
        )
        return
    assert report["report"] == (
        f"stopped at once: {left} to ClickHouse are in the embedded broker at "
        f"{running.data_dir / 'broker'} and will be processed at the next `sgpipe up`"
    )
    # ... and so they are.
    again = up(tmp_path, key, embedded=embedded)
    try:
        again.wait_for("SELECT count() FROM email_events FINAL", "10\n")
    finally:
        stop_pipeline(again)


# --- supervision -----------------------------------------------------------------------------


class RefusingRegistry:
    """A schema registry that answers every request 401: credentials refused, which no restart
    fixes (the environment, not a record: exit 3)."""

    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def _refuse(self) -> None:
                body = b'{"error_code": 40101, "message": "Unauthorized"}'
                self.send_response(401)
                self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _refuse

            def log_message(self, *args: Any) -> None:
                return None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> RefusingRegistry:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_child_that_exits_3_stops_up_with_its_message(tmp_path: Path) -> None:
    key = WebhookKey.generate()
    with RefusingRegistry() as registry:
        running = start_pipeline(
            tmp_path,
            webhooks=key.webhooks,
            embedded=MEMORY,
            kafka={"events_format": "confluent"},
            schema_registry={"url": registry.url},
        )
        try:
            assert running.process.wait(timeout=120) == 3, running.log.read_text()
        finally:
            stop_pipeline(running)
    events = log_events(running.log)
    last = events[-1]
    assert last["event"] == "sgpipe up stopped: a stage failed"
    # The processor and the sink both read the registry at start; whichever failed first.
    assert last["stage"] in ("process", "sink") and last["exit_code"] == 3
    assert last["error"].startswith(f"{last['stage']}: {last['stage']}: reading the schema ")
    assert "401" in last["error"]
    assert not [e for e in events if e["event"] == "child process exited; restarting it"]
    # Every child was stopped: no process left that runs on this data directory.
    assert processes_using(running.data_dir) == []


def processes_using(data_dir: Path) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if str(data_dir) in command and alive(int(entry.name)):
                found.append(command)
    return found


def test_a_killed_processor_is_restarted_and_no_acknowledged_event_is_lost(
    tmp_path: Path,
) -> None:
    """And then the fork server killed: every child it forked dies with it, and each is
    restarted as a new process (``python -m sgpipe <command>``, a child of the supervisor)."""
    key = WebhookKey.generate()
    running = up(tmp_path, key)  # the durable broker: what it acknowledged survives anything
    events = 600
    try:
        first = read_state(running.data_dir)["children"]["process"]["pid"]

        def kill_processor_midway() -> None:
            time.sleep(1.0)
            os.kill(first, signal.SIGKILL)

        killer = threading.Thread(target=kill_processor_midway)
        killer.start()
        summary = asyncio.run(simulate(simulation(running, key, events, seed=7)))
        killer.join()
        assert summary.events_accepted == events, summary
        wait_until(
            lambda: read_state(running.data_dir)["children"]["process"]["pid"] not in (None, first),
            60,
            "the processor's restart",
        )
        running.wait_for(
            "SELECT count(), uniqExact(sg_event_id) FROM email_events FINAL",
            f"{events}\t{events}\n",
            timeout=120,
        )
        assert metric(scrape(running), "sgpipe_up_child_restarts_total", child="process") == 1

        forked = {
            name: child["pid"] for name, child in read_state(running.data_dir)["children"].items()
        }
        (fork_server,) = {parent_pid(pid) for pid in forked.values()}
        os.kill(fork_server, signal.SIGKILL)

        def all_exec_d() -> bool:
            now = {
                name: child["pid"]
                for name, child in read_state(running.data_dir)["children"].items()
            }
            return all(
                now[name] not in (None, pid)
                and alive(now[name])
                and parent_pid(now[name]) == running.process.pid
                for name, pid in forked.items()
            )

        wait_until(all_exec_d, 120, "every child restarted as a new process")
        for name, child in read_state(running.data_dir)["children"].items():
            assert command_line(child["pid"])[2:4] == ["sgpipe", COMMANDS[name]], name
        _wait_until_serving(running)
        wait_until(lambda: get(f"{running.base_url}/readyz")[0] == 200, 120, "every stage ready")
        more = asyncio.run(simulate(simulation(running, key, 200, seed=8)))
        assert more.events_accepted == 200, more
        total = events + 200
        running.wait_for(
            "SELECT count(), uniqExact(sg_event_id) FROM email_events FINAL",
            f"{total}\t{total}\n",
            timeout=120,
        )
    finally:
        stop_pipeline(running)
    restarts = [
        (entry["child"], entry["exit_status"], entry["restart"])
        for entry in log_events(running.log)
        if entry["event"] == "child process exited; restarting it"
    ]
    assert restarts[0] == ("process", -9, 1)
    after_the_server = {child: (status, restart) for child, status, restart in restarts[1:]}
    assert after_the_server == {
        "ingest": (-9, 1),
        "process": (-9, 2),
        "sink": (-9, 1),
        "clickhouse": (-9, 1),
    }
    lost = [e for e in log_events(running.log) if e["event"].startswith("the fork server is gone")]
    assert len(lost) == 1


COMMANDS = {
    "ingest": "ingest",
    "process": "process",
    "sink": "sink",
    "clickhouse": "serve-clickhouse",
}


def simulation(
    running: RunningPipeline, key: WebhookKey, events: int, seed: int
) -> SimulationOptions:
    return SimulationOptions(
        url=f"{running.base_url}/webhooks/main",
        private_key=key.private_key,
        events=events,
        rate=200.0,
        flush_interval_seconds=0.1,
        seed=seed,
    )


# --- isolation -------------------------------------------------------------------------------


def failing_checks(body: bytes) -> str:
    """The checks a /readyz answer names as failing, else the start of the body."""
    try:
        checks = json.loads(body)["checks"]
    except (ValueError, KeyError, TypeError):
        return repr(body[:300])
    return "; ".join(
        f"{name}: {check['detail']}" for name, check in checks.items() if not check["ok"]
    )


class HealthProbe:
    """GET ``path`` (/healthz) in a loop from a thread, over one keep-alive connection; every
    answer but a 200 is a failure."""

    def __init__(self, port: int, timeout: float, path: str = "/healthz") -> None:
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._port = port
        self._timeout = timeout
        self._path = path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self._port, timeout=self._timeout)
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                connection.request("GET", self._path)
                response = connection.getresponse()
                body = response.read()
                if response.status != 200:
                    self.failures.append(f"status {response.status}: {failing_checks(body)}")
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(repr(exc))
                connection.close()
            self.latencies.append(time.monotonic() - started)
            time.sleep(0.02 if self._path == "/healthz" else 0.5)
        connection.close()


def test_huge_and_hostile_signed_batches_neither_stall_the_ingress_nor_stop_anything(
    tmp_path: Path,
) -> None:
    """One `sgpipe up` (starting it is the expensive part) for two promises.

    The ingress is not stalled by huge batches: the worst latency is measured by
    bench/up_isolation.py; here every /healthz must be answered (within a timeout generous for
    a loaded machine, far below the foundation's stall of a minute) while other processes work.

    Record content never stops the pipeline (issue 15): the signed bodies of 101 zeros and of
    2,000,000 zeros are raw batches whose every element is a dead letter. The dead-letter limit,
    at its defaults, counts each once (a source record), so neither pauses the processor, let
    alone stops `sgpipe up`: the valid batches are stored, the zeros are in dead_letters (the 101
    one letter per element, the 2,000,000 as one letter of the whole record), and /readyz stays
    200 throughout. Mutation caught: counting the limit per element (the processor pauses on the
    101 zeros; /readyz answers 503 and the later batches never land)."""
    key = WebhookKey.generate()
    running = up(tmp_path, key, embedded=MEMORY)
    url = f"{running.base_url}/webhooks/main"
    port = int(running.base_url.rsplit(":", 1)[1])
    tiny, tiny_events = tiny_events_body("huge", 4_000_000)
    zeros_101, zeros = zeros_body(101), zeros_body()
    try:
        with HealthProbe(port, timeout=5.0) as probe:
            assert post(url, tiny, key.headers(tiny)) == 200
            running.wait_for(
                "SELECT count() FROM email_events FINAL", f"{tiny_events}\n", timeout=180
            )
            with HealthProbe(port, 10.0, "/readyz") as ready:
                assert post(url, zeros_101, key.headers(zeros_101)) == 200
                assert post(url, zeros, key.headers(zeros)) == 200
                # While the processor works on the 2,000,000 elements, a small batch is still
                # acknowledged at once.
                wait_for_metric(running, "sgpipe_records_consumed_total", 3, stage="process")
                small = events_body("during", 2)
                assert post(url, small, key.headers(small), timeout=10) == 200
                running.wait_for(
                    "SELECT count() FROM email_events FINAL", f"{tiny_events + 2}\n", timeout=300
                )
                running.wait_for(
                    "SELECT reason, count(), sum(length(payload)), min(event_index) "
                    "FROM dead_letters FINAL GROUP BY reason ORDER BY reason",
                    f"not_an_object\t101\t101\t0\ntoo_many_invalid_elements\t1\t{len(zeros)}\t-1\n",
                    timeout=300,
                )
        assert probe.failures == [] and ready.failures == []
        assert len(probe.latencies) > 50 and len(ready.latencies) > 5
        assert running.process.poll() is None
        status, body = get(f"{running.base_url}/readyz")
        assert status == 200, body
        text = scrape(running)
        assert metric(text, "sgpipe_dead_letter_limit_tripped", stage="process") == 0
        assert metric(text, "sgpipe_up_child_restarts_total", stage="up", child="process") == 0
        running.process.send_signal(signal.SIGTERM)
        running.process.send_signal(signal.SIGINT)
        assert running.process.wait(timeout=60) == 1, running.log.read_text()
    finally:
        stop_pipeline(running)


def test_past_the_dead_letter_limit_the_processor_pauses_and_the_ingress_keeps_acknowledging(
    tmp_path: Path,
) -> None:
    """A bad deploy, simulated by a strict limit: the processor pauses (not ready, the batch
    held) instead of exiting into a restart loop, and nothing else stops: the ingress keeps
    acknowledging into the durable broker. The documented way out -- fix the cause (here:
    switch the ratio off, the data really is bad) and restart -- dead-letters the held batch
    and writes what queued behind it."""
    key = WebhookKey.generate()
    strict = {"dead_letters": {"min_records": 1, "window_records": 10, "max_ratio": 0.5}}
    running = up(tmp_path, key, processor=strict)  # the durable broker
    url = f"{running.base_url}/webhooks/main"
    zeros = zeros_body(3)
    try:
        # With the durable broker the ingress serves before the stages are ready.
        wait_until(lambda: get(f"{running.base_url}/readyz")[0] == 200, 90, "every stage ready")
        assert post(url, zeros, key.headers(zeros)) == 200
        wait_for_metric(running, "sgpipe_dead_letter_limit_tripped", 1, stage="process")
        held = events_body("held", 2)
        assert post(url, held, key.headers(held)) == 200  # acknowledged while paused
        status, body = get(f"{running.base_url}/readyz")
        assert status == 503
        failing = json.loads(body)["checks"]
        failing = {name: check["detail"] for name, check in failing.items() if not check["ok"]}
        assert list(failing) == ["process.dead_letter_limit"], failing
        assert failing["process.dead_letter_limit"].startswith(
            "process: 1 of the last 1 source records had dead letters, over "
            "dead_letters.max_ratio (0.5); paused"
        )
        assert running.process.poll() is None
        text = scrape(running)
        assert metric(text, "sgpipe_up_child_restarts_total", stage="up", child="process") == 0
        assert metric(text, "sgpipe_dead_letters_total", stage="process") == 0
        running.process.send_signal(signal.SIGTERM)
        assert running.process.wait(timeout=120) == 0, running.log.read_text()
    finally:
        stop_pipeline(running)

    resumed = up(tmp_path, key, processor={"dead_letters": {"max_ratio": 1.0}})
    try:
        resumed.wait_for(
            "SELECT reason, count() FROM dead_letters FINAL GROUP BY reason", "not_an_object\t3\n"
        )
        resumed.wait_for("SELECT count() FROM email_events FINAL", "2\n")
        status, body = get(f"{resumed.base_url}/readyz")
        assert status == 200, body
    finally:
        stop_pipeline(resumed)


# --- stopping with the broker dead -----------------------------------------------------------


def test_the_stop_deadline_holds_with_the_broker_dead(tmp_path: Path) -> None:
    """The foundation's first SIGTERM hung for over 4 minutes with a dead broker. Every child
    now has a deadline (its stop timeout, its clients' close timeouts), then SIGKILL."""
    key = WebhookKey.generate()
    broker = EmbeddedBroker()
    servers = asyncio.run(broker.start())
    short = {"stop_timeout_seconds": 2.0}
    running = up(
        tmp_path,
        key,
        kafka={"bootstrap_servers": servers, "request_timeout_ms": 3000},
        processor=short,
        sink={**short, "batch_max_seconds": 0.2},
        ingest={"publish_timeout_seconds": 2.0},
    )
    try:
        post_batches(running, key, "dead")
        running.wait_for("SELECT count() FROM email_events FINAL", "10\n")
        broker.kill()
        asyncio.run(broker.wait_exited())
        body = events_body("refused", 1)
        assert post(f"{running.base_url}/webhooks/main", body, key.headers(body)) == 503
        started = time.monotonic()
        running.process.send_signal(signal.SIGTERM)
        # Generous: the deadlines add up to about a minute here (ingress 17 s, stages 37 s
        # each, in parallel); the foundation took over 4.
        code = running.process.wait(timeout=150)
        elapsed = time.monotonic() - started
    finally:
        stop_pipeline(running)
        asyncio.run(broker.stop())
    assert code == 0, running.log.read_text()
    (report,) = reports(running, "stopped in order")
    assert report["left"] is None
    assert report["report"].startswith("stopped: during the stop the processor wrote 0 raw")
    assert "what is left unwritten could not be counted (" in report["report"]
    assert report["report"].endswith(
        f"it stays in Kafka at {servers} and will be processed when the processor and the "
        "sink run again"
    )
    print(f"stop with the broker dead took {elapsed:.1f} s")


def test_the_stop_deadline_holds_with_the_embedded_broker_frozen(tmp_path: Path) -> None:
    """Worse than dead: a broker that keeps its connections open and never answers (SIGSTOP),
    so that every request waits for its timeout -- and the embedded broker's own supervisor
    sees a running process, so nothing restarts it."""
    key = WebhookKey.generate()
    short = {"stop_timeout_seconds": 2.0}
    running = up(
        tmp_path,
        key,
        kafka={"request_timeout_ms": 3000},
        processor=short,
        sink={**short, "batch_max_seconds": 0.2},
        ingest={"publish_timeout_seconds": 2.0},
    )
    tansu = read_state(running.data_dir)["broker"]["pid"]
    try:
        post_batches(running, key, "frozen")
        running.wait_for("SELECT count() FROM email_events FINAL", "10\n")
        os.kill(tansu, signal.SIGSTOP)
        body = events_body("refused", 1)
        assert post(f"{running.base_url}/webhooks/main", body, key.headers(body)) == 503
        started = time.monotonic()
        running.process.send_signal(signal.SIGTERM)
        # Generous: the deadlines add up to about 80 s here (ingress 17 s, then the stages
        # 37 s in parallel, the count 5 s, tansu's SIGTERM 10 s); the foundation took over 4.
        code = running.process.wait(timeout=150)
        elapsed = time.monotonic() - started
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(tansu, signal.SIGCONT)
        stop_pipeline(running)
    assert code == 0, running.log.read_text()
    assert not alive(tansu)
    (report,) = reports(running, "stopped in order")
    assert report["left"] is None
    assert "what is left unwritten could not be counted (" in report["report"]
    assert report["report"].endswith(
        f"it stays in the embedded broker at {running.data_dir / 'broker'} and will be "
        "processed at the next `sgpipe up`"
    )
    print(f"stop with the embedded broker frozen took {elapsed:.1f} s")


# --- the demo --------------------------------------------------------------------------------


def readme_demo_command() -> list[str]:
    readme = (REPOSITORY / "README.md").read_text(encoding="utf-8")
    setup = readme.split("## Set-up", 1)[1]
    blocks = re.findall(r"```sh\n(.*?)```", setup, flags=re.S)
    # Right after the two set-up commands.
    assert "make up" in blocks[0] and "make test" in blocks[0]
    assert "--demo" in blocks[1], blocks[1]
    (line,) = [line for line in blocks[1].splitlines() if "--demo" in line]
    return shlex.split(line)


def test_demo_lands_rows_and_prints_the_query(tmp_path: Path) -> None:
    command = readme_demo_command()
    assert command[:3] == [".venv/bin/sgpipe", "up", "--demo"]
    assert (REPOSITORY / command[command.index("--config") + 1]).is_file()
    # The README's flags, with a config of free ports and the in-memory broker.
    config = tmp_path / "sgpipe.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "ingest": {"port": free_port()},
                "embedded": MEMORY,
                "kafka": dict(FAST_GROUP_SETTINGS),
                "sink": {"batch_max_seconds": 0.5},
                "logging": {"format": "json"},
            }
        )
    )
    data_dir = tmp_path / "demo-data"
    log = tmp_path / "demo.log"
    args = [*command[1:]]
    args[args.index("--data-dir") + 1] = str(data_dir)
    args[args.index("--config") + 1] = str(config)
    with log.open("wb") as output:
        process = forked.Popen(
            [sys.executable, "-m", "sgpipe", *args],
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=REPOSITORY,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    demo = RunningPipeline(process, "", data_dir, config, log)
    try:
        wait_until(
            lambda: (
                [e for e in log_events(log) if e["event"] == "demo running"]
                or process.poll() is not None
            ),
            90,
            "the demo",
        )
        (announced,) = [e for e in log_events(log) if e["event"] == "demo running"]
        printed = shlex.split(announced["query_command"])
        assert printed[1:] == [
            "query",
            "--config",
            str(config),
            "--data-dir",
            str(data_dir),
            "SELECT event, count() AS events FROM email_events FINAL GROUP BY event "
            "ORDER BY events DESC",
        ]
        # The printed query, run as printed: rows arrive within seconds.
        wait_until(lambda: "processed" in demo.query(printed[-1]), 60, "demo rows")
        key_file = data_dir / "demo-key.pem"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0, log.read_text()
    finally:
        stop_pipeline(demo)
    assert not list(REPOSITORY.glob("*.pem"))
